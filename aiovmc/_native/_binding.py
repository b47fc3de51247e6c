"""The compiled core (`ffi`, `lib`), and a clear error when it is missing or stale.

The extension is the top-level module `_aiovmc_native` (see `native/build_ffi.py`
for why). When this package is imported from a source checkout — the repository
root is on `sys.path`, as with `python -m pytest` run there — the core must have
been built from the checkout's `native/` sources: a core built from other sources
is refused with the command that rebuilds it, instead of running C code that no
longer matches this Python code.
"""

from __future__ import annotations

from pathlib import Path

from ._source import source_digest

try:
    import _aiovmc_native
    from _aiovmc_native import ffi, lib
except ModuleNotFoundError as exc:
    if exc.name != "_aiovmc_native":
        raise
    raise ImportError(
        "aiovmc's compiled core (the module _aiovmc_native) is not installed: "
        "install aiovmc with `pip install .` from the repository (or `pip install aiovmc`); "
        "pip builds the core, which needs a C compiler and the Python headers"
    ) from None

__all__ = ["_aiovmc_native", "ffi", "lib"]


def _checkout_native_dir() -> Path | None:
    """The `native/` folder beside this `aiovmc/` package, if this is a source checkout."""
    root = Path(__file__).resolve().parents[2]
    native = root / "native"
    if (native / "build_ffi.py").is_file() and (root / "pyproject.toml").is_file():
        return native
    return None


def _check_built_from_checkout() -> None:
    native = _checkout_native_dir()
    if native is None:
        return
    built = ffi.string(lib.vmc_source_digest()).decode()
    if built != source_digest(native):
        raise ImportError(
            f"aiovmc's compiled core ({_aiovmc_native.__file__}) was built from other sources "
            f"than those in {native}: rebuild it with `pip install .` (or `pip install -e .`) "
            "in the repository"
        )


_check_built_from_checkout()
