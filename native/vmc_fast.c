/* vmc_fast.c -- the CPython fast path: `get`, `_get_inline`, `in` and more as C-API methods.
 *
 * The cffi binding pays, per get, a cffi call that releases and retakes the
 * GIL, and a per-thread scratch buffer (with a re-entrancy flag) from which
 * the result is sliced: two copies. Here the result is a bytes object
 * allocated once the value's length is known (in an optimistic round, or
 * under the shard lock), and the value is copied into it (and verified
 * against its checksum) in one pass, with the GIL held throughout. That is
 * safe because nothing holding a shard lock ever waits for the GIL (no core
 * code calls Python, and allocating a bytes object runs no Python code), and
 * it never stalls the process's other threads behind another process:
 * vmc_get_sink only *tries* the shard lock
 * and backs off (VMC_BUSY) rather than wait for it, for a repair or for the
 * pool lock; this file then releases the GIL and takes the same path as the
 * cffi binding (vmc_get to count and size, then a quiet copy into a bytes
 * object of that size). Values above VMC_SCRATCH_SIZE take that path too, so
 * that no long copy runs with the GIL held.
 *
 * `_get_inline` (AsyncCache's get on the loop) and `in` go the same way, and
 * so does AsyncCache.get itself (fast_async_get, bound by fast_bind_async): a
 * hit is answered as Ready(value), an awaitable already done, so that an
 * awaited hit creates no coroutine. `_get_many_inline` is AsyncCache's
 * get_many on the loop; fresh_bytes allocates get_entry's large results.
 *
 * Installation goes through the one cffi-declared function vmc_fast_install():
 * cffi cannot declare PyObject, so it adds to this module (_aiovmc_native,
 * found in sys.modules) the C-API functions the Python side then calls
 * itself: `FastHandle(cdata)`, which takes a cffi `vmc_cache *` (its type
 * checked with cffi's own `ffi.typeof`), and `fast_bind(cls, encode_key,
 * raise_for)`, which returns method descriptors for `cls` (aiovmc's Handle).
 * The descriptors find the core handle through the instance's `_fast` slot.
 * On PyPy (cpyext) nothing is installed: the cffi binding is the path there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT_EX: the member type of a __slots__ slot */

#include "vmc.h"
#include "vmc_cache.h"
#include "vmc_mutex.h"

int vmc_fast_install(void);

#ifdef PYPY_VERSION

int vmc_fast_install(void)
{
    return 0;
}

#else

typedef struct {
    PyObject_HEAD
    vmc_cache *c;
    PyObject *cdata; /* the cffi pointer, whose ffi.gc finaliser frees c */
} FastHandle;

/* Shared by every handle of the process: the names set by install(), the
 * functions by fast_bind() (before any method it returns can run). */
static PyObject *str_fast;     /* "_fast" */
static PyObject *str_missed;   /* "_missed" */
static PyObject *encode_key;   /* aiovmc._convert.encode_key */
static PyObject *raise_for;    /* aiovmc._native._status.raise_for */

static PyObject *fast_handle_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *cdata;
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "FastHandle() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:FastHandle", &cdata))
        return NULL;
    PyObject *module = PyImport_ImportModule("_aiovmc_native");
    if (module == NULL)
        return NULL;
    PyObject *ffi = PyObject_GetAttrString(module, "ffi");
    Py_DECREF(module);
    if (ffi == NULL)
        return NULL;
    PyObject *want = PyObject_CallMethod(ffi, "typeof", "s", "vmc_cache *");
    PyObject *got = want ? PyObject_CallMethod(ffi, "typeof", "O", cdata) : NULL;
    PyObject *address = NULL;
    if (got && got != want)
        PyErr_Format(PyExc_TypeError, "FastHandle() takes a cffi 'vmc_cache *', not %R", got);
    else if (got)
        address = PyObject_CallMethod(ffi, "cast", "sO", "uintptr_t", cdata);
    Py_XDECREF(want);
    Py_XDECREF(got);
    Py_DECREF(ffi);
    if (address == NULL)
        return NULL;
    PyObject *number = PyNumber_Long(address); /* a cffi integer: int() it */
    Py_DECREF(address);
    if (number == NULL)
        return NULL;
    vmc_cache *c = PyLong_AsVoidPtr(number);
    Py_DECREF(number);
    if (c == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "FastHandle() takes a non-NULL handle");
        return NULL;
    }
    FastHandle *self = (FastHandle *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->c = c;
    self->cdata = Py_NewRef(cdata);
    return (PyObject *)self;
}

static void fast_handle_dealloc(FastHandle *self)
{
    Py_CLEAR(self->cdata);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject FastHandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_aiovmc_native.FastHandle",
    .tp_basicsize = sizeof(FastHandle),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A core handle (vmc_cache *) as the fast path reads it.",
    .tp_new = fast_handle_new,
    .tp_dealloc = (destructor)fast_handle_dealloc,
};

/* ---- get ---- */

/* A sink that allocates the result: a bytes object of the value's length, in
 * results[item] (one slot for a get, one per key of a get_many batch). */
struct bytes_sink {
    struct vmc_sink base;
    uint64_t max; /* larger values are not copied here */
    PyObject **results;
    bool no_memory;
};

static char *bytes_dst(struct vmc_sink *sink, uint64_t len)
{
    struct bytes_sink *b = (struct bytes_sink *)sink;
    if (b->no_memory) /* an exception is set: allocate nothing more */
        return NULL;
    PyObject **result = &b->results[sink->item];
    if (*result && (uint64_t)PyBytes_GET_SIZE(*result) == len)
        return PyBytes_AS_STRING(*result); /* a later round, the same length */
    Py_CLEAR(*result); /* a bytes object: no finaliser runs */
    if (len > b->max)
        return NULL; /* copied later with the GIL released, or not at all */
    *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (*result == NULL) {
        b->no_memory = true;
        return NULL;
    }
    return PyBytes_AS_STRING(*result);
}

/* A wait hook (vmc_mutex.h) that releases the GIL where the core would wait
 * or copy long: for calls whose buffers are held by the caller (get_into,
 * put), which then need the GIL for nothing until they return. */
struct gil_hook {
    struct vmc_wait_hook base;
    PyThreadState *saved; /* set once the GIL is released */
};

static void release_gil(struct vmc_wait_hook *hook)
{
    ((struct gil_hook *)hook)->saved = PyEval_SaveThread();
}

static void gil_hook_begin(struct gil_hook *g)
{
    g->base.before_wait = release_gil;
    g->saved = NULL;
    vmc_wait_hook_set(&g->base);
}

static void gil_hook_end(struct gil_hook *g)
{
    vmc_wait_hook_set(NULL);
    if (g->saved)
        PyEval_RestoreThread(g->saved);
}

/* parse -- METH_FASTCALL|METH_KEYWORDS arguments of `fn` into given[] by
 * name: the first npos may come by position, the first nreq are required;
 * given[] holds the defaults of the others. 0, or -1 with TypeError. */
static int parse(const char *fn, const char *const *names, Py_ssize_t nnames, Py_ssize_t npos,
                 Py_ssize_t nreq, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                 PyObject **given)
{
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)",
                     fn, npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        given[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        Py_ssize_t at = 0;
        while (at < nnames && PyUnicode_CompareWithASCIIString(name, names[at]) != 0)
            at++;
        if (at == nnames || at < nargs) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated keyword "
                         "argument %R", fn, name);
            return -1;
        }
        given[at] = args[nargs + i];
    }
    for (Py_ssize_t i = 0; i < nreq; i++)
        if (given[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]);
            return -1;
        }
    return 0;
}

/* encoded -- the key as bytes (a new reference), through aiovmc's encode_key. */
static PyObject *encoded(PyObject *key)
{
    return PyBytes_CheckExact(key) ? Py_NewRef(key) : PyObject_CallOneArg(encode_key, key);
}

/* raise_status -- the exception of a failed core call, through the one mapping. */
static PyObject *raise_status(int64_t status)
{
    PyObject *code = PyLong_FromLongLong(status);
    if (code == NULL)
        return NULL;
    PyObject *r = PyObject_CallOneArg(raise_for, code);
    Py_DECREF(code);
    Py_XDECREF(r); /* raise_for always raises */
    return NULL;
}

/* copy_whole -- a value of known size, copied quietly (no statistics, no LRU
 * touch) with the GIL released into a new bytes object (VMC_F_FRESH: backed by
 * huge pages where it can be, so that freeing it is cheap too); NULL with *status
 * set if it has gone (VMC_MISS; with VMC_F_COUNTED in `flags`, the hit counted
 * for it becomes a miss) or the copy failed, NULL with an exception if out of
 * memory. */
static PyObject *copy_whole(vmc_cache *c, const char *key, size_t klen, int64_t size,
                            uint32_t flags, int64_t *status)
{
    for (;;) {
        PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
        if (out == NULL)
            return NULL;
        char *dst = PyBytes_AS_STRING(out);
        int64_t n;
        Py_BEGIN_ALLOW_THREADS
        n = vmc_get(c, key, klen, dst, (size_t)size, 0,
                    flags | VMC_F_WHOLE | VMC_F_QUIET | VMC_F_FRESH);
        Py_END_ALLOW_THREADS
        if (n == size)
            return out;
        Py_DECREF(out);
        if (n < 0) {
            *status = n;
            return NULL;
        }
        size = n; /* replaced by a value of another size meanwhile: again */
    }
}

/* finish -- the rest of a counted get of key after vmc_get_sink answered n
 * without a result: a value of n bytes counted but too large for the GIL held
 * (copied now with the GIL released, if it has at most `limit` bytes), or
 * VMC_BUSY (the get again, waiting without the GIL). The value as bytes; else
 * NULL with *status set to its size (counted, not copied: more than `limit`
 * bytes, or, with VMC_F_NO_REPAIR, a repair pending before its copy, which
 * the caller makes where a repair may run, as for a large value), to
 * VMC_MISS or to a failure; or NULL with an exception (out of memory).
 * `flags`: 0, or VMC_F_NO_REPAIR. */
static PyObject *finish(vmc_cache *c, const char *k, size_t klen, int64_t n, int64_t limit,
                        uint32_t flags, int64_t *status)
{
    if (n == VMC_BUSY) { /* it would wait: wait without the GIL */
        Py_BEGIN_ALLOW_THREADS
        n = vmc_get(c, k, klen, NULL, 0, 0, flags | VMC_F_WHOLE);
        Py_END_ALLOW_THREADS
    }
    if (n >= 0 && n <= limit) { /* counted, not copied: too large for the GIL held */
        int64_t size = n;
        PyObject *result = copy_whole(c, k, klen, size, flags | VMC_F_COUNTED, &n);
        if (result || PyErr_Occurred())
            return result;
        if (n == VMC_E_REPAIR && (flags & VMC_F_NO_REPAIR)) /* counted: not to count again */
            n = size;
    }
    *status = n;
    return NULL;
}

/* lookup -- a counted get of key, as Handle._get_inline: the value as bytes
 * if it has at most `limit` bytes; else as finish(). */
static PyObject *lookup(vmc_cache *c, const char *k, size_t klen, int64_t limit, uint32_t flags,
                        int64_t *status)
{
    uint64_t max = limit < VMC_SCRATCH_SIZE ? (uint64_t)limit : VMC_SCRATCH_SIZE;
    PyObject *result = NULL;
    struct bytes_sink sink = {{bytes_dst, 0}, max, &result, false};
    int64_t n = vmc_get_sink(c, k, klen, &sink.base, flags);
    if (n >= 0 && result && !sink.no_memory) /* the hit, copied and verified */
        return result;
    Py_CLEAR(result);
    if (sink.no_memory)
        return NULL;
    return finish(c, k, klen, n, limit, flags, status);
}

/* Where the `_fast` slot of aiovmc's Handle sits in its instances (found by
 * fast_bind from the slot's member descriptor): the methods read it there,
 * not through an attribute lookup per call. Their descriptors were made for
 * Handle, so `self` is always an instance of Handle, or of a subclass, which
 * keeps the slot at the same offset. */
static Py_ssize_t fast_offset;

/* handle_of -- the core handle of self (its `_fast` slot), as a new reference. */
static FastHandle *handle_of(PyObject *self)
{
    PyObject *fast = *(PyObject **)((char *)self + fast_offset);
    if (fast == NULL || !Py_IS_TYPE(fast, &FastHandleType)) {
        PyErr_Format(PyExc_TypeError, "%R has no fast handle", self);
        return NULL;
    }
    return (FastHandle *)Py_NewRef(fast);
}

/* get(key, default=None): as Handle.get in aiovmc/_native/_handle.py. */
static PyObject *fast_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    static const char *const names[] = {"key", "default"};
    PyObject *given[2] = {NULL, Py_None};
    if (parse("get", names, 2, 2, 1, args, nargs, kwnames, given) < 0)
        return NULL;

    FastHandle *fast = handle_of(self);
    if (fast == NULL)
        return NULL;
    vmc_cache *c = fast->c;
    PyObject *result = NULL;
    PyObject *key = encoded(given[0]);
    if (key == NULL)
        goto done;
    const char *k = PyBytes_AS_STRING(key);
    size_t klen = (size_t)PyBytes_GET_SIZE(key);

    int64_t n = 0;
    if ((result = lookup(c, k, klen, INT64_MAX, 0, &n)) || PyErr_Occurred())
        goto done;
    if (n == VMC_MISS) {
        PyObject *call[4] = {NULL, self, key, given[1]};
        result = PyObject_VectorcallMethod(str_missed, call + 1,
                                           3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    } else {
        result = raise_status(n);
    }
done:
    Py_XDECREF(key);
    Py_DECREF(fast);
    return result;
}

/* _get_inline(key, limit): as Handle._get_inline (key: bytes). */
static PyObject *fast_get_inline(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || !PyLong_CheckExact(args[1]))
        return PyErr_Format(PyExc_TypeError, "_get_inline(key: bytes, limit: int)");
    int64_t limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    FastHandle *fast = handle_of(self);
    if (fast == NULL)
        return NULL;
    int64_t n = 0;
    PyObject *result = lookup(fast->c, PyBytes_AS_STRING(args[0]),
                              (size_t)PyBytes_GET_SIZE(args[0]), limit, VMC_F_NO_REPAIR, &n);
    Py_DECREF(fast);
    if (result || PyErr_Occurred())
        return result;
    if (n >= 0)
        return PyLong_FromLongLong(n);
    if (n == VMC_MISS)
        Py_RETURN_NONE;
    return raise_status(n);
}

static PyMethodDef get_inline_def = {
    "_get_inline", (PyCFunction)(void (*)(void))fast_get_inline, METH_FASTCALL,
    "_get_inline(key, limit)\n--\n\nA hit of at most `limit` bytes as bytes; a larger "
    "hit, or one whose copy must wait for a repair, as its size (not copied: finish it with "
    "_copy_whole(key, size, COUNTED)); a miss as None. Counts the get either way."};

/* _copy_whole(key, size, flags=0): as Handle._copy_whole (key: bytes; flags:
 * VMC_F_NO_REPAIR, VMC_F_COUNTED, both or neither). The result is allocated
 * uninitialised, where the pure binding's bytes(size) zeroes it with the GIL
 * held: O(size) work that stalls the event loop when a worker thread copies a
 * large value, once malloc serves such sizes from its heap (glibc does after
 * the first one is freed, up to 32 MiB). */
static PyObject *fast_copy_whole(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3 || !PyBytes_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) ||
        (nargs == 3 && !PyLong_CheckExact(args[2])))
        return PyErr_Format(PyExc_TypeError, "_copy_whole(key: bytes, size: int, flags: int = 0)");
    int64_t size = PyLong_AsLongLong(args[1]);
    long flags = nargs == 3 ? PyLong_AsLong(args[2]) : 0;
    if (PyErr_Occurred())
        return NULL;
    if (size < 0 || (flags & ~(long)(VMC_F_NO_REPAIR | VMC_F_COUNTED)))
        return PyErr_Format(PyExc_ValueError, "_copy_whole: size %lld, flags %ld",
                            (long long)size, flags);
    FastHandle *fast = handle_of(self);
    if (fast == NULL)
        return NULL;
    int64_t n = 0;
    PyObject *result = copy_whole(fast->c, PyBytes_AS_STRING(args[0]),
                                  (size_t)PyBytes_GET_SIZE(args[0]), size, (uint32_t)flags, &n);
    Py_DECREF(fast);
    if (result || PyErr_Occurred())
        return result;
    if (n == VMC_MISS)
        Py_RETURN_NONE;
    return raise_status(n);
}

static PyMethodDef copy_whole_def = {
    "_copy_whole", (PyCFunction)(void (*)(void))fast_copy_whole, METH_FASTCALL,
    "_copy_whole(key, size, flags=0)\n--\n\nA value whose size is known, copied quietly (no "
    "statistics, no LRU touch) into a new bytes object; None if it has gone meanwhile (with "
    "COUNTED in flags, the hit counted for it then becomes a miss)."};

/* fresh_bytes(size): a bytes object of `size` bytes, not initialised, for
 * the pure binding's large results that the core then fills (get_entry):
 * bytes(size) would zero it with the GIL held, O(size) work that stalls the
 * event loop when a worker thread copies a large value (see _copy_whole). Its
 * caller fills every byte, or drops it unseen. */
static PyObject *fresh_bytes(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0)
        return PyErr_Format(PyExc_ValueError, "fresh_bytes: size %zd", size);
    return PyBytes_FromStringAndSize(NULL, size);
}

static PyMethodDef fresh_bytes_def = {
    "fresh_bytes", fresh_bytes, METH_O,
    "fresh_bytes(size)\n--\n\nA bytes object of `size` bytes, not initialised: fill every "
    "byte, or drop it unseen."};

/* __contains__(key): as Handle.__contains__. */
static PyObject *fast_contains(PyObject *self, PyObject *key)
{
    FastHandle *fast = handle_of(self);
    if (fast == NULL)
        return NULL;
    PyObject *result = NULL;
    if ((key = encoded(key)) == NULL)
        goto done;
    const char *k = PyBytes_AS_STRING(key);
    size_t klen = (size_t)PyBytes_GET_SIZE(key);
    int rc = vmc_contains_now(fast->c, k, klen);
    if (rc == VMC_BUSY) {
        Py_BEGIN_ALLOW_THREADS
        rc = vmc_contains(fast->c, k, klen);
        Py_END_ALLOW_THREADS
    }
    result = rc < 0 ? raise_status(rc) : Py_NewRef(rc ? Py_True : Py_False);
done:
    Py_XDECREF(key);
    Py_DECREF(fast);
    return result;
}

static PyMethodDef contains_def = {
    "__contains__", fast_contains, METH_O,
    "Whether key is present and unexpired; counts nothing, touches nothing."};

static PyMethodDef get_def = {
    "get", (PyCFunction)(void (*)(void))fast_get, METH_FASTCALL | METH_KEYWORDS,
    "get(key, default=None)\n--\n\nThe value of `key` as bytes; on a miss the loader's "
    "result (see `Cache`), else `default` (the compiled fast path)."};

/* ---- get_into ---- */

/* get_into(key, buffer, *, offset=0): as Handle.get_into. The buffer is held
 * by the call, so the GIL is released only where the core would wait or copy
 * long (the wait hook). */
static PyObject *fast_get_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    static const char *const names[] = {"key", "buffer", "offset"};
    PyObject *given[3] = {NULL, NULL, NULL};
    if (parse("get_into", names, 3, 2, 2, args, nargs, kwnames, given) < 0)
        return NULL;
    FastHandle *fast = handle_of(self);
    if (fast == NULL)
        return NULL;
    PyObject *result = NULL;
    PyObject *key = encoded(given[0]);
    if (key == NULL)
        goto done;
    long long offset = 0;
    if (given[2]) {
        int overflow = 0;
        if (!PyBool_Check(given[2]) && PyLong_Check(given[2]))
            offset = PyLong_AsLongLongAndOverflow(given[2], &overflow);
        if (offset == -1 && PyErr_Occurred())
            goto done;
        if (overflow > 0)
            offset = LLONG_MAX; /* past any value: nothing to copy */
        if (PyBool_Check(given[2]) || !PyLong_Check(given[2]) || offset < 0) {
            PyErr_Format(PyExc_ValueError, "offset must be a non-negative int, got %R",
                         given[2]);
            goto done;
        }
    }
    Py_buffer view;
    if (PyObject_GetBuffer(given[1], &view, PyBUF_WRITABLE) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError) &&
            !PyErr_ExceptionMatches(PyExc_BufferError))
            goto done;
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "buffer must be a writable bytes-like object, not %s",
                     Py_TYPE(given[1])->tp_name);
        goto done;
    }
    struct gil_hook gil;
    gil_hook_begin(&gil);
    int64_t n = vmc_get(fast->c, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key),
                        view.buf, (size_t)view.len, (uint64_t)offset, 0);
    gil_hook_end(&gil);
    PyBuffer_Release(&view);
    if (n >= 0)
        result = PyLong_FromLongLong(n);
    else if (n == VMC_MISS)
        result = Py_NewRef(Py_None);
    else
        raise_status(n);
done:
    Py_XDECREF(key);
    Py_DECREF(fast);
    return result;
}

static PyMethodDef get_into_def = {
    "get_into", (PyCFunction)(void (*)(void))fast_get_into, METH_FASTCALL | METH_KEYWORDS,
    "get_into(key, buffer, *, offset=0)\n--\n\nCopy value[offset:offset+len(buffer)] into "
    "`buffer`; return the value's total size, or None on a miss. Never calls a loader."};

/* ---- put ---- */

static PyObject *str_on_evict; /* "_on_evict" */
static PyObject *ttl_to_ns;    /* aiovmc._convert.ttl_to_ns */
static PyObject *slow_put;     /* the pure binding's Handle.put */

/* put(key, value, *, ttl=None): as Handle.put, for a bytes value and no
 * on_evict (the pure binding's put does the rest: a buffer is converted
 * there, and evictions are made and notified from Python). */
static PyObject *fast_put(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    static const char *const names[] = {"key", "value", "ttl"};
    PyObject *given[3] = {NULL, NULL, Py_None};
    if (parse("put", names, 3, 2, 2, args, nargs, kwnames, given) < 0)
        return NULL;
    PyObject *on_evict = PyObject_GetAttr(self, str_on_evict);
    if (on_evict == NULL)
        return NULL;
    Py_DECREF(on_evict); /* only compared */
    if (on_evict != Py_None || !PyBytes_CheckExact(given[1])) {
        PyObject *call[6] = {self};
        Py_ssize_t total = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
        for (Py_ssize_t i = 0; i < total; i++) /* at most 3, as parse() checked */
            call[1 + i] = args[i];
        return PyObject_Vectorcall(slow_put, call, (size_t)nargs + 1, kwnames);
    }
    FastHandle *fast = handle_of(self);
    if (fast == NULL)
        return NULL;
    PyObject *result = NULL;
    PyObject *key = encoded(given[0]);
    if (key == NULL)
        goto done;
    long long ttl_ns = -1;
    if (given[2] != Py_None) {
        PyObject *ns = PyObject_CallOneArg(ttl_to_ns, given[2]);
        if (ns == NULL)
            goto done;
        ttl_ns = PyLong_AsLongLong(ns);
        Py_DECREF(ns);
        if (ttl_ns == -1 && PyErr_Occurred())
            goto done;
    }
    struct gil_hook gil;
    gil_hook_begin(&gil);
    int64_t ts = vmc_put(fast->c, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key),
                         PyBytes_AS_STRING(given[1]), (size_t)PyBytes_GET_SIZE(given[1]),
                         ttl_ns, 0);
    gil_hook_end(&gil);
    result = ts > 0 ? PyLong_FromLongLong(ts) : raise_status(ts);
done:
    Py_XDECREF(key);
    Py_DECREF(fast);
    return result;
}

static PyMethodDef put_def = {
    "put", (PyCFunction)(void (*)(void))fast_put, METH_FASTCALL | METH_KEYWORDS,
    "put(key, value, *, ttl=None)\n--\n\nInsert or replace; returns the publication "
    "timestamp."};

/* ---- get_many ---- */

/* Keys looked up per core call of get_many: the batch its prefetching runs over. */
#define BATCH 64

/* add_large -- note in `large` a hit of key counted and not copied (as
 * finish() answers its size), as (size, asks): its size and how many of
 * the keys asked were such hits of it, each to be finished; and, unless an
 * earlier ask of it found a value, hold its place in `found` with None. 0,
 * or -1 with an exception. */
static int add_large(PyObject *large, PyObject *found, PyObject *key, int64_t size)
{
    PyObject *was = PyDict_GetItemWithError(large, key); /* borrowed */
    long long asks = 1;
    if (was == NULL && PyErr_Occurred())
        return -1;
    if (was && !(PyTuple_CheckExact(was) && PyTuple_GET_SIZE(was) == 2 &&
                 PyLong_CheckExact(PyTuple_GET_ITEM(was, 1)))) {
        PyErr_Format(PyExc_TypeError, "_get_many_inline: large[%R] is %R, not (size, asks)",
                     key, was);
        return -1;
    }
    if (was) {
        long long before = PyLong_AsLongLong(PyTuple_GET_ITEM(was, 1));
        if (before == -1 && PyErr_Occurred())
            return -1;
        asks = before + 1;
    }
    PyObject *entry = Py_BuildValue("(LL)", (long long)size, asks);
    int rc = entry == NULL || PyDict_SetItem(large, key, entry) < 0 ? -1 : 0;
    Py_XDECREF(entry);
    if (rc == 0 && (rc = PyDict_Contains(found, key)) == 0)
        rc = PyDict_SetItem(found, key, Py_None);
    return rc < 0 ? -1 : 0;
}

/* many_batch -- look keys[0..n) up into found (a dict), in order: hits
 * copied under the lock in one core call, then each key that call stopped at
 * (VMC_BUSY: it would wait) finished as a get is, and the call made again
 * for the rest. A hit that finish() leaves counted and not copied (more than
 * `limit` bytes, or a repair pending) goes into `large` (add_large;
 * _get_many_inline; get_many's limit is INT64_MAX and it never stops for a
 * repair). The number of keys done: n, or fewer when (with VMC_F_NO_REPAIR)
 * the next one needs a repair; -1 with an exception. */
static Py_ssize_t many_batch(vmc_cache *c, PyObject **keys, Py_ssize_t n, int64_t limit,
                             uint32_t flags, PyObject *found, PyObject *large)
{
    const char *ptrs[BATCH];
    size_t lens[BATCH];
    int64_t status[BATCH];
    PyObject *results[BATCH] = {NULL};
    for (Py_ssize_t i = 0; i < n; i++) {
        ptrs[i] = PyBytes_AS_STRING(keys[i]);
        lens[i] = (size_t)PyBytes_GET_SIZE(keys[i]);
    }
    uint64_t max = limit < VMC_SCRATCH_SIZE ? (uint64_t)limit : VMC_SCRATCH_SIZE;
    Py_ssize_t done = n;
    int rc = 0; /* 1: stopped before a key that needs a repair */
    for (Py_ssize_t from = 0; from < n && rc == 0;) {
        struct bytes_sink sink = {{bytes_dst, 0}, max, results + from, false};
        size_t looked = vmc_get_many_sink(c, ptrs + from, lens + from, (size_t)(n - from),
                                          status + from, &sink.base, flags);
        Py_ssize_t end = from + (Py_ssize_t)looked;
        if (sink.no_memory)
            rc = -1;
        for (Py_ssize_t i = from; i <= end && i < n && rc == 0; i++) {
            int64_t got = status[i];
            PyObject *value = results[i];
            results[i] = NULL;
            if (got < 0) /* a destination given to a round that did not hit: not the value */
                Py_CLEAR(value);
            if (value == NULL && (got >= 0 || (i == end && got == VMC_BUSY)))
                value = finish(c, ptrs[i], lens[i], got, limit, flags, &got);
            if (value) {
                rc = PyDict_SetItem(found, keys[i], value);
                Py_DECREF(value);
            } else if (PyErr_Occurred()) {
                rc = -1;
            } else if (got >= 0 && large) { /* counted, not copied: its size */
                rc = add_large(large, found, keys[i], got);
            } else if (got == VMC_E_REPAIR && (flags & VMC_F_NO_REPAIR)) {
                done = i;
                rc = 1;
            } else if (got != VMC_MISS) {
                raise_status(got);
                rc = -1;
            }
        }
        from = end + 1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(results[i]);
    return rc < 0 ? -1 : done;
}

/* new_dict -- an empty dict with room for n items (as every key may hit): no
 * resizing as it fills (docs/design.md, "Where a get's time goes"). */
static PyObject *new_dict(Py_ssize_t n)
{
#if PY_VERSION_HEX < 0x030D0000 /* private since 3.13 */
    return _PyDict_NewPresized(n);
#else
    (void)n;
    return PyDict_New();
#endif
}

/* get_many(keys): as Cache.get_many -- {key: value} of the hits, keyed by the
 * encoded key; never loads. */
static PyObject *fast_get_many(PyObject *self, PyObject *keys)
{
    PyObject *iter = PyObject_GetIter(keys);
    if (iter == NULL)
        return NULL;
    FastHandle *fast = handle_of(self);
    /* sized for a list or tuple of keys (no Python code runs to learn it) */
    bool sized = PyList_CheckExact(keys) || PyTuple_CheckExact(keys);
    PyObject *found = fast ? new_dict(sized ? Py_SIZE(keys) : 0) : NULL;
    PyObject *batch[BATCH];
    Py_ssize_t n = 0;
    PyObject *key = NULL;
    while (found) {
        key = PyIter_Next(iter);
        if (key == NULL && PyErr_Occurred())
            Py_CLEAR(found);
        PyObject *enc = key ? encoded(key) : NULL;
        Py_CLEAR(key);
        if (enc)
            batch[n++] = enc;
        else if (PyErr_Occurred())
            Py_CLEAR(found);
        if (found && n && (n == BATCH || enc == NULL) && 
            many_batch(fast->c, batch, n, INT64_MAX, 0, found, NULL) < 0)
            Py_CLEAR(found);
        if (n == BATCH || enc == NULL || found == NULL) {
            while (n)
                Py_DECREF(batch[--n]);
        }
        if (enc == NULL)
            break;
    }
    Py_XDECREF(fast);
    Py_DECREF(iter);
    return found;
}

/* _get_many_inline(keys, limit, found, large, start): as
 * Handle._get_many_inline -- keys[start:] (a list) looked up into found and
 * large, in batches; the number of keys done. */
static PyObject *fast_get_many_inline(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyList_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) ||
        !PyDict_CheckExact(args[2]) || !PyDict_CheckExact(args[3]) || !PyLong_CheckExact(args[4]))
        return PyErr_Format(PyExc_TypeError, "_get_many_inline(keys: list, limit: int, "
                                             "found: dict, large: dict, start: int)");
    int64_t limit = PyLong_AsLongLong(args[1]);
    Py_ssize_t at = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    FastHandle *fast = handle_of(self);
    if (fast == NULL)
        return NULL;
    /* A tuple holds the keys while the GIL is released (another thread may
     * change the list meanwhile). */
    PyObject *keys = PyList_AsTuple(args[0]);
    Py_ssize_t n = keys ? PyTuple_GET_SIZE(keys) : 0;
    at = at < 0 ? 0 : at > n ? n : at;
    Py_ssize_t done = keys ? 0 : -1;
    while (at < n && done >= 0) {
        PyObject *batch[BATCH];
        Py_ssize_t m = 0, want = n - at < BATCH ? n - at : BATCH;
        while (m < want && (batch[m] = encoded(PyTuple_GET_ITEM(keys, at + m))) != NULL)
            m++;
        /* A key that fails to encode fails its batch before it is looked up
         * (as get_many). */
        done = m < want ? -1
                        : many_batch(fast->c, batch, m, limit, VMC_F_NO_REPAIR, args[2], args[3]);
        while (m)
            Py_DECREF(batch[--m]);
        if (done >= 0)
            at += done;
        if (done < want)
            break; /* a key to repair first, or an error */
    }
    Py_XDECREF(keys);
    Py_DECREF(fast);
    return done < 0 ? NULL : PyLong_FromSsize_t(at);
}

static PyMethodDef get_many_inline_def = {
    "_get_many_inline", (PyCFunction)(void (*)(void))fast_get_many_inline, METH_FASTCALL,
    "_get_many_inline(keys, limit, found, large, start)\n--\n\nLook keys[start:] up: hits of at "
    "most `limit` bytes into `found`, the others (larger, or to copy after a repair) into "
    "`large` as (size, asks) and, unless an earlier ask found a value, into `found` as None "
    "(holding their place); the number of keys "
    "done, fewer than len(keys) when the next one needs a repair (never made here)."};

static PyMethodDef get_many_def = {
    "get_many", fast_get_many, METH_O,
    "get_many(keys)\n--\n\n``{key: value}`` for the keys present; never calls the loader."};

/* ---- Ready: an awaitable that is already done ---- */

/* AsyncCache.get answers a hit without a coroutine: Ready(value), which
 * `await` finishes at once -- am_send hands the value over with no frame, no
 * StopIteration -- where a coroutine would cost a frame, its creation and its
 * return (measured in docs/async.md, "The cost of an awaited hit"). aiovmc
 * registers the type as a collections.abc.Coroutine, so that asyncio.create_task,
 * anyio and trio take it as they take the coroutine of a miss. Like a
 * coroutine, it answers once (await, send(None), next()), then raises
 * RuntimeError; throw() raises what it is given, close() drops the value. */
typedef struct {
    PyObject_HEAD
    PyObject *value; /* NULL once answered or closed */
} Ready;

static PyTypeObject ReadyType;

/* ready_take -- the value, handed over once (a new reference); NULL with
 * RuntimeError after that. */
static PyObject *ready_take(Ready *self)
{
    PyObject *value = self->value;
    if (value == NULL)
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse an already awaited aiovmc result");
    self->value = NULL;
    return value;
}

static PySendResult ready_am_send(PyObject *self, PyObject *arg, PyObject **result)
{
    (void)arg;
    *result = ready_take((Ready *)self);
    return *result ? PYGEN_RETURN : PYGEN_ERROR;
}

/* The protocol without am_send (next(), send()): the value as StopIteration's. */
static PyObject *ready_next(PyObject *self)
{
    PyObject *value = ready_take((Ready *)self);
    if (value == NULL)
        return NULL;
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
    Py_DECREF(value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

static PyObject *ready_send(PyObject *self, PyObject *arg)
{
    (void)arg;
    return ready_next(self);
}

static PyObject *ready_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3)
        return PyErr_Format(PyExc_TypeError, "throw() takes 1 to 3 arguments (%zd given)", nargs);
    Py_CLEAR(((Ready *)self)->value);
    PyObject *exc = args[0];
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else if (PyExceptionClass_Check(exc))
        PyErr_SetObject(exc, nargs > 1 && args[1] != Py_None ? args[1] : NULL);
    else
        PyErr_SetString(PyExc_TypeError, "throw() takes an exception class or instance");
    return NULL;
}

static PyObject *ready_close(PyObject *self, PyObject *unused)
{
    (void)unused;
    Py_CLEAR(((Ready *)self)->value);
    Py_RETURN_NONE;
}

static PyObject *ready_await(PyObject *self)
{
    return Py_NewRef(self);
}

static PyObject *ready_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames)
{
    (void)type;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL)
        return PyErr_Format(PyExc_TypeError, "Ready(value) takes one argument");
    Ready *self = PyObject_New(Ready, &ReadyType);
    if (self != NULL)
        self->value = Py_NewRef(args[0]);
    return (PyObject *)self;
}

static void ready_dealloc(PyObject *self)
{
    Py_XDECREF(((Ready *)self)->value);
    PyObject_Free(self);
}

static PyAsyncMethods ready_async = {.am_await = ready_await, .am_send = ready_am_send};

static PyMethodDef ready_methods[] = {
    {"send", ready_send, METH_O, "send(None): raise StopIteration with the value."},
    {"throw", (PyCFunction)(void (*)(void))ready_throw, METH_FASTCALL,
     "throw(exc): raise exc (the value is dropped)."},
    {"close", ready_close, METH_NOARGS, "Drop the value."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReadyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_aiovmc_native.Ready",
    .tp_basicsize = sizeof(Ready),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ready(value): an awaitable already done, whose await returns value.",
    .tp_as_async = &ready_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = ready_next,
    .tp_methods = ready_methods,
    .tp_vectorcall = ready_vectorcall,
    .tp_dealloc = ready_dealloc,
};

/* ---- AsyncCache.get ---- */

/* The classes whose `get` is fast_async_get (AsyncCache, TieredCache), each
 * with where it keeps its Cache (`_cache`) and the largest value it answers
 * on the loop (`_limit`): slots, found by fast_bind_async. */
#define ASYNC_CLASSES 2
static struct async_class {
    PyTypeObject *cls;
    Py_ssize_t cache_offset, limit_offset;
} async_classes[ASYNC_CLASSES];
static PyTypeObject *handle_type; /* aiovmc's Handle: what `_cache` must be */
static PyObject *repair_needed;   /* aiovmc.RepairNeeded */
static PyObject *str_get_rest;    /* "_get_rest" */

/* slot -- the object in the slot at `offset` of self (borrowed), or NULL with
 * AttributeError if it is unset. */
static PyObject *slot(PyObject *self, Py_ssize_t offset, const char *name)
{
    PyObject *value = *(PyObject **)((char *)self + offset);
    if (value == NULL)
        PyErr_Format(PyExc_AttributeError, "%R has no %s", self, name);
    return value;
}

/* async_class_of -- the bound class self is an instance of, or NULL with TypeError. */
static const struct async_class *async_class_of(PyObject *self)
{
    for (int i = 0; i < ASYNC_CLASSES && async_classes[i].cls; i++)
        if (PyObject_TypeCheck(self, async_classes[i].cls))
            return &async_classes[i];
    PyErr_Format(PyExc_TypeError, "get of %R: not a bound class", self);
    return NULL;
}

/* get(key, default=None, *, on_miss=None, ttl=None): as AsyncCache.get in
 * aiovmc/_async_cache.py (and TieredCache.get) -- a hit of at most `_limit`
 * bytes as Ready(value), anything else as
 * self._get_rest(key, found, default, on_miss, ttl). */
static PyObject *fast_async_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const names[] = {"key", "default", "on_miss", "ttl"};
    PyObject *given[4] = {NULL, Py_None, Py_None, Py_None};
    if (parse("get", names, 4, 2, 1, args, nargs, kwnames, given) < 0)
        return NULL;
    const struct async_class *bound = async_class_of(self);
    PyObject *cache = bound ? slot(self, bound->cache_offset, "_cache") : NULL;
    PyObject *limit_obj = cache ? slot(self, bound->limit_offset, "_limit") : NULL;
    if (limit_obj == NULL)
        return NULL;
    if (!PyObject_TypeCheck(cache, handle_type) || !PyLong_CheckExact(limit_obj))
        return PyErr_Format(PyExc_TypeError, "%R is not set up", self);
    int64_t limit = PyLong_AsLongLong(limit_obj);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    FastHandle *fast = handle_of(cache);
    if (fast == NULL)
        return NULL;
    PyObject *result = NULL, *found = NULL;
    PyObject *key = encoded(given[0]);
    if (key == NULL)
        goto done;
    int64_t n = 0;
    PyObject *value = lookup(fast->c, PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key),
                             limit, VMC_F_NO_REPAIR, &n);
    if (value) {
        result = ready_vectorcall(NULL, &value, 1, NULL);
        Py_DECREF(value);
        goto done;
    }
    if (PyErr_Occurred())
        goto done;
    if (n >= 0)
        found = PyLong_FromLongLong(n);
    else if (n == VMC_MISS)
        found = Py_NewRef(Py_None);
    else if (raise_status(n), PyErr_ExceptionMatches(repair_needed)) {
        PyErr_Clear();
        found = Py_NewRef(repair_needed);
    }
    if (found) {
        PyObject *call[7] = {NULL, self, key, found, given[1], given[2], given[3]};
        result = PyObject_VectorcallMethod(str_get_rest, call + 1,
                                           6 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(found);
    }
done:
    Py_XDECREF(key);
    Py_DECREF(fast);
    return result;
}

static PyMethodDef async_get_def = {
    "get", (PyCFunction)(void (*)(void))fast_async_get, METH_FASTCALL | METH_KEYWORDS,
    "get(key, default=None, *, on_miss=None, ttl=None)\n--\n\nThe value of `key`, awaitable; "
    "on a miss, loaded (coalesced) or `default` (the compiled fast path)."};

/* slot_offset -- the offset of the slot `name` of cls, or -1 with TypeError. */
static Py_ssize_t slot_offset(PyObject *cls, const char *name)
{
    PyObject *descr = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, name);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%R has no `%s` slot", cls, name);
        return -1;
    }
    return ((PyMemberDescrObject *)descr)->d_member->offset;
}

/* fast_bind_async(cls, handle_cls, RepairNeeded) -> the method descriptor of
 * cls (aiovmc's AsyncCache or TieredCache) for `get`; fast_bind(handle_cls, ...)
 * first. */
static PyObject *fast_bind_async(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyType_Check(args[0]) || !PyType_Check(args[1]) ||
        !PyExceptionClass_Check(args[2]) || fast_offset == 0)
        return PyErr_Format(PyExc_TypeError,
                            "fast_bind_async(cls, handle_cls, RepairNeeded), after fast_bind");
    int i = 0;
    while (i < ASYNC_CLASSES && async_classes[i].cls &&
           async_classes[i].cls != (PyTypeObject *)args[0])
        i++;
    if (i == ASYNC_CLASSES)
        return PyErr_Format(PyExc_TypeError, "fast_bind_async: more than %d classes",
                            ASYNC_CLASSES);
    Py_ssize_t cache_offset = slot_offset(args[0], "_cache");
    Py_ssize_t limit_offset = cache_offset < 0 ? -1 : slot_offset(args[0], "_limit");
    if (limit_offset < 0)
        return NULL;
    if (async_classes[i].cls == NULL)
        async_classes[i].cls = (PyTypeObject *)Py_NewRef(args[0]);
    async_classes[i].cache_offset = cache_offset;
    async_classes[i].limit_offset = limit_offset;
    Py_XSETREF(handle_type, (PyTypeObject *)Py_NewRef(args[1]));
    Py_XSETREF(repair_needed, Py_NewRef(args[2]));
    return PyDescr_NewMethod((PyTypeObject *)args[0], &async_get_def);
}

static PyMethodDef fast_bind_async_def = {
    "fast_bind_async", (PyCFunction)(void (*)(void))fast_bind_async, METH_FASTCALL,
    "fast_bind_async(cls, handle_cls, RepairNeeded)\n--\n\nThe fast path's `get` for "
    "AsyncCache or TieredCache."};

/* fast_bind(cls, encode_key, raise_for, ttl_to_ns, slow_put) -> {name: method descriptor of cls} */
static PyObject *fast_bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyType_Check(args[0]))
        return PyErr_Format(PyExc_TypeError,
                            "fast_bind(cls, encode_key, raise_for, ttl_to_ns, slow_put)");
    PyObject *slot = PyDict_GetItemWithError(((PyTypeObject *)args[0])->tp_dict, str_fast);
    if (slot == NULL || !Py_IS_TYPE(slot, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)slot)->d_member->type != T_OBJECT_EX)
        return PyErr_Occurred() ? NULL
                                : PyErr_Format(PyExc_TypeError, "fast_bind(cls, ...): %R has no "
                                               "`_fast` slot", args[0]);
    fast_offset = ((PyMemberDescrObject *)slot)->d_member->offset;
    Py_XSETREF(encode_key, Py_NewRef(args[1]));
    Py_XSETREF(raise_for, Py_NewRef(args[2]));
    Py_XSETREF(ttl_to_ns, Py_NewRef(args[3]));
    Py_XSETREF(slow_put, Py_NewRef(args[4]));
    PyObject *methods = PyDict_New();
    PyMethodDef *defs[] = {&get_def,     &get_inline_def, &copy_whole_def, &contains_def,
                           &get_into_def, &put_def,       &get_many_def,   &get_many_inline_def};
    for (size_t i = 0; methods && i < sizeof defs / sizeof defs[0]; i++) {
        PyObject *method = PyDescr_NewMethod((PyTypeObject *)args[0], defs[i]);
        if (method == NULL || PyDict_SetItemString(methods, defs[i]->ml_name, method) < 0)
            Py_CLEAR(methods);
        Py_XDECREF(method);
    }
    return methods;
}

static PyMethodDef fast_bind_def = {
    "fast_bind", (PyCFunction)(void (*)(void))fast_bind, METH_FASTCALL,
    "fast_bind(cls, encode_key, raise_for, ttl_to_ns, slow_put)\n--\n\nThe fast path's "
    "methods for cls."};

static int install(void)
{
    if (str_fast == NULL && (str_fast = PyUnicode_InternFromString("_fast")) == NULL)
        return -1;
    if (str_missed == NULL && (str_missed = PyUnicode_InternFromString("_missed")) == NULL)
        return -1;
    if (str_on_evict == NULL &&
        (str_on_evict = PyUnicode_InternFromString("_on_evict")) == NULL)
        return -1;
    if (str_get_rest == NULL && (str_get_rest = PyUnicode_InternFromString("_get_rest")) == NULL)
        return -1;
    if (PyType_Ready(&FastHandleType) < 0 || PyType_Ready(&ReadyType) < 0)
        return -1;
    PyObject *module = PyImport_ImportModule("_aiovmc_native");
    if (module == NULL)
        return -1;
    PyObject *bind = PyCFunction_NewEx(&fast_bind_def, NULL, NULL);
    PyObject *bind_async = PyCFunction_NewEx(&fast_bind_async_def, NULL, NULL);
    PyObject *fresh = PyCFunction_NewEx(&fresh_bytes_def, NULL, NULL);
    int rc = bind == NULL || bind_async == NULL || fresh == NULL ? -1
             : PyObject_SetAttrString(module, "FastHandle", (PyObject *)&FastHandleType) < 0
                 ? -1
             : PyObject_SetAttrString(module, "Ready", (PyObject *)&ReadyType) < 0
                 ? -1
             : PyObject_SetAttrString(module, "fast_bind_async", bind_async) < 0
                 ? -1
             : PyObject_SetAttrString(module, "fresh_bytes", fresh) < 0
                 ? -1
                 : PyObject_SetAttrString(module, "fast_bind", bind);
    Py_XDECREF(bind);
    Py_XDECREF(bind_async);
    Py_XDECREF(fresh);
    Py_DECREF(module);
    return rc;
}

/* vmc_fast_install -- called through cffi, which released the GIL: 1 when
 * _aiovmc_native.FastHandle and .fast_bind are in place, -1 if that failed
 * (the exception was reported through sys.unraisablehook), 0 on PyPy. */
int vmc_fast_install(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = install();
    if (rc < 0)
        PyErr_WriteUnraisable(NULL);
    PyGILState_Release(gil);
    return rc < 0 ? -1 : 1;
}

#endif
