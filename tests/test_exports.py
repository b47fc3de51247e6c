"""The public surface: what `import aiovmc` offers, and the layering behind it."""

from __future__ import annotations

import ast
import pathlib

import aiovmc
from aiovmc._native import ERRORS
from aiovmc._native._binding import lib

PACKAGE = pathlib.Path(aiovmc.__file__).parent


def test_public_names_report_the_public_module() -> None:
    for name in aiovmc.__all__:
        assert getattr(aiovmc, name).__module__ == "aiovmc", name


def test_no_private_name_leaks() -> None:
    # Subpackages appear once imported (aiovmc.integrations, by the web tests).
    public = {n for n in vars(aiovmc) if not n.startswith("_")}
    assert public - {"integrations"} == set(aiovmc.__all__) | {"functools"}


def test_import_aiovmc_makes_functools_available() -> None:
    assert callable(aiovmc.functools.cached)


def test_only_the_native_package_touches_the_compiled_core() -> None:
    """Nothing outside aiovmc/_native imports cffi's ffi/lib or the compiled module."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "_native" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {alias.name for alias in node.names}
                module = node.module or ""
                if "_aiovmc_native" in module or "_binding" in module or names & {"ffi", "lib"}:
                    offenders.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(
                alias.name in ("_aiovmc_native", "cffi") for alias in node.names
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_every_core_status_is_mapped() -> None:
    statuses = {
        getattr(lib, name) for name in dir(lib) if name.startswith("VMC_E_")
    }
    assert statuses == set(ERRORS)
    assert lib.VMC_MISS not in ERRORS and lib.VMC_OK not in ERRORS


def test_exception_tree() -> None:
    for name in ("CacheConfigError", "KeyTooLargeError", "ValueTooLargeError"):
        assert issubclass(getattr(aiovmc, name), ValueError)
    for name in ("CacheFormatError", "CacheConfigError", "CacheFullError", "KeyTooLargeError",
                 "ValueTooLargeError", "CacheClosedError"):
        assert issubclass(getattr(aiovmc, name), aiovmc.AiovmcError)
