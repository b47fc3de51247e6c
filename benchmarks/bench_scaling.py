# ruff: noqa: RUF003  (µ, ×, −, – are meant: they are printed)
"""Family ``scaling``: read throughput of 1 and 2 processes sharing one file.

A store is filled with 100k keys of 100 B values. Then groups of worker processes
(``spawn``ed, each opening the store itself) read random keys (each worker its own
pre-generated order) for a fixed duration per round; a round of a group starts when
all its workers and the parent meet at a barrier, and each worker reports ops/s. The
figure of a round is the sum over the group's workers; the family reports the median
over rounds, for 1 and 2 processes, for aiovmc and for py-lmdb (gets inside a read
transaction renewed every chunk of 1,000 gets). Rounds of the four groups are
interleaved. Scaling = median(2 processes) / median(1 process); the target is ≥ 1.8
on a 2-core machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

from _common import (
    Check,
    FamilyResult,
    GiB,
    MiB,
    Ratio,
    Settings,
    key_order,
    make_key,
    make_value,
    median,
    peer,
    print_checks,
    print_ratios,
    rm,
    say,
    scratch,
)

NAME = "scaling"
TITLE = "Read throughput, 1 and 2 processes on one file (100 B values, 100k keys)"
N_KEYS = 100_000
VALUE = 100
CHUNK = 1_000


def _worker(
    lib: str, path: str, worker: int, rounds: int, duration: float, barrier: Any, queue: Any
) -> None:
    """Child process: open the store, then per round read for ``duration`` seconds."""
    import gc

    keys = [make_key(i) for i in key_order(N_KEYS, seed=1000 + worker)]
    chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]
    if lib == "aiovmc":
        import aiovmc

        cache = aiovmc.Cache(path)
        get = cache.get

        def chunk_loop(chunk: list[bytes]) -> None:
            for k in chunk:
                get(k)

        close = cache.close
    else:
        import lmdb

        env = lmdb.open(path, map_size=2 * GiB, readonly=True, lock=True)

        def chunk_loop(chunk: list[bytes]) -> None:
            with env.begin() as txn:
                g = txn.get
                for k in chunk:
                    g(k)

        close = env.close
    try:
        for r in range(rounds):
            barrier.wait()
            gc.collect()
            gc.disable()
            ops = 0
            i = 0
            t0 = time.perf_counter_ns()
            end = t0 + int(duration * 1e9)
            while True:
                chunk_loop(chunks[i])
                ops += CHUNK
                i = (i + 1) % len(chunks)
                now = time.perf_counter_ns()
                if now >= end:
                    break
            gc.enable()
            queue.put((r, worker, ops * 1e9 / (now - t0)))
    finally:
        close()


def _fill(lib: str, aiovmc: Any, lmdb: Any) -> tuple[str, Any]:
    value = make_value(VALUE)
    keys = [make_key(i) for i in range(N_KEYS)]
    d = scratch(f"scale-{lib}")
    if lib == "aiovmc":
        path = os.path.join(d, "cache.vmc")
        c = aiovmc.Cache(path, size=256 * MiB)
        for k in keys:
            c.put(k, value)
        return path, lambda: (c.close(), rm(d))
    env = lmdb.open(d, map_size=2 * GiB, sync=False, writemap=True)
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k, value)
    env.sync(True)
    env.close()
    return d, lambda: rm(d)


def run(settings: Settings, aiovmc: Any) -> FamilyResult:
    res = FamilyResult(NAME, TITLE)
    lmdb = peer("lmdb")
    libs = ([] if aiovmc is None else ["aiovmc"]) + ([] if lmdb is None else ["lmdb"])
    if aiovmc is None:
        res.note("aiovmc not available: lmdb only")
    ctx = mp.get_context("spawn")
    rounds = settings.warmup + settings.rounds
    duration = settings.duration / 2 if settings.quick else settings.duration
    stores: dict[str, tuple[str, Any]] = {}
    groups: list[tuple[str, int, Any, Any, list[Any]]] = []
    try:
        for lib in libs:
            stores[lib] = _fill(lib, aiovmc, lmdb)
        for lib in libs:
            for nproc in (1, 2):
                barrier = ctx.Barrier(nproc + 1)
                queue = ctx.Queue()
                procs = [
                    ctx.Process(
                        target=_worker,
                        daemon=True,
                        args=(lib, stores[lib][0], w, rounds, duration, barrier, queue),
                    )
                    for w in range(nproc)
                ]
                for p in procs:
                    p.start()
                groups.append((lib, nproc, barrier, queue, procs))
        say(f"  {len(groups)} worker groups, {rounds} rounds of {duration:g} s each")
        per: dict[str, list[float]] = {f"{lib} x{n}": [] for lib, n, *_ in groups}
        for r in range(rounds):
            for lib, nproc, barrier, queue, _procs in groups:
                barrier.wait(timeout=120)
                total = 0.0
                for _ in range(nproc):
                    rr, _w, ops = queue.get(timeout=120)
                    assert rr == r
                    total += ops
                if r >= settings.warmup:
                    per[f"{lib} x{nproc}"].append(total)
        for _lib, _n, _b, _q, procs in groups:
            for p in procs:
                p.join(30)
    finally:
        for *_rest, procs in groups:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for _path, close in stores.values():
            close()

    for name, xs in per.items():
        res.data[name] = {"median_ops_s": median(xs), "rounds_ops_s": xs}
        say(f"  {name}: {median(xs) / 1e6:.3f} M ops/s")
    for lib in libs:
        one = res.data[f"{lib} x1"]["median_ops_s"]
        two = res.data[f"{lib} x2"]["median_ops_s"]
        res.data[f"{lib} scaling"] = two / one
        res.checks.append(
            Check(
                f"{lib}: 2 processes / 1 process",
                two / one,
                "x",
                1.8 if lib == "aiovmc" else None,
                "higher",
            )
        )
    if "aiovmc" in libs and "lmdb" in libs:
        for n in (1, 2):
            res.ratios.append(
                Ratio(
                    f"read throughput, {n} process{'es' if n > 1 else ''}",
                    res.data[f"aiovmc x{n}"]["median_ops_s"],
                    "lmdb",
                    res.data[f"lmdb x{n}"]["median_ops_s"],
                    "ops/s",
                    "higher",
                )
            )
    print_ratios(res.ratios)
    print_checks(res.checks)
    return res
