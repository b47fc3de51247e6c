# ruff: noqa: RUF001, RUF002, RUF003  (µ, ×, −, – are meant: they are printed)
"""Family ``flight``: host-wide single-flight (DESIGN.md §9 and §8).

Worker processes are ``spawn``ed once per library and kept across rounds; a round
starts when every worker and the parent meet at a barrier, and uses a key no round
used before (a cold key). Four figures:

* **Loader calls for one cold key, 4 processes × 100 tasks**, the loader taking
  50 ms (a backend call): aiovmc with ``coalesce="host"`` (the default) and with
  ``coalesce="process"``, cashews (``@cache(..., lock=True)``, its stampede lock
  in redis) and aiocache (``@cached`` on its redis backend), both on a local
  ``redis-server`` on 127.0.0.1 started for the run. Median and maximum over
  rounds; target exactly 1.
* **Wake latency**: per wave, one process's loader returns (its time is taken just
  before it returns: the value is stored and the wave ended a few µs later) and the
  three other processes, each with one task waiting, note when their ``get``
  returns. Latency = return − loader return, on CLOCK_MONOTONIC (one clock for
  the host). Median and p99 over every waiter of every wave, on asyncio and trio.
* **Waiters' CPU during a 2 s load**: 4 processes × 100 tasks, the leader's loader
  sleeping 2 s; each waiting process reports the CPU time it used (every thread)
  from the start of its gets to their return, over the wall time: the share of one
  core. Maximum over waiting processes and rounds; target ≤ 2 %.
* **Takeover after SIGKILL**: a leader process's loader never returns; three
  waiting processes; the parent SIGKILLs the leader and notes the time; the
  process that takes over notes when its loader is called. Median and maximum;
  target ≤ 0.5 s.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

from _common import (
    Check,
    FamilyResult,
    RedisServer,
    Settings,
    median,
    peer,
    percentile,
    print_checks,
    say,
)

NAME = "flight"
TITLE = "Host-wide single-flight: one cold key asked by 4 processes × 100 tasks"
N_PROCS = 4
N_TASKS = 100
LOAD_S = 0.05
LONG_LOAD_S = 2.0
VALUE = b"v" * 100


# --------------------------------------------------------------------------- workers


def _getter(lib: str, target: str, load_s: float) -> Any:
    """An async ``get(key) -> bytes`` for `lib` that calls a loader on a miss, and a
    counter of loader calls (a one-item list). Made inside the running loop."""
    calls = [0]
    stamp = [0]

    async def backend(key: str) -> bytes:
        import anyio

        calls[0] += 1
        await anyio.sleep(load_s)
        stamp[0] = time.monotonic_ns()
        return VALUE

    if lib.startswith("aiovmc"):
        import aiovmc

        acache = aiovmc.AsyncCache(
            target, coalesce="process" if lib == "aiovmc process" else "host"
        )

        async def load_bytes(key: bytes) -> bytes:
            return await backend(key.decode())

        async def get(key: str) -> bytes:
            return await acache.get(key, on_miss=load_bytes)

        return get, calls, stamp, acache.aclose
    if lib == "cashews":
        from cashews import Cache

        cache = Cache()
        cache.setup(target)

        @cache(ttl=600, key="flight:{key}", lock=True)
        async def cashews_get(key: str) -> bytes:
            return await backend(key)

        async def close() -> None:
            await cache.close()

        return cashews_get, calls, stamp, close
    if lib == "aiocache":
        from aiocache import RedisCache, cached
        from aiocache.serializers import PickleSerializer

        host, port = target.split("//")[1].split("/")[0].split(":")

        @cached(ttl=600, cache=RedisCache, endpoint=host, port=int(port), namespace="flight",
                serializer=PickleSerializer())
        async def aiocache_get(key: str) -> bytes:
            return await backend(key)

        async def noop() -> None:
            pass

        return aiocache_get, calls, stamp, noop
    raise ValueError(lib)


def _worker(
    lib: str, target: str, backend: str, n_tasks: int, load_s: float, rounds: int,
    barrier: Any, queue: Any,
) -> None:
    """Per round: meet at the barrier, then `n_tasks` gets of the round's cold key.
    Reports (round, loader calls, the loader's return time or 0, each get's return
    time (the last), CPU seconds, wall seconds)."""
    import anyio

    async def one_round(r: int) -> tuple[int, int, int, float, float]:
        get, calls, stamp, close = _getter(lib, target, load_s)
        key = f"cold-{os.getppid()}-{r}"
        done = [0]

        async def one() -> None:
            await get(key)
            done[0] = max(done[0], time.monotonic_ns())

        await anyio.to_thread.run_sync(barrier.wait, 120)
        cpu0, wall0 = time.process_time(), time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(n_tasks):
                tg.start_soon(one)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        await close()
        return calls[0], stamp[0], done[0], cpu, wall

    for r in range(rounds):
        calls, stamp, done, cpu, wall = anyio.run(one_round, r, backend=backend)
        queue.put((r, calls, stamp, done, cpu, wall))


def _run_group(
    ctx: Any, lib: str, target: str, backend: str, n_procs: int, n_tasks: int, load_s: float,
    rounds: int,
) -> list[list[tuple[int, int, int, int, float, float]]]:
    """Rounds of `n_procs` workers; per round, every worker's report."""
    barrier = ctx.Barrier(n_procs)
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker, daemon=True,
            args=(lib, target, backend, n_tasks, load_s, rounds, barrier, queue),
        )
        for _ in range(n_procs)
    ]
    for p in procs:
        p.start()
    try:
        out = []
        for _ in range(rounds):
            out.append([queue.get(timeout=120) for _ in range(n_procs)])
        for p in procs:
            p.join(30)
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def _takeover_waiter(path: str, queue: Any, ready: Any) -> None:
    import anyio

    import aiovmc

    async def main() -> None:
        async def loader(key: bytes) -> bytes:
            queue.put(("took over", time.monotonic_ns()))
            return VALUE

        async with aiovmc.AsyncCache(path) as acache:
            ready.set()
            await acache.get(b"takeover", on_miss=loader)

    anyio.run(main)
    queue.put(("done", 0))


def _takeover_leader(path: str, queue: Any) -> None:
    import anyio

    import aiovmc

    async def main() -> None:
        async def loader(key: bytes) -> bytes:
            queue.put(("leading", os.getpid()))
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async with aiovmc.AsyncCache(path) as acache:
            await acache.get(b"takeover", on_miss=loader)

    anyio.run(main)


def _takeover_round(ctx: Any, aiovmc: Any, path: str) -> float:
    """Seconds from the leader's SIGKILL to the takeover's loader call."""
    aiovmc.Cache(path, size="4MiB", reset=True).close()
    keep = aiovmc.Cache(path)  # the file stays attached: no recovery in between
    queue = ctx.Queue()
    leader = ctx.Process(target=_takeover_leader, args=(path, queue), daemon=True)
    leader.start()
    assert queue.get(timeout=60)[0] == "leading"
    waiters = []
    for _ in range(3):
        ready = ctx.Event()
        w = ctx.Process(target=_takeover_waiter, args=(path, queue, ready), daemon=True)
        w.start()
        ready.wait(60)
        waiters.append(w)
    time.sleep(0.3)  # let every waiter join the wave and fall asleep (a benchmark: no test)
    killed = time.monotonic_ns()
    os.kill(leader.pid, signal.SIGKILL)
    took = None
    for _ in range(4):
        what, t = queue.get(timeout=60)
        if what == "took over":
            took = t
    for w in waiters:
        w.join(30)
    leader.join(30)
    keep.close()
    assert took is not None
    return (took - killed) / 1e9


# --------------------------------------------------------------------------- the family


def run(settings: Settings, aiovmc: Any) -> FamilyResult:
    res = FamilyResult(NAME, TITLE)
    if aiovmc is None or not hasattr(aiovmc.Cache, "_flights_in_use"):
        res.note("aiovmc has no host-wide single-flight: nothing to measure")
        return res
    ctx = mp.get_context("spawn")
    rounds = settings.rounds
    path = os.path.join("/dev/shm", f"aiovmc-bench-flight-{os.getpid()}.cache")
    redis_server = RedisServer(tcp=True) if RedisServer.available() else None
    url = None
    try:
        if redis_server is not None:
            redis_server.start().close()
            url = redis_server.url
        else:
            res.note("no redis-server on PATH: cashews and aiocache skipped")

        # 1. loader calls for one cold key, 4 processes x 100 tasks
        libs = ["aiovmc host", "aiovmc process"]
        if url is not None:
            libs += [lib for lib, mod in (("cashews", "cashews"), ("aiocache", "aiocache"))
                     if peer(mod) is not None]
        calls: dict[str, list[int]] = {}
        for lib in libs:
            if lib.startswith("aiovmc"):
                aiovmc.Cache(path, size="16MiB", reset=True).close()
                target = path
            else:
                target = url  # type: ignore[assignment]
            reports = _run_group(ctx, lib, target, "asyncio", N_PROCS, N_TASKS, LOAD_S, rounds)
            calls[lib] = [sum(rep[1] for rep in rnd) for rnd in reports]
            res.data[f"loader calls: {lib}"] = {
                "median": median(calls[lib]), "max": max(calls[lib]), "rounds": calls[lib]
            }
            say(f"  loader calls, {lib}: median {median(calls[lib]):g}, max {max(calls[lib])}")
        res.checks.append(
            Check("loader calls for one cold key, 4 processes × 100 tasks (aiovmc host, max)",
                  max(calls["aiovmc host"]), "calls", 1, "equal")
        )
        for lib in libs[1:]:
            res.checks.append(
                Check(f"loader calls for one cold key, 4 processes × 100 tasks ({lib}, median)",
                      median(calls[lib]), "calls", None, "lower")
            )

        # 2. wake latency, 1 leader + 3 waiters with one task each
        for backend in ("asyncio", "trio"):
            aiovmc.Cache(path, size="16MiB", reset=True).close()
            waves = 10 if settings.quick else 30
            reports = _run_group(ctx, "aiovmc host", path, backend, N_PROCS, 1, 0.03, waves)
            lat = []
            for rnd in reports:
                leader = [rep for rep in rnd if rep[1] == 1]
                if len(leader) != 1:
                    continue
                t0 = leader[0][2]
                lat += [(rep[3] - t0) / 1e3 for rep in rnd if rep[1] == 0]
            res.data[f"wake latency µs: {backend}"] = {
                "median": median(lat), "p99": percentile(lat, 99), "n": len(lat)
            }
            say(f"  wake latency ({backend}): median {median(lat):.0f} µs, "
                f"p99 {percentile(lat, 99):.0f} µs over {len(lat)} waiters")
            res.checks.append(
                Check(f"wake latency, median ({backend})", median(lat) / 1e3, "ms", 1.0, "lower")
            )
            res.checks.append(
                Check(f"wake latency, p99 ({backend})", percentile(lat, 99) / 1e3, "ms", None,
                      "lower")
            )

        # 3. waiters' CPU during a 2 s load
        cpu_libs = ["aiovmc host"] + (["cashews"] if "cashews" in libs else [])
        for lib in cpu_libs:
            target = path if lib.startswith("aiovmc") else url
            if lib.startswith("aiovmc"):
                aiovmc.Cache(path, size="16MiB", reset=True).close()
            reports = _run_group(ctx, lib, target, "asyncio", N_PROCS, N_TASKS, LONG_LOAD_S,  # type: ignore[arg-type]
                                 2 if settings.quick else 3)
            shares = [rep[4] / rep[5] for rnd in reports for rep in rnd if rep[1] == 0]
            res.data[f"waiter cpu share: {lib}"] = {"max": max(shares), "median": median(shares)}
            say(f"  waiters' CPU during a {LONG_LOAD_S:g} s load ({lib}): median "
                f"{median(shares):.2%}, max {max(shares):.2%} of a core")
            res.checks.append(
                Check(f"waiters' CPU during a 2 s load, max per process ({lib})",
                      100 * max(shares), "% of a core", 2.0 if lib == "aiovmc host" else None,
                      "lower")
            )

        # 4. takeover after SIGKILL
        takes = [_takeover_round(ctx, aiovmc, path) for _ in range(3 if settings.quick else 5)]
        res.data["takeover s"] = {"median": median(takes), "max": max(takes), "rounds": takes}
        say(f"  takeover after SIGKILL: median {median(takes) * 1e3:.0f} ms, "
            f"max {max(takes) * 1e3:.0f} ms")
        res.checks.append(Check("takeover after SIGKILL of the leader, max", max(takes), "s",
                                0.5, "lower"))
    finally:
        if redis_server is not None:
            redis_server.stop()
        for suffix in ("",):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass
    print_checks(res.checks)
    return res
