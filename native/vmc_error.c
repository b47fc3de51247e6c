/* vmc_error.c -- the thread-local message behind every failing status. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vmc_internal.h"

static __thread char message[512];
static __thread int message_errno;

/* vmc_last_error -- the message of the last failure on this thread. */
const char *vmc_last_error(void)
{
    return message;
}

int vmc_last_errno(void)
{
    return message_errno;
}

/* vmc_fail -- record a message and return code, for `return vmc_fail(...)`. */
int vmc_fail(int code, const char *fmt, ...)
{
    va_list ap;
    message_errno = code == VMC_E_OS ? errno : 0;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return code;
}

/* vmc_fail_errno -- VMC_E_OS naming the call, the path and errno. */
int vmc_fail_errno(const char *what, const char *path)
{
    int err = errno;
    int rc = vmc_fail(VMC_E_OS, "%s(%s) failed: %s (errno %d)", what, path ? path : "",
                    strerror(err), err);
    message_errno = err;
    return rc;
}
