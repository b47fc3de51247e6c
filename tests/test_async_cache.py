"""AsyncCache (DESIGN.md §4, §5) on asyncio and trio.

Interleavings are forced with events and `anyio.wait_all_tasks_blocked()`; nothing
sleeps to synchronise. "Is a checkpoint" is tested by calling inside an already
cancelled scope: an operation that yields to the loop raises there, one that does
not completes.
"""

from __future__ import annotations

import collections.abc
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import aiovmc
from aiovmc import AsyncCache, AsyncReservation, Cache, CacheClosedError, CacheConfigError
from aiovmc._async_cache import DEFAULT_OFFLOAD_THRESHOLD

from .conftest import Clock

pytestmark = pytest.mark.anyio

MiB = 1 << 20

# Made at import time, outside any event loop; see test_no_loop_affinity.
MODULE_CACHE = AsyncCache(size="4MiB", offload_threshold=1024)


@pytest.fixture
def acache() -> Iterator[AsyncCache]:
    cache = AsyncCache(size="16MiB", offload_threshold="4k")
    yield cache
    cache.cache.close()


async def checkpoints(op: object) -> bool:
    """Await ``op`` (a coroutine) in a cancelled scope: True if it yielded."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        await op  # type: ignore[misc]
    return scope.cancelled_caught


class Loader:
    """An async loader that blocks on `release`, counting and tracking its calls."""

    def __init__(self, result: bytes | None = b"loaded", error: Exception | None = None):
        self.result = result
        self.error = error
        self.release = anyio.Event()
        self.calls = 0
        self.running = 0
        self.max_running = 0

    async def __call__(self, key: bytes) -> bytes | None:
        self.calls += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        if self.error is not None:
            raise self.error
        return self.result


# -- reads without waiting -------------------------------------------------------


async def test_hit_and_plain_miss_are_not_checkpoints(acache: AsyncCache) -> None:
    await acache.put("k", b"small")
    assert await acache.get("k") == b"small"
    assert await acache.get(b"k") == b"small"
    assert not await checkpoints(acache.get("k"))
    assert not await checkpoints(acache.get("absent"))
    assert await acache.get("absent") is None
    assert await acache.get("absent", b"dflt") == b"dflt"
    assert acache.get_nowait("k") == b"small"
    assert acache.get_nowait("absent", 7) == 7


async def test_a_get_is_a_coroutine_that_answers_once(acache: AsyncCache) -> None:
    # A hit is answered by an awaitable already done (docs/async.md, "The cost of
    # an awaited hit"): it keeps a coroutine's protocol.
    await acache.put("k", b"v")
    for key, value in (("k", b"v"), ("absent", None)):
        once = acache.get(key)
        assert isinstance(once, collections.abc.Coroutine)
        assert await once == value
        with pytest.raises(RuntimeError):
            await once
    sent = acache.get("k")
    with pytest.raises(StopIteration) as stop:
        sent.send(None)
    assert stop.value.value == b"v"
    thrown = acache.get("k")
    with pytest.raises(ValueError, match="thrown"):
        thrown.throw(ValueError("thrown"))
    closed = acache.get("k")
    closed.close()
    with pytest.raises(RuntimeError):
        await closed
    stats = acache.statistics()
    assert (stats.hits, stats.misses) == (4, 1)  # counted when called, awaited or not


async def test_a_get_runs_as_a_task_of_its_own(acache: AsyncCache, anyio_backend: str) -> None:
    await acache.put("k", b"v")
    got: list[bytes | None] = []

    async def keep(key: str) -> None:
        got.append(await acache.get(key))

    async with anyio.create_task_group() as tg:
        tg.start_soon(acache.get, "k")  # a hit, started as a task
        tg.start_soon(acache.get, "absent")
        tg.start_soon(keep, "k")
    assert got == [b"v"]
    if anyio_backend == "asyncio":
        import asyncio

        assert await asyncio.create_task(acache.get("k")) == b"v"
        assert await asyncio.gather(acache.get("k"), acache.get("absent", b"d")) == [b"v", b"d"]


def _finishing_threads(acache: AsyncCache) -> list[int]:
    """The threads that copy large values (the core's ``finish``), as a list
    that grows with every call from now on."""
    threads: list[int] = []
    finish = acache._core.finish

    def spy(key: bytes, size: int) -> bytes | None:
        threads.append(threading.get_ident())
        return finish(key, size)

    acache._core.finish = spy
    return threads


async def test_large_hit_is_copied_in_a_worker_thread(acache: AsyncCache) -> None:
    value = bytes(range(256)) * 64  # 16 KiB >= the fixture's 4 KiB threshold
    await acache.put("big", value)
    threads = _finishing_threads(acache)
    assert await acache.get("big") == value
    assert threads and threads[0] != threading.get_ident()
    assert await checkpoints(acache.get("big"))  # an offloaded copy is a checkpoint
    assert acache.get_nowait("big") == value  # never waits, even for a large value
    stats = acache.statistics()
    assert (stats.hits, stats.gets) == (3, 3)  # the cancelled get counts: it looked up


async def test_large_entry_replaced_by_a_miss_between_lookup_and_copy(
    acache: AsyncCache,
) -> None:
    await acache.put("big", b"x" * 8192)
    finish = acache._core.finish

    def vanished(key: bytes, size: int) -> bytes | None:
        acache.cache.delete(key)
        return finish(key, size)

    acache._core.finish = vanished
    assert await acache.get("big", b"gone") == b"gone"
    await acache.put("big", b"x" * 8192)
    assert await acache.get_many(["big", "big"]) == {}
    stats = acache.statistics()
    assert (stats.hits, stats.misses) == (0, 3)  # counted as answered: misses


async def test_get_into(acache: AsyncCache) -> None:
    await acache.put("k", b"0123456789")
    buf = bytearray(4)
    assert await acache.get_into("k", buf, offset=3) == 10
    assert buf == b"3456"
    assert await acache.get_into("absent", buf) is None
    big = bytes(range(256)) * 64
    await acache.put("big", big)
    out = bytearray(len(big))
    assert await acache.get_into("big", out) == len(big)
    assert out == big


async def test_get_many(acache: AsyncCache) -> None:
    big = b"B" * 10_000
    await acache.put_many({"a": b"1", "big": big, "c": b"3"})
    got = await acache.get_many(["a", "missing", "big", "c"])
    assert got == {b"a": b"1", b"big": big, b"c": b"3"}
    assert list(got) == [b"a", b"big", b"c"]


async def test_get_many_batches_hits_misses_duplicates_and_expired(
    acache: AsyncCache, clock: Clock
) -> None:
    # More keys than one batch of the core's call (64), in an order that mixes
    # hits, misses, keys asked twice and expired keys across batch boundaries.
    values = {b"k%03d" % i: b"v%d" % i * (i % 7 + 1) for i in range(150)}
    for key, value in values.items():
        await acache.put(key, value, ttl=1 if key.endswith(b"5") else None)
    clock.advance(2)  # the keys ending in 5 have expired
    asked = [b"k%03d" % i for i in range(0, 200, 3)] + [b"k%03d" % i for i in range(0, 150, 4)]
    every = [*asked, b"k001", b"k002"]
    before = acache.statistics()
    got = await acache.get_many([*asked, "k001", "k002"])
    want = {k: values[k] for k in every if k in values and not k.endswith(b"5")}
    assert got == want
    assert list(got) == list(want)  # in the order first asked
    after = acache.statistics()
    assert after.gets - before.gets == len(every)  # every lookup counted, repeats too
    assert after.hits - before.hits == sum(1 for k in every if k in want)
    expired = {k for k in every if k in values and k.endswith(b"5")}
    assert after.expirations - before.expirations == len(expired)
    assert not await checkpoints(acache.get_many(asked))  # no large value: nothing waits


async def test_get_many_copies_large_values_off_the_loop(acache: AsyncCache) -> None:
    big = bytes(range(256)) * 64  # 16 KiB >= the fixture's 4 KiB threshold
    await acache.put_many({"a": b"1", "big": big, "big2": big[::-1]})
    threads = _finishing_threads(acache)
    got = await acache.get_many(["big", "a", "big", "big2"])
    assert got == {b"big": big, b"a": b"1", b"big2": big[::-1]}
    assert list(got) == [b"big", b"a", b"big2"]
    assert len(threads) == 2 and threading.get_ident() not in threads  # each large key once
    stats = acache.statistics()
    assert (stats.gets, stats.hits) == (4, 4)


async def test_get_many_finishes_each_ask_of_a_large_key_that_hit(acache: AsyncCache) -> None:
    # A large key asked twice is copied once, and each ask that hit is
    # finished: here the key is deleted after the first ask (a hit, counted),
    # so the second misses; the copy then finds it gone and the first ask
    # becomes a miss too. No other hit is touched.
    big = bytes(range(256)) * 64  # 16 KiB >= the fixture's 4 KiB threshold
    await acache.put_many({"a": b"1", "big": big})
    assert await acache.get("a") == b"1"
    inline = acache._core.get_many_inline

    def deleting_after_the_first_ask(
        keys: list[Any], limit: int, found: dict[bytes, bytes | None], large: Any, start: int
    ) -> int:
        done = inline(keys[: start + 1], limit, found, large, start)
        acache.cache.delete(b"big")
        return inline(keys, limit, found, large, done)

    acache._core.get_many_inline = deleting_after_the_first_ask
    assert await acache.get_many(["big", "big"]) == {}
    stats = acache.statistics()
    assert (stats.hits, stats.misses) == (1, 2)
    # Both asks hit, then the key goes before the copy: two misses.
    acache._core.get_many_inline = inline
    await acache.put("big", big)
    finish = acache._core.finish

    def gone(key: bytes, size: int) -> bytes | None:
        acache.cache.delete(key)
        return finish(key, size)

    acache._core.finish = gone
    assert await acache.get_many(["big", "big"]) == {}
    stats = acache.statistics()
    assert (stats.hits, stats.misses) == (1, 4)
    # A small value of the key, copied by the first ask, is kept when the
    # second ask's large one has gone before its copy.
    await acache.put("k", b"small")

    def replaced_after_the_first_ask(
        keys: list[Any], limit: int, found: dict[bytes, bytes | None], large: Any, start: int
    ) -> int:
        done = inline(keys[: start + 1], limit, found, large, start)
        acache.cache.put(b"k", big)
        return inline(keys, limit, found, large, done)

    acache._core.get_many_inline = replaced_after_the_first_ask
    assert await acache.get_many(["k", "k"]) == {b"k": b"small"}
    stats = acache.statistics()
    assert (stats.hits, stats.misses) == (2, 5)


async def test_get_many_cancelled_in_the_middle(acache: AsyncCache) -> None:
    big = bytes(range(256)) * 64
    await acache.put_many({"a": b"1", "big": big, "big2": big})
    copying, release = threading.Event(), threading.Event()
    finish = acache._core.finish

    def held(key: bytes, size: int) -> bytes | None:
        copying.set()
        assert release.wait(30), "the test did not release the copy"
        return finish(key, size)

    acache._core.finish = held
    outcome: list[object] = []

    async def get_many() -> None:
        outcome.append(await acache.get_many(["a", "big", "big2"]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(get_many)
        await anyio.to_thread.run_sync(copying.wait)  # the first large copy has started
        tg.cancel_scope.cancel()
        release.set()  # the copy runs to its end; the cancel takes effect after it
    assert outcome == []  # the call returned nothing
    stats = acache.statistics()
    assert (stats.gets, stats.hits) == (3, 3)  # the lookups made are counted
    acache._core.finish = finish
    assert await acache.get_many(["big2", "a"]) == {b"big2": big, b"a": b"1"}


# -- writes ----------------------------------------------------------------------


async def test_writes(acache: AsyncCache) -> None:
    ts1 = await acache.put("a", b"1")
    ts2 = await acache.put("b", bytearray(b"2"), ttl=60)
    assert ts2 > ts1
    assert not await checkpoints(acache.put("c", b"3"))  # small: no waiting
    assert await acache.add("a", b"other") is False
    assert await acache.add("d", memoryview(b"4")) is True
    assert await acache.get("a") == b"1"
    assert await acache.delete("a") is True
    assert await acache.delete("a") is False
    assert await acache.evict("b") is True
    ts3 = await acache.put_many([("e", b"5"), ("f", b"6")])
    assert ts3 > ts2
    assert sorted(acache.cache.keys()) == [b"c", b"d", b"e", b"f"]
    await acache.clear()
    assert len(acache.cache) == 0


async def test_large_writes_are_offloaded(acache: AsyncCache) -> None:
    big = bytes(range(256)) * 64
    assert await checkpoints(acache.put("big", big))  # so it may not have happened
    await acache.put("big", big)
    assert await acache.get("big") == big
    assert await acache.add("big2", big)
    assert await acache.put_many({f"k{i}": b"x" * 1024 for i in range(8)})  # 8 KiB total
    assert await acache.get("k7") == b"x" * 1024


async def test_errors_are_the_sync_caches(acache: AsyncCache) -> None:
    with pytest.raises(TypeError):
        await acache.get(12)  # type: ignore[call-overload]
    with pytest.raises(aiovmc.KeyTooLargeError):
        await acache.get(b"k" * 70_000)
    with pytest.raises(aiovmc.KeyTooLargeError):
        acache.get_nowait("k" * 70_000)
    with pytest.raises(TypeError):
        await acache.put("k", "not a buffer")  # type: ignore[arg-type]
    with pytest.raises(aiovmc.ValueTooLargeError):
        await acache.put("k", bytes(32 * MiB))


# -- loads -----------------------------------------------------------------------


async def test_500_concurrent_misses_make_one_loader_call(acache: AsyncCache) -> None:
    loader = Loader()
    results: list[bytes | None] = []

    async def get() -> None:
        results.append(await acache.get("cold", on_miss=loader))

    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(get)
        await anyio.wait_all_tasks_blocked()
        assert loader.calls == 1
        loader.release.set()
    assert results == [b"loaded"] * 500
    stats = acache.statistics()
    assert (stats.loader_calls, stats.coalesced_gets) == (1, 499)
    # The leader's get is a miss; the 499 answered by its load are hits.
    assert (stats.gets, stats.misses, stats.hits, stats.puts) == (500, 1, 499, 1)
    assert await acache.get("cold") == b"loaded"  # stored: now a hit without a loader


async def test_handle_loader_and_per_call_loader(acache: AsyncCache) -> None:
    calls: list[bytes] = []

    async def handle_loader(key: bytes) -> bytes:
        calls.append(key)
        return b"h:" + key

    def sync_loader(key: bytes) -> bytearray:
        calls.append(key)
        return bytearray(b"s:" + key)

    cache = AsyncCache.from_cache(acache.cache, on_miss=handle_loader)
    assert await cache.get("a") == b"h:a"
    got = await cache.get("b", on_miss=sync_loader)
    assert got == b"s:b" and type(got) is bytes
    assert await cache.get("a") == b"h:a"
    assert calls == [b"a", b"b"]
    assert cache.statistics().loader_calls == 2


async def test_loader_error_reaches_every_waiter_and_is_not_cached(acache: AsyncCache) -> None:
    error = ConnectionError("backend down")
    loader = Loader(error=error)
    errors: list[BaseException] = []

    async def get() -> None:
        try:
            await acache.get("k", on_miss=loader)
        except ConnectionError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(get)
        await anyio.wait_all_tasks_blocked()
        loader.release.set()
    assert len(errors) == 5 and all(e is error for e in errors)
    assert "k" not in acache.cache
    ok = Loader()
    ok.release.set()
    assert await acache.get("k", on_miss=ok) == b"loaded"
    assert acache.statistics().loader_calls == 2


async def test_none_result_gives_each_waiter_its_default(acache: AsyncCache) -> None:
    loader = Loader(result=None)
    results: dict[int, object] = {}

    async def get(n: int) -> None:
        results[n] = await acache.get("k", n, on_miss=loader)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(get, n)
        await anyio.wait_all_tasks_blocked()
        loader.release.set()
    assert results == {0: 0, 1: 1, 2: 2, 3: 3}
    assert "k" not in acache.cache
    assert acache.statistics().puts == 0


async def test_cancelled_waiter_leaves_the_load_alone(acache: AsyncCache) -> None:
    loader = Loader()
    results: list[object] = []
    scope = anyio.CancelScope()

    async def get(scope: anyio.CancelScope) -> None:
        with scope:
            results.append(await acache.get("k", on_miss=loader))
            return
        results.append("cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(get, anyio.CancelScope())
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(get, scope)
        tg.start_soon(get, anyio.CancelScope())
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert results == ["cancelled"]
        loader.release.set()
    assert results == ["cancelled", b"loaded", b"loaded"]
    assert loader.calls == 1


async def test_cancelled_leader_hands_the_load_over(acache: AsyncCache) -> None:
    first, second = Loader(b"first"), Loader(b"second")
    results: list[object] = []
    leader = anyio.CancelScope()

    async def get(scope: anyio.CancelScope, loader: Loader) -> None:
        with scope:
            results.append(await acache.get("k", on_miss=loader))
            return
        results.append("cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(get, leader, first)
        await anyio.wait_all_tasks_blocked()
        for _ in range(3):
            tg.start_soon(get, anyio.CancelScope(), second)
        await anyio.wait_all_tasks_blocked()
        leader.cancel()
        await anyio.wait_all_tasks_blocked()
        assert (first.running, second.running, second.calls) == (0, 1, 1)
        second.release.set()
    assert results == ["cancelled", b"second", b"second", b"second"]
    assert first.max_running == second.max_running == 1
    assert acache.get_nowait("k") == b"second"
    stats = acache.statistics()
    assert (stats.loader_calls, stats.coalesced_gets) == (2, 2)


async def test_large_loaded_value_is_stored_off_loop(acache: AsyncCache) -> None:
    big = bytearray(b"L" * 100_000)

    async def load(key: bytes) -> bytearray:
        return big

    results: list[bytes | None] = []

    async def get() -> None:
        results.append(await acache.get("k", on_miss=load))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(get)
    assert results == [bytes(big)] * 3
    assert all(type(r) is bytes for r in results)
    assert acache.get_nowait("k") == bytes(big)


async def test_loaded_value_gets_the_ttl(acache: AsyncCache, clock: Clock) -> None:
    async def load(key: bytes) -> bytes:
        return b"v"

    assert await acache.get("k", on_miss=load, ttl=5) == b"v"
    assert acache.get_nowait("k") == b"v"
    clock.advance(6)
    assert acache.get_nowait("k") is None


async def test_loader_returning_a_non_buffer_is_an_error_for_everyone(
    acache: AsyncCache,
) -> None:
    async def load(key: bytes) -> str:
        return "text"

    with pytest.raises(TypeError):
        await acache.get("k", on_miss=load)  # type: ignore[arg-type]
    assert "k" not in acache.cache


# -- reservations ----------------------------------------------------------------


async def test_reserve_publishes_on_success(acache: AsyncCache) -> None:
    async with acache.reserve("r", 5, ttl=60) as r:
        assert isinstance(r, AsyncReservation)
        assert (r.key, r.size, r.timestamp) == (b"r", 5, None)
        assert acache.get_nowait("r") is None  # not visible before publication
        r.buffer[:] = b"hello"
    assert r.timestamp is not None
    assert acache.get_nowait("r") == b"hello"
    assert acache.cache.committed_timestamp >= r.timestamp


async def test_reserve_cancels_on_exception(acache: AsyncCache) -> None:
    baseline = acache.statistics().used_bytes
    with pytest.raises(RuntimeError):
        async with acache.reserve("r", 5) as r:
            r.buffer[:2] = b"he"
            raise RuntimeError("half-written")
    assert r.timestamp is None
    assert "r" not in acache.cache
    assert acache.statistics().used_bytes == baseline


async def test_reserve_cancels_on_cancellation(acache: AsyncCache) -> None:
    baseline = acache.statistics().used_bytes
    with anyio.CancelScope() as scope:
        async with acache.reserve("r", 5) as r:
            r.buffer[:2] = b"he"
            scope.cancel()
            await anyio.lowlevel.checkpoint()
            r.buffer[2:] = b"llo"  # never reached
    assert scope.cancelled_caught
    assert r.timestamp is None
    assert "r" not in acache.cache
    assert acache.statistics().used_bytes == baseline


async def test_reserve_explicit_publish(acache: AsyncCache) -> None:
    r = acache.reserve("r", 3)
    r.buffer[:] = b"abc"
    ts = r.publish()
    assert r.timestamp == ts
    assert await acache.get("r") == b"abc"
    r2 = acache.reserve("r", 3)
    r2.cancel()
    assert await acache.get("r") == b"abc"


# -- committed and persisted -----------------------------------------------------


async def test_wait_committed(acache: AsyncCache) -> None:
    ts = await acache.put("k", b"v")
    assert await acache.wait_committed(ts) >= ts
    assert await checkpoints(acache.wait_committed(ts))  # always a checkpoint

    done = anyio.Event()
    later: list[int] = []

    async def waiter(target: int) -> None:
        later.append(await acache.wait_committed(target))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, ts + 1)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        ts2 = await acache.put("k2", b"v")
        with anyio.fail_after(10):
            await done.wait()
    assert later[0] >= ts2


async def test_wait_persisted_shares_one_flush(acache: AsyncCache) -> None:
    ts = await acache.put("k", b"v")
    results: list[int] = []

    async def waiter() -> None:
        results.append(await acache.wait_persisted(ts))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(waiter)
    assert len(results) == 20 and min(results) >= ts
    assert acache._flushes.loader_calls == 1
    assert acache.cache.persisted_timestamp >= ts
    # Already persisted: no flush, but still a checkpoint.
    assert await acache.wait_persisted(ts) >= ts
    assert await checkpoints(acache.wait_persisted(ts))
    assert acache._flushes.loader_calls == 1


class SlowPersistCache(Cache):
    """A Cache whose flushes report their start and finish when the test says so."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.flush_started = threading.Semaphore(0)
        self.flush_done = threading.Semaphore(0)
        self.flushes = 0

    def persist(self) -> int:
        self.flushes += 1
        persisted = super().persist()
        self.flush_started.release()
        assert self.flush_done.acquire(timeout=10)
        return persisted


async def test_wait_persisted_group_commit_rounds() -> None:
    cache = SlowPersistCache(size="4MiB")
    acache = AsyncCache.from_cache(cache)
    results: list[int] = []

    async def waiter(ts: int) -> None:
        results.append(await acache.wait_persisted(ts))

    async def flush_started() -> None:
        assert await anyio.to_thread.run_sync(cache.flush_started.acquire, True, 10)
        await anyio.wait_all_tasks_blocked()

    try:
        ts1 = await acache.put("a", b"1")
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(waiter, ts1)
            await flush_started()
            # Published after flush 1 has done its work: these need the next flush.
            ts2 = await acache.put("b", b"2")
            for _ in range(5):
                tg.start_soon(waiter, ts2)
            await anyio.wait_all_tasks_blocked()
            assert (cache.flushes, results) == (1, [])
            cache.flush_done.release()  # flush 1 ends: the ts1 waiters are done
            await flush_started()
            assert cache.flushes == 2
            assert len(results) == 5 and min(results) >= ts1
            cache.flush_done.release()
        assert len(results) == 10 and min(results[5:]) >= ts2
        assert results == sorted(results)  # persisted_timestamp never goes back
        assert cache.flushes == 2
        assert cache.persisted_timestamp >= ts2
    finally:
        for _ in range(3):
            cache.flush_done.release()
        cache.close()


async def test_cancelled_persist_waiter_does_not_disturb_others(acache: AsyncCache) -> None:
    ts = await acache.put("k", b"v")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await acache.wait_persisted(ts)
    assert scope.cancelled_caught
    assert await acache.wait_persisted(ts) >= ts


# -- statistics, lifetime, construction ------------------------------------------


async def test_statistics_count_loads_file_wide(acache: AsyncCache) -> None:
    assert acache.statistics() == acache.cache.statistics()
    loader = Loader()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(lambda: acache.get("k", on_miss=loader))
        await anyio.wait_all_tasks_blocked()
        loader.release.set()
    stats = acache.statistics()
    assert (stats.loader_calls, stats.coalesced_gets, stats.load_takeovers) == (1, 2, 0)
    assert (stats.gets, stats.hits, stats.misses, stats.puts, stats.entries) == (3, 2, 1, 1, 1)
    assert acache.statistics() == acache.cache.statistics()


async def test_aclose_and_context_manager() -> None:
    async with AsyncCache(size="2MiB") as acache:
        await acache.put("k", b"v")
    assert acache.cache.closed
    with pytest.raises(CacheClosedError):
        await acache.get("k")
    await acache.aclose()  # idempotent

    other = AsyncCache(size="2MiB")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await other.aclose()
    assert other.cache.closed  # closed even though cancelled


async def test_from_cache_uses_the_caches_sync_loader() -> None:
    with Cache(size="2MiB", on_miss=lambda key: b"sync:" + key) as cache:
        acache = AsyncCache.from_cache(cache)
        assert acache.cache is cache
        assert await acache.get("k") == b"sync:k"
        assert acache.statistics().loader_calls == 1


def test_construction_checks() -> None:
    with pytest.raises(CacheConfigError):
        AsyncCache(size="2MiB", offload_threshold=-1)
    with pytest.raises(TypeError):
        AsyncCache.from_cache(object())  # type: ignore[arg-type]
    acache = AsyncCache(size="2MiB", offload_threshold="1k")
    assert acache.offload_threshold == 1024
    acache.cache.close()
    acache = AsyncCache(size="2MiB")
    assert acache.offload_threshold == DEFAULT_OFFLOAD_THRESHOLD
    acache.cache.close()


def test_no_loop_affinity() -> None:
    """One AsyncCache made at import time serves alternating asyncio and trio runs."""

    async def main(n: int) -> None:
        loader = Loader(result=b"%d" % n)

        async def get() -> None:
            assert await MODULE_CACHE.get(f"cold{n}", on_miss=loader) == b"%d" % n

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(get)
            await anyio.wait_all_tasks_blocked()
            loader.release.set()
        assert loader.calls == 1
        big = b"%d" % n * 4096  # above the 1 KiB threshold: a worker-thread copy
        await MODULE_CACHE.put("big", big)
        assert await MODULE_CACHE.get("big") == big
        ts = await MODULE_CACHE.put("p", b"v")
        assert await MODULE_CACHE.wait_persisted(ts) >= ts

    for n, backend in enumerate(["asyncio", "trio", "asyncio", "trio", "asyncio"]):
        anyio.run(main, n, backend=backend)


# -- the event loop stays responsive ---------------------------------------------


async def test_large_copies_run_off_the_loop_while_it_runs_on() -> None:
    """Concurrent 64 MiB puts and gets (the default offload threshold): each
    copy runs in a worker thread, and the loop stays free while one is in
    flight: every copy first waits for the loop to run a call of its own.

    How long the loop is kept waiting is measured in benchmarks/ (section 3
    of bench_async.py), not asserted here.
    """
    size = 64 * MiB
    values = [bytes([n]) * size for n in range(3)]
    copiers: list[int] = []

    def after_the_loop_answers(copy: Any) -> Any:
        def copy_in_flight(*args: Any, **kwargs: Any) -> Any:
            copiers.append(threading.get_ident())
            anyio.from_thread.run_sync(lambda: None)  # blocks unless the loop runs
            return copy(*args, **kwargs)

        return copy_in_flight

    class PutInFlight(Cache):
        put = after_the_loop_answers(Cache.put)

    acache = AsyncCache.from_cache(PutInFlight(size="512MiB"))
    try:
        acache._core.finish = after_the_loop_answers(acache._core.finish)
        got: list[bytes | None] = []

        async def put_then_get(n: int) -> None:
            await acache.put(f"v{n}", values[n])
            got.append(await acache.get(f"v{n}"))

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                for n in range(3):
                    tg.start_soon(put_then_get, n)
        assert sorted(v[0] for v in got if v is not None) == [0, 0, 1, 1, 2, 2]
        assert all(v is not None and len(v) == size and v.count(v[0]) == size for v in got)
        assert len(copiers) == 12 and threading.get_ident() not in copiers
    finally:
        acache.cache.close()


async def test_a_leader_taking_over_looks_again_before_loading() -> None:
    """The first leader stored the value, then was cancelled before its load
    ended: the waiter that takes over finds the value instead of loading."""
    acache = AsyncCache(size="1MiB")
    calls: list[str] = []
    stored = anyio.Event()

    async def first(key: bytes) -> bytes:
        calls.append("first")
        acache.cache.put(key, b"stored by the first leader")
        stored.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def second(key: bytes) -> bytes:
        calls.append("second")
        return b"loaded again"

    results: list[bytes | None] = []
    try:
        async with anyio.create_task_group() as tg:
            scopes: list[anyio.CancelScope] = []

            async def leader() -> None:
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await acache.get(b"k", on_miss=first)

            async def waiter() -> None:
                results.append(await acache.get(b"k", on_miss=second))

            tg.start_soon(leader)
            await stored.wait()
            acache.cache.delete(b"k")  # so that the waiter misses and joins the load
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            acache.cache.put(b"k", b"stored by the first leader")
            scopes[0].cancel()
        assert results == [b"stored by the first leader"]
        assert calls == ["first"]
    finally:
        await acache.aclose()


async def test_entering_a_closed_handle_fails_at_once() -> None:
    acache = AsyncCache(size="1MiB")
    await acache.aclose()
    with pytest.raises(CacheClosedError, match="closed"):
        async with acache:
            pass
