"""Shared pytest configuration.

Every test marked ``anyio`` runs once per backend listed in `anyio_backend`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from aiovmc._native import set_clock_offset

from .redis_server import RedisServer, redis_available


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


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a unix socket in a temporary directory, killed after."""
    redis_available()
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    try:
        server.start()
        yield server
    finally:
        server.kill()


class Clock:
    """This process's clock as the C core sees it (TTL deadlines, expiry):
    moved forward by the test instead of waiting for time to pass."""

    def __init__(self) -> None:
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        set_clock_offset(self.offset)


@pytest.fixture
def clock() -> Iterator[Clock]:
    """An injectable clock for TTL tests; back to the real one afterwards."""
    c = Clock()
    try:
        yield c
    finally:
        set_clock_offset(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` (soak, long fuzz) run only with AIOVMC_SLOW=1."""
    if os.environ.get("AIOVMC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set AIOVMC_SLOW=1 to run the soak and fuzz variants")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
