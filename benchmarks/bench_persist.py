# ruff: noqa: RUF003  (µ, ×, −, – are meant: they are printed)
"""Family ``persist``: reserve/publish, persistence waits, crash recovery.

1. ``reserve(key, n)`` + fill ``r.buffer`` + ``publish()`` against ``put(key, value)``
   for 4 KiB and 1 MiB values (keys rotating over a small set; same file).
2. ``persist()`` latency, and ``await wait_persisted(ts)`` after ``await put``: per-waiter
   latency and how many waiters one flush serves (group commit), for 1, 10 and 100
   concurrent writer tasks, with the file on /dev/shm (tmpfs) and on a disk path
   (ext4 or whatever /var/tmp is). Flushes are counted as the distinct values of
   ``persisted_timestamp`` the waiters see when they wake.
3. Recovery: a child process fills a 1 GiB file with 1M entries (16 B keys, 100 B
   values), persists, then keeps overwriting random keys until the parent kills it
   with SIGKILL; the parent then times reopening the file (``Cache(path)``, which
   must recover), and counts the entries kept. Repeated per round with a fresh kill;
   a clean close + reopen is timed for reference.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from typing import Any

from _common import (
    SEED,
    Case,
    Check,
    FamilyResult,
    GiB,
    KiB,
    MiB,
    Ratio,
    Settings,
    disk_dir,
    fmt_ns,
    fs_type,
    has_async,
    has_reserve,
    interleaved,
    make_value,
    median,
    percentile,
    print_checks,
    print_ratios,
    rm,
    say,
    scratch,
)

NAME = "persist"
TITLE = "Reserve/publish, persistence waits and crash recovery"
RESERVE_SIZES = (4 * KiB, 1 * MiB)
WAITERS = (1, 10, 100)
RECOVERY_SIZE = 1 * GiB
RECOVERY_ENTRIES = 1_000_000


# ----------------------------------------------------------------------- 1. reserve


def _reserve(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    d = scratch("reserve")
    out: dict[str, Any] = {}
    try:
        cache = aiovmc.Cache(os.path.join(d, "cache.vmc"), size=1 * GiB)
        try:
            for size in RESERVE_SIZES:
                value = make_value(size)
                nkeys = 1000 if size < MiB else 64
                keys = [b"res-%06d" % i for i in range(nkeys)]
                for k in keys:
                    cache.put(k, value)
                order = [keys[i % nkeys] for i in range(max(nkeys, 20_000 if size < MiB else 256))]
                random.Random(SEED).shuffle(order)

                def make_put(ks: list[bytes], value: bytes = value) -> Any:
                    put = cache.put

                    def loop() -> None:
                        for k in ks:
                            put(k, value)

                    return loop

                def make_reserve(ks: list[bytes], value: bytes = value, size: int = size) -> Any:
                    reserve = cache.reserve

                    def loop() -> None:
                        for k in ks:
                            r = reserve(k, size)
                            r.buffer[:] = value
                            r.publish()

                    return loop

                def make_reserve_cm(ks: list[bytes], value: bytes = value, size: int = size) -> Any:
                    reserve = cache.reserve

                    def loop() -> None:
                        for k in ks:
                            with reserve(k, size) as r:
                                r.buffer[:] = value

                    return loop

                label = f"{size // KiB} KiB" if size < MiB else f"{size // MiB} MiB"
                rounds = interleaved(
                    [
                        Case("put", make_put),
                        Case("reserve+fill+publish", make_reserve),
                        Case("with reserve() (fill)", make_reserve_cm),
                    ],
                    order,
                    settings,
                )
                out[label] = {
                    n: {"median_ns": median(x), "rounds_ns": x} for n, x in rounds.items()
                }
                say(
                    f"  {label}: "
                    + ", ".join(f"{n} {fmt_ns(median(x))}" for n, x in rounds.items())
                )
                res.ratios.append(
                    Ratio(
                        f"reserve+publish {label}",
                        out[label]["reserve+fill+publish"]["median_ns"],
                        "put",
                        out[label]["put"]["median_ns"],
                        "ns",
                        "lower",
                    )
                )
        finally:
            cache.close()
    finally:
        rm(d)
    res.data["reserve"] = out


# ----------------------------------------------------------------------- 2. persist


def _persist(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    import anyio

    out: dict[str, Any] = {}
    locations = [("shm", None), ("disk", disk_dir())]
    value = make_value(4 * KiB)
    for where, base in locations:
        d = scratch("persist", base)
        label = f"{where} ({fs_type(d)})"
        try:
            cache = aiovmc.Cache(os.path.join(d, "cache.vmc"), size=64 * MiB)
            try:
                # sync persist() latency with one fresh put each time
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
                entry: dict[str, Any] = {"persist_ns": median(xs), "persist_rounds_ns": xs}
                say(f"  {label}: persist() after one put {fmt_ns(median(xs))}")
                if has_async(aiovmc) and hasattr(aiovmc.AsyncCache, "wait_persisted"):
                    from_cache = getattr(aiovmc.AsyncCache, "from_cache", None)
                    ac = (
                        from_cache(cache)
                        if from_cache
                        else aiovmc.AsyncCache(os.path.join(d, "cache.vmc"))
                    )

                    for n in WAITERS:

                        async def main(n: int = n, ac: Any = ac) -> list[dict[str, Any]]:
                            rounds = []
                            for _r in range(settings.warmup + settings.rounds):
                                lat: list[int] = []
                                seen: list[int] = []

                                async def writer(
                                    i: int,
                                    ac: Any = ac,
                                    lat: list[int] = lat,
                                    seen: list[int] = seen,
                                ) -> None:
                                    ts = await ac.put(b"w-%d" % i, value)
                                    t0 = time.perf_counter_ns()
                                    await ac.wait_persisted(ts)
                                    lat.append(time.perf_counter_ns() - t0)
                                    seen.append(ac.cache.persisted_timestamp)

                                t0 = time.perf_counter_ns()
                                async with anyio.create_task_group() as tg:
                                    for i in range(n):
                                        tg.start_soon(writer, i)
                                wall = time.perf_counter_ns() - t0
                                flushes = len(set(seen))
                                rounds.append(
                                    {
                                        "p50_ns": percentile(lat, 50),
                                        "max_ns": max(lat),
                                        "wall_ns": wall,
                                        "flushes": flushes,
                                        "waiters_per_flush": n / max(1, flushes),
                                    }
                                )
                            return rounds[settings.warmup :]

                        for bname in ("asyncio", "trio"):
                            try:
                                rs = anyio.run(main, backend=bname)
                            except ImportError:
                                continue
                            k = f"{bname} {n} waiters"
                            entry[k] = {
                                "p50_ns": median([r["p50_ns"] for r in rs]),
                                "max_ns": median([r["max_ns"] for r in rs]),
                                "wall_ns": median([r["wall_ns"] for r in rs]),
                                "waiters_per_flush": median([r["waiters_per_flush"] for r in rs]),
                                "rounds": rs,
                            }
                            say(
                                f"  {label} {k:<20}: wait_persisted p50 "
                                f"{fmt_ns(entry[k]['p50_ns'])}, max {fmt_ns(entry[k]['max_ns'])}, "
                                f"{entry[k]['waiters_per_flush']:.1f} waiters per flush"
                            )
                else:
                    res.note("AsyncCache.wait_persisted not available: group commit skipped")
                out[label] = entry
            finally:
                cache.close()
        finally:
            rm(d)
    res.data["persist"] = out
    for label, e in out.items():
        k = "asyncio 100 waiters"
        if k in e:
            res.checks.append(
                Check(
                    f"waiters served per flush, 100 writers, {label}",
                    e[k]["waiters_per_flush"],
                    "",
                    None,
                    "higher",
                )
            )
            res.checks.append(
                Check(
                    f"wait_persisted p50, 1 writer, {label}",
                    e["asyncio 1 waiters"]["p50_ns"] / 1e3,
                    "µs",
                    None,
                    "lower",
                )
            )


# ----------------------------------------------------------------------- 3. recovery


def _child_writer(path: str, fill: int, size: int, ready: Any) -> None:
    """Fill (first round) or attach, persist, say ready, then overwrite until killed."""
    import aiovmc

    value = b"v" * 100
    if fill:
        c = aiovmc.Cache(path, size=size)
        put = c.put
        for i in range(fill):
            put(b"rec-%012d" % i, value)
    else:
        c = aiovmc.Cache(path)
    c.persist()
    rng = random.Random(os.getpid())
    keys = [b"rec-%012d" % rng.randrange(RECOVERY_ENTRIES) for _ in range(10_000)]
    ready.set()
    other = b"w" * 100
    while True:
        for k in keys:
            c.put(k, other)


def _recovery(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    ctx = mp.get_context("spawn")
    d = scratch("recovery")
    path = os.path.join(d, "cache.vmc")
    out: dict[str, Any] = {"file_size": RECOVERY_SIZE, "entries_written": RECOVERY_ENTRIES}
    opens: list[float] = []
    kept: list[int] = []
    probe = [b"rec-%012d" % i for i in random.Random(SEED).sample(range(RECOVERY_ENTRIES), 1000)]
    try:
        for r in range(settings.warmup + settings.rounds):
            ready = ctx.Event()
            t_fill = time.perf_counter()
            p = ctx.Process(
                target=_child_writer,
                args=(path, RECOVERY_ENTRIES if r == 0 else 0, RECOVERY_SIZE, ready),
            )
            p.start()
            if not ready.wait(300):
                p.kill()
                raise RuntimeError("recovery writer never became ready")
            if r == 0:
                out["fill_s"] = time.perf_counter() - t_fill
                say(f"  filled {RECOVERY_ENTRIES:,} entries in {out['fill_s']:.1f} s (child)")
            time.sleep(0.05)  # let it be in the middle of puts
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            t0 = time.perf_counter_ns()
            c = aiovmc.Cache(path)
            t1 = time.perf_counter_ns()
            n = len(c)
            hits = sum(1 for k in probe if c.get(k) is not None)
            c.close()
            say(
                f"  round {r}: reopen after SIGKILL {fmt_ns(t1 - t0)}, {n:,} entries, "
                f"{hits}/1000 probes hit"
            )
            if r >= settings.warmup or settings.rounds == 0:
                opens.append(t1 - t0)
                kept.append(n)
        # clean reopen for reference
        clean = []
        for _ in range(3):
            t0 = time.perf_counter_ns()
            c = aiovmc.Cache(path)
            clean.append(time.perf_counter_ns() - t0)
            c.close()
    finally:
        rm(d)
    out.update(
        {
            "reopen_after_kill_ns": median(opens),
            "reopen_rounds_ns": opens,
            "entries_after": kept,
            "clean_reopen_ns": median(clean),
        }
    )
    res.data["recovery"] = out
    say(
        f"  reopen after SIGKILL (1 GiB, 1M entries): {fmt_ns(median(opens))}; clean reopen "
        f"{fmt_ns(median(clean))}"
    )
    res.checks.append(
        Check("reopen after SIGKILL, 1 GiB / 1M entries", median(opens) / 1e6, "ms", None, "lower")
    )
    res.checks.append(
        Check("entries kept after SIGKILL (min over rounds)", min(kept), "", None, "higher")
    )


def run(settings: Settings, aiovmc: Any) -> FamilyResult:
    res = FamilyResult(NAME, TITLE)
    if aiovmc is None:
        res.note("aiovmc not available: nothing to measure")
        return res
    steps = [
        ("reserve/publish", _reserve, has_reserve(aiovmc)),
        ("persist", _persist, hasattr(aiovmc.Cache, "persist")),
        ("recovery", _recovery, True),
    ]
    for title, fn, ok in steps:
        say(f"  -- {title}")
        if not ok:
            res.note(f"{title}: not available")
            continue
        try:
            fn(res, settings, aiovmc)
        except (NotImplementedError, AttributeError) as exc:
            res.note(f"{title}: not available ({type(exc).__name__}: {exc})")
    print_ratios(res.ratios)
    print_checks(res.checks)
    return res
