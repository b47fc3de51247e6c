/* vmc_error.c -- the thread-local message behind every failing status. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vmc.h"
#include "vmc_error.h"

static __thread char message[512];
static __thread int message_errno;

/* vmc_last_error -- the message of the last failure on this thread. */
const char *vmc_last_error(void)
{
    return message;
}

/* vmc_last_errno -- errno behind the last VMC_E_OS on this thread. */
int vmc_last_errno(void)
{
    return message_errno;
}

int vmc_fail(int code, const char *fmt, ...)
{
    va_list ap;
    message_errno = code == VMC_E_OS ? errno : 0;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return code;
}

int vmc_fail_errno(const char *what, const char *path)
{
    int err = errno;
    int rc = vmc_fail(VMC_E_OS, "%s(%s) failed: %s (errno %d)", what, path ? path : "",
                      strerror(err), err);
    message_errno = err;
    return rc;
}

void vmc_assert_failed(const char *file, int line, const char *cond, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s:%d: assertion failed: %s: ", file, line, cond);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}
