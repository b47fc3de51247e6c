"""Issue 11 fast paths, measured beside lmdb (temporary; to be folded into the families).

    python benchmarks/bench_fastpath_tmp.py [--quick] [--only 100,4096,65536,1048576]

For each value size: a file of keys filled in aiovmc and lmdb (both in /dev/shm),
then interleaved rounds (the harness of bench_sync) of

* ``get``: ``Cache.get`` / lmdb ``txn.get`` (one read transaction per round, as
  bench_sync), random order;
* ``get_into``: ``Cache.get_into`` a preallocated buffer of the value's size;
* ``put``: replace, ``Cache.put`` / one lmdb write transaction per put;
* ``get_many``: ``Cache.get_many`` of 100 keys a call (ns per key), 100 B only;
* ``get hot``: 1,000 hot keys, 100 B only.

``--scaling``: put throughput (100 B values replacing 100k keys) of 1 and 2 spawned
processes on one file, rounds of ``duration`` seconds started at a barrier, the
groups interleaved; scaling = median(2 processes) / median(1 process).

Prints medians (ns/op) and the ratio aiovmc / lmdb of the same run: the machine may
be loaded by other work, so compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import lmdb
from harness import (
    Case,
    GiB,
    MiB,
    Settings,
    fmt,
    interleaved,
    key_order,
    loop_over,
    make_key,
    make_value,
    median,
    scratch,
)

import aiovmc

KEYS = {100: 100_000, 4096: 50_000, 65536: 4_000, 1048576: 256}
BATCH = 100
HOT = 1_000

Loop = Callable[[], Any]


def _batched(op: Callable[[list[bytes]], Any]) -> Callable[[list[bytes]], Loop]:
    def make(keys: list[bytes]) -> Loop:
        batches = [keys[i : i + BATCH] for i in range(0, len(keys), BATCH)]

        def loop() -> None:
            for b in batches:
                op(b)

        return loop

    return make


def _lmdb_get(env: Any) -> Callable[[list[bytes]], Loop]:
    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            with env.begin() as txn:
                get = txn.get
                for k in keys:
                    get(k)

        return loop

    return make


def _lmdb_put(env: Any, value: bytes) -> Callable[[list[bytes]], Loop]:
    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            begin = env.begin
            for k in keys:
                txn = begin(write=True)
                txn.put(k, value)
                txn.commit()

        return loop

    return make


def run(size: int, settings: Settings) -> None:
    n = KEYS[size]
    keys = [make_key(i) for i in range(n)]
    order = [keys[i] for i in key_order(n)]
    value = make_value(size)
    with scratch("fastpath") as d:
        measure(size, settings, d, keys, order, value)


def measure(
    size: int, settings: Settings, d: str, keys: list[bytes], order: list[bytes], value: bytes
) -> None:
    n = len(keys)
    c = aiovmc.Cache(os.path.join(d, "cache.vmc"), size=max(256 * MiB, 3 * n * size))
    env = lmdb.open(os.path.join(d, "lmdb"), map_size=2 * GiB, sync=False, writemap=True)
    try:
        for k in keys:
            c.put(k, value)
        with env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, value)
        buf = bytearray(size)
        get_into = c.get_into
        plan: list[tuple[str, list[Case], list[bytes], int]] = [
            ("get", [Case("aiovmc", loop_over(c.get)), Case("lmdb", _lmdb_get(env))], order, 1),
            (
                "get_into",
                [
                    Case("aiovmc", loop_over(lambda k: get_into(k, buf))),
                    Case("lmdb", _lmdb_get(env)),
                ],
                order,
                1,
            ),
            (
                "put",
                [
                    Case("aiovmc", loop_over(lambda k: c.put(k, value))),
                    Case("lmdb", _lmdb_put(env, value)),
                ],
                order,
                1,
            ),
        ]
        if size == 100:
            hot_keys = order[:HOT]
            hot = [hot_keys[i % HOT] for i in key_order(n, seed=7)]
            plan.append(
                (
                    "get hot",
                    [Case("aiovmc", loop_over(c.get)), Case("lmdb", _lmdb_get(env))],
                    hot,
                    1,
                )
            )
            plan.append(
                (
                    f"get_many {BATCH}",
                    [Case("aiovmc", _batched(c.get_many)), Case("lmdb", _lmdb_get(env))],
                    order,
                    1,
                )
            )
        for op, cases, seq, _ in plan:
            rounds = interleaved(cases, seq, settings)
            a, b = median(rounds["aiovmc"]), median(rounds["lmdb"])
            print(
                f"{size:>8} B  {op:<13} aiovmc {fmt(a, 'ns'):>10}  lmdb {fmt(b, 'ns'):>10}  "
                f"ratio {a / b:.2f}",
                flush=True,
            )
    finally:
        c.close()
        env.close()


def _putter(path: str, worker: int, rounds: int, duration: float, barrier: Any, queue: Any) -> None:
    import gc

    keys = [make_key(i) for i in key_order(100_000, seed=2000 + worker)]
    value = make_value(100)
    cache = aiovmc.Cache(path)
    put = cache.put
    try:
        for r in range(rounds):
            barrier.wait()
            gc.collect()
            gc.disable()
            ops = 0
            t0 = time.perf_counter_ns()
            end = t0 + int(duration * 1e9)
            while True:
                for k in keys[(ops % 100_000) : (ops % 100_000) + 1000]:
                    put(k, value)
                ops += 1000
                now = time.perf_counter_ns()
                if now >= end:
                    break
            gc.enable()
            queue.put((r, worker, ops * 1e9 / (now - t0)))
    finally:
        cache.close()


def scaling(settings: Settings) -> None:
    with scratch("fastpath-scale") as d:
        scale(settings, os.path.join(d, "cache.vmc"))


def scale(settings: Settings, path: str) -> None:
    value = make_value(100)
    with aiovmc.Cache(path, size=256 * MiB) as c:
        for i in range(100_000):
            c.put(make_key(i), value)
    ctx = mp.get_context("spawn")
    rounds = settings.rounds + settings.warmup
    groups = {}
    for n in (1, 2):
        barrier = ctx.Barrier(n + 1)
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_putter, args=(path, w, rounds, settings.duration, barrier, queue))
            for w in range(n)
        ]
        for p in procs:
            p.start()
        groups[n] = (barrier, queue, procs, [])
    for r in range(rounds):
        for n, (barrier, queue, _procs, results) in groups.items():
            barrier.wait()
            total = sum(queue.get()[2] for _ in range(n))
            if r >= settings.warmup:
                results.append(total)
    for n, (_b, _q, procs, results) in groups.items():
        for p in procs:
            p.join()
        print(
            f"put 100 B, {n} process(es): {median(results) / 1e6:.3f} M ops/s "
            f"(rounds {', '.join(f'{x / 1e6:.3f}' for x in results)})"
        )
    one, two = median(groups[1][3]), median(groups[2][3])
    print(f"put scaling 2 / 1 processes: {two / one:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(str(s) for s in KEYS))
    parser.add_argument("--scaling", action="store_true")
    args = parser.parse_args()
    settings = Settings.make("quick" if args.quick else "full")
    if args.scaling:
        scaling(settings)
        return
    print(f"fast path: {aiovmc._native.FAST_PATH}")
    for size in (int(s) for s in args.only.split(",")):
        run(size, settings)


if __name__ == "__main__":
    main()
