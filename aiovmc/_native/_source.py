"""The digest of the C sources the core is built from.

One definition for both sides: `native/build_ffi.py` bakes it into the compiled
module, and `_binding.py` recomputes it over a source checkout to refuse a stale
build. Standard library only: the build runs it before aiovmc is importable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_digest(native: Path) -> str:
    """SHA-256 over the names and contents of `native/*.c`, `native/*.h` and `build_ffi.py`."""
    digest = hashlib.sha256()
    for path in [*sorted(native.glob("*.[ch]")), native / "build_ffi.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
