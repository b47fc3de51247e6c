"""`aiovmc.functools.cached` on asyncio and trio."""

from __future__ import annotations

import datetime
import enum
import inspect
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any

import anyio
import pytest

from aiovmc import AsyncCache, Cache
from aiovmc.functools import MAX_READABLE_KEY, cached

from .conftest import Clock

pytestmark = pytest.mark.anyio


@pytest.fixture
def acache() -> Iterator[AsyncCache]:
    cache = AsyncCache(size="8MiB")
    yield cache
    cache.cache.close()


class Color(enum.Enum):
    RED = 1


async def test_results_are_cached_and_calls_coalesced(acache: AsyncCache) -> None:
    calls = 0
    release = anyio.Event()

    @cached(acache)
    async def square(x: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"x": x, "square": x * x}

    results: list[dict[str, int]] = []

    async def call(x: int) -> None:
        results.append(await square(x))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(call, 3)
        tg.start_soon(call, 4)
        await anyio.wait_all_tasks_blocked()
        assert calls == 2  # one per distinct argument
        release.set()
    assert results.count({"x": 3, "square": 9}) == 50
    assert {"x": 4, "square": 16} in results
    assert len({id(r) for r in results}) == 51  # every caller gets its own object
    assert await square(3) == {"x": 3, "square": 9}  # a hit
    assert calls == 2
    stats = square.cache.statistics()
    assert (stats.loader_calls, stats.coalesced_gets) == (2, 49)
    assert inspect.iscoroutinefunction(square)
    assert square.__name__ == "square"


async def test_errors_are_not_cached(acache: AsyncCache) -> None:
    calls = 0

    @cached(acache)
    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("first call fails")
        return "ok"

    with pytest.raises(ConnectionError):
        await flaky()
    assert await flaky() == "ok"
    assert await flaky() == "ok"
    assert calls == 2


async def test_default_key() -> None:
    async def fn(a: object, b: object = 2, *args: object, **kwargs: object) -> None: ...

    cache = AsyncCache(size="2MiB")
    try:
        f = cached(cache)(fn)
        prefix = f"{fn.__module__}:{fn.__qualname__}"
        assert f.cache_key(1) == f"{prefix}(a=1, b=2, args=(), kwargs={{}})"
        assert f.cache_key(1, 2) == f.cache_key(a=1) == f.cache_key(b=2, a=1)
        assert f.cache_key(1, 2, 3, z=1, y="s") == (
            f"{prefix}(a=1, b=2, args=(3,), kwargs={{'y':'s','z':1}})"
        )
        assert f.cache_key({"b": 1, "a": [2.5, None]}) == f.cache_key({"a": [2.5, None], "b": 1})
        assert f.cache_key({3, 1, 2}) == f.cache_key(frozenset({2, 3, 1}))
        assert f.cache_key(1) != f.cache_key(True) != f.cache_key(1.0) != f.cache_key("1")
        assert f.cache_key(b"x") != f.cache_key(bytearray(b"x"))
        f.cache_key(
            (
                Color.RED,
                datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc),
                datetime.timedelta(seconds=3),
                Decimal("1.5"),
                uuid.UUID(int=5),
                PurePosixPath("/a/b"),
            )
        )
        assert "Color.RED" in str(f.cache_key(Color.RED))

        with pytest.raises(TypeError, match="key="):
            f.cache_key(object())
        with pytest.raises(TypeError):
            f.cache_key()  # type: ignore[call-arg]  # the signature says it is missing

        long_key = f.cache_key("x" * 10_000)
        assert isinstance(long_key, str)
        assert len(long_key.encode()) <= MAX_READABLE_KEY
        assert long_key.startswith(prefix)
        assert long_key != f.cache_key("x" * 10_001)
    finally:
        cache.cache.close()


def test_default_key_is_the_same_in_every_process() -> None:
    """str hashes are salted per process; the default key must not depend on them."""
    code = (
        "import aiovmc; from aiovmc.functools import cached\n"
        "async def fn(x): ...\n"
        "c = aiovmc.AsyncCache(size='2MiB')\n"
        "print(cached(c)(fn).cache_key(({'a', 'b', 'c', 'd'}, {'k1': 1, 'k2': 2})))\n"
        "c.cache.close()\n"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(keys) == 1


async def test_custom_key_and_invalidate(acache: AsyncCache) -> None:
    calls = 0

    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name

        @cached(acache, key=lambda self, n: f"repo:{self.name}:{n}")
        async def item(self, n: int) -> str:
            nonlocal calls
            calls += 1
            return f"{self.name}-{n}"

    repo = Repo("r")
    assert await repo.item(1) == "r-1"
    assert await repo.item(1) == "r-1"
    assert calls == 1
    assert "repo:r:1" in acache.cache
    assert Repo.item.cache_key(repo, 1) == "repo:r:1"
    assert await Repo.item.invalidate(repo, 1) is True
    assert await repo.item(1) == "r-1"
    assert calls == 2


async def test_version_keeps_old_results_apart(acache: AsyncCache) -> None:
    """A deploy that changes a function's result shape bumps `version`: the new code
    never reads what the old code stored, even while both run on one file."""

    def build(version: int | None, shape: str) -> Any:
        @cached(acache, serializer="json", version=version)
        async def profile(user_id: int) -> object:  # one qualified name for every build
            return [user_id, "name"] if shape == "list" else {"id": user_id, "name": "name"}

        return profile

    old, same_version, new = build(None, "list"), build(None, "dict"), build(2, "dict")
    assert await old(7) == [7, "name"]
    assert await same_version(7) == [7, "name"]  # without a bump: the old shape comes back
    assert await new(7) == {"id": 7, "name": "name"}
    assert str(new.cache_key(7)).startswith("v2:") and new.cache_key(7)[3:] == old.cache_key(7)
    assert await old(7) == [7, "name"]  # old code still reads its own entries

    @cached(acache, key=lambda n: b"item:%d" % n, version="2026-11")
    async def item(n: int) -> int:
        return n

    assert item.cache_key(3) == b"v2026-11:item:3"
    assert await item(3) == 3
    assert b"v2026-11:item:3" in acache.cache


async def test_serializers(acache: AsyncCache) -> None:
    @cached(acache, serializer="json")
    async def as_json(x: int) -> Any:
        return {"x": x, "t": (1, 2)}

    assert await as_json(1) == {"x": 1, "t": [1, 2]}
    assert json.loads(acache.get_nowait(as_json.cache_key(1)) or b"") == {"x": 1, "t": [1, 2]}

    raw_calls = 0

    @cached(acache, serializer="raw")
    async def as_raw(x: int) -> bytes | None:
        nonlocal raw_calls
        raw_calls += 1
        return b"r%d" % x if x else None

    assert await as_raw(1) == b"r1"
    assert acache.get_nowait(as_raw.cache_key(1)) == b"r1"
    assert await as_raw(0) is None  # None is not cached
    assert await as_raw(0) is None
    assert raw_calls == 3

    @cached(acache, serializer="raw")
    async def not_bytes() -> str:
        return "text"

    with pytest.raises(TypeError, match="bytes-like"):
        await not_bytes()

    class Upper:
        def dumps(self, obj: str) -> bytes:
            return obj.upper().encode()

        def loads(self, data: bytes) -> str:
            return data.decode() + "!"

    @cached(acache, serializer=Upper())
    async def custom() -> str:
        return "hi"

    assert await custom() == "HI!"
    assert acache.get_nowait(custom.cache_key()) == b"HI"

    @cached(acache)  # pickle
    async def pickled() -> tuple[int, set[str]]:
        return (1, {"a"})

    assert await pickled() == (1, {"a"})
    assert await pickled() == (1, {"a"})

    with pytest.raises(ValueError, match="unknown serializer"):
        cached(acache, serializer="yaml")
    with pytest.raises(TypeError):
        cached(acache, serializer=object())  # type: ignore[arg-type]


async def test_ttl(acache: AsyncCache, clock: Clock) -> None:
    calls = 0

    @cached(acache, ttl=5)
    async def fn() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await fn() == 1
    assert await fn() == 1
    clock.advance(6)
    assert acache.get_nowait(fn.cache_key()) is None
    assert await fn() == 2


async def test_sync_cache_is_wrapped() -> None:
    with Cache(size="2MiB") as cache:

        @cached(cache)
        async def fn(x: int) -> int:
            return x + 1

        assert await fn(1) == 2
        assert await fn(1) == 2
        assert fn.cache.cache is cache
        assert fn.cache.statistics().hits == 1


def test_decorator_checks(acache: AsyncCache) -> None:
    with pytest.raises(TypeError, match=r"AsyncCache or aiovmc\.Cache"):
        cached({})  # type: ignore[arg-type]

    def sync_fn() -> int:
        return 1

    with pytest.raises(TypeError, match="async"):
        cached(acache)(sync_fn)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="version must be a str or an int"):
        cached(acache, version=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version must not be empty"):
        cached(acache, version="")
