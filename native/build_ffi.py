"""Build the compiled core, the top-level module `_aiovmc_native` (cffi out-of-line API mode).

The cdef is `vmc.h` itself, minus its preprocessor lines, so the declarations
the compiler checks and the ones cffi binds cannot drift apart.

The module is top-level, not `aiovmc._native._vmc`: Python run from the
repository root imports the source folder `aiovmc/` ahead of the installed
package, and a compiled submodule would be missing there. A top-level module is
found in site-packages (or, after `pip install -e .`, beside this repository's
`aiovmc/`) whichever `aiovmc/` is imported. The module carries a digest of the
sources it was built from, so a source checkout whose C code changed since the
last build refuses to run the stale core (`aiovmc/_native/_binding.py`).
"""

import os
import runpy
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# The digest function is shared with the runtime check: one definition, loaded by path
# because aiovmc itself is not importable while it is being built.
source_digest = runpy.run_path(str(HERE.parent / "aiovmc" / "_native" / "_source.py"))[
    "source_digest"
]
MODULE = "_aiovmc_native"
# One .c/.h pair per concern; the call graph is in vmc_handle.h.
# vmc_fast.c is the CPython fast path (C-API code, installed by vmc_fast_install).
SOURCES = ["vmc_cache.c", "vmc_entry.c", "vmc_error.c", "vmc_fast.c", "vmc_file.c", "vmc_flight.c",
           "vmc_index.c", "vmc_lru.c", "vmc_mutex.c", "vmc_pool.c", "vmc_recover.c", "vmc_repair.c"]


def _cdef() -> str:
    lines = (HERE / "vmc.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


# AIOVMC_SANITIZE=address,undefined (or thread) builds the core with those
# sanitizers and its debug assertions (VMC_DEBUG), as .ci/run does with
# `AIOVMC_SANITIZE=address,undefined pip install -e .`; the interpreter then
# needs the sanitizer's runtime preloaded (LD_PRELOAD=$(gcc
# -print-file-name=libasan.so)). Unset: the normal optimised build.
SANITIZE = os.environ.get("AIOVMC_SANITIZE", "")
DEBUG_FLAGS = (
    [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
     "-O1", "-g", "-DVMC_DEBUG"]
    if SANITIZE
    else []
)

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.cdef("const char *vmc_source_digest(void);")
# Defined in vmc_fast.c; it takes the GIL itself (cffi releases it around calls).
ffibuilder.cdef("int vmc_fast_install(void);")
ffibuilder.set_source(
    MODULE,
    '#include "vmc.h"\n'
    f'const char *vmc_source_digest(void) {{ return "{source_digest(HERE)}"; }}\n',
    # setuptools wants source paths relative to setup.py, the repository root.
    sources=[f"native/{name}" for name in SOURCES],
    include_dirs=["native"],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden", *DEBUG_FLAGS],
    extra_link_args=DEBUG_FLAGS[:1],
    libraries=["pthread"],
    # The full C API: the limited one turns Py_TYPE and friends into calls on the hot path.
    py_limited_api=False,
)

if __name__ == "__main__":  # a developer's in-place build: python native/build_ffi.py
    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=True)
