"""Processes SIGKILLed in the middle of puts, deletes, evictions and reservations.

What must hold after every kill (DESIGN.md §3, §5):
- the survivors never block (a dead lock owner is repaired, not waited for) and
  keep working: every wait here is bounded and progress is checked;
- no process ever reads a corrupt value (values are self-verifying);
- the space of a killed process's open reservations is reclaimed;
- reopening a file after every user was SIGKILLed keeps its entries: at least
  every persisted entry not since replaced, deleted or evicted, with its value.

The default runs are short; `AIOVMC_SLOW=1` adds longer soak variants.
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aiovmc
from aiovmc._native._binding import ffi

from .helpers import (
    KIND_FREE,
    KIND_HEAD,
    WAIT,
    chaos_worker,
    check_value,
    join_all,
    make_value,
    plant_forged_spare,
    read_header,
    spare_mark,
    spare_slot_units,
    verify_get,
    wait_for,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def _progressed(
    procs: dict[int, Any], progress: Any, marks: dict[int, int], by: int
) -> Callable[[], bool]:
    """A wait_for predicate: every worker moved `by` steps past its mark, or
    one died (which the caller then reports)."""
    return lambda: all(progress[s] > marks[s] + by for s in procs) or any(
        not p.is_alive() for p in procs.values()
    )


def _kill(p: Any) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join(WAIT)
    assert not p.is_alive(), f"pid {p.pid} survived SIGKILL"


def _drain(errors: Any) -> list[str]:
    out = []
    while True:
        try:
            out.append(errors.get(timeout=0.05))
        except Exception:  # queue.Empty
            return out


def _fill_until_reclaimed(cache: aiovmc.Cache, seconds: float = 0.4) -> None:
    """Keep writing into a full cache (constant evictions) for a while: room is
    short all the time, which is when dead owners' reservations are reclaimed."""
    rng = random.Random(3)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline or i < 200:
        key = b"fill-%d" % rng.randrange(400)
        cache.put(key, make_value(key, i, rng.choice((3000, 20000, 60000))))
        i += 1


def _kill_loop(ctx: Any, path: str, kills: int, nworkers: int, seed: int) -> None:
    """Run chaos workers and SIGKILL one at a random moment, `kills` times.
    After each kill the survivors must make progress within a bounded time."""
    rng = random.Random(seed)
    progress = ctx.RawArray("q", nworkers)
    stop = ctx.RawValue("b", 0)
    errors = ctx.Queue()
    procs: dict[int, Any] = {}

    def start(slot: int) -> None:
        p = ctx.Process(
            target=chaos_worker,
            args=(path, slot, 120, rng.getrandbits(32), progress, errors, stop),
            daemon=True,
        )
        p.start()
        procs[slot] = p

    def check_workers() -> None:
        dead = {s: p.exitcode for s, p in procs.items() if not p.is_alive()}
        assert not dead, f"workers died on their own: {dead}; errors: {_drain(errors)}"

    for slot in range(nworkers):
        start(slot)
    try:
        for _ in range(kills):
            # Let everybody get going (spawned interpreters take a moment), then
            # kill one at a random point of whatever it is doing.
            marks = {s: progress[s] for s in procs}
            wait_for(
                _progressed(procs, progress, marks, 0),
                WAIT,
                "every worker to make progress",
            )
            check_workers()
            time.sleep(rng.uniform(0.0, 0.03))
            victim = rng.choice(sorted(procs))
            _kill(procs.pop(victim))
            # The survivors must not be blocked by whatever the victim held.
            marks = {s: progress[s] for s in procs}
            wait_for(
                _progressed(procs, progress, marks, 5),
                WAIT,
                "the survivors to keep working after a SIGKILL",
            )
            check_workers()
            start(victim)
        stop.value = 1
        join_all(procs.values())
        assert [p.exitcode for p in procs.values()] == [0] * len(procs), _drain(errors)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(5)
    assert not _drain(errors)


def _assert_consistent(cache: aiovmc.Cache) -> None:
    """Every entry verifies; counts agree; after clear() nothing is held."""
    keys = cache.keys()
    for key in keys:
        verify_get(cache, key)
    stats = cache.statistics()
    assert stats.entries == len(keys) == len(cache)
    cache.clear()
    stats = cache.statistics()
    assert stats.entries == 0
    assert stats.used_bytes == 0, (
        f"{stats.used_bytes} bytes still held after clear(): a dead process's "
        "reservation (or a lost extent) was never reclaimed"
    )


@pytest.mark.parametrize(("method", "kills"), [("fork", 40), ("spawn", 8)])
def test_sigkill_loop_survivors_keep_working(method: str, kills: int, cache_path: str) -> None:
    """Workers hammer a 1 MiB cache (constant evictions) with puts, gets,
    deletes, evict() and reservations; one is SIGKILLed at a random moment,
    again and again. Survivors never block nor read a corrupt value; at the
    end, with the parent's handle open all along (no recovery at open), the
    dead processes' reservations have been reclaimed."""
    ctx = multiprocessing.get_context(method)
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        _kill_loop(ctx, cache_path, kills=kills, nworkers=3, seed=kills)
        for key in list(cache.keys()):
            verify_get(cache, key)
        _fill_until_reclaimed(cache)
        _assert_consistent(cache)
        assert cache.statistics().evictions > 0
    # Every process is gone: the next opener recovers, and finds it consistent.
    with aiovmc.Cache(cache_path) as cache:
        assert cache.info.recovered
        _assert_consistent(cache)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_sigkill_soak(method: str, cache_path: str) -> None:
    """The kill loop, long: hundreds of kills."""
    ctx = multiprocessing.get_context(method)
    kills = 600 if method == "fork" else 80
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        _kill_loop(ctx, cache_path, kills=kills, nworkers=4, seed=99)
        _fill_until_reclaimed(cache)
        _assert_consistent(cache)
    with aiovmc.Cache(cache_path) as cache:
        _assert_consistent(cache)


# ---------------------------------------------------------------------------
# Reservations of killed processes
# ---------------------------------------------------------------------------


def _reserve_and_hang(path: str, size: int, ready: Any) -> None:
    """Open a reservation, half fill it, say so, and wait to be killed."""
    cache = aiovmc.Cache(path)
    res = cache.reserve(b"doomed", size)
    res.buffer[: size // 2] = b"\xaa" * (size // 2)
    ready.set()
    time.sleep(WAIT)


def _attach_and_leave(path: str) -> None:
    aiovmc.Cache(path).close()


@pytest.fixture(params=["fork", "spawn"])
def ctx(request: pytest.FixtureRequest) -> Any:
    return multiprocessing.get_context(request.param)


def _killed_reservation(ctx: Any, path: str, size: int) -> None:
    ready = ctx.Event()
    p = ctx.Process(target=_reserve_and_hang, args=(path, size, ready))
    p.start()
    assert ready.wait(WAIT)
    _kill(p)


def test_killed_reservation_reclaimed_by_writers(ctx: Any, cache_path: str) -> None:
    """A process dies with a reservation open: its room shows in used_bytes
    until writers run short of room, then it is reclaimed."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        size = cache.capacity * 2 // 5
        _killed_reservation(ctx, cache_path, size)
        assert cache.statistics().used_bytes >= size
        assert b"doomed" not in cache
        _fill_until_reclaimed(cache)
        assert b"doomed" not in cache
        _assert_consistent(cache)


def test_killed_reservation_reclaimed_when_another_process_attaches(
    ctx: Any, cache_path: str
) -> None:
    """A process attaching to the file looks for dead owners' reservations."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        cache.put(b"k", make_value(b"k", 1, 1000))
        base = cache.statistics().used_bytes
        _killed_reservation(ctx, cache_path, cache.capacity // 3)
        assert cache.statistics().used_bytes > base
        p = ctx.Process(target=_attach_and_leave, args=(cache_path,))
        p.start()
        join_all([p])
        assert p.exitcode == 0
        assert cache.statistics().used_bytes == base
        check_value(b"k", cache.get(b"k"))


def _replace_and_hang(path: str, ready: Any) -> None:
    """Replace a key (its old extent becomes this handle's spare), say so,
    and wait to be killed."""
    cache = aiovmc.Cache(path)
    cache.put(b"spare", make_value(b"spare", 1, 100))
    cache.put(b"spare", make_value(b"spare", 2, 100))
    ready.set()
    time.sleep(WAIT)


def test_killed_process_spare_extent_reclaimed_when_another_process_attaches(
    ctx: Any, cache_path: str
) -> None:
    """A process dies holding the spare extent its last replacement left: a
    reservation of a dead owner, reclaimed like any other; its entry stays."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        cache.put(b"k", make_value(b"k", 1, 1000))
        base = cache.statistics().used_bytes
        ready = ctx.Event()
        p = ctx.Process(target=_replace_and_hang, args=(cache_path, ready))
        p.start()
        assert ready.wait(WAIT)
        _kill(p)
        held = cache.statistics().used_bytes - base  # the entry and the spare: one size
        assert held > 0 and cache.get(b"spare") == make_value(b"spare", 2, 100)
        p = ctx.Process(target=_attach_and_leave, args=(cache_path,))
        p.start()
        join_all([p])
        assert p.exitcode == 0
        assert cache.statistics().used_bytes == base + held // 2
        assert cache.get(b"spare") == make_value(b"spare", 2, 100)
        check_value(b"k", cache.get(b"k"))


def test_a_dead_owners_slot_frees_only_a_head_bearing_the_files_spare_mark(
    ctx: Any, cache_path: str
) -> None:
    """A dead owner's spare slot is all that names its spare, and it may be
    stale or damaged: here it names a head forged inside another entry's value,
    whose bytes copy every field of a spare but the file's secret spare mark
    (the constant a spare's nonce once was). The attach that frees the dead
    owner's slot leaves that head alone: the value stays whole, and the room
    the puts after it take is never inside it."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        ready = ctx.Event()
        p = ctx.Process(target=_replace_and_hang, args=(cache_path, ready))
        p.start()
        assert ready.wait(WAIT)
        hdr = read_header(Path(cache_path).read_bytes())
        assert spare_mark(hdr) != 0x80000000
        value = plant_forged_spare(cache_path, cache, b"victim", 0x80000000)
        _kill(p)
        p = ctx.Process(target=_attach_and_leave, args=(cache_path,))
        p.start()
        join_all([p])
        assert p.exitcode == 0
        assert not any(map(any, spare_slot_units(Path(cache_path).read_bytes())))  # freed
        unit = 1 << hdr["unit_shift"]
        for i in range(20):  # room freed inside the value would be filled here
            cache.put(b"f%d" % i, bytes(2 * unit - 100))
        assert cache.get(b"victim") == value
        assert cache.get(b"spare") == make_value(b"spare", 2, 100)


def _replace_forever(path: str, seed: int, progress: Any) -> None:
    """Replace the 100 B values of keys r0..r199 forever, counting puts: each
    put refills the handle's spare and leaves the replaced entry as the next
    one, without the pool lock."""
    cache = aiovmc.Cache(path)
    rng = random.Random(seed)
    for n in itertools.count(1):
        key = b"r%d" % rng.randrange(200)
        cache.put(key, make_value(key, n, 100))
        progress.value = n


def _past(p: Any, progress: Any, target: int) -> Callable[[], bool]:
    """A wait_for predicate: the worker counted more than `target`, or died."""
    return lambda: progress.value > target or not p.is_alive()


def test_killed_while_refilling_its_spare_leaves_no_room_behind(ctx: Any, cache_path: str) -> None:
    """A process SIGKILLed at a random moment of a stream of replacements
    (filling its spare, naming the next one in its spare slot, publishing, or
    holding the shard lock between): once another process attached (which
    frees dead owners' slots and spares) and the survivor read every key
    (repairing if the dead process held a lock), every key is there with a
    sound value and the pool holds exactly the entries, no spare."""
    rng = random.Random(1)
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        for i in range(200):
            cache.put(b"r%d" % i, make_value(b"r%d" % i, 0, 100))
        used = cache.statistics().used_bytes  # new keys only: this handle holds no spare
        for round_ in range(4):
            progress = ctx.Value("q", 0)
            p = ctx.Process(target=_replace_forever, args=(cache_path, round_, progress))
            p.start()
            target = rng.randrange(50, 3000)
            wait_for(_past(p, progress, target), what="replacements")
            assert p.is_alive()
            _kill(p)
            q = ctx.Process(target=_attach_and_leave, args=(cache_path,))
            q.start()
            join_all([q])
            assert q.exitcode == 0
            for i in range(200):
                check_value(b"r%d" % i, cache.get(b"r%d" % i))
            stats = cache.statistics()
            assert (stats.entries, stats.used_bytes) == (200, used)


def test_killed_reservation_does_not_fill_a_no_evict_cache(ctx: Any, cache_path: str) -> None:
    """Policy "none": a dead process's reservation holds most of the pool; a
    put that needs that room must get it (reclaimed), not CacheFullError."""
    with aiovmc.Cache(cache_path, size="2MiB", policy="none") as cache:
        size = cache.capacity * 3 // 4
        _killed_reservation(ctx, cache_path, size)
        value = make_value(b"big", 1, cache.capacity // 2)
        cache.put(b"big", value)
        assert cache.get(b"big") == value


def test_killed_reservation_reclaimed_at_reopen(ctx: Any, cache_path: str) -> None:
    """Every process gone (the last one killed mid-reservation): the next
    opener recovers the file and nothing of the reservation is left."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        cache.put(b"k", make_value(b"k", 1, 1000))
        base = cache.statistics().used_bytes
    _killed_reservation(ctx, cache_path, 500_000)
    with aiovmc.Cache(cache_path) as cache:
        assert cache.info.recovered
        assert cache.statistics().used_bytes == base
        check_value(b"k", cache.get(b"k"))
        assert b"doomed" not in cache


# ---------------------------------------------------------------------------
# Persisted entries survive every user being SIGKILLed
# ---------------------------------------------------------------------------


def _persisting_writer(path: str, rnd: int, n: int, seed: int, out: Any) -> None:
    """Write n keys of this round, persist, report, then churn other keys
    (puts, deletes, replacements) until killed."""
    rng = random.Random(seed)
    cache = aiovmc.Cache(path)
    last = 0
    for i in range(n):
        key = b"p%d-%d" % (rnd, i)
        last = cache.put(key, make_value(key, i, rng.choice((100, 3000, 30000))))
    persisted = cache.persist()
    out.put((persisted, last))
    i = 0
    while True:
        i += 1
        key = b"churn-%d" % rng.randrange(40)
        r = rng.random()
        if r < 0.6:
            cache.put(key, make_value(key, i, rng.choice((100, 3000, 30000))))
        elif r < 0.8:
            cache.delete(key)
        else:
            with cache.reserve(key, 5000) as res:
                res.buffer[:] = make_value(key, i, 5000)
        if i % 50 == 0:
            cache.persist()


def _reader(path: str, ready: Any) -> None:
    cache = aiovmc.Cache(path)
    rng = random.Random(os.getpid())
    ready.set()
    while True:
        verify_get(cache, b"churn-%d" % rng.randrange(40))


@pytest.fixture(params=["shm", "disk"])
def crash_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "shm":
        if not os.access("/dev/shm", os.W_OK):
            path = tmp_path  # no tmpfs: the disk case twice
        else:
            path = Path("/dev/shm") / f"aiovmc-crash-{uuid.uuid4().hex}"
            path.mkdir()
    else:
        path = tmp_path  # a disk-backed directory (pytest's temp dir)
    yield str(path)
    if request.param == "shm":
        shutil.rmtree(path, ignore_errors=True)


def _persist_kill_reopen(ctx: Any, path: str, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    # Room for every round's values and the churn: nothing persisted is evicted.
    aiovmc.Cache(path, size=(8 + 2 * rounds) << 20).close()
    expected: dict[bytes, int] = {}
    newest = 0
    persisted_seen = 0
    for rnd in range(rounds):
        out, ready = ctx.Queue(), ctx.Event()
        n = 40
        writer = ctx.Process(
            target=_persisting_writer, args=(path, rnd, n, rng.getrandbits(32), out)
        )
        reader = ctx.Process(target=_reader, args=(path, ready))
        reader.start()
        writer.start()
        persisted, last = out.get(timeout=WAIT)
        assert persisted >= last, "persist() returned less than a finished put's timestamp"
        assert ready.wait(WAIT)
        time.sleep(rng.uniform(0.0, 0.1))  # churning: kill them at a random moment
        _kill(writer)
        _kill(reader)
        assert reader.exitcode == -signal.SIGKILL, "the reader failed before it was killed"
        expected.update({b"p%d-%d" % (rnd, i): i for i in range(n)})
        newest = max(newest, last)
        persisted_seen = max(persisted_seen, persisted)
        with aiovmc.Cache(path) as cache:
            assert cache.info.recovered, "the first opener after the crash did not recover"
            assert cache.persisted_timestamp >= persisted_seen
            assert cache.committed_timestamp >= newest
            assert cache.statistics().evictions == 0, "the test overfilled the cache"
            missing = [k for k in expected if cache.get(k) is None]
            assert not missing, f"persisted entries lost after SIGKILL: {missing[:10]}"
            for key, seq in expected.items():
                assert check_value(key, cache.get(key)) == seq
            for key in list(cache.keys()):  # the churned keys, whatever state they were in
                verify_get(cache, key)
            ts = cache.put(b"after-%d" % rnd, make_value(b"after-%d" % rnd, rnd, 100))
            assert ts > newest, "the clock went backwards across the crash"
            newest = ts


def test_persisted_entries_survive_sigkill_of_every_user(ctx: Any, crash_dir: str) -> None:
    """persist(), then SIGKILL every process using the file at a random moment,
    then reopen: every persisted entry is there with its value, on /dev/shm and
    on a disk-backed directory, round after round on the same file."""
    _persist_kill_reopen(ctx, os.path.join(crash_dir, "c.cache"), rounds=3, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_persisted_entries_survive_sigkill_soak(crash_dir: str) -> None:
    _persist_kill_reopen(
        multiprocessing.get_context("fork"), os.path.join(crash_dir, "c.cache"), rounds=40, seed=2
    )


def _open_report(path: str, start: Any, out: Any, done: Any) -> None:
    start.wait(WAIT)
    with aiovmc.Cache(path) as cache:
        out.put((cache.info.recovered, sorted(cache.keys())))
        done.wait(WAIT)  # stay attached until every opener has opened


def test_openers_racing_after_a_crash_recover_once(ctx: Any, cache_path: str) -> None:
    """After every user was killed, several processes open the file at once:
    exactly one of them recovers it, and all see the same entries."""
    ready = ctx.Event()
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        for i in range(50):
            cache.put(b"e%d" % i, make_value(b"e%d" % i, i, 2000))
    p = ctx.Process(target=_reserve_and_hang, args=(cache_path, 10_000, ready))
    p.start()
    assert ready.wait(WAIT)
    _kill(p)
    out, done = ctx.Queue(), ctx.Event()
    start = ctx.Barrier(5)  # the four openers and this process: they open at once
    openers = [
        ctx.Process(target=_open_report, args=(cache_path, start, out, done)) for _ in range(4)
    ]
    for o in openers:
        o.start()
    start.wait(WAIT)
    try:
        reports = [out.get(timeout=WAIT) for _ in openers]
    finally:
        done.set()
        join_all(openers)
    assert sum(1 for r in reports if r[0]) == 1, reports
    assert all(r[1] == reports[0][1] for r in reports)
    assert len(reports[0][1]) == 50


def _open_and_wait(path: str) -> None:
    aiovmc.Cache(path)
    time.sleep(WAIT)


def test_sigkill_during_recovery_at_open(cache_path: str) -> None:
    """The first opener after a crash recovers the file; kill it in the middle
    of that, again and again: the next opener recovers from whatever the dead
    one left, and every entry is still there."""
    ctx = multiprocessing.get_context("fork")
    n = 40_000
    with aiovmc.Cache(cache_path, size="32MiB") as cache:
        for i in range(n):
            key = b"e%d" % i
            cache.put(key, make_value(key, i, 300))
    started = time.monotonic()
    with aiovmc.Cache(cache_path) as cache:
        assert cache.info.recovered
    recovery = time.monotonic() - started
    rng = random.Random(8)
    for _ in range(15):
        p = ctx.Process(target=_open_and_wait, args=(cache_path,))
        p.start()
        time.sleep(rng.uniform(0.0, 2 * recovery))
        _kill(p)
    with aiovmc.Cache(cache_path) as cache:
        assert cache.info.recovered
        assert len(cache) == n
        for i in range(n):
            key = b"e%d" % i
            assert check_value(key, cache.get(key)) == i


def _put_fresh_keys(path: str, start: int, progress: Any) -> None:
    """Put fresh keys forever into a cache at its entry budget: every put
    evicts, and reservations open and close all the time."""
    with aiovmc.Cache(path) as cache:
        for i in itertools.count(start):
            key = b"b%d" % i
            if i % 3:
                cache.put(key, make_value(key, i, 100))
            else:
                with cache.reserve(key, 100) as res:
                    res.buffer[:] = make_value(key, i, 100)
            progress.value = i


def _reached(progress: Any, target: int, proc: Any) -> Callable[[], bool]:
    """A wait_for predicate: the writer's progress reached `target`, or it died."""
    return lambda: progress.value >= target or not proc.is_alive()


def _heads(path: str) -> int:
    """`pool.heads`, the pool's count of HEAD extents, read from the file."""
    return int.from_bytes(Path(path).read_bytes()[300:304], "little")


def test_entry_count_survives_sigkill_and_is_recounted(cache_path: str) -> None:
    """A writer at the entry budget (max_entries) is SIGKILLed mid-put, again and
    again; recovery at open and a live repair recount the pool's entries, so the
    budget stays exact: the cache fills to max_entries again, never beyond, and
    every further put evicts exactly one entry, the least recently used."""
    ctx = multiprocessing.get_context("fork")
    budget, rng = 300, random.Random(11)
    aiovmc.Cache(cache_path, size="2MiB", max_entries=budget).close()
    start = 0
    for _ in range(6):
        progress = ctx.RawValue("q", -1)
        p = ctx.Process(target=_put_fresh_keys, args=(cache_path, start, progress))
        p.start()
        wait_for(_reached(progress, start + 2 * budget, p), WAIT, "the writer to fill the cache")
        assert p.is_alive(), f"the writer failed: exit code {p.exitcode}"
        time.sleep(rng.uniform(0.0, 0.01))
        _kill(p)
        start = progress.value + 10
        with aiovmc.Cache(cache_path) as cache:  # the only user: recovery at open
            assert cache.info.recovered
            assert cache.info.max_entries == budget
            assert _heads(cache_path) == len(cache) <= budget
            for key in cache.keys():  # noqa: SIM118 (a Cache)
                check_value(key, cache.get(key))
    evicted: list[bytes] = []
    with aiovmc.Cache(cache_path, on_evict=evicted.append) as cache:
        # A live repair (a dead pool-lock owner) recounts too.
        base = int(ffi.cast("uintptr_t", cache._base))
        p = ctx.Process(target=_lock_and_die, args=(base, 128))  # &header->pool.lock
        p.start()
        p.join(WAIT)
        assert p.exitcode == -signal.SIGKILL
        for i in range(budget):
            cache.put(b"f%d" % i, b"v")
        assert len(cache) == budget == _heads(cache_path)
        evicted.clear()
        cache.get(b"f0")  # now the most recent: f1 is the least recently used
        before = cache.statistics().evictions
        cache.put(b"last", b"v")
        assert evicted == [b"f1"] and cache.statistics().evictions == before + 1
        assert len(cache) == budget == _heads(cache_path)


def _lock_and_die(base: int, offset: int) -> None:
    """Take a lock of the file through its mutex and die holding it: what a
    process SIGKILLed in the middle of an operation leaves behind."""
    libc = ctypes.CDLL(None)
    libc.pthread_mutex_lock(ctypes.c_void_p(base + offset))
    os.kill(os.getpid(), signal.SIGKILL)


def _use_everything(path: str, n: int, out: Any) -> None:
    error = None
    try:
        with aiovmc.Cache(path) as cache:
            for i in range(n):
                key = b"e%d" % i
                assert check_value(key, cache.get(key)) == i
                cache.put(key, make_value(key, i, 500))
            with cache.reserve(b"r", 1000) as res:
                res.buffer[:] = make_value(b"r", 0, 1000)
            _ = cache.committed_timestamp
            cache.persist()
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    out.put(error)


@pytest.mark.parametrize("lock", ["shard-0", "shard-37", "shard-63", "pool", "every-lock"])
def test_dead_lock_owner_never_blocks_and_loses_nothing(lock: str, cache_path: str) -> None:
    """A process dies holding a shard lock or the pool lock (both robust
    mutexes). The next process to take it repairs the cache instead of
    waiting forever, and nothing published is lost."""
    ctx = multiprocessing.get_context("fork")
    n = 300
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        for i in range(n):
            key = b"e%d" % i
            cache.put(key, make_value(key, i, 500))
        hdr = read_header(Path(cache_path).read_bytes()[:4096])
        base = int(ffi.cast("uintptr_t", cache._base))
        shard_size = (hdr["flights_off"] - hdr["shards_off"]) // 64  # sizeof(struct vmc_shard)

        def shard(i: int) -> int:
            return int(hdr["shards_off"] + i * shard_size)
        offsets = {
            "shard-0": [shard(0)],
            "shard-37": [shard(37)],
            "shard-63": [shard(63)],
            "pool": [128],  # &header->pool.lock
            "every-lock": [shard(i) for i in range(64)] + [128],
        }[lock]
        for offset in offsets:
            p = ctx.Process(target=_lock_and_die, args=(base, offset))
            p.start()
            p.join(WAIT)
            assert p.exitcode == -signal.SIGKILL
        out = ctx.Queue()
        users = [ctx.Process(target=_use_everything, args=(cache_path, n, out)) for _ in range(2)]
        for u in users:
            u.start()
        errors = [out.get(timeout=WAIT) for _ in users]  # a deadlock fails here
        join_all(users)
        assert errors == [None, None]
        assert cache.evict()  # the LRU victim search walks every shard: no lock blocks it
        assert len(cache) == n + 1 - 1  # every entry, plus b"r", minus the one evicted


# ---------------------------------------------------------------------------
# A repair must not free a reservation that is still being set up
# ---------------------------------------------------------------------------

_INTERPOSER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

/* Set by the test: the address of a mutex. The first unlock of that mutex
 * after it is set pauses the calling thread, just after the unlock, until a
 * byte arrives on fd 0 (it first writes "P" to fd 1). */
volatile uintptr_t aiovmc_test_pause_at = 0;

int pthread_mutex_unlock(pthread_mutex_t *m)
{
    static int (*real)(pthread_mutex_t *);
    if (!real)
        real = (int (*)(pthread_mutex_t *))dlsym(RTLD_NEXT, "pthread_mutex_unlock");
    int rc = real(m);
    if (aiovmc_test_pause_at && (uintptr_t)m == aiovmc_test_pause_at) {
        aiovmc_test_pause_at = 0;
        char b = 'P';
        if (write(1, &b, 1) == 1)
            while (read(0, &b, 1) < 0)
                ;
    }
    return rc;
}
"""

_PAUSED_RESERVER = r"""
import ctypes, os, sys
import aiovmc
from aiovmc._native._binding import ffi
from tests.helpers import make_value

so, path = sys.argv[1], sys.argv[2]
cache = aiovmc.Cache(path)
base = int(ffi.cast("uintptr_t", cache._base))
pause = ctypes.c_size_t.in_dll(ctypes.CDLL(so), "aiovmc_test_pause_at")
pause.value = base + 128  # &header->pool.lock: pause right after make_room unlocks it
res = cache.reserve(b"res", 100)  # pauses inside, between allocation and set-up
value = make_value(b"res", 999, 100)
res.buffer[:] = value
os.write(1, b"F")  # filled, not published
os.read(0, 1)
try:
    ts = res.publish()
    os.write(1, b"OK %d\n" % ts)
except aiovmc.AiovmcError as exc:
    os.write(1, ("FAILED %s: %s\n" % (type(exc).__name__, exc)).encode())
"""


def _build_interposer(tmp_path: Path) -> str:
    src = tmp_path / "pause.c"
    so = tmp_path / "pause.so"
    src.write_text(_INTERPOSER)
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    subprocess.run([*cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(src), "-ldl"], check=True)
    return str(so)


def _read_exact(fd: int, n: int, timeout: float = WAIT) -> bytes:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"timed out; got {data!r}"
        chunk = os.read(fd, n - len(data))
        assert chunk, f"the reserving process ended early; got {data!r}"
        data += chunk
    return data


def _unit_key(path: str, hdr: dict[str, Any], unit: int, klen: int) -> tuple[int, bytes]:
    with open(path, "rb") as f:
        f.seek(hdr["pool_off"] + ((unit - 1) << hdr["unit_shift"]))
        head = f.read(56 + klen)
    return int.from_bytes(head[4:8], "little") & ~1, head[56:]  # kind without PREV_FREE


def _race_a_repair(cache: aiovmc.Cache, cache_path: str, hdr: dict[str, Any], a: Any) -> None:
    assert a.stdout is not None and a.stdin is not None
    assert _read_exact(a.stdout.fileno(), 1) == b"P"  # A is inside the window
    kind, _ = _unit_key(cache_path, hdr, 11, 0)
    assert kind == KIND_HEAD, "setup: the reservation did not take unit 11"

    # B dies holding shard 5's lock (a process killed mid-operation).
    base = int(ffi.cast("uintptr_t", cache._base))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        libc = ctypes.CDLL(None)
        shard_size = (hdr["flights_off"] - hdr["shards_off"]) // 64  # sizeof(struct vmc_shard)
        libc.pthread_mutex_lock(ctypes.c_void_p(base + hdr["shards_off"] + 5 * shard_size))
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    _ = cache.committed_timestamp  # locks every shard: finds B dead, repairs

    kind, _ = _unit_key(cache_path, hdr, 11, 0)
    # Writers go on. If the repair freed A's room, a put of b"res" soon lands
    # on unit 11; if A's reservation was kept, none can.
    for i in range(6):
        newest = make_value(b"res", 2 + i, 150)
        cache.put(b"res", newest)
        if _unit_key(cache_path, hdr, 11, 3) == (KIND_HEAD, b"res"):
            break

    a.stdin.write(b"x")  # let A set up and fill its reservation
    a.stdin.flush()
    assert _read_exact(a.stdout.fileno(), 1) == b"F"
    seen = cache.get(b"res")
    assert seen == newest, (
        f"a reader of b'res' got {len(seen or b'')} bytes that are not the last "
        f"published value (unit 11 became {hex(kind)} after the repair: "
        f"{'FREE' if kind == KIND_FREE else 'kept'})"
    )
    a.stdin.write(b"x")
    a.stdin.flush()
    outcome = a.stdout.readline().decode()
    assert outcome.startswith("OK"), f"A's publish: {outcome}"
    assert cache.get(b"res") == make_value(b"res", 999, 100)


def test_repair_keeps_a_reservation_that_is_being_set_up(tmp_path: Path, cache_path: str) -> None:
    """Process A has just been given room for a reservation (make_room has
    unlocked the pool) but has not yet written the entry's key_len and
    value_len. Process B dies holding a shard lock, and the next locker
    repairs the cache (vmc_rebuild, LIVE mode), which must keep A's
    reservation: A is alive. The rebuild decides from the head's *stale*
    value_len (left over from the free extent's list link), finds the chain
    "unsound", frees A's room, and hands it to the next put; A then writes
    its key, sizes and value over that entry. A reader sees the bytes of a
    reservation that was never published and A's publish fails."""
    so = _build_interposer(tmp_path)
    cache = aiovmc.Cache(cache_path, size="1MiB")
    hdr = read_header(Path(cache_path).read_bytes()[:4096])
    try:
        # Units 1..1000 hold one-unit entries; free units 901 then 11 so the
        # one-unit free list is 11 -> 901: a reservation takes unit 11, and
        # the word where its value_len goes still holds the link "901".
        for i in range(1000):
            cache.put(b"f%03d" % i, make_value(b"f%03d" % i, i, 150))
        assert _unit_key(cache_path, hdr, 1000, 4)[1] == b"f999"
        cache.put(b"res", make_value(b"res", 1, 150))  # the value readers should see
        cache.delete(b"f900")
        cache.delete(b"f010")

        # after any library already preloaded (the ASan runtime, in .ci/run's sanitizer pass)
        preload = f"{os.environ.get('LD_PRELOAD', '')} {so}".strip()
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, LD_PRELOAD=preload, PYTHONPATH=root)
        with subprocess.Popen(
            [sys.executable, "-c", _PAUSED_RESERVER, so, cache_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        ) as a:
            try:
                _race_a_repair(cache, cache_path, hdr, a)
            finally:
                if a.poll() is None:
                    a.kill()
                a.wait(WAIT)
        for key in list(cache.keys()):
            verify_get(cache, key)
    finally:
        cache.close()
