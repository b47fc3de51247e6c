"""Shared pytest configuration.

Every test marked ``anyio`` runs once per backend listed in `anyio_backend`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def cache_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh path for a cache file, on tmpfs when the machine has one."""
    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path_factory.mktemp("c"))
    path = os.path.join(directory, f"aiovmc-test-{uuid.uuid4().hex}.cache")
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
