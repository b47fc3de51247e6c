"""The anyio facade: hit path, cold-key stampede, loop stalls, offload threshold, bandwidth.

1. Hit path: 100k keys, 100 B values, random order; one task awaits
   `AsyncCache.get` hits (asyncio, asyncio+uvloop, trio), against the sync
   `Cache.get` and `get_nowait` of the same file in the same loop; `get_many` of
   100 keys a call, awaited and sync (per key); and against the hits of in-process
   async memoizers on asyncio (async-lru `@alru_cache`, cachebox
   `@cached(LRUCache)`, theine `@Memoize`, warmed with every key).
2. Stampede: 500 tasks ask for one cold key at once, the loader sleeping 10 ms
   (a fresh key per round): loader calls and wall time. Peers: async-lru, aiocache
   `@cached` and `@cached_stampede`, cashews `@cache` and `lock=True` (in memory),
   cachebox, theine.
3. Loop stalls: 4 tasks loop `put` + `get` of 1..64 MiB values (each its own key,
   a checkpoint after every operation), copies inline (`offload_threshold` above any
   value) and offloaded to worker threads (`offload_threshold` 64 KiB), and at
   64 MiB offloaded `get_into` a buffer allocated once (no fresh result to allocate
   and free); each backend's idle baseline (no workers) is run round by round
   between the loaded runs, so a slow phase of the machine hits both. The
   instrument is I/O, not a timer: a clock process writes its time
   (`CLOCK_MONOTONIC`, the same clock on the whole host) to a pipe every 1 ms, and
   a listener task on the loop awaits the pipe (`anyio.wait_readable`); a stamp's
   lateness is when the listener got it minus when it was sent — how long an
   event that had arrived waited for the loop, which is what a stalled loop does
   to a server. A timer ticker cannot show this under 1 ms: both backends sleep
   in `epoll_wait`, whose timeout CPython rounds up to the millisecond, so a
   0.5 ms sleep is a 1 ms one, and every earlier wake-up of a loaded loop rounds
   the rest up again. Reported: the longest lateness of a round (median of
   rounds: the §8 figure; the worst round apart), p99 and p99.9 of every stamp of
   every round; the longest stretch the loop thread ran between two polls for
   I/O, and its CPU time (asyncio: the loop's `selector.select` wrapped; trio:
   a `trio.abc.Instrument`'s I/O-wait hooks) — the work done on the loop
   thread, callbacks, task steps and what is freed between them; the rest of a
   lateness is time the loop thread was off the CPU or waiting for the GIL; the
   most CPU time the loop thread used between two reads of the clock; and the
   time the loop spends dropping one result (the application's part).
4. Offload threshold: sync `Cache.get`/`put` time against value size (4 KiB..64 MiB)
   and one `anyio.to_thread.run_sync` round trip; the recommended default
   `offload_threshold` is the power of two where the slower of an inline get and put
   takes 100–200 µs (log-log interpolated; the nearest to the band's middle if none
   falls inside).
5. Bandwidth: a 64 MiB `Cache.get` against `bytes(memoryview(mmap)[a:b])` of a plain
   mmap of a file in /dev/shm, py-lmdb's get, and both into a reused buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import mmap
import os
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiocache
import anyio
import async_lru
import cachebox
import cashews
import lmdb
import theine
from harness import (
    Case,
    Family,
    GiB,
    KiB,
    MiB,
    Plot,
    Settings,
    Table,
    ainterleaved,
    aloop_over,
    fmt,
    interleaved,
    key_order,
    loop_over,
    make_key,
    make_value,
    median,
    percentile,
    say,
    scratch,
    size_label,
)

import aiovmc

TITLE = "AsyncCache"
STALL = "loop stall: event lateness"
BUSY = "loop stall: longest stretch between polls"
TABLES = [
    Table("hit path", "Per hit, 100 B values, 100k keys, random order",
          Plot("bars", "bench_async_hit.png", "Hit path: awaited get vs sync get vs "
               "async memoizers", xlabel="ns per hit")),
    Table("stampede", "500 tasks on one cold key, the loader sleeping 10 ms"),
    Table(STALL, "How late the loop read an event (a pipe written every 1 ms by another "
                 "process): the longest lateness of a round, median of rounds; idle = no "
                 "workers, run between the loaded rounds",
          Plot("lines", "bench_loop_lag.png", "Loop stall, 4 tasks put + get",
               xlabel="value size (bytes)", ylabel="ms", logx=True, logy=True, hline=1.0,
               hline_label="target 1 ms")),
    Table("loop stall: worst round", "The same, the worst round"),
    Table("loop stall: p99", "The p99 lateness of every event of every round"),
    Table("loop stall: p99.9", "The p99.9 lateness of every event of every round"),
    Table(BUSY, "The longest time the loop thread ran between two polls for I/O (callbacks, "
                "task steps, what is freed between them), median of rounds: work done on "
                "the loop"),
    Table("loop stall: CPU of the longest stretch", "The loop thread's CPU time in that "
                                                    "stretch, median of rounds"),
    Table("loop stall: loop thread's CPU", "The most CPU time the loop thread used between "
                                           "two reads of the clock, median of rounds"),
    Table("loop stall: MiB/s moved", "Put + get traffic of the 4 tasks"),
    Table("loop stall: dropping one result", "The longest time the loop spent dropping a "
                                             "result (the application's part)"),
    Table("inline copy", "Sync `Cache.get` / `put` of one key against value size",
          Plot("lines", "bench_offload.png", "Inline copy time vs value size",
               xlabel="value size (bytes)", ylabel="ns per op (loop time if inline)",
               logx=True, logy=True, hline=150_000, hline_label="100–200 µs band")),
    Table("offload threshold", "The offload round trip and the recommended default"),
    Table("64 MiB copies", "One 64 MiB value"),
]  # fmt: skip
N_KEYS = 100_000
HIT_VALUE = 100
MANY = 100  # keys per get_many call
STAMPEDE_TASKS = 500
LOADER_SLEEP = 0.010
WORKERS = 4
OFFLOAD_SMALL = 64 * KiB
INLINE = 1 << 62
BIG = 64 * MiB
Backend = tuple[str, dict[str, Any]]  # anyio.run's backend and backend_options
ASYNCIO: Backend = ("asyncio", {})
BACKENDS: dict[str, Backend] = {
    "asyncio": ASYNCIO, "uvloop": ("asyncio", {"use_uvloop": True}), "trio": ("trio", {})
}


def _run(fn: Callable[..., Awaitable[Any]], backend: Backend, *args: Any
         ) -> Any:  # fmt: skip
    return anyio.run(fn, *args, backend=backend[0], backend_options=backend[1])


# ----------------------------------------------------------------------- 1. hit path


async def _memoizers(keys: list[bytes], value: bytes) -> dict[str, Any]:
    async def load(key: bytes) -> bytes:
        return value

    memo = {
        "async-lru hit": async_lru.alru_cache(maxsize=None)(load),
        "cachebox hit": cachebox.cached(cachebox.LRUCache(len(keys) * 2))(load),
        "theine hit": theine.Memoize(len(keys) * 2, None)(load),
    }
    for f in memo.values():  # every key becomes a hit
        for k in keys:
            await f(k)
    return memo


def _hit_path(fam: Family, settings: Settings, n_keys: int) -> None:
    keys = [make_key(i) for i in range(n_keys)]
    order = [keys[i] for i in key_order(n_keys)]
    value = make_value(HIT_VALUE)
    with scratch("async-hit") as d:
        ac = aiovmc.AsyncCache(os.path.join(d, "cache"), size=256 * MiB)
        for k in keys:
            ac.cache.put(k, value)
        batches = [order[i : i + MANY] for i in range(0, len(order) - MANY + 1, MANY)]
        for bname, backend in BACKENDS.items():

            async def main(bname: str = bname) -> dict[str, list[float]]:
                cases = [
                    Case(f"aiovmc await get ({bname})", aloop_over(ac.get)),
                    Case(f"aiovmc Cache.get (sync) [{bname}]", _sync_as_async(ac.cache.get)),
                    Case(f"aiovmc get_nowait [{bname}]", _sync_as_async(ac.get_nowait)),
                ]
                if bname == "asyncio":
                    memo = await _memoizers(keys, value)
                    cases += [Case(name, aloop_over(f)) for name, f in memo.items()]
                hits = await ainterleaved(cases, order, settings)
                many = await ainterleaved(
                    [Case(f"aiovmc await get_many ({bname}), per key", aloop_over(ac.get_many)),
                     Case(f"aiovmc Cache.get_many (sync) [{bname}], per key",
                          _sync_as_async(ac.cache.get_many))],
                    batches, settings)  # fmt: skip
                return hits | {name: [x / MANY for x in ns] for name, ns in many.items()}

            for name, ns in _run(main, backend).items():
                fam.add("hit path", name, "per hit", ns, "ns")
                say(f"  hit: {name:<40} {fmt(median(ns), 'ns')}")
        ac.cache.close()


def _sync_as_async(op: Callable[[Any], Any]) -> Callable[[list[Any]], Callable[[], Any]]:
    """A sync loop timed inside the running event loop (the same process state)."""
    sync = loop_over(op)

    def make(keys: list[Any]) -> Callable[[], Awaitable[None]]:
        loop = sync(keys)

        async def run() -> None:
            loop()

        return run

    return make


# ----------------------------------------------------------------------- 2. stampede


async def _stampede_once(call: Callable[[bytes], Awaitable[Any]], key: bytes, expect: bytes
                         ) -> float:  # fmt: skip
    results: list[Any] = []

    async def one() -> None:
        results.append(await call(key))

    t0 = time.perf_counter_ns()
    async with anyio.create_task_group() as tg:
        for _ in range(STAMPEDE_TASKS):
            tg.start_soon(one)
    wall = (time.perf_counter_ns() - t0) / 1e6
    if any(r != expect for r in results):
        raise AssertionError("a stampede result was wrong")
    return wall


def _stampede(fam: Family, settings: Settings) -> None:
    value = make_value(HIT_VALUE)
    rounds = settings.warmup + settings.rounds
    cashews.cache.setup("mem://")
    decorators: dict[str, Callable[[Any], Any]] = {
        "async-lru": lambda f: async_lru.alru_cache(maxsize=None)(f),
        "aiocache @cached": lambda f: aiocache.cached(ttl=60)(f),
        "aiocache @cached_stampede": lambda f: aiocache.cached_stampede(lease=2, ttl=60)(f),
        "cashews @cache": lambda f: cashews.cache(ttl="1m")(f),
        "cashews @cache(lock=True)": lambda f: cashews.cache(ttl="1m", lock=True)(f),
        "cachebox": lambda f: cachebox.cached(cachebox.LRUCache(1000))(f),
        "theine": lambda f: theine.Memoize(1000, None)(f),
    }
    with scratch("async-stampede") as d:
        ac = aiovmc.AsyncCache(os.path.join(d, "cache"), size=64 * MiB)
        libs: list[tuple[str, Backend, Callable[..., Any]]] = [
            (f"aiovmc ({b})", BACKENDS[b],
             lambda loader, r, b=b: lambda k: ac.get(k + b.encode(), on_miss=loader))
            for b in ("asyncio", "trio")
        ] + [
            (name, ASYNCIO, lambda loader, r, deco=deco, name=name: deco(_named(loader, name, r)))
            for name, deco in decorators.items()
        ]  # fmt: skip
        for name, backend, wrap in libs:

            async def main(wrap: Callable[[Any, int], Any] = wrap) -> list[tuple[float, int]]:
                out = []
                for r in range(rounds):
                    calls = [0]

                    async def loader(key: bytes, calls: list[int] = calls) -> bytes:
                        calls[0] += 1
                        await anyio.sleep(LOADER_SLEEP)
                        return value

                    out.append((await _stampede_once(wrap(loader, r), b"cold-%d" % r, value),
                                calls[0]))  # fmt: skip
                return out[settings.warmup :]

            rs = _run(main, backend)
            fam.add("stampede", name, "loader calls (max of rounds)", max(c for _, c in rs),
                    "")  # fmt: skip
            fam.add("stampede", name, "wall time", [w for w, _ in rs], "ms")
            say(f"  stampede: {name:<28} loader calls {[c for _, c in rs]}  wall "
                f"{median([w for w, _ in rs]):.1f} ms")  # fmt: skip
        ac.cache.close()


def _named(loader: Callable[..., Any], name: str, r: int) -> Callable[..., Any]:
    """The loader under a name of its own: the memoizers key their caches by function."""
    loader.__qualname__ = loader.__name__ = f"stampede_{abs(hash(name))}_{r}"
    return loader


# ----------------------------------------------------------------------- 3. loop stalls

#: The clock process (section 3): writes its CLOCK_MONOTONIC time to a pipe every
#: `CLOCK_PERIOD` on an absolute grid, dropping a stamp rather than blocking when the
#: pipe is full (the loop not reading), so every stamp read is the time it was sent.
CLOCK_SOURCE = """
import os, struct, sys, time
fd, period = int(sys.argv[1]), int(sys.argv[2])
os.set_blocking(fd, False)
due = time.monotonic_ns()
while True:
    due += period
    now = time.monotonic_ns()
    if due > now:
        time.sleep((due - now) / 1e9)
    else:
        due = now  # late itself: the grid restarts here
    try:
        os.write(fd, struct.pack("q", time.monotonic_ns()))
    except BlockingIOError:
        pass
    except BrokenPipeError:
        break
"""
CLOCK_PERIOD = 0.001


class _Clock:
    """A process that sends its time on a pipe every `CLOCK_PERIOD` (`CLOCK_SOURCE`)."""

    def __init__(self) -> None:
        self.fd, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLOCK_SOURCE, str(w), str(int(CLOCK_PERIOD * 1e9))],
            pass_fds=[w])  # fmt: skip
        os.close(w)
        os.set_blocking(self.fd, False)

    def close(self) -> None:
        os.close(self.fd)  # the clock's next write fails: it ends
        self.proc.wait()


class _BusyTimer:
    """The longest stretch the loop thread ran between two polls for I/O while
    installed, and the CPU time it used in it: every callback or task step run in
    one pass of the loop, and whatever is freed between them (asyncio drops a
    finished callback, and the arguments it holds, after it has run). The poll is
    asyncio's `selector.select` (wrapped on the running loop's selector) or trio's
    I/O wait (`before_io_wait` / `after_io_wait` of a `trio.abc.Instrument`); a
    GIL wait on waking is inside the poll, not in a stretch."""

    def __init__(self) -> None:
        self.longest = self.longest_cpu = 0
        self.woke = self.woke_cpu = 0

    def polling(self) -> None:
        if self.woke:
            busy = time.perf_counter_ns() - self.woke
            if busy > self.longest:
                self.longest, self.longest_cpu = busy, time.thread_time_ns() - self.woke_cpu
        self.woke = 0

    def polled(self) -> None:
        self.woke, self.woke_cpu = time.perf_counter_ns(), time.thread_time_ns()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():
            timer = self

            class Polls(trio.abc.Instrument):  # type: ignore[misc]
                def before_io_wait(self, timeout: float) -> None:
                    timer.polling()

                def after_io_wait(self, timeout: float) -> None:
                    timer.polled()

            instrument = Polls()
            trio.lowlevel.add_instrument(instrument)
            try:
                yield
            finally:
                trio.lowlevel.remove_instrument(instrument)
            return
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        select = selector.select

        def timed_select(timeout: float | None = None) -> Any:
            self.polling()
            try:
                return select(timeout)
            finally:
                self.polled()

        selector.select = timed_select
        try:
            yield
        finally:
            del selector.select  # the class's method again


class _GetIntoMode:
    """An AsyncCache whose ``get`` is ``get_into`` a buffer allocated once per key."""

    def __init__(self, ac: aiovmc.AsyncCache, keys: list[bytes], size: int) -> None:
        self.ac = ac
        self.outs = {k: bytearray(size) for k in keys}

    async def put(self, key: bytes, value: bytes) -> Any:
        return await self.ac.put(key, value)

    async def get(self, key: bytes) -> bytearray | None:
        n = await self.ac.get_into(key, self.outs[key])
        return None if n is None else self.outs[key]


async def _lag_round(clock: _Clock, ac: Any, keys: list[bytes], value: bytes, duration: float
                     ) -> dict[str, Any]:  # fmt: skip
    """One round: a listener task reads the clock's stamps while the workers (none for
    the idle baseline) loop put + get; the lateness of a stamp is when the listener
    got it minus when it was sent. Each round runs on an event loop of its own, so
    it measures from the moment every worker has done one put + get (the loop's
    worker threads started), after collecting the garbage the previous round and
    this loop's start left: the first collection of those thousands of young
    objects, slowed by the copies' memory traffic, took 2-3 ms inside a round
    (asyncio), a pause a long-running loop pays once at start-up, not per copy."""
    late: list[int] = []
    cpu: list[int] = [0]  # the loop thread's CPU time between two reads of the clock
    drops: list[int] = [0]
    moved = [0]
    stop = anyio.Event()
    busy = _BusyTimer()
    unwarmed = [len(keys)]
    warm = anyio.Event()
    if not keys:
        warm.set()
    gc.collect()

    async def listener() -> None:
        await warm.wait()
        busy.longest = busy.longest_cpu = 0  # the stretches of the warm-up do not count
        while True:  # drop what the clock sent before the round
            try:
                os.read(clock.fd, 1 << 16)
            except BlockingIOError:
                break
        start = time.monotonic_ns()
        last_cpu = time.thread_time_ns()
        while not stop.is_set():
            await anyio.wait_readable(clock.fd)
            now, now_cpu = time.monotonic_ns(), time.thread_time_ns()
            try:
                sent = os.read(clock.fd, 1 << 16)
            except BlockingIOError:
                continue
            late.extend(now - t for (t,) in struct.iter_unpack("q", sent) if t >= start)
            cpu.append(now_cpu - last_cpu)
            last_cpu = now_cpu

    async def worker(k: bytes) -> None:
        warmed = False
        while not stop.is_set():
            await ac.put(k, value)
            await anyio.lowlevel.checkpoint()
            v = await ac.get(k)
            if v is None or len(v) != len(value):
                raise AssertionError("a loop-stall worker lost its value")
            t0 = time.perf_counter_ns()
            v = None  # unmapped here if this was the last reference (asyncio's future
            # and trio's outcome may still hold it: then where they are freed)
            drops.append(time.perf_counter_ns() - t0)
            await anyio.lowlevel.checkpoint()
            moved[0] += 2 * len(value)
            if not warmed:
                warmed = True
                unwarmed[0] -= 1
                if unwarmed[0] == 0:
                    warm.set()

    t0 = time.perf_counter_ns()
    with busy.installed():
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener)
            for k in keys:
                tg.start_soon(worker, k)
            await anyio.sleep(duration)
            stop.set()
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    return {"late": [x / 1e6 for x in late], "busy": busy.longest / 1e6,
            "busy_cpu": busy.longest_cpu / 1e6,
            "cpu": max(cpu[2:] or cpu) / 1e6, "drop": max(drops) / 1e6,
            "mib_s": moved[0] / MiB / elapsed}  # fmt: skip


def _loop_lag(fam: Family, settings: Settings) -> None:
    sizes = settings.pick((1 * MiB, 4 * MiB, 16 * MiB, BIG), (1 * MiB, 4 * MiB, 16 * MiB, BIG),
                          (BIG,))  # fmt: skip
    duration = settings.pick(0.8, 0.25, 0.05)
    keys = [b"lag-%d" % i for i in range(WORKERS)]
    values = {size: make_value(size) for size in sizes}
    clock = _Clock()
    try:
        with scratch("async-lag") as d, aiovmc.Cache(os.path.join(d, "c"), size=2 * GiB) as cache:
            modes = {
                "inline": aiovmc.AsyncCache.from_cache(cache, offload_threshold=INLINE),
                "offloaded": aiovmc.AsyncCache.from_cache(cache, offload_threshold=OFFLOAD_SMALL),
            }
            for bname in ("asyncio", "trio"):
                runs: list[tuple[str, int, Any]] = [(f"{bname} idle (no workers)", 0, None)]
                for size in sizes:
                    runs += [(f"{bname} {m}", size, ac) for m, ac in modes.items()]
                    if size == BIG:
                        runs.append((f"{bname} offloaded get_into", size,
                                     _GetIntoMode(modes["offloaded"], keys, size)))  # fmt: skip
                # round by round, the idle baseline interleaved with the loaded runs
                rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
                for r in range(settings.warmup + settings.rounds):
                    for row, size, ac in runs:
                        res = _run(_lag_round, BACKENDS[bname], clock, ac, keys if size else [],
                                   values.get(size, b""), duration)  # fmt: skip
                        if r >= settings.warmup:
                            rounds.setdefault((row, size), []).append(res)
                for (row, size), rs in rounds.items():
                    _record_lag(fam, row, size, rs)
    finally:
        clock.close()


def _record_lag(fam: Family, row: str, size: int, rs: list[dict[str, Any]]) -> None:
    col = size_label(size) if size else "—"
    x = float(size) if size else None
    late = [x for r in rs for x in r["late"]]
    fam.add(STALL, row, col, [max(r["late"]) for r in rs], "ms", x=x)
    fam.add("loop stall: worst round", row, col, max(late), "ms")
    fam.add("loop stall: p99", row, col, percentile(late, 99), "ms")
    fam.add("loop stall: p99.9", row, col, percentile(late, 99.9), "ms")
    fam.add(BUSY, row, col, [r["busy"] for r in rs], "ms")
    fam.add("loop stall: CPU of the longest stretch", row, col, [r["busy_cpu"] for r in rs], "ms")
    fam.add("loop stall: loop thread's CPU", row, col, [r["cpu"] for r in rs], "ms")
    if size:
        fam.add("loop stall: MiB/s moved", row, col, [r["mib_s"] for r in rs], "")
        fam.add("loop stall: dropping one result", row, col, [r["drop"] for r in rs], "ms")
    say(f"  stall {row:<28} {col:>7}: late {fam.value(STALL, row, col):6.2f} ms (p99.9 "
        f"{percentile(late, 99.9):.2f}), longest stretch between polls "
        f"{fam.value(BUSY, row, col):.2f} ms")  # fmt: skip


# ----------------------------------------------------------------------- 4. threshold


def _size_at(points: list[tuple[int, float]], ns: float) -> float:
    """Interpolate (log-log) the size at which an op takes ``ns``."""
    for (s0, t0), (s1, t1) in itertools.pairwise(points):
        if t0 <= ns <= t1:
            if t1 == t0:
                return float(s0)
            f = (math.log(ns) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0)))
    return float(points[0][0] if ns < points[0][1] else points[-1][0])


def _recommend(at100: float, at200: float) -> int:
    """The power of two between the 100 µs and 200 µs sizes (the lower one if two)."""
    p = 1 << max(12, math.ceil(math.log2(max(at100, 1))))
    if p > at200:  # no power of two inside the band: the nearest to its middle
        mid = math.sqrt(at100 * at200)
        lo = 1 << math.floor(math.log2(mid))
        p = lo if mid / lo < (2 * lo) / mid else 2 * lo
    return p


def _offload_curve(fam: Family, settings: Settings) -> None:
    sizes = settings.pick(tuple(4 * KiB * 4**i for i in range(8)),
                          tuple(4 * KiB * 4**i for i in range(8)), (4 * KiB, 64 * MiB))
    budget = settings.pick(256 * MiB, 64 * MiB, 64 * MiB)  # fmt: skip
    curve: dict[str, list[tuple[int, float]]] = {"get": [], "put": []}
    with scratch("async-curve") as d, aiovmc.Cache(os.path.join(d, "c"), size=1 * GiB) as cache:
        for size in sizes:
            value = make_value(size)
            k = b"curve-%d" % size
            cache.put(k, value)
            ops = max(3, min(2000, budget // size))
            rounds = interleaved(
                [Case("get", loop_over(cache.get), ops),
                 Case("put", loop_over(lambda k, v=value: cache.put(k, v)), ops)],
                [k] * ops, settings)  # fmt: skip
            for op, ns in rounds.items():
                fig = fam.add("inline copy", f"Cache.{op}", size_label(size), ns, "ns", x=size)
                curve[op].append((size, fig.value))

    async def trip() -> float:
        def noop() -> None:
            return None

        for _ in range(50):
            await anyio.to_thread.run_sync(noop)
        xs = []
        for _ in range(settings.rounds):
            t0 = time.perf_counter_ns()
            for _ in range(200):
                await anyio.to_thread.run_sync(noop)
            xs.append((time.perf_counter_ns() - t0) / 200)
        return median(xs)

    for bname in ("asyncio", "trio"):
        fam.add("offload threshold", f"to_thread round trip ({bname})", "value",
                _run(trip, BACKENDS[bname]), "ns")  # fmt: skip
    # one inline copy of either kind stalls the loop: the slower of get and put counts
    worst = [(s, max(g, p)) for (s, g), (_, p) in zip(curve["get"], curve["put"], strict=True)]
    at100, at200 = _size_at(worst, 100_000), _size_at(worst, 200_000)
    fam.add("offload threshold", "an inline copy takes 100 µs at", "value", at100, "B")
    fam.add("offload threshold", "an inline copy takes 200 µs at", "value", at200, "B")
    rec = fam.add("offload threshold", "recommended default offload_threshold", "value",
                  _recommend(at100, at200), "B")  # fmt: skip
    say(f"  inline copy 100 µs at {fmt(at100, 'B')}, 200 µs at {fmt(at200, 'B')}: recommended "
        f"offload_threshold {fmt(rec.value, 'B')}")  # fmt: skip


# ----------------------------------------------------------------------- 5. bandwidth


def _bandwidth(fam: Family, settings: Settings) -> None:
    value = make_value(BIG)
    buf = bytearray(BIG)
    a, b = 4096, 4096 + BIG
    with scratch("async-bw") as d, aiovmc.Cache(os.path.join(d, "c"), size=512 * MiB) as cache:
        cache.put(b"big", value)
        with open(os.path.join(d, "plain"), "wb") as f:
            f.write(b"\0" * a + value)
        with open(os.path.join(d, "plain"), "r+b") as plain:
            mm = mmap.mmap(plain.fileno(), 0)
        env = lmdb.open(os.path.join(d, "lmdb"), map_size=1 * GiB, sync=False, writemap=True)
        with env.begin(write=True) as txn:
            txn.put(b"big", value)
        view, out = memoryview(mm), memoryview(buf)

        def lmdb_get(k: bytes) -> Any:
            with env.begin() as txn:
                return txn.get(k)

        def into(_k: bytes) -> None:
            out[:] = view[a:b]

        cases = [
            Case("aiovmc Cache.get", loop_over(cache.get), 5),
            Case("bytes(memoryview(mmap)[a:b])", loop_over(lambda _k: bytes(view[a:b])), 5),
            Case("lmdb get", loop_over(lmdb_get), 5),
            Case("aiovmc get_into (reused buffer)",
                 loop_over(lambda k: cache.get_into(k, buf)), 5),
            Case("mmap slice into reused buffer", loop_over(into), 5),
        ]  # fmt: skip
        try:
            for name, ns in interleaved(cases, [b"big"] * 5, settings).items():
                fam.add("64 MiB copies", name, "time", ns, "ns")
                fam.add("64 MiB copies", name, "GiB/s", [BIG / x * 1e9 / GiB for x in ns],
                        "GiB/s")  # fmt: skip
                say(f"  64 MiB {name:<32} {fam.value('64 MiB copies', name, 'GiB/s'):.2f} GiB/s")
        finally:
            out.release()
            view.release()
            mm.close()
            env.close()


def run(settings: Settings, fam: Family) -> None:
    steps = [
        ("hit path", lambda: _hit_path(fam, settings, settings.pick(N_KEYS, N_KEYS, 2_000))),
        ("stampede", lambda: _stampede(fam, settings)),
        ("loop stalls", lambda: _loop_lag(fam, settings)),
        ("offload threshold", lambda: _offload_curve(fam, settings)),
        ("bandwidth", lambda: _bandwidth(fam, settings)),
    ]
    for title, step in steps:
        say(f"  -- {title}")
        t0 = time.monotonic()
        step()
        say(f"     ({title}: {time.monotonic() - t0:.1f} s)")

