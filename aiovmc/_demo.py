"""The `python -m aiovmc demo` program: worker processes sharing one cache file.

It lives in its own module so that spawned workers can import `_worker`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import random
import sys
import time

from ._cache import Cache


def _value_of(key: bytes) -> bytes:
    return hashlib.sha256(key).digest() * 32  # 1 KiB, derived from the key: checkable


def _expensive(key: bytes) -> bytes:
    """Stand-in for a slow loader (a database query, an HTTP call): 2 ms."""
    time.sleep(0.002)
    return _value_of(key)


Row = tuple[int, int, int]  # pid, gets, loader calls


def _worker(
    path: str, seconds: float, keys: int, seed: int, results: multiprocessing.Queue[Row]
) -> None:
    rng = random.Random(seed)
    loads = 0
    with Cache(path) as cache:  # attach to the file the parent created
        deadline = time.monotonic() + seconds
        gets = 0
        while time.monotonic() < deadline:
            # Popular keys are asked more often (Zipf-like), as in real traffic.
            key = b"item:%d" % int(keys * rng.random() ** 3)
            value = cache.get(key)
            gets += 1
            if value is None:
                value = _expensive(key)
                loads += 1
                cache.put(key, value)
            if value != _value_of(key):
                raise AssertionError(f"worker {seed} read a wrong value for {key!r}")
    results.put((os.getpid(), gets, loads))


def demo(workers: int, seconds: float, keys: int) -> int:
    context = multiprocessing.get_context("spawn")
    with Cache(size="64MiB") as cache:  # a private file under /dev/shm
        print(f"cache file {cache.path} ({cache.capacity >> 20} MiB usable), "
              f"{workers} worker processes for {seconds:g} s over {keys} keys\n")
        results: multiprocessing.Queue[Row] = context.Queue()
        procs = [
            context.Process(target=_worker, args=(cache.path, seconds, keys, i, results))
            for i in range(workers)
        ]
        started = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=seconds + 60)
        elapsed = time.monotonic() - started
        rows = []
        while True:
            try:
                rows.append(results.get(timeout=0.5))
            except queue.Empty:
                break
        failed = [p for p in procs if p.exitcode != 0]
        print(f"{'worker pid':>10} {'gets':>9} {'loader calls':>13}")
        for pid, gets, loads in sorted(rows):
            print(f"{pid:>10} {gets:>9} {loads:>13}")
        total_gets = sum(r[1] for r in rows)
        total_loads = sum(r[2] for r in rows)
        stats = cache.statistics()
        print(f"\nshared statistics of the file, seen from the parent process:\n  {stats}")
        print(
            f"\n{total_gets} gets in {elapsed:.1f} s ({total_gets / elapsed:,.0f}/s); "
            f"hit ratio {stats.hits / max(stats.gets, 1):.1%}; {total_loads} loader calls for "
            f"{len(cache)} distinct keys cached: each process reused what the others loaded."
        )
        if failed:
            print(f"{len(failed)} worker(s) failed", file=sys.stderr)
            return 1
    return 0

