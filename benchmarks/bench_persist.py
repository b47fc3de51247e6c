"""Reserve/publish, persistence waits, crash recovery.

1. `reserve(key, n)` + fill `r.buffer` + `publish()` (and `with reserve(...)`) against
   `put(key, value)`, 4 KiB and 1 MiB values, keys rotating over a small set.
2. `persist()` after one put, and `await wait_persisted(ts)` after `await put`: each
   waiter's latency and how many waiters one flush serves (group commit; flushes
   counted as the distinct `persisted_timestamp`s the waiters see), for 1, 10 and 100
   concurrent writer tasks, on /dev/shm (tmpfs) and on a disk directory.
3. Recovery: a child process fills a 1 GiB file with 1M entries (16 B keys, 100 B
   values), persists, then overwrites random keys until the parent SIGKILLs it; the
   parent times reopening the file (`Cache(path)`, which recovers) and counts the
   entries kept. A clean close and reopen is timed for reference.
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import anyio
from harness import (
    SEED,
    SPAWN,
    Case,
    Family,
    GiB,
    KiB,
    MiB,
    Settings,
    Table,
    disk_dir,
    fmt,
    fs_type,
    interleaved,
    loop_over,
    make_value,
    median,
    percentile,
    say,
    scratch,
    size_label,
)

import aiovmc

TITLE = "Reserve/publish, persistence and recovery"
TABLES = [
    Table("reserve", "Per value, keys rotating over a small set"),
    Table("persist()", "`persist()` after one put"),
    Table("wait_persisted", "`await put` then `await wait_persisted(ts)`, per waiter, "
                            "medians of rounds"),
    Table("recovery", "A 1 GiB file with 1M entries (16 B keys, 100 B values)"),
]  # fmt: skip
WAITERS = (1, 10, 100)


def _reserve(fam: Family, settings: Settings) -> None:
    with scratch("reserve") as d, aiovmc.Cache(os.path.join(d, "c"), size=1 * GiB) as cache:
        for size in (4 * KiB, 1 * MiB):
            value = make_value(size)
            nkeys = 1000 if size < MiB else 64
            keys = [b"res-%06d" % i for i in range(nkeys)]
            for k in keys:
                cache.put(k, value)
            order = [keys[i % nkeys] for i in range(max(nkeys, 20_000 if size < MiB else 256))]
            random.Random(SEED).shuffle(order)

            def reserve(k: bytes, size: int = size, value: bytes = value) -> None:
                r = cache.reserve(k, size)
                r.buffer[:] = value
                r.publish()

            def reserve_cm(k: bytes, size: int = size, value: bytes = value) -> None:
                with cache.reserve(k, size) as r:
                    r.buffer[:] = value

            cases = [
                Case("put", loop_over(lambda k, v=value: cache.put(k, v))),
                Case("reserve + fill + publish", loop_over(reserve)),
                Case("with reserve() (fill)", loop_over(reserve_cm)),
            ]
            for name, ns in interleaved(cases, order, settings).items():
                fam.add("reserve", size_label(size), name, ns, "ns")
            say(f"  {size_label(size)}: " + ", ".join(
                f"{c.name} {fmt(fam.value('reserve', size_label(size), c.name), 'ns')}"
                for c in cases))  # fmt: skip


async def _waiters(ac: aiovmc.AsyncCache, n: int, value: bytes) -> tuple[float, float, float]:
    """One round of ``n`` writers: p50 and max wait (ns), and waiters per flush."""
    lat: list[int] = []
    seen: set[int] = set()

    async def writer(i: int) -> None:
        ts = await ac.put(b"w-%d" % i, value)
        t0 = time.perf_counter_ns()
        await ac.wait_persisted(ts)
        lat.append(time.perf_counter_ns() - t0)
        seen.add(ac.cache.persisted_timestamp)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(writer, i)
    return percentile(lat, 50), max(lat), n / len(seen)


def _persist(fam: Family, settings: Settings) -> None:
    value = make_value(4 * KiB)
    for base in (None, disk_dir()):
        with scratch("persist", base) as d, aiovmc.Cache(os.path.join(d, "c"), size=64 * MiB
                                                         ) as cache:  # fmt: skip
            where = f"{'disk' if base else 'shm'} ({fs_type(d)})"
            xs = []
            for r in range(settings.warmup + settings.rounds):
                t = []
                for i in range(10):
                    cache.put(b"p-%d" % i, value)
                    t0 = time.perf_counter_ns()
                    cache.persist()
                    t.append(time.perf_counter_ns() - t0)
                if r >= settings.warmup:
                    xs.append(median(t))
            fam.add("persist()", where, "latency", xs, "ns")
            ac = aiovmc.AsyncCache.from_cache(cache)
            for n in WAITERS:
                for backend in ("asyncio", "trio"):

                    async def main(n: int = n, ac: aiovmc.AsyncCache = ac
                                   ) -> list[tuple[float, float, float]]:  # fmt: skip
                        rs = [await _waiters(ac, n, value)
                              for _ in range(settings.warmup + settings.rounds)]  # fmt: skip
                        return rs[settings.warmup :]

                    rs = anyio.run(main, backend=backend)
                    row = f"{where}, {backend}, {n} writer{'s' if n > 1 else ''}"
                    fam.add("wait_persisted", row, "p50", [r[0] for r in rs], "ns")
                    fam.add("wait_persisted", row, "max", [r[1] for r in rs], "ns")
                    fam.add("wait_persisted", row, "waiters per flush", [r[2] for r in rs], "")
                    say(f"  {row}: p50 {fmt(fam.value('wait_persisted', row, 'p50'), 'ns')}, "
                        f"{fam.value('wait_persisted', row, 'waiters per flush'):.1f} waiters "
                        "per flush")  # fmt: skip


def _child_writer(path: str, fill: int, size: int, entries: int, ready: Any) -> None:
    """Fill (first round) or attach, persist, say ready, then overwrite until killed."""
    if fill:
        c = aiovmc.Cache(path, size=size)
        for i in range(fill):
            c.put(b"rec-%012d" % i, b"v" * 100)
    else:
        c = aiovmc.Cache(path)
    c.persist()
    rng = random.Random(os.getpid())
    keys = [b"rec-%012d" % rng.randrange(entries) for _ in range(10_000)]
    ready.set()
    while True:
        for k in keys:
            c.put(k, b"w" * 100)


def _recovery(fam: Family, settings: Settings) -> None:
    size = settings.pick(1 * GiB, 1 * GiB, 64 * MiB)
    entries = settings.pick(1_000_000, 1_000_000, 10_000)
    col = f"{size_label(size)}, {entries:,} entries"
    opens, kept, clean = [], [], []
    with scratch("recovery") as d:
        path = os.path.join(d, "c")
        for r in range(settings.warmup + settings.rounds):
            ready = SPAWN.Event()
            p = SPAWN.Process(target=_child_writer,
                              args=(path, entries if r == 0 else 0, size, entries, ready))
            p.start()  # fmt: skip
            if not ready.wait(600):
                p.kill()
                raise RuntimeError("the recovery writer never became ready")
            time.sleep(0.05)  # let it be in the middle of puts (a benchmark, not a test)
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            t0 = time.perf_counter_ns()
            with aiovmc.Cache(path) as c:
                t1 = time.perf_counter_ns()
                n = len(c)
            say(f"  round {r}: reopen after SIGKILL {fmt(t1 - t0, 'ns')}, {n:,} entries")
            if r >= settings.warmup:
                opens.append(t1 - t0)
                kept.append(n)
        for _ in range(3):
            t0 = time.perf_counter_ns()
            c = aiovmc.Cache(path)
            clean.append(time.perf_counter_ns() - t0)
            c.close()
    fam.add("recovery", "reopen after SIGKILL of a writer", col, opens, "ns")
    fam.add("recovery", "entries kept (fewest of rounds)", col, min(kept), "")
    fam.add("recovery", "clean reopen", col, clean, "ns")


def run(settings: Settings, fam: Family) -> None:
    for title, step in (("reserve/publish", _reserve), ("persist", _persist),
                        ("recovery", _recovery)):  # fmt: skip
        say(f"  -- {title}")
        step(fam, settings)
