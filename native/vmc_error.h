/* vmc_error.h -- failure messages and debug-build assertions.
 *
 * Every failure is a negative status plus a thread-local message (vmc.h);
 * vmc_fail() records the message and returns the status, so a failing path
 * reads `return vmc_fail(VMC_E_..., "...", ...)`.
 *
 * VMC_ASSERT(cond, fmt, ...) checks an invariant of the code (never of the
 * file's bytes: those may be damaged and are checked by the code itself) and,
 * in a build with -DVMC_DEBUG, prints the failed condition with the values in
 * `fmt` and aborts. In a normal build it compiles to nothing.
 */
#ifndef VMC_ERROR_H
#define VMC_ERROR_H

/* vmc_fail -- record a message for this thread and return `code`. */
int vmc_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* vmc_fail_errno -- VMC_E_OS naming the call, the path and errno. */
int vmc_fail_errno(const char *what, const char *path);
/* vmc_assert_failed -- print a failed assertion with its values and abort. */
void vmc_assert_failed(const char *file, int line, const char *cond, const char *fmt, ...)
    __attribute__((format(printf, 4, 5), noreturn));

#ifdef VMC_DEBUG
#define VMC_ASSERT(cond, ...)                                                     \
    do {                                                                          \
        if (!(cond))                                                              \
            vmc_assert_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);            \
    } while (0)
#else
#define VMC_ASSERT(cond, ...) ((void)0)
#endif

#endif
