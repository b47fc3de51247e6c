"""The `python -m aiovmc demo` program: worker processes sharing one cache file.

Each worker opens the file with `AsyncCache(path, on_miss=load)` and runs many
asyncio tasks. Step 1 asks one cold key from every task of every worker at
once; step 2 is traffic over many keys, popular ones more often. The parent
then prints what each worker saw and the file's shared statistics, and checks
that the figures agree with each other (exit status 1 if they do not).

It lives in its own module so that spawned workers can import `_worker`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import anyio

from ._async_cache import AsyncCache
from ._cache import Cache, CacheStatistics, cache_directory

COLD_KEY = b"report:today"
COLD_LOAD_SECONDS = 0.2
LOAD_SECONDS = 0.002


def value_of(key: bytes) -> bytes:
    """What the loader returns for `key`: 1 KiB derived from the key, so any reader can check it."""
    return hashlib.sha256(key).digest() * 32


@dataclass
class WorkerReport:
    """What one worker counted itself, sent back to the parent."""

    pid: int
    cold_gets: int = 0
    cold_loads: int = 0
    gets: int = 0
    loads: int = 0


async def _work(path: str, tasks: int, seconds: float, keys: int, seed: int,
                barrier: Any) -> WorkerReport:
    report = WorkerReport(os.getpid())

    async def load(key: bytes) -> bytes:
        """The slow thing being cached (a database query, an HTTP call)."""
        if key == COLD_KEY:
            report.cold_loads += 1
            await anyio.sleep(COLD_LOAD_SECONDS)
        else:
            report.loads += 1
            await anyio.sleep(LOAD_SECONDS)
        return value_of(key)

    def check(key: bytes, value: bytes | None) -> None:
        if value != value_of(key):
            raise AssertionError(f"worker {report.pid} read a wrong value for {key!r}")

    async with AsyncCache(path, on_miss=load) as cache:
        # Step 1: every task of every worker asks for the same cold key at once.
        await anyio.to_thread.run_sync(barrier.wait)

        async def cold_get() -> None:
            check(COLD_KEY, await cache.get(COLD_KEY))
            report.cold_gets += 1

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(cold_get)
        await anyio.to_thread.run_sync(barrier.wait)  # the parent reads the statistics now
        await anyio.to_thread.run_sync(barrier.wait)

        # Step 2: traffic; popular keys are asked more often (Zipf-like), as on a real site.
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                key = b"page:%d" % int(keys * rng.random() ** 3)
                check(key, await cache.get(key))
                report.gets += 1

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(client)
    return report


def _worker(path: str, tasks: int, seconds: float, keys: int, seed: int, barrier: Any,
            results: Any) -> None:
    results.put(anyio.run(_work, path, tasks, seconds, keys, seed, barrier))


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n:,} times"


class _Checks:
    """The demo's claims, each checked against the figures it prints."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def expect(self, ok: bool, claim: str) -> None:
        if not ok:
            self.failed.append(claim)


def demo(workers: int, tasks: int, seconds: float, keys: int, keep: bool) -> int:
    path = os.path.join(cache_directory(), f"aiovmc-demo-{os.getpid()}.cache")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers + 1)
    results = context.Queue()
    checks = _Checks()
    with Cache(path, size="64MiB", reset=True) as cache:
        print(f"aiovmc demo: {workers} worker processes share one cache file, {path} "
              f"({cache.capacity / 2**20:.0f} MiB usable).\nEach opens it with "
              f"AsyncCache(path, on_miss=load) and runs {tasks} asyncio tasks.\n")
        procs = [
            context.Process(target=_worker,
                            args=(path, tasks, seconds, keys, seed, barrier, results))
            for seed in range(workers)
        ]
        for p in procs:
            p.start()
        try:
            barrier.wait(timeout=60)  # every worker has opened the file
            barrier.wait(timeout=60)  # step 1 is over in every worker
            after_cold = cache.statistics()
            barrier.wait(timeout=60)
            reports: list[WorkerReport] = [results.get(timeout=seconds + 60) for _ in procs]
        except BaseException:
            for p in procs:
                p.kill()
            raise
        finally:
            for p in procs:
                p.join(timeout=60)
        stats = cache.statistics()
        entries = len(cache)
    if not keep:
        os.unlink(path)

    reports.sort(key=lambda r: r.pid)
    cold_gets = sum(r.cold_gets for r in reports)
    cold_loads = sum(r.cold_loads for r in reports)
    print(f"Step 1: one cold key, {COLD_KEY.decode()!r}, asked at once by every task: "
          f"{cold_gets} gets.")
    scope = ("once on the whole host" if cold_loads == 1
             else f"{_times(cold_loads)} (once per process)" if cold_loads == workers
             else _times(cold_loads))
    print(f"  The loader ({COLD_LOAD_SECONDS * 1000:.0f} ms, standing in for a database query) "
          f"ran {scope}; every task got the same value.")
    print(f"  The file counted {after_cold.gets} gets: {after_cold.misses} "
          f"{'miss' if after_cold.misses == 1 else 'misses'} and {after_cold.hits} hits, "
          f"{after_cold.coalesced_gets} of which were answered by a load another task or "
          "process ran.\n")
    checks.expect(cold_gets == workers * tasks, "every task of step 1 got its value")
    checks.expect(after_cold.gets == cold_gets, "the file counted every get of step 1")
    checks.expect(after_cold.loader_calls == cold_loads,
                  "the file counted every loader call of step 1")
    checks.expect(after_cold.hits + after_cold.misses == after_cold.gets,
                  "hits + misses = gets after step 1")

    gets = sum(r.gets for r in reports)
    loads = sum(r.loads for r in reports)
    print(f"Step 2: {seconds:g} s of traffic over {keys:,} keys, popular keys asked more often.")
    print(f"  {'worker pid':>10} {'gets':>10} {'loader calls':>13}")
    for r in reports:
        print(f"  {r.pid:>10} {r.gets:>10,} {r.loads:>13,}")
    print(f"  {'all':>10} {gets:>10,} {loads:>13,}   ({gets / seconds:,.0f} gets/s)\n")
    checks.expect(stats.gets == cold_gets + gets, "the file counted every get")
    checks.expect(stats.loader_calls == cold_loads + loads, "the file counted every loader call")
    checks.expect(stats.hits + stats.misses == stats.gets, "hits + misses = gets")
    checks.expect(stats.puts == stats.loader_calls, "every loaded value was stored once")
    checks.expect(entries == stats.entries == stats.puts - stats.evictions,
                  "every stored value is still there")
    _print_statistics(stats, path)

    if checks.failed:
        print("\nThese figures do not agree: " + "; ".join(checks.failed), file=sys.stderr)
        return 1
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        print(f"{len(failed)} worker(s) failed (exit codes {failed})", file=sys.stderr)
        return 1
    once = stats.loader_calls == entries
    print(f"\n{entries:,} distinct keys are cached and the loader ran "
          f"{_times(stats.loader_calls)}: " + ("each key was loaded once on the whole host." if once
             else "some keys were loaded by several processes at once."))
    print(f"The file is kept: python -m aiovmc stats {path}" if keep
          else "The demo's file is removed (--keep keeps it for `python -m aiovmc stats`).")
    return 0


def _print_statistics(stats: CacheStatistics, path: str) -> None:
    ratio = stats.hits / stats.gets if stats.gets else 0.0
    print(f"Shared statistics of {os.path.basename(path)} (the same for every process; "
          "read here by the parent, which made no get itself):")
    print(f"  gets {stats.gets:,} = hits {stats.hits:,} + misses {stats.misses:,}; "
          f"hit ratio {ratio:.1%} (the share of gets that did not pay for a load)")
    print(f"  loader calls {stats.loader_calls:,} (the misses that ran the loader); "
          f"coalesced gets {stats.coalesced_gets:,} (hits answered by a load "
          "another task or process ran)")
    print(f"  puts {stats.puts:,}, entries {stats.entries:,}, evictions {stats.evictions:,}, "
          f"{stats.used_bytes / 2**20:.1f} of {stats.capacity / 2**20:.1f} MiB used")
