"""Throughput of 1 and 2 processes sharing one file: gets, puts and a 10 % put mix.

A store is filled with 100k keys of 100 B values. Groups of 1 and 2 `spawn`ed
worker processes, each opening the store itself and walking its own random order,
then get, put (replace) or mix (every 10th op a put) for a fixed duration per round;
a round starts when the group's workers and the parent meet at a barrier. A
round's figure is the sum of its workers' ops/s; the rounds of every group are
interleaved. py-lmdb runs the same: a read transaction per 1,000 gets, a write
transaction per put. Scaling = median(2 processes) / median(1 process). With 2
CPUs, the 2-process figure leaves no core to the OS or the parent: a lower bound.

What the machine allows readers is measured beside them, in the same rounds, by
three references that share nothing a cache could contend on:
- "1k-key dict per process": each worker gets the 1,000 keys of its own small
  dict over and over: no cache miss, the CPU alone;
- "100k-key dict per process": each worker gets the caches' keys from its own
  dict of the 100k keys' values (a process's private cache, less the copy);
- "bare mapping reads": each worker reads a file on tmpfs that every worker maps,
  through the least any shared-memory cache does -- two dependent loads at random
  (an 8-byte index word among 1M, then the 100 B value it names, copied into a
  new bytes object) -- with no lock, no check, no write.
Their scaling is this machine's ceiling for random reads from Python: a cache
reading at that ratio loses nothing to its own code.

What the scaling figure cannot tell apart -- the code contending and the machine
giving less than two cores -- is measured beside it: each worker's thread CPU
time per op (cache-line transfers and lock waits spent spinning count there; a
CPU taken away by the hypervisor or lent to another process does not), and the
share of the CPUs' time the hypervisor stole during each group's rounds
(/proc/stat). CPU per op at 2 processes over 1 process near 1.0 means the
processes did not slow each other down.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import random
import struct
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
    Table("throughput", "Ops/s summed over the processes (100 B values, 100k keys, random)"),
    Table("2 processes / 1", "Scaling: the 2-process figure over the 1-process one",
          Plot("bars", "bench_scaling.png",
               "2 processes over 1 (medians of rounds; dashed: two cores' worth)",
               hline=2.0)),
    Table("CPU per op", "A worker thread's CPU time per op (mean over the group's workers)"),
    Table("CPU per op, 2 processes / 1",
          "Contention: CPU per op with 2 processes over 1 process (1.00: none)"),
    Table("steal", "CPU time the hypervisor took from the VM during the group's rounds, "
                   "% of both CPUs"),
]  # fmt: skip
MODES = ("get", "put", "10 % puts")
CHUNK = 1_000
VALUE = 100
BARE = "bare mapping reads"
PRIVATE = "100k-key dict per process"
SMALL = "1k-key dict per process"
BARE_SLOTS = 1 << 20  # index words of the bare mapping (8 MiB), its values after them
BARE_STRIDE = 192  # the bytes an aiovmc entry of a 16 B key and a 100 B value takes


def _bare_slots(n_keys: int) -> list[int]:
    """The index word of each key of the bare mapping, at random among BARE_SLOTS."""
    return random.Random(0).sample(range(BARE_SLOTS), n_keys)


def _bare_fill(path: str, n_keys: int, value: bytes) -> None:
    """The bare mapping: key i's index word holds the offset of its value, the i-th after
    the index."""
    with open(path, "w+b") as f:
        f.truncate(BARE_SLOTS * 8 + n_keys * BARE_STRIDE)
        with mmap.mmap(f.fileno(), 0) as mm:
            for i, slot in enumerate(_bare_slots(n_keys)):
                at = BARE_SLOTS * 8 + i * BARE_STRIDE
                struct.pack_into("<Q", mm, slot * 8, at)
                mm[at : at + len(value)] = value


def _worker(
    index: int, rounds: int, barrier: Any, queue: Any, lib: str, path: str, mode: str,
    n_keys: int, duration: float,
) -> None:  # fmt: skip
    """A child process: per round, ops of ``mode`` for ``duration`` seconds."""
    size = 1_000 if lib == SMALL else n_keys  # the keys this worker walks
    order = key_order(size, seed=1000 + index)
    if lib == BARE:
        slots = _bare_slots(n_keys)
        items: list[Any] = [slots[i] * 8 for i in order]  # the index words' offsets
    else:
        items = [make_key(i) for i in order]
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
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
    elif lib == BARE:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        word = struct.Struct("<Q").unpack_from

        def chunk_loop(chunk: list[int]) -> None:
            for at in chunk:
                (v,) = word(mm, at)
                mm[v : v + VALUE]

        close = mm.close
    elif lib in (PRIVATE, SMALL):
        private = {make_key(i): i.to_bytes(4, "little") + value[4:] for i in range(size)}
        get = private.__getitem__

        def chunk_loop(chunk: list[bytes]) -> None:
            for k in chunk:
                get(k)

        close = private.clear
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
            cpu0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            end = t0 + int(duration * 1e9)
            while (now := time.perf_counter_ns()) < end:
                chunk_loop(chunks[i])
                ops += len(chunks[i])
                i = (i + 1) % len(chunks)
            cpu = time.thread_time_ns() - cpu0
            gc.enable()
            queue.put((ops * 1e9 / (now - t0), cpu / ops))
    finally:
        close()


def _stolen() -> tuple[int, int]:
    """(steal, all) jiffies of every CPU since boot, from /proc/stat's cpu line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[7], sum(fields[:8])  # user nice system idle iowait irq softirq steal


def run(settings: Settings, fam: Family) -> None:
    n_keys = settings.pick(100_000, 100_000, 2_000)
    rounds = settings.warmup + settings.rounds
    value = make_value(VALUE)
    with scratch("scaling") as d:
        paths = {lib: os.path.join(d, lib) for lib in ("aiovmc", SMALL, PRIVATE, BARE, "lmdb")}
        modes = {lib: ("get",) for lib in paths} | {"aiovmc": MODES, "lmdb": MODES}
        cache = aiovmc.Cache(paths["aiovmc"], size=256 * MiB)
        env = lmdb.open(paths["lmdb"], map_size=2 * GiB, sync=False, writemap=True)
        with env.begin(write=True) as txn:
            for i in range(n_keys):
                cache.put(make_key(i), value)
                txn.put(make_key(i), value)
        cache.close()
        env.close()
        _bare_fill(paths[BARE], n_keys, value)
        groups = [(lib, mode, n) for lib in paths for mode in modes[lib] for n in (1, 2)]
        per: dict[tuple[str, str, int], list[float]] = {g: [] for g in groups}
        cpu: dict[tuple[str, str, int], list[float]] = {g: [] for g in groups}
        steal = {g: [0, 0] for g in groups}
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
                    stolen0, all0 = _stolen()
                    reports = group.round()
                    stolen1, all1 = _stolen()
                    if r >= settings.warmup:
                        per[g].append(sum(ops for ops, _ in reports))
                        cpu[g].append(sum(c for _, c in reports) / len(reports))
                        steal[g][0] += stolen1 - stolen0
                        steal[g][1] += all1 - all0
    for (lib, mode, n), xs in per.items():
        col = f"{mode}, {n} process{'es' if n > 1 else ''}"
        fam.add("throughput", lib, col, xs, "ops/s")
        fam.add("CPU per op", lib, col, cpu[(lib, mode, n)], "ns")
        stolen, total = steal[(lib, mode, n)]
        fam.add("steal", lib, col, 100 * stolen / max(total, 1), "%")
    for lib in paths:
        for mode in modes[lib]:
            one = fam.value("throughput", lib, f"{mode}, 1 process")
            two = fam.value("throughput", lib, f"{mode}, 2 processes")
            fam.add("2 processes / 1", lib, mode, two / one, "x")
            cpu1 = fam.value("CPU per op", lib, f"{mode}, 1 process")
            cpu2 = fam.value("CPU per op", lib, f"{mode}, 2 processes")
            fam.add("CPU per op, 2 processes / 1", lib, mode, cpu2 / cpu1, "x")
            say(f"  {lib} {mode}: {fmt(one, 'ops/s')} -> {fmt(two, 'ops/s')} ({two / one:.2f}×); "
                f"CPU per op {fmt(cpu1, 'ns')} -> {fmt(cpu2, 'ns')} ({cpu2 / cpu1:.2f}×), "
                f"steal {fam.value('steal', lib, f'{mode}, 2 processes'):.1f} %")
