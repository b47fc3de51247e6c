"""Build the `aiovmc._native._vmc` extension (cffi out-of-line API mode).

The cdef is `vmc.h` itself, minus its preprocessor lines, so the declarations
the compiler checks and the ones cffi binds cannot drift apart.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["vmc_cache.c", "vmc_error.c", "vmc_file.c", "vmc_flight.c", "vmc_lock.c", "vmc_pool.c",
           "vmc_recover.c", "vmc_shard.c"]


def _cdef() -> str:
    lines = (HERE / "vmc.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "aiovmc._native._vmc",
    '#include "vmc.h"',
    # setuptools wants source paths relative to setup.py, the repository root.
    sources=[f"native/{name}" for name in SOURCES],
    include_dirs=["native"],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden"],
    libraries=["pthread"],
    # The full C API: the limited one turns Py_TYPE and friends into calls on the hot path.
    py_limited_api=False,
)

if __name__ == "__main__":  # a developer's in-place build: python native/build_ffi.py
    import os

    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=True)
