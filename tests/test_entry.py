"""`Cache.get_entry` / `AsyncCache.get_entry`: a value with its publication
timestamp and expiry, read in one core call."""

from __future__ import annotations

import dataclasses
import time

import anyio
import pytest

import aiovmc
from aiovmc import AsyncCache, Cache, CacheEntry


def test_get_entry_sync() -> None:
    with Cache(size="8MiB") as cache:
        ts = cache.put("a", b"value", ttl=100)
        before = time.time()
        entry = cache.get_entry("a")
        assert isinstance(entry, CacheEntry)
        assert entry.value == b"value" and entry.timestamp == ts
        assert entry.expires_at is not None and before < entry.expires_at <= before + 100
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.value = b"x"  # type: ignore[misc]
        ts2 = cache.put("a", b"forever")
        assert cache.get_entry("a") == CacheEntry(b"forever", ts2, None)
        assert cache.get_entry("missing") is None
        big = bytes(range(256)) * 1000  # beyond the per-thread scratch buffer
        ts3 = cache.put(b"big", big)
        assert cache.get_entry(b"big") == CacheEntry(big, ts3, None)
        stats = cache.statistics()
        assert (stats.gets, stats.hits, stats.misses) == (4, 3, 1)  # counted like get
        with pytest.raises(aiovmc.KeyTooLargeError):
            cache.get_entry("k" * 70_000)
        with pytest.raises(TypeError):
            cache.get_entry(3)  # type: ignore[arg-type]
    with pytest.raises(aiovmc.CacheClosedError):
        cache.get_entry("a")


def test_get_entry_of_an_expired_value_is_none() -> None:
    with Cache(size="1MiB") as cache:
        cache.put("gone", b"x", ttl=0.001)
        deadline = time.monotonic() + 10
        while cache.get_entry("gone") is not None:  # polled until the clock passes the TTL
            assert time.monotonic() < deadline
        assert "gone" not in cache


@pytest.mark.anyio
async def test_get_entry_async_offloads_large_values() -> None:
    async with AsyncCache(size="8MiB", offload_threshold="4k") as cache:
        ts = await cache.put("small", b"s", ttl=60)
        entry = await cache.get_entry("small")
        assert entry is not None and entry.value == b"s" and entry.timestamp == ts
        big = bytes(range(256)) * 64
        ts_big = await cache.put("big", big)
        assert await cache.get_entry("big") == CacheEntry(big, ts_big, None)
        # a small hit completes without a checkpoint; a large one is copied off the loop
        assert not await checkpoints(cache.get_entry("small"))
        assert await checkpoints(cache.get_entry("big"))
        assert await cache.get_entry("missing") is None
        stats = cache.statistics()
        # five gets, each counted once (a large one too, though it takes two
        # calls; the cancelled one as well: it looked up)
        assert (stats.gets, stats.hits, stats.misses) == (5, 4, 1)


async def checkpoints(op: object) -> bool:
    """Await ``op`` (a coroutine) in a cancelled scope: True if it yielded."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        await op  # type: ignore[misc]
    return scope.cancelled_caught
