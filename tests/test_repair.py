"""Repairs stay off the event loop (docs/design.md, "Repair off the event loop").

A process SIGKILLed while holding a lock of the file leaves it to be repaired:
a stop-the-world rebuild, O(pool). `Cache` repairs on the calling thread; the
calls `AsyncCache` makes on the loop (`CacheCore`'s inline calls) answer
`RepairNeeded` instead, and `AsyncCache` runs the repair in a worker thread.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import aiovmc
from aiovmc._cache import CacheCore
from aiovmc._errors import RepairNeeded
from aiovmc._native._binding import ffi

from .helpers import (
    ENTRY,
    ENTRY_FIELDS,
    HEADER_FIELDS,
    SHARD_FIELDS,
    WAIT,
    check_value,
    make_value,
    plant_forged_spare,
    read_header,
    spare_mark,
    spare_slot_units,
)

N = 200


def _lock_and_die(path: str, base: int | None, offsets: list[int], seqs: list[int]) -> None:
    """Take locks of the file and die holding them (a process SIGKILLed
    mid-operation). At each of `seqs` (a shard's read sequence), open a write
    section as a writer does (odd), so that optimistic gets of that shard look
    no further. A spawned process (no `base`) maps the file itself."""
    if base is None:
        cache = aiovmc.Cache(path)
        base = int(ffi.cast("uintptr_t", cache._base))
    libc = ctypes.CDLL(None)
    for offset in offsets:
        libc.pthread_mutex_lock(ctypes.c_void_p(base + offset))
    for offset in seqs:
        seq = ctypes.c_uint64.from_address(base + offset)
        seq.value |= 1
    os.kill(os.getpid(), signal.SIGKILL)


def _fill(cache: aiovmc.Cache) -> None:
    for i in range(N):
        key = b"e%d" % i
        cache.put(key, make_value(key, i, 300))


def _kill_holding_every_shard_lock(
    cache: aiovmc.Cache, path: str, method: str = "fork", writing: bool = True
) -> None:
    """A process takes every shard lock, and is SIGKILLed holding them:
    whichever key the next call looks up, its lock's owner is dead. `writing`:
    it died in a write section of every shard (as a put, a delete or an
    eviction would), else holding the locks only to read."""
    hdr = read_header(Path(path).read_bytes()[:4096])
    base = int(ffi.cast("uintptr_t", cache._base)) if method == "fork" else None
    shard_size = (hdr["flights_off"] - hdr["shards_off"]) // 64  # sizeof(struct vmc_shard)
    offsets = [hdr["shards_off"] + shard * shard_size for shard in range(64)]
    seq = SHARD_FIELDS["seq"][0]
    seqs = [offset + seq for offset in offsets] if writing else []
    ctx: Any = multiprocessing.get_context(method)
    p = ctx.Process(target=_lock_and_die, args=(path, base, offsets, seqs))
    p.start()
    p.join(WAIT)
    assert p.exitcode == -signal.SIGKILL


def test_a_holder_that_died_reading_leaves_hits_to_the_optimistic_path(cache_path: str) -> None:
    """A process SIGKILLed holding every shard lock outside a write section
    (as a locked get holds it) changed nothing: a hit is answered without the
    lock, its dead owner unnoticed and nothing to repair for it. A miss looks
    again under the lock: it finds the dead owner, and the repair keeps every
    entry."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        _fill(cache)
        _kill_holding_every_shard_lock(cache, cache_path, writing=False)
        core = CacheCore(cache)
        for i in range(N):  # inline calls: a lock taken would answer RepairNeeded
            key = b"e%d" % i
            assert check_value(key, core.get_inline(key, 1 << 20)) == i
        with pytest.raises(RepairNeeded):
            core.get_inline(b"absent", 1 << 20)
        assert cache.get(b"absent") is None  # Cache repairs on the calling thread
        assert len(cache) == N
        for i in range(N):
            key = b"e%d" % i
            assert check_value(key, core.get_inline(key, 1 << 20)) == i


def test_inline_calls_answer_repair_needed_and_leave_it_to_repair(cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        _fill(cache)
        _kill_holding_every_shard_lock(cache, cache_path)
        core = CacheCore(cache)
        value = make_value(b"new", 0, 100)
        calls: list[Callable[[], object]] = [
            lambda: core.get_inline(b"e1", 1 << 20),
            lambda: core.get_entry(b"e2", 1 << 20, inline=True),
            lambda: core.size(b"e3", inline=True),
            lambda: core.store(b"new", value, None),
            lambda: core.store(b"new", value, None, add=True),
            lambda: core.get_into(b"e4", bytearray(10), 0),
            lambda: core.delete(b"e5"),
            lambda: core.evict(b"e6"),
            core.committed,
            lambda: core.count_loads(b"e7", loader_calls=1, coalesced=1, coalesced_hits=1),
        ]
        for call in calls:  # each finds the damage, none repairs it: the next finds it too
            with pytest.raises(RepairNeeded):
                call()
        found: dict[bytes, bytes | None] = {}
        assert core.get_many_inline([b"e1", b"e2"], 1 << 20, found, {}, 0) == 0  # stops there
        assert found == {}
        assert core.persisted() == 0  # takes no lock: nothing to repair first
        assert b"new" not in cache.keys()  # nothing was stored (keys() repairs first)  # noqa: SIM118
        for i in range(N):  # repaired by keys(): every entry kept, every call answers
            key = b"e%d" % i
            assert check_value(key, core.get_inline(key, 1 << 20)) == i
        assert core.store(b"new", value, None) > 0
        assert core.delete(b"e5") and core.evict(b"e6")
        assert len(cache) == N + 1 - 2
        stats = cache.statistics()  # the deferred calls counted nothing
        assert (stats.loader_calls, stats.coalesced_gets, stats.puts) == (0, 0, N + 1)


@pytest.mark.parametrize("call", ["Cache.get", "AsyncCache.get_nowait"])
def test_a_sync_call_repairs_on_its_thread(call: str, cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        _fill(cache)
        _kill_holding_every_shard_lock(cache, cache_path)
        get = cache.get if call == "Cache.get" else aiovmc.AsyncCache.from_cache(cache).get_nowait
        for i in range(N):
            key = b"e%d" % i
            assert check_value(key, get(key)) == i


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["fork", "spawn"])
async def test_async_repair_runs_in_a_worker_thread_while_the_loop_runs(
    anyio_backend: str, method: str, cache_path: str
) -> None:
    """Several tasks find the damage at once: one repair, in a worker thread,
    and the loop runs another task while it is in progress (if the repair ran
    on the loop, that task could not release it and the wait below would fail)."""
    acache = aiovmc.AsyncCache(cache_path, size="2MiB")
    async with acache:
        _fill(acache.cache)
        _kill_holding_every_shard_lock(acache.cache, cache_path, method)
        loop_thread = threading.get_ident()
        entered, release = threading.Event(), threading.Event()
        repairs: list[int] = []
        repair = acache._core.repair

        def spy() -> None:
            repairs.append(threading.get_ident())
            entered.set()
            assert release.wait(WAIT), "the loop did not run while the repair was pending"
            repair()

        acache._core.repair = spy
        results: dict[bytes, Any] = {}

        async def get(key: bytes) -> None:
            results[key] = await acache.get(key)

        async def the_loop_runs() -> None:
            await anyio.to_thread.run_sync(entered.wait, WAIT)
            release.set()  # on the loop thread, while the repair waits for it

        keys = [b"e%d" % i for i in range(0, N, 20)]
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(get, key)
            tg.start_soon(the_loop_runs)
        assert release.is_set()
        assert len(repairs) == 1 and repairs[0] != loop_thread
        for key in keys:
            check_value(key, results[key])
        # Every write and read of the loop works on the repaired file.
        assert await acache.put(b"after", b"v") > 0
        assert await acache.delete(b"e1")
        assert await acache.get_many([b"after", b"e2"]) == {
            b"after": b"v",
            b"e2": make_value(b"e2", 2, 300),
        }
        assert len(repairs) == 1


@pytest.mark.anyio
async def test_async_get_many_waits_for_the_repair_and_counts_each_key_once(
    anyio_backend: str, cache_path: str
) -> None:
    acache = aiovmc.AsyncCache(cache_path, size="2MiB", offload_threshold=200)
    async with acache:
        _fill(acache.cache)
        _kill_holding_every_shard_lock(acache.cache, cache_path)
        loop_thread = threading.get_ident()
        repairs: list[int] = []
        repair = acache._core.repair

        def spy() -> None:
            repairs.append(threading.get_ident())
            repair()

        acache._core.repair = spy
        keys = [b"e%d" % i for i in range(0, N, 2)] + [b"absent"]
        before = acache.statistics()
        got = await acache.get_many(keys)  # values of 300 B: copied off the loop too
        assert len(repairs) == 1 and repairs[0] != loop_thread
        assert list(got) == keys[:-1]
        for i, key in enumerate(keys[:-1]):
            assert check_value(key, got[key]) == 2 * i
        after = acache.statistics()
        assert (after.gets - before.gets, after.hits - before.hits) == (len(keys), len(keys) - 1)


@pytest.mark.anyio
async def test_async_writes_wait_for_the_repair_too(anyio_backend: str, cache_path: str) -> None:
    acache = aiovmc.AsyncCache(cache_path, size="2MiB")
    async with acache:
        _fill(acache.cache)
        _kill_holding_every_shard_lock(acache.cache, cache_path)
        threads: list[int] = []
        repair = acache._core.repair

        def spy() -> None:
            threads.append(threading.get_ident())
            repair()

        acache._core.repair = spy
        assert await acache.put(b"k", b"v") > 0
        assert threads and threads[0] != threading.get_ident()
        assert await acache.get(b"k") == b"v"
        assert len(acache.cache) == N + 1


_DEFERRING_PUTTER = r"""
import ctypes, os, sys
import aiovmc
from aiovmc._cache import CacheCore
from aiovmc._errors import RepairNeeded
from aiovmc._native._binding import ffi

so, path = sys.argv[1], sys.argv[2]
cache = aiovmc.Cache(path)
core = CacheCore(cache)
base = int(ffi.cast("uintptr_t", cache._base))
pause = ctypes.c_size_t.in_dll(ctypes.CDLL(so), "aiovmc_test_pause_at")
pause.value = base + 128  # &header->pool.lock: pause once make_room has the room
try:
    core.store(b"k", b"v" * 1000, None)  # pauses inside, before its publication
    os.write(1, b"stored\n")
except RepairNeeded:
    held = cache.statistics().used_bytes
    core.repair()
    os.write(1, b"%d %d\n" % (held, cache.statistics().used_bytes))
"""


def test_a_deferred_put_leaves_no_room_held_after_the_repair(
    tmp_path: Path, cache_path: str
) -> None:
    """A put on the loop (no repair) has its room when a lock holder dies: its
    publication answers "repair needed" and cannot free the room (that takes
    the pool lock, in a file that needs a repair). The room is freed by the
    repair the caller then runs, not kept for the handle's life (repair keeps
    a live owner's reservations)."""
    from .test_crash import _build_interposer, _read_exact

    so = _build_interposer(tmp_path)
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        _fill(cache)
        used = cache.statistics().used_bytes
        preload = f"{os.environ.get('LD_PRELOAD', '')} {so}".strip()
        env = dict(os.environ, LD_PRELOAD=preload, PYTHONPATH=str(Path(__file__).parents[1]))
        with subprocess.Popen(
            [sys.executable, "-c", _DEFERRING_PUTTER, so, cache_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        ) as putter:
            assert putter.stdin is not None and putter.stdout is not None
            try:
                assert _read_exact(putter.stdout.fileno(), 1) == b"P"  # holds its room
                _kill_holding_every_shard_lock(cache, cache_path)
                putter.stdin.write(b"go")
                putter.stdin.flush()
                out, _ = putter.communicate(timeout=WAIT)
            finally:
                if putter.poll() is None:
                    putter.kill()
        held, after = (int(n) for n in out.split())
        assert held > used  # the failed put's room, an orphan until the repair
        assert after == used
        assert b"k" not in cache
        assert cache.statistics().used_bytes == used


def test_a_clock_damaged_while_attached_is_repaired_by_the_next_put(cache_path: str) -> None:
    """A publication checks the timestamp its fetch_add returns: a clock
    damaged past 2^62 (here to wrap to 0) marks the file, the put starts again
    at its shard lock, which repairs (the rebuild resets the clock to the
    newest kept timestamp), and the put succeeds with the next timestamp."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        first = cache.put(b"a", b"1")
        off, size = HEADER_FIELDS["clock"]
        with open(cache_path, "r+b") as f:  # the file's pages are the mapping's
            f.seek(off)
            f.write((2**64 - 1).to_bytes(size, "little"))
        assert cache.put(b"b", b"2") == first + 1
        assert (cache.get(b"a"), cache.get(b"b")) == (b"1", b"2")


def test_a_clock_at_its_end_fails_puts_instead_of_repairing_forever(cache_path: str) -> None:
    """A clock forged to one below its end (2^62): the next put takes the last
    timestamp; the one after cannot have one, and the repair cannot move the
    clock back below the newest entry's. That put fails with an error saying
    so after a bounded number of repairs, instead of looping."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        cache.put(b"a", b"1")
        off, size = HEADER_FIELDS["clock"]
        with open(cache_path, "r+b") as f:  # the file's pages are the mapping's
            f.seek(off)
            f.write((2**62 - 2).to_bytes(size, "little"))
        assert cache.put(b"b", b"2") == 2**62 - 1
        with pytest.raises(aiovmc.AiovmcError, match="clock stays at its end"):
            cache.put(b"c", b"3")
        assert (cache.get(b"a"), cache.get(b"b"), cache.get(b"c")) == (b"1", b"2", None)


def test_a_repair_keeps_a_live_handles_spare_off_the_reserved_list(cache_path: str) -> None:
    """A live repair keeps the spare of a live handle (a reservation of a live
    owner) where the handle's spare slot names it, not on the reserved list:
    the handle's next replacement refills it, and its close frees it."""
    with aiovmc.Cache(cache_path, size="2MiB") as cache, aiovmc.Cache(cache_path) as other:
        _fill(cache)
        used = cache.statistics().used_bytes
        cache.put(b"e0", make_value(b"e0", 1, 300))  # the old e0 is now the spare
        assert cache.statistics().used_bytes > used
        with_spare = cache.statistics().used_bytes
        _kill_holding_every_shard_lock(cache, cache_path)
        check_value(b"e1", other.get(b"e1"))  # repairs: the spare's owner is alive
        assert cache.statistics().used_bytes == with_spare
        cache.put(b"e2", make_value(b"e2", 1, 300))  # refills it; the old e2 is the next
        assert cache.statistics().used_bytes == with_spare
        off, size = HEADER_FIELDS["reserved_head"]
        assert Path(cache_path).read_bytes()[off : off + size] == bytes(size)  # no list
        cache.close()
        assert other.statistics().used_bytes == used
        for i in range(N):
            check_value(b"e%d" % i, other.get(b"e%d" % i))


def test_a_close_frees_the_spare_it_knows_not_what_its_slot_was_pointed_at(
    cache_path: str,
) -> None:
    """A handle's spare slot names its spare in the file, where damage may
    point it anywhere: here at a head forged inside another entry's value (a
    value's bytes are whatever the application stored), with the file's own
    spare mark, as the handle's spare. The close frees the spare the handle
    knows, never what the slot names: the value holding the forged head stays
    whole, and the spare's room is freed."""
    with aiovmc.Cache(cache_path, size="2MiB") as other:
        cache = aiovmc.Cache(cache_path)
        cache.put(b"s", make_value(b"s", 0, 300))
        cache.put(b"s", make_value(b"s", 1, 300))  # the old s is the spare
        data = Path(cache_path).read_bytes()
        hdr = read_header(data)
        unit = 1 << hdr["unit_shift"]
        (spare,) = {int.from_bytes(u, "little") for u in spare_slot_units(data)} - {0}
        fields = ENTRY.unpack_from(data, hdr["pool_off"] + (spare - 1) * unit)
        head = dict(zip(ENTRY_FIELDS, fields, strict=True))
        assert (head["state"], head["checksum"]) == (1, spare_mark(hdr))  # RESERVED, the mark
        value = plant_forged_spare(cache_path, other, b"victim", spare_mark(hdr))
        used = other.statistics().used_bytes
        cache.close()
        assert other.get(b"victim") == value
        assert other.statistics().used_bytes == used - 2 * unit  # the spare's two units
        for i in range(20):  # the room freed is room: puts fill it, no entry is harmed
            other.put(b"f%d" % i, bytes(2 * unit - 100))
        assert other.get(b"victim") == value
        assert other.get(b"s") == make_value(b"s", 1, 300)


_FORK_DURING_DROP_ORPHANS = r"""
import ctypes, os, select, signal, sys, threading
import aiovmc
from aiovmc._cache import CacheCore
from aiovmc._errors import RepairNeeded
from aiovmc._native._binding import ffi
from tests.helpers import WAIT
from tests.test_repair import _fill, _kill_holding_every_shard_lock

so, path = sys.argv[1], sys.argv[2]
# The interposer's pause talks on fds 0 and 1: pipes this process holds the other ends of.
go_r, go_w = os.pipe()
paused_r, paused_w = os.pipe()
os.dup2(go_r, 0)
os.dup2(paused_w, 1)
pause = ctypes.c_size_t.in_dll(ctypes.CDLL(so), "aiovmc_test_pause_at")


def read1(fd):
    assert select.select([fd], [], [], WAIT)[0], "timed out"
    return os.read(fd, 1)


cache = aiovmc.Cache(path, size="2MiB")
_fill(cache)
core = CacheCore(cache)
base = int(ffi.cast("uintptr_t", cache._base))


def deferred_put():  # as AsyncCache.put on the loop: its room becomes an orphan
    try:
        core.store(b"k", b"v" * 1000, None)
    except RepairNeeded:
        return
    raise AssertionError("stored in a damaged file")


pause.value = base + 128  # &header->pool.lock: pause once make_room has the room
put = threading.Thread(target=deferred_put)
put.start()
assert read1(paused_r) == b"P"
_kill_holding_every_shard_lock(cache, path)
os.write(go_w, b"g")
put.join()
pause.value = base + 128  # the repair thread: pause after vmc_repair's pool unlock...
repair = threading.Thread(target=core.repair)
repair.start()
assert read1(paused_r) == b"P"
pause.value = base + 128  # ...then in drop_orphans, holding the handle's rids_lock
os.write(go_w, b"g")
assert read1(paused_r) == b"P"
for op in ("close", "reserve"):
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if op == "reserve":
            cache.reserve(b"r", 10).cancel()
        cache.close()
        os.write(done_w, b"d")
        os._exit(0)
    os.close(done_w)
    ready = select.select([done_r], [], [], WAIT)[0]
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert ready, f"a child's {op} hangs on the lock a thread of its parent held"
    assert os.read(done_r, 1) == b"d"
os.write(go_w, b"g")
repair.join()
assert b"k" not in cache
cache.close()
print("ok")
"""


def test_a_child_forked_while_a_thread_holds_the_handles_list_lock_can_use_its_handle(
    tmp_path: Path, cache_path: str
) -> None:
    """A thread freeing the orphans after a repair holds the handle's
    process-local list lock while it takes the pool lock. A child forked then
    inherits the lock held by a thread it does not have: its close and reserve
    must not wait for it (the list is the parent's, forgotten in the child)."""
    from .test_crash import _build_interposer

    so = _build_interposer(tmp_path)
    preload = f"{os.environ.get('LD_PRELOAD', '')} {so}".strip()
    env = dict(os.environ, LD_PRELOAD=preload, PYTHONPATH=str(Path(__file__).parents[1]))
    out = subprocess.run(
        [sys.executable, "-c", _FORK_DURING_DROP_ORPHANS, so, cache_path],
        env=env,
        capture_output=True,
        timeout=4 * WAIT,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]


def _close_inherited(cache: aiovmc.Cache) -> None:
    cache.close()


def test_a_child_closing_its_inherited_handle_leaves_the_parents_reservation(
    cache_path: str,
) -> None:
    with aiovmc.Cache(cache_path, size="2MiB") as cache:
        reservation = cache.reserve(b"r", 5)
        reservation.buffer[:] = b"hello"
        child = multiprocessing.get_context("fork").Process(target=_close_inherited, args=(cache,))
        child.start()
        child.join(WAIT)
        assert child.exitcode == 0
        reservation.publish()
        assert cache.get(b"r") == b"hello"


@pytest.mark.anyio
@pytest.mark.parametrize("call", ["put", "put_many"])
async def test_a_write_cancelled_while_it_waits_for_the_repair_is_not_done(
    anyio_backend: str, call: str, cache_path: str
) -> None:
    """docs/cancellation.md: a cancellation during the wait for a repair
    leaves nothing behind but the repair (its thread is shielded: the
    cancellation is delivered when it is over, before the write is tried)."""
    acache = aiovmc.AsyncCache(cache_path, size="2MiB")
    async with acache:
        _fill(acache.cache)
        _kill_holding_every_shard_lock(acache.cache, cache_path)
        entered, release = threading.Event(), threading.Event()
        repair = acache._core.repair

        def held_repair() -> None:
            entered.set()
            assert release.wait(WAIT)
            repair()

        acache._core.repair = held_repair
        returned: list[object] = []

        async def write() -> None:
            if call == "put":
                returned.append(await acache.put(b"k", b"v" * 100))
            else:
                returned.append(await acache.put_many([(b"k", b"v"), (b"k2", b"w")]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            assert await anyio.to_thread.run_sync(entered.wait, WAIT)
            tg.cancel_scope.cancel()  # while the write waits for the repair
            release.set()
        assert returned == []
        assert b"k" not in acache.cache and b"k2" not in acache.cache
        assert len(acache.cache) == N  # repaired: every entry kept


@pytest.mark.anyio
async def test_aclose_waits_for_a_repair_in_flight_off_the_loop(
    anyio_backend: str, cache_path: str
) -> None:
    """Closing waits for the calls in flight on the handle; for a repair
    (O(pool)) that wait is in a worker thread, and the loop runs meanwhile.
    The repair here cannot finish before a task of the loop lets it: if
    aclose blocked the loop, the holder's bounded wait would fail."""
    acache = aiovmc.AsyncCache(cache_path, size="2MiB")
    _fill(acache.cache)
    _kill_holding_every_shard_lock(acache.cache, cache_path)
    pool_lock = int(ffi.cast("uintptr_t", acache.cache._base)) + 128  # &header->pool.lock
    libc = ctypes.CDLL(None)
    held, release = threading.Event(), threading.Event()
    released: list[bool] = []

    def hold_the_pool_lock() -> None:
        libc.pthread_mutex_lock(ctypes.c_void_p(pool_lock))
        held.set()
        released.append(release.wait(WAIT))
        libc.pthread_mutex_unlock(ctypes.c_void_p(pool_lock))

    def a_thread_sleeps_on_the_pool_lock() -> None:
        # glibc's lock word has FUTEX_WAITERS set once a locker sleeps on it:
        # the repair is then inside the core (a call in flight on the handle).
        word = ctypes.c_uint32.from_address(pool_lock)
        deadline = time.monotonic() + WAIT
        while not word.value & 0x80000000:
            assert time.monotonic() < deadline, "the repair did not wait for the pool lock"
            time.sleep(0.001)

    holder = threading.Thread(target=hold_the_pool_lock)
    holder.start()
    try:
        assert await anyio.to_thread.run_sync(held.wait, WAIT)
        got: list[object] = []

        async def get() -> None:  # meets the damage: the repair runs in a worker thread
            try:
                got.append(await acache.get(b"e1"))
            except aiovmc.CacheClosedError as exc:
                got.append(exc)

        async def release_from_the_loop() -> None:
            release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            await anyio.to_thread.run_sync(a_thread_sleeps_on_the_pool_lock)
            tg.start_soon(release_from_the_loop)  # runs only if aclose lets the loop run
            await acache.aclose()
            assert acache.cache.closed
    finally:
        release.set()
        holder.join(WAIT)
    assert released == [True], "aclose blocked the loop while the repair was in flight"
    assert len(got) == 1
    assert isinstance(got[0], aiovmc.CacheClosedError) or check_value(b"e1", got[0]) == 1
    await acache.aclose()  # idempotent


def test_an_entry_count_damaged_to_zero_is_repaired_not_wrapped(cache_path: str) -> None:
    """`pool.heads` (the entries the budget counts) overwritten with 0 while the
    cache holds entries: the next free finds no count to take from, marks the
    file for repair instead of wrapping to 2^32 - 1 (which would evict every
    entry and then refuse every put), and the repair recounts it."""
    heads = 300  # offset of pool.heads (docs/format.md)
    with aiovmc.Cache(cache_path, size="1MiB", max_entries=50) as cache:
        for i in range(10):
            cache.put(b"k%d" % i, b"v")
        fd = os.open(cache_path, os.O_RDWR)
        try:
            os.pwrite(fd, (0).to_bytes(4, "little"), heads)
            assert cache.delete(b"k0")
            cache.put(b"new", b"v")
            assert len(cache) == 10 and cache.statistics().evictions == 0
            assert int.from_bytes(os.pread(fd, 4, heads), "little") == 10
        finally:
            os.close(fd)
