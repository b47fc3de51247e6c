"""Several real processes sharing one cache file.

Every test runs its children with both multiprocessing start methods: "spawn"
(a fresh interpreter that opens the file by path) and "fork" (a copy of this
process). Values are self-verifying (tests/helpers.py), so any process can tell
that a value it reads is intact and belongs to the key it asked for. Every wait
is bounded.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import queue
import random
import select
import signal
import time
from typing import Any

import anyio
import pytest

import aiovmc

from .helpers import (
    WAIT,
    check_value,
    join_all,
    make_value,
    private_file_stats,
    rw_worker,
    slot_hits,
    verify_get,
    wait_for,
)

# Python 3.12+ warns when fork() is called while threads run (other test files
# may leave worker threads alive); the children here use no inherited thread.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

START_METHODS = ["spawn", "fork"]


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    return multiprocessing.get_context(request.param)


def _run_workers(
    ctx: Any,
    target: Any,
    arglists: list[tuple[Any, ...]],
    *,
    barrier: bool = False,
    meanwhile: Any = None,
) -> list[Any]:
    """Run `target(*args, [start,] out)` in one process per entry of `arglists`
    and return what they put on `out`, one report each (in arrival order),
    once all have exited, each with status 0. With `barrier`, `start` is a
    barrier the workers pass together with this process, so that they all
    begin at once; `meanwhile()` runs here while they work."""
    out = ctx.Queue()
    start = ctx.Barrier(len(arglists) + 1) if barrier else None
    extra = (out,) if start is None else (start, out)
    procs = [ctx.Process(target=target, args=(*args, *extra)) for args in arglists]
    for p in procs:
        p.start()
    if start is not None:
        start.wait(WAIT)
    if meanwhile is not None:
        meanwhile()
    results = [out.get(timeout=WAIT) for _ in procs]
    join_all(procs)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return results


# ---------------------------------------------------------------------------
# Workers (module level so that "spawn" children can import them)
# ---------------------------------------------------------------------------


def _stamp_worker(path: str, wid: int, n: int, start: Any, out: Any) -> None:
    """Publish n values (puts and reserve/publish) and report their timestamps."""
    stamps: list[int] = []
    error = None
    try:
        with aiovmc.Cache(path) as cache:
            start.wait(WAIT)
            for i in range(n):
                key = b"ts-%d-%d" % (wid, i)
                value = make_value(key, i, 100)
                if i % 2:
                    stamps.append(cache.put(key, value))
                else:
                    with cache.reserve(key, len(value)) as res:
                        res.buffer[:] = value
                    assert res.timestamp is not None
                    stamps.append(res.timestamp)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, stamps, error))


def _add_worker(path: str, wid: int, keys: list[bytes], start: Any, out: Any) -> None:
    """Race `add` on the same keys as every other worker; report which it won."""
    won: list[bytes] = []
    error = None
    try:
        with aiovmc.Cache(path) as cache:
            start.wait(WAIT)
            for key in keys:
                if cache.add(key, make_value(key, wid, 200)):
                    won.append(key)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, won, error))


def _stats_worker(path: str, wid: int, n: int, out: Any) -> None:
    """n puts of own keys, n hits, n misses: exact counts for the parent."""
    error = None
    try:
        with aiovmc.Cache(path) as cache:
            for i in range(n):
                key = b"st-%d-%d" % (wid, i)
                cache.put(key, make_value(key, i, 80))
            for i in range(n):
                key = b"st-%d-%d" % (wid, i)
                check_value(key, cache.get(key))
                assert cache.get(b"absent-%d-%d" % (wid, i)) is None
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, error))


CHURN_KEYS = [b"churn-%d" % i for i in range(12)]  # a dozen keys: few shards, much racing
CHURN_SIZES = (30, 200, 1500, 9000)  # one unit up to several: extents freed and reused


def _churn_reader(path: str, wid: int, n: int, start: Any, out: Any) -> None:
    """n gets (single, and batches of get_many) of the churned keys, every value
    verified; reports (wid, (hits, misses), error)."""
    hits = misses = 0
    error = None
    try:
        rng = random.Random(wid)
        with aiovmc.Cache(path) as cache:
            start.wait(WAIT)
            done = 0
            while done < n:
                if rng.random() < 0.2:
                    batch = rng.sample(CHURN_KEYS, 4)
                    found = cache.get_many(batch)
                    for key, value in found.items():
                        check_value(key, value)
                    hits, misses = hits + len(found), misses + len(batch) - len(found)
                    done += len(batch)
                else:
                    key = rng.choice(CHURN_KEYS)
                    if verify_get(cache, key) is None:
                        misses += 1
                    else:
                        hits += 1
                    done += 1
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, (hits, misses), error))


def _churn_writer(path: str, wid: int, n: int, start: Any, out: Any) -> None:
    """n replacements of the churned keys with values of every size, and some
    deletes, in a cache too small for them: entries are removed, evicted, freed
    and their room reused under the readers."""
    error = None
    try:
        rng = random.Random(100 + wid)
        with aiovmc.Cache(path) as cache:
            start.wait(WAIT)
            for i in range(n):
                key = rng.choice(CHURN_KEYS)
                if rng.random() < 0.1:
                    cache.delete(key)
                else:
                    cache.put(key, make_value(key, i, rng.choice(CHURN_SIZES)))
                if i % 50 == 0:  # fills the file: evictions of the churned keys too
                    filler = b"fill-%d-%d" % (wid, i)
                    cache.put(filler, make_value(filler, i, 60_000))
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, (0, 0), error))


def test_optimistic_reads_racing_writers_and_evictions_verify_and_count_exactly(
    ctx: Any, cache_path: str
) -> None:
    """Gets look a key up without the shard lock and validate by the shard's
    sequence (docs/design.md, "Optimistic reads"). Readers get a dozen keys
    while writers replace them with values of other sizes, delete them, and
    fill the cache so that evictions free their room for reuse: every value
    read verifies, the hits and misses counted are exactly those the readers
    saw, and most hits were counted by the optimistic path."""
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        for i, key in enumerate(CHURN_KEYS):
            cache.put(key, make_value(key, i, 200))
        before, optimistic_before = cache.statistics(), sum(slot_hits(cache_path))
        readers = [(_churn_reader, (cache_path, w, 10_000)) for w in range(2)]
        writers = [(_churn_writer, (cache_path, w, 2500)) for w in range(2)]
        results = _run_workers(
            ctx,
            _churn_worker,
            [(target, args) for target, args in readers + writers],
            barrier=True,
        )
        assert not [r for r in results if r[2]], results
        after = cache.statistics()
        assert after.hits - before.hits == sum(r[1][0] for r in results)
        assert after.misses - before.misses == sum(r[1][1] for r in results)
        assert after.evictions > before.evictions  # room was freed under the readers
        optimistic = sum(slot_hits(cache_path)) - optimistic_before
        assert 0 < optimistic <= after.hits - before.hits


def _churn_worker(target: Any, args: tuple[Any, ...], start: Any, out: Any) -> None:
    target(*args, start, out)


FLICKER = b"flicker"  # one key, deleted and put back without pause


def _flicker_writer(path: str, size: int, stop: Any, start: Any, out: Any) -> None:
    """Delete FLICKER and put it back (`size` bytes), until `stop` is set."""
    error = None
    try:
        values = [make_value(FLICKER, i, size) for i in range(2)]
        with aiovmc.Cache(path) as cache:
            start.wait(WAIT)
            i = 0
            while not stop.is_set():
                cache.delete(FLICKER)
                cache.put(FLICKER, values[i % 2])
                i += 1
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put(("writer", (0, 0), error))


async def _flicker_gets(forms: list[Any], n: int) -> tuple[int, int]:
    """Gets of FLICKER by each of `forms` in turn (async callables answering
    the value or None), every value verified: n, then more until both a hit
    and a miss were seen (at most 100 n). (hits, misses) seen."""
    hits = done = 0
    while (done < n or not 0 < hits < done) and done < 100 * n:
        value = await forms[done % len(forms)]()
        done += 1
        if value is not None:
            check_value(FLICKER, value)
            hits += 1
    return hits, done - hits


def _flicker_reader(path: str, how: str, n: int, stop: Any, start: Any, out: Any) -> None:
    """`_flicker_gets` by get, get_many and get_entry: Cache's ("sync", on an
    asyncio loop that only calls them) or AsyncCache's (on the loop `how`);
    then sets `stop`. Reports (hits, misses) seen."""
    seen, error = (0, 0), None

    async def main() -> tuple[int, int]:
        if how == "sync":
            cache: Any = aiovmc.Cache(path)
            handle = cache

            async def get() -> bytes | None:
                return cache.get(FLICKER)  # type: ignore[no-any-return]

            async def get_many() -> bytes | None:
                return cache.get_many([FLICKER]).get(FLICKER)  # type: ignore[no-any-return]

            async def get_entry() -> bytes | None:
                entry = cache.get_entry(FLICKER)
                return None if entry is None else entry.value

        else:
            cache = aiovmc.AsyncCache(path, offload_threshold="4KiB")
            handle = cache.cache

            async def get() -> bytes | None:
                return await cache.get(FLICKER)  # type: ignore[no-any-return]

            async def get_many() -> bytes | None:
                return (await cache.get_many([FLICKER])).get(FLICKER)  # type: ignore[no-any-return]

            async def get_entry() -> bytes | None:
                entry = await cache.get_entry(FLICKER)
                return None if entry is None else entry.value

        try:
            await anyio.to_thread.run_sync(start.wait, WAIT)
            return await _flicker_gets([get, get_many, get_entry], n)
        finally:
            handle.close()

    try:
        seen = anyio.run(main, backend="asyncio" if how == "sync" else how)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()
    out.put(("reader", seen, error))


@pytest.mark.parametrize("how", ["sync", "asyncio", "trio"])
@pytest.mark.parametrize("size", [100, 70_000, 300_000])
def test_a_get_counts_a_hit_only_if_it_returns_the_value(
    ctx: Any, cache_path: str, size: int, how: str
) -> None:
    """A get that sizes a value in one core call and copies it in another (a
    value too large for the scratch buffer or the event loop; on the fast path,
    a get that found the shard lock held) counts its hit in the first; one
    that copies a value past 256 KiB without the shard lock, then finds it
    replaced, looks again in the same call. If the key is deleted before the
    copy, the get answers a miss, and so it is counted: the hits and misses
    counted are exactly those the reader saw, while another process deletes
    and puts the key back without pause."""
    n = 30_000 if size == 100 else 1_500
    with aiovmc.Cache(cache_path, size="8MiB") as cache:
        before = cache.statistics()
        stop = ctx.Event()
        results = _run_workers(
            ctx,
            _churn_worker,
            [
                (_flicker_reader, (cache_path, how, n, stop)),
                (_flicker_writer, (cache_path, size, stop)),
            ],
            barrier=True,
        )
        assert not [r for r in results if r[2]], results
        ((hits, misses),) = [r[1] for r in results if r[0] == "reader"]
        after = cache.statistics()
        assert (after.hits - before.hits, after.misses - before.misses) == (hits, misses)


def _replacement(wid: int, i: int, r: int) -> tuple[bytes, bytes]:
    """Key i of worker wid and its value of round r: of alternating sizes, so
    that some replacements fill the handle's spare extent and some free it."""
    key = b"rp-%d-%d" % (wid, i)
    return key, make_value(key, r, 100 if (r + i) % 3 else 3000)


def _replace_worker(path: str, wid: int, n: int, rounds: int, out: Any) -> None:
    """`rounds` replacements of each of n own keys."""
    error = None
    try:
        with aiovmc.Cache(path) as cache:
            for r in range(1, rounds + 1):
                for i in range(n):
                    cache.put(*_replacement(wid, i, r))
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, error))


def _create_worker(path: str, wid: int, start: Any, out: Any) -> None:
    """Race to create the same file; write a key; report what the handle saw."""
    error = None
    created = False
    try:
        start.wait(WAIT)
        with aiovmc.Cache(path, size="2MiB") as cache:
            created = cache.info.created
            key = b"cr-%d" % wid
            cache.put(key, make_value(key, wid, 500))
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, created, error))


def _inherited_worker(cache: aiovmc.Cache, wid: int, parent_keys: list[bytes], out: Any) -> None:
    """Use a handle inherited through fork (gunicorn --preload)."""
    error = None
    try:
        for key in parent_keys:
            check_value(key, cache.get(key))
        for i in range(200):
            key = b"child-%d-%d" % (wid, i)
            cache.put(key, make_value(key, i, 300))
            check_value(key, cache.get(key))
        res = cache.reserve(b"child-res-%d" % wid, 100)
        res.buffer[:] = make_value(b"child-res-%d" % wid, 0, 100)
        res.publish()
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, error))


def _hold_open(path: str, ready: Any, release: Any) -> None:
    """Keep the cache open until told to go (or killed)."""
    with aiovmc.Cache(path) as cache:
        cache.put(b"holder", make_value(b"holder", 0, 100))
        ready.set()
        release.wait(WAIT)


def _attach_report(path: str, out: Any) -> None:
    with aiovmc.Cache(path) as cache:
        out.put((cache.info.recovered, sorted(cache.keys())))


def _private_cache_then_wait(out: Any, release: Any) -> None:
    """Create a private cache (a forked grandchild shares it), report, and wait to be killed."""
    cache = aiovmc.Cache(size="4MiB")
    cache.put(b"k", make_value(b"k", 1, 100))
    pid = os.fork()
    if pid == 0:  # the grandchild keeps using the inherited private cache
        check_value(b"k", cache.get(b"k"))
        release.wait(WAIT)
        os._exit(0)
    out.put((cache.path, pid))
    release.wait(WAIT)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_concurrent_readers_and_writers_verify_every_value(ctx: Any, cache_path: str) -> None:
    """Processes put, get, delete and add over shared keys at once (with
    evictions: the cache is smaller than what they write). Every value any of
    them reads is intact and belongs to its key; the file ends consistent."""
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        nproc, ops = 4, 1500
        results = _run_workers(
            ctx, rw_worker, [(cache_path, w, 300, ops, 1000 + w) for w in range(nproc)]
        )
        errors = [r[3] for r in results if r[3]]
        assert not errors, errors
        # The parent sees a consistent cache: every key's value verifies.
        keys = cache.keys()
        assert len(keys) == len(cache) == cache.statistics().entries
        for key in keys:
            verify_get(cache, key)
        stats = cache.statistics()
        assert stats.puts == sum(r[1]["puts"] for r in results)
        assert stats.evictions > 0  # the test did exercise eviction


def test_statistics_are_shared_and_exact(ctx: Any, cache_path: str) -> None:
    """Counters live in the file: the sum of every process's work, exactly."""
    n, nproc = 150, 3
    with aiovmc.Cache(cache_path, size="4MiB") as cache:
        before = cache.statistics()
        results = _run_workers(ctx, _stats_worker, [(cache_path, w, n) for w in range(nproc)])
        assert not [r for r in results if r[1]], results
        after = cache.statistics()
        assert after.puts - before.puts == n * nproc
        assert after.gets - before.gets == 2 * n * nproc
        assert after.hits - before.hits == n * nproc
        assert after.misses - before.misses == n * nproc
        assert after.entries == n * nproc
        assert after.evictions == before.evictions == 0
        # Another process's handle reports the same file-wide numbers.
        with aiovmc.Cache(cache_path) as other:
            same = other.statistics()
        assert (same.puts, same.gets, same.hits, same.misses, same.entries) == (
            after.puts,
            after.gets,
            after.hits,
            after.misses,
            after.entries,
        )


def test_concurrent_replacements_keep_statistics_and_lru_order_exact(
    ctx: Any, cache_path: str
) -> None:
    """Processes replacing their keys at the same time (each replacement takes
    over the old entry's LRU item, and may fill or leave a spare extent): the
    counters are the sum of the work exactly, every key holds its last value,
    and the LRU order is exact afterwards: evicting everything follows the
    order in which this process then read the keys."""
    n, rounds, nproc = 120, 8, 2
    evicted: list[bytes] = []
    with aiovmc.Cache(cache_path, size="8MiB", on_evict=evicted.append) as cache:
        last = dict(_replacement(w, i, rounds) for w in range(nproc) for i in range(n))
        keys = list(last)
        for w in range(nproc):
            for i in range(n):
                cache.put(*_replacement(w, i, 0))
        before = cache.statistics()
        results = _run_workers(
            ctx, _replace_worker, [(cache_path, w, n, rounds) for w in range(nproc)]
        )
        assert not [r for r in results if r[1]], results
        after = cache.statistics()
        assert after.puts - before.puts == n * nproc * rounds
        assert (after.entries, after.evictions, after.expirations) == (len(keys), 0, 0)
        order = random.Random(5).sample(keys, len(keys))
        for key in order:
            assert cache.get(key) == last[key]
        assert cache.statistics().hits - after.hits == len(keys)
        while cache.evict():
            pass
        assert evicted == order


def test_timestamps_strictly_increase_across_processes(ctx: Any, cache_path: str) -> None:
    """One clock for the whole file: every publication (put, reserve/publish)
    from every process gets a distinct timestamp, each process's own are
    increasing, and committed_timestamp covers them all afterwards."""
    nproc, n = 4, 300
    with aiovmc.Cache(cache_path, size="4MiB") as cache:
        base = cache.committed_timestamp
        results = _run_workers(
            ctx, _stamp_worker, [(cache_path, w, n) for w in range(nproc)], barrier=True
        )
        assert not [r[2] for r in results if r[2]], results
        merged: list[int] = []
        for _, stamps, _ in results:
            assert len(stamps) == n
            assert all(a < b for a, b in itertools.pairwise(stamps)), "own stamps went backwards"
            assert min(stamps) > base
            merged.extend(stamps)
        assert len(set(merged)) == len(merged), "two publications shared a timestamp"
        committed = cache.committed_timestamp
        assert committed >= max(merged)
        # A later publication from this process is later than all of them.
        assert cache.put(b"after", b"x") > max(merged)


def test_add_race_has_exactly_one_winner(ctx: Any, cache_path: str) -> None:
    """N processes `add` the same keys at the same moment: exactly one wins
    each key, and the stored value is the winner's."""
    nproc = 4
    keys = [b"race-%d" % i for i in range(120)]
    with aiovmc.Cache(cache_path, size="4MiB") as cache:
        results = _run_workers(
            ctx, _add_worker, [(cache_path, w, keys) for w in range(nproc)], barrier=True
        )
        assert not [r[2] for r in results if r[2]], results
        winners: dict[bytes, list[int]] = {}
        for wid, won, _ in results:
            for key in won:
                winners.setdefault(key, []).append(wid)
        assert sorted(winners) == sorted(keys), "some key was won by nobody"
        doubles = {k: w for k, w in winners.items() if len(w) != 1}
        assert not doubles, f"keys added by more than one process: {doubles}"
        for key, (wid,) in winners.items():
            assert cache.get(key) == make_value(key, wid, 200)
        assert cache.statistics().puts == len(keys)


def test_concurrent_creation_makes_one_file(ctx: Any, cache_path: str) -> None:
    """Processes racing to create the same path all end up on one file: one
    creator, everyone's writes visible, no temporary file left behind."""
    nproc = 4
    results = _run_workers(
        ctx, _create_worker, [(cache_path, w) for w in range(nproc)], barrier=True
    )
    assert not [r[2] for r in results if r[2]], results
    assert sum(1 for r in results if r[1]) == 1, results
    with aiovmc.Cache(cache_path) as cache:
        for w in range(nproc):
            key = b"cr-%d" % w
            assert cache.get(key) == make_value(key, w, 500)
    directory, name = os.path.split(cache_path)
    leftovers = [f for f in os.listdir(directory) if f.startswith(name) and f != name]
    assert not leftovers


@pytest.mark.parametrize("method", ["fork", "os.fork"])
def test_handle_opened_before_fork_works_in_children(method: str, cache_path: str) -> None:
    """gunicorn --preload: the parent opens the cache, forks workers that use
    the inherited handle (reads, puts, reservations); the parent sees their
    writes, and closing the parent's handle does not disturb the children."""
    cache = aiovmc.Cache(cache_path, size="4MiB")
    parent_keys = [b"parent-%d" % i for i in range(50)]
    for i, key in enumerate(parent_keys):
        cache.put(key, make_value(key, i, 500))
    nproc = 3
    if method == "fork":
        ctx = multiprocessing.get_context("fork")
        results = _run_workers(
            ctx, _inherited_worker, [(cache, w, parent_keys) for w in range(nproc)]
        )
        assert not [r for r in results if r[1]], results
    else:
        pids = []
        for w in range(nproc):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                status = 1
                try:
                    q: Any = queue.SimpleQueue()
                    _inherited_worker(cache, w, parent_keys, q)
                    status = 0 if q.get()[1] is None else 2
                finally:
                    os._exit(status)
            pids.append(pid)
        deadline = time.monotonic() + WAIT
        for pid in pids:
            exited = os.pidfd_open(pid)  # readable once the child has exited
            try:
                ready, _, _ = select.select([exited], [], [], deadline - time.monotonic())
            finally:
                os.close(exited)
            assert ready, "a forked child hung"
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    for w in range(nproc):
        for i in range(0, 200, 37):
            key = b"child-%d-%d" % (w, i)
            assert check_value(key, cache.get(key)) == i
        key = b"child-res-%d" % w
        assert cache.get(key) == make_value(key, 0, 100)
    cache.close()


def test_closing_the_parent_handle_keeps_forked_children_alive(cache_path: str) -> None:
    """After fork, each child holds a liveness lock of its own: when the parent
    closes its handle (or a child exits), the file is still known to be in use,
    so a new opener attaches without running recovery under a live user."""
    ctx = multiprocessing.get_context("fork")
    cache = aiovmc.Cache(cache_path, size="2MiB")
    cache.put(b"k", make_value(b"k", 1, 100))
    ready, release = ctx.Event(), ctx.Event()

    def child() -> None:  # uses the inherited handle, then idles
        cache.put(b"from-child", make_value(b"from-child", 2, 100))
        ready.set()
        release.wait(WAIT)
        check_value(b"k", cache.get(b"k"))

    p = ctx.Process(target=child)
    p.start()
    try:
        assert ready.wait(WAIT)
        cache.close()  # the parent lets go; the child still uses the file
        spawn = multiprocessing.get_context("spawn")
        out = spawn.Queue()
        probe = spawn.Process(target=_attach_report, args=(cache_path, out))
        probe.start()
        recovered, keys = out.get(timeout=WAIT)
        join_all([probe])
        assert recovered is False, "recovery ran while a forked child still used the file"
        assert b"from-child" in keys and b"k" in keys
    finally:
        release.set()
        join_all([p])
    assert p.exitcode == 0


def test_inherited_handle_child_killed_does_not_release_parent(cache_path: str) -> None:
    """A forked child that inherited the handle is SIGKILLed; the parent still
    uses the file, so a new opener must not recover it (recovery re-initialises
    the locks under the parent's feet)."""
    ctx = multiprocessing.get_context("fork")
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        cache.put(b"k", make_value(b"k", 1, 100))
        ready, release = ctx.Event(), ctx.Event()

        def child() -> None:
            cache.put(b"c", make_value(b"c", 1, 100))
            ready.set()
            release.wait(WAIT)

        p = ctx.Process(target=child)
        p.start()
        assert ready.wait(WAIT)
        p.kill()
        join_all([p])
        spawn = multiprocessing.get_context("spawn")
        out = spawn.Queue()
        probe = spawn.Process(target=_attach_report, args=(cache_path, out))
        probe.start()
        recovered, keys = out.get(timeout=WAIT)
        join_all([probe])
        assert recovered is False
        assert keys == [b"c", b"k"]
        check_value(b"c", cache.get(b"c"))


def test_last_user_leaving_lets_the_next_opener_recover(ctx: Any, cache_path: str) -> None:
    """Liveness the other way round: once every user is gone (one SIGKILLed),
    the next opener is the file's only user and recovers it; while a user
    lives, nobody does."""
    aiovmc.Cache(cache_path, size="2MiB").close()
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_open, args=(cache_path, ready, release))
    holder.start()
    assert ready.wait(WAIT)
    out = ctx.Queue()
    probe = ctx.Process(target=_attach_report, args=(cache_path, out))
    probe.start()
    recovered, keys = out.get(timeout=WAIT)
    join_all([probe])
    assert recovered is False and keys == [b"holder"]
    holder.kill()
    join_all([holder])
    with aiovmc.Cache(cache_path) as cache:
        assert cache.info.recovered is True
        check_value(b"holder", cache.get(b"holder"))


def test_many_processes_large_values(ctx: Any, cache_path: str) -> None:
    """Values of hundreds of KiB scattered over extents, read by other
    processes while being replaced: never torn."""
    rng = random.Random(7)
    with aiovmc.Cache(cache_path, size="8MiB") as cache:
        keys = [b"big-%d" % i for i in range(6)]
        for i, key in enumerate(keys):
            cache.put(key, make_value(key, i, rng.randrange(100_000, 600_000)))

        def replace_big_values() -> None:
            for i in range(60):
                key = rng.choice(keys)
                cache.put(key, make_value(key, 1000 + i, rng.randrange(100_000, 600_000)))
                verify_get(cache, rng.choice(keys))

        results = _run_workers(
            ctx,
            functools.partial(rw_worker, prefix=b"big-", sizes=(100_000, 300_000, 600_000)),
            [(cache_path, w, 6, 120, 50 + w) for w in range(3)],
            meanwhile=replace_big_values,
        )
        assert not [r[3] for r in results if r[3]], results


def test_private_cache_of_killed_processes_leaves_no_file(ctx: Any) -> None:
    """A private cache's file is unlinked as soon as it is open: SIGKILL of its
    creator and of a forked child sharing it leaves nothing in /dev/shm, and the
    memory is released with the last descriptor."""
    out, release = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_private_cache_then_wait, args=(out, release))
    p.start()
    path, grandchild = out.get(timeout=WAIT)
    directory, name = os.path.split(path)
    assert not os.path.exists(path)
    assert private_file_stats(path, p.pid) and private_file_stats(path, grandchild)
    p.kill()
    os.kill(grandchild, signal.SIGKILL)
    join_all([p])
    wait_for(lambda: not os.path.exists(f"/proc/{grandchild}/fd"), what="grandchild gone")
    assert [n for n in os.listdir(directory) if n.startswith(name)] == []
