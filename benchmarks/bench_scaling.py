
"""Throughput of 1 and 2 processes sharing one file: gets, puts and a 10 % put mix.

A store is filled with 100k keys of 100 B values. Groups of 1 and 2 `spawn`ed
worker processes, each opening the store itself and walking its own random order,
then get, put (replace) or mix (every 10th op a put) for a fixed duration per round;
a round starts when the group's workers and the parent meet at a barrier. A
round's figure is the sum of its workers' ops/s; the rounds of every group are
interleaved. py-lmdb runs the same: a read transaction per 1,000 gets, a write
transaction per put. Scaling = median(2 processes) / median(1 process). With 2
CPUs, the 2-process figure leaves no core to the OS or the parent: a lower bound.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from typing import Any

import lmdb
from harness import (
    Family,
    GiB,
    MiB,
    Plot,
    Settings,
    Table,
    WorkerGroup,
    fmt,
    key_order,
    make_key,
    make_value,
    say,
    scratch,
)

import aiovmc

TITLE = "Processes sharing one file"
TABLES = [
    Table("throughput", "Ops/s summed over the processes (100 B values, 100k keys, random)",
          Plot("bars", "bench_scaling.png", "Throughput on one shared file (median)",
               xlabel="M ops/s")),
    Table("2 processes / 1", "Scaling: the 2-process figure over the 1-process one"),
]  # fmt: skip
MODES = ("get", "put", "10 % puts")
CHUNK = 1_000
VALUE = 100


def _worker(
    index: int, rounds: int, barrier: Any, queue: Any, lib: str, path: str, mode: str,
    n_keys: int, duration: float,
) -> None:  # fmt: skip
    """A child process: per round, ops of ``mode`` for ``duration`` seconds."""
    keys = [make_key(i) for i in key_order(n_keys, seed=1000 + index)]
    chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]
    value = make_value(VALUE, seed=index)
    every = {"get": 0, "put": 1, "10 % puts": 10}[mode]
    if lib == "aiovmc":
        cache = aiovmc.Cache(path)
        get, put = cache.get, cache.put

        def chunk_loop(chunk: list[bytes]) -> None:
            for i, k in enumerate(chunk):
                if every and i % every == 0:
                    put(k, value)
                else:
                    get(k)

        close = cache.close
    else:
        env = lmdb.open(path, map_size=2 * GiB, sync=False, writemap=True)
        begin = env.begin

        def chunk_loop(chunk: list[bytes]) -> None:
            txn = begin()
            for i, k in enumerate(chunk):
                if every and i % every == 0:
                    with begin(write=True) as w:
                        w.put(k, value)
                else:
                    txn.get(k)
            txn.abort()

        close = env.close
    try:
        for _ in range(rounds):
            barrier.wait()
            gc.collect()
            gc.disable()
            ops, i = 0, 0
            t0 = time.perf_counter_ns()
            end = t0 + int(duration * 1e9)
            while (now := time.perf_counter_ns()) < end:
                chunk_loop(chunks[i])
                ops += len(chunks[i])
                i = (i + 1) % len(chunks)
            gc.enable()
            queue.put(ops * 1e9 / (now - t0))
    finally:
        close()


def run(settings: Settings, fam: Family) -> None:
    n_keys = settings.pick(100_000, 100_000, 2_000)
    rounds = settings.warmup + settings.rounds
    value = make_value(VALUE)
    with scratch("scaling") as d:
        paths = {"aiovmc": os.path.join(d, "aiovmc"), "lmdb": os.path.join(d, "lmdb")}
        cache = aiovmc.Cache(paths["aiovmc"], size=256 * MiB)
        env = lmdb.open(paths["lmdb"], map_size=2 * GiB, sync=False, writemap=True)
        with env.begin(write=True) as txn:
            for i in range(n_keys):
                cache.put(make_key(i), value)
                txn.put(make_key(i), value)
        cache.close()
        env.close()
        groups = [(lib, mode, n) for lib in paths for mode in MODES for n in (1, 2)]
        per: dict[tuple[str, str, int], list[float]] = {g: [] for g in groups}
        say(f"  {len(groups)} process groups, {rounds} rounds of {settings.duration:g} s")
        with contextlib.ExitStack() as stack:
            running = {
                g: stack.enter_context(
                    WorkerGroup(g[2], rounds, _worker, g[0], paths[g[0]], g[1], n_keys,
                                settings.duration))
                for g in groups
            }  # fmt: skip
            for r in range(rounds):
                for g, group in running.items():
                    total = sum(group.round())
                    if r >= settings.warmup:
                        per[g].append(total)
    for (lib, mode, n), xs in per.items():
        fam.add("throughput", lib, f"{mode}, {n} process{'es' if n > 1 else ''}", xs, "ops/s")
    for lib in paths:
        for mode in MODES:
            one = fam.value("throughput", lib, f"{mode}, 1 process")
            two = fam.value("throughput", lib, f"{mode}, 2 processes")
            fam.add("2 processes / 1", lib, mode, two / one, "x")
            say(f"  {lib} {mode}: {fmt(one, 'ops/s')} -> {fmt(two, 'ops/s')} ({two / one:.2f}×)")
