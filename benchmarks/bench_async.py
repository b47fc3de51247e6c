# ruff: noqa: RUF002, RUF003  (µ, ×, −, – are meant: they are printed)
"""Family ``async``: the anyio facade: hit path, stampede, loop stalls, big copies.

1. Hit path. 100k keys, 100 B values, random order; one task awaits
   ``AsyncCache.get`` hits in a loop (asyncio, asyncio+uvloop, trio), against the
   sync ``Cache.get`` of the same file timed in the same process, and against the hit
   path of in-process async memoizers on asyncio: async-lru ``@alru_cache``,
   cachebox ``@cached(LRUCache)`` and theine ``@Memoize`` (pre-warmed with every key).
2. Stampede. 500 tasks ask for the same cold key at once; the loader sleeps 10 ms.
   Loader calls and wall time (first task started to last result), per round a fresh
   key. Peers: async-lru, aiocache ``@cached`` (and ``@cached_stampede``), cashews
   ``@cache`` (and ``lock=True``), cachebox, theine.
3. Loop stalls. A ticker task sleeps 0.5 ms in a loop and records the gap between
   its wake-ups while 4 tasks loop ``put`` + ``get`` of 1, 4, 16, 64 MiB values (each
   its own key, a checkpoint after every operation), once with copies inline
   (``offload_threshold`` larger than any value) and once offloaded to worker threads
   (``offload_threshold`` = 64 KiB); at 64 MiB also offloaded with ``get_into`` a
   buffer allocated once (no fresh result to allocate and free). Max and p99 gap,
   MiB/s moved, and the time the loop spends dropping one result, per round; the
   ticker alone gives each backend's idle baseline.
4. Offload threshold. Sync ``Cache.get``/``put`` time against value size (4 KiB..64 MiB),
   and the cost of one ``anyio.to_thread.run_sync`` round trip: the recommended
   default ``offload_threshold`` is the size whose inline copy takes 100–200 µs.
5. Bandwidth. 64 MiB ``Cache.get`` against ``bytes(memoryview(mmap)[a:b])`` of the same
   size from a plain mmap of a file in /dev/shm (and py-lmdb's get, for reference).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import mmap
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import (
    Case,
    Check,
    FamilyResult,
    GiB,
    KiB,
    MiB,
    Ratio,
    Settings,
    fmt_bytes,
    fmt_ns,
    gc_frozen,
    gc_off,
    has_async,
    interleaved,
    key_order,
    make_key,
    make_value,
    median,
    peer,
    percentile,
    print_checks,
    print_ratios,
    rm,
    say,
    scratch,
)

NAME = "async"
TITLE = "AsyncCache: hit path, cold-key stampede, loop stalls, offload threshold, bandwidth"
N_KEYS = 100_000
HIT_VALUE = 100
STAMPEDE_TASKS = 500
LOADER_SLEEP = 0.010
LAG_SIZES = (1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)
TICK = 0.0005
WORKERS = 4
OFFLOAD_SMALL = 64 * KiB
GET_INTO_SIZE = 64 * MiB  # where the get_into variant of the offloaded mode also runs
INLINE = 1 << 62
CURVE_SIZES = tuple(4 * KiB * 4**i for i in range(8))  # 4 KiB .. 64 MiB
BIG = 64 * MiB

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("asyncio", "asyncio", {}),
    ("uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]


def _backends() -> list[tuple[str, str, dict[str, Any]]]:
    out = [BACKENDS[0]]
    try:
        import uvloop  # noqa: F401

        out.append(BACKENDS[1])
    except ImportError:
        say("  uvloop not installed: skipped")
    try:
        import trio  # noqa: F401

        out.append(BACKENDS[2])
    except ImportError:
        say("  trio not installed: skipped")
    return out


def _anyio_run(fn: Callable[[], Awaitable[Any]], backend: tuple[str, str, dict[str, Any]]) -> Any:
    import anyio

    return anyio.run(fn, backend=backend[1], backend_options=backend[2])


# ----------------------------------------------------------------------- timing (async)


async def _async_interleaved(
    cases: list[tuple[str, Callable[[list[bytes]], Any], bool]],
    order: list[bytes],
    settings: Settings,
) -> dict[str, list[float]]:
    """Like _common.interleaved, for loops that are coroutines (flag True) or plain."""
    n = len(order)
    plan = []
    for name, make, is_async in cases:
        probe = make(order[:1000])
        if is_async:
            await probe()
            with gc_off():
                t0 = time.perf_counter_ns()
                await probe()
                ns = (time.perf_counter_ns() - t0) / 1000
        else:
            probe()
            with gc_off():
                t0 = time.perf_counter_ns()
                probe()
                ns = (time.perf_counter_ns() - t0) / 1000
        ops = max(1000, min(n, int(settings.round_seconds * 1e9 / max(ns, 1.0))))
        fns = []
        for r in range(settings.warmup + settings.rounds):
            start = (r * ops) % n
            keys = (order[start:] + order[:start])[:ops] if ops < n else order
            fns.append(make(keys))
        plan.append((name, is_async, ops, fns))
    out: dict[str, list[float]] = {name: [] for name, *_ in cases}
    with gc_frozen():
        for r in range(settings.warmup + settings.rounds):
            for name, is_async, ops, fns in plan:
                with gc_off():
                    t0 = time.perf_counter_ns()
                    if is_async:
                        await fns[r]()
                    else:
                        fns[r]()
                    t1 = time.perf_counter_ns()
                if r >= settings.warmup:
                    out[name].append((t1 - t0) / ops)
    return out


def _await_loop(fn: Callable[[bytes], Awaitable[Any]]) -> Callable[[list[bytes]], Any]:
    def make(keys: list[bytes]) -> Any:
        async def loop() -> None:
            for k in keys:
                await fn(k)

        return loop

    return make


def _put_loop(cache: Any, value: bytes) -> Callable[[list[bytes]], Any]:
    return _sync_loop(lambda k: cache.put(k, value))


def _sync_loop(fn: Callable[[bytes], Any]) -> Callable[[list[bytes]], Any]:
    def make(keys: list[bytes]) -> Any:
        def loop() -> None:
            for k in keys:
                fn(k)

        return loop

    return make


# ----------------------------------------------------------------------- 1. hit path


def _hit_path(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    keys = [make_key(i) for i in range(N_KEYS)]
    order = [keys[i] for i in key_order(N_KEYS)]
    value = make_value(HIT_VALUE)
    d = scratch("async-hit")
    out: dict[str, dict[str, list[float]]] = {}
    try:
        ac = aiovmc.AsyncCache(os.path.join(d, "cache.vmc"), size=256 * MiB)
        cache = ac.cache
        for k in keys:
            cache.put(k, value)

        for backend in _backends():
            bname = backend[0]

            async def main(bname: str = bname) -> dict[str, list[float]]:
                cases: list[tuple[str, Callable[[list[bytes]], Any], bool]] = [
                    (f"aiovmc await get ({bname})", _await_loop(ac.get), True),
                    ("aiovmc Cache.get (sync)", _sync_loop(cache.get), False),
                ]
                if hasattr(ac, "get_nowait"):
                    cases.append(("aiovmc get_nowait", _sync_loop(ac.get_nowait), False))
                cleanup: list[Callable[[], Any]] = []
                if bname == "asyncio":
                    cases += await _memoizer_cases(keys, value, cleanup)
                try:
                    return await _async_interleaved(cases, order, settings)
                finally:
                    for fn in cleanup:  # 100k memoized entries would slow every gc later
                        fn()

            rounds = _anyio_run(main, backend)
            for name, xs in rounds.items():
                if name == "aiovmc Cache.get (sync)" or name == "aiovmc get_nowait":
                    name = f"{name} [{bname}]"
                out[name] = {"median_ns": median(xs), "rounds_ns": xs}
        ac.cache.close()
    finally:
        rm(d)
    res.data["hit"] = out
    for name, b in out.items():
        say(f"  hit: {name:<40} {fmt_ns(b['median_ns'])}")
    for bname in ("asyncio", "uvloop", "trio"):
        a = out.get(f"aiovmc await get ({bname})")
        s = out.get(f"aiovmc Cache.get (sync) [{bname}]")
        if a and s:
            res.ratios.append(
                Ratio(
                    f"await get hit ({bname})",
                    a["median_ns"],
                    "sync Cache.get",
                    s["median_ns"],
                    "ns",
                    "lower",
                    1.5,
                )
            )
    a = out.get("aiovmc await get (asyncio)")
    for peer_name, target in (("async-lru", 1.0), ("cachebox", None), ("theine", None)):
        p = out.get(f"{peer_name} hit")
        if a and p:
            res.ratios.append(
                Ratio(
                    "await get hit (asyncio)",
                    a["median_ns"],
                    peer_name,
                    p["median_ns"],
                    "ns",
                    "lower",
                    target,
                )
            )
    t = out.get("aiovmc await get (trio)")
    p = out.get("async-lru hit")
    if t and p:
        res.ratios.append(
            Ratio(
                "await get hit (trio)",
                t["median_ns"],
                "async-lru (asyncio)",
                p["median_ns"],
                "ns",
                "lower",
                1.0,
                note="async-lru runs on asyncio only",
            )
        )


async def _memoizer_cases(
    keys: list[bytes], value: bytes, cleanup: list[Callable[[], Any]]
) -> list[tuple[str, Any, bool]]:
    cases: list[tuple[str, Any, bool]] = []

    async def load(key: bytes) -> bytes:
        return value

    async_lru = peer("async_lru")
    if async_lru is not None:
        f = async_lru.alru_cache(maxsize=None)(load)
        cases.append(("async-lru hit", f, True))
        cleanup.append(f.cache_clear)
    cachebox = peer("cachebox")
    if cachebox is not None:
        f = cachebox.cached(cachebox.LRUCache(len(keys) * 2))(load)
        cases.append(("cachebox hit", f, True))
        cleanup.append(f.cache_clear)
    theine = peer("theine")
    if theine is not None:
        f = theine.Memoize(len(keys) * 2, None)(load)
        cases.append(("theine hit", f, True))
        cleanup.append(getattr(getattr(f, "_cache", None), "clear", lambda: None))
    for _name, f, _ in cases:  # warm: every key becomes a hit
        for k in keys:
            await f(k)
    return [(name, _await_loop(f), True) for name, f, _ in cases]


# ----------------------------------------------------------------------- 2. stampede


async def _stampede_once(
    call: Callable[[bytes], Awaitable[Any]], key: bytes, expect: bytes
) -> float:
    import anyio

    results: list[Any] = []

    async def one() -> None:
        results.append(await call(key))

    t0 = time.perf_counter_ns()
    async with anyio.create_task_group() as tg:
        for _ in range(STAMPEDE_TASKS):
            tg.start_soon(one)
    t1 = time.perf_counter_ns()
    bad = sum(1 for r in results if r != expect)
    if bad:
        raise AssertionError(f"{bad} of {len(results)} stampede results were wrong")
    return (t1 - t0) / 1e6


def _stampede(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    import anyio

    value = make_value(HIT_VALUE)
    rounds = settings.warmup + settings.rounds
    out: dict[str, dict[str, Any]] = {}

    def record(name: str, walls: list[float], calls: list[int]) -> None:
        out[name] = {
            "median_wall_ms": median(walls[settings.warmup :]),
            "walls_ms": walls[settings.warmup :],
            "loader_calls": calls[settings.warmup :],
            "max_loader_calls": max(calls[settings.warmup :]),
        }

    d = scratch("async-stampede")
    try:
        if aiovmc is not None:
            ac = aiovmc.AsyncCache(os.path.join(d, "cache.vmc"), size=64 * MiB)
            for bname, backend in (("asyncio", BACKENDS[0]), ("trio", BACKENDS[2])):
                calls: list[int] = []
                walls: list[float] = []

                async def main(
                    calls: list[int] = calls, walls: list[float] = walls, bname: str = bname
                ) -> None:
                    for r in range(rounds):
                        n = [0]

                        async def loader(key: bytes, n: list[int] = n) -> bytes:
                            n[0] += 1
                            await anyio.sleep(LOADER_SLEEP)
                            return value

                        key = b"cold-%s-%d" % (bname.encode(), r)

                        async def call(k: bytes, loader: Any = loader) -> Any:
                            return await ac.get(k, on_miss=loader)

                        walls.append(await _stampede_once(call, key, value))
                        calls.append(n[0])

                try:
                    _anyio_run(main, backend)
                    record(f"aiovmc ({bname})", walls, calls)
                except ImportError:
                    pass
            ac.cache.close()
    finally:
        rm(d)

    peers: list[tuple[str, Callable[[Any], Any]]] = []
    async_lru = peer("async_lru")
    if async_lru is not None:
        peers.append(("async-lru", lambda f: async_lru.alru_cache(maxsize=None)(f)))
    aiocache = peer("aiocache")
    if aiocache is not None:
        peers.append(("aiocache @cached", lambda f: aiocache.cached(ttl=60)(f)))
        peers.append(
            ("aiocache @cached_stampede", lambda f: aiocache.cached_stampede(lease=2, ttl=60)(f))
        )
    cashews = peer("cashews")
    if cashews is not None:
        cashews.cache.setup("mem://")
        peers.append(("cashews @cache", lambda f: cashews.cache(ttl="1m")(f)))
        peers.append(("cashews @cache(lock=True)", lambda f: cashews.cache(ttl="1m", lock=True)(f)))
    cachebox = peer("cachebox")
    if cachebox is not None:
        peers.append(("cachebox", lambda f: cachebox.cached(cachebox.LRUCache(1000))(f)))
    theine = peer("theine")
    if theine is not None:
        peers.append(("theine", lambda f: theine.Memoize(1000, None)(f)))

    for pname, deco in peers:
        calls = []
        walls = []

        async def pmain(
            deco: Any = deco,
            calls: list[int] = calls,
            walls: list[float] = walls,
            pname: str = pname,
        ) -> None:
            for r in range(rounds):
                n = [0]

                async def loader(key: bytes, n: list[int] = n) -> bytes:
                    n[0] += 1
                    await asyncio.sleep(LOADER_SLEEP)
                    return value

                loader.__qualname__ = f"stampede_{abs(hash(pname))}_{r}"
                f = deco(loader)
                walls.append(await _stampede_once(f, b"cold-%d" % r, value))
                calls.append(n[0])

        asyncio.run(pmain())
        record(pname, walls, calls)

    res.data["stampede"] = out
    for name, b in out.items():
        say(
            f"  stampede: {name:<28} loader calls {b['loader_calls']}  "
            f"wall {b['median_wall_ms']:.1f} ms"
        )
    for bname in ("asyncio", "trio"):
        b = out.get(f"aiovmc ({bname})")
        if b:
            res.checks.append(
                Check(
                    f"stampede loader calls, max over rounds ({bname})",
                    b["max_loader_calls"],
                    "",
                    1,
                    "equal",
                )
            )
            for pname, pb in out.items():
                if not pname.startswith("aiovmc") and bname == "asyncio":
                    res.ratios.append(
                        Ratio(
                            "stampede wall time (asyncio)",
                            b["median_wall_ms"],
                            pname,
                            pb["median_wall_ms"],
                            "ms",
                            "lower",
                            note=f"peer loader calls {pb['max_loader_calls']}",
                        )
                    )


# ----------------------------------------------------------------------- 3. loop stalls


class _GetIntoMode:
    """An AsyncCache whose ``get`` is ``get_into`` a buffer allocated once per key:
    the same copies, without allocating (and later freeing) a fresh result."""

    def __init__(self, ac: Any, keys: list[bytes], size: int) -> None:
        self.ac = ac
        self.outs = {k: bytearray(size) for k in keys}

    async def put(self, key: bytes, value: bytes) -> Any:
        return await self.ac.put(key, value)

    async def get(self, key: bytes) -> bytearray | None:
        out = self.outs[key]
        n = await self.ac.get_into(key, out)
        return None if n is None else out


async def _lag_round(ac: Any, keys: list[bytes], value: bytes, duration: float) -> dict[str, Any]:
    import anyio

    gaps: list[int] = []
    drops: list[int] = [0]
    moved = [0]
    stop = [False]

    async def ticker() -> None:
        last = time.perf_counter_ns()
        while not stop[0]:
            await anyio.sleep(TICK)
            now = time.perf_counter_ns()
            gaps.append(now - last)
            last = now

    async def worker(k: bytes) -> None:
        size = len(value)
        while not stop[0]:
            await ac.put(k, value)
            await anyio.lowlevel.checkpoint()
            v = await ac.get(k)
            if v is None or len(v) != size:
                raise AssertionError("lag worker: lost its value")
            # dropping the result is the application's part of the stall (a large
            # bytes object is unmapped on the loop thread): timed apart
            t0 = time.perf_counter_ns()
            v = None
            drops.append(time.perf_counter_ns() - t0)
            await anyio.lowlevel.checkpoint()
            moved[0] += 2 * size

    t0 = time.perf_counter_ns()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        for k in keys:
            tg.start_soon(worker, k)
        await anyio.sleep(duration)
        stop[0] = True
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    gaps = gaps[2:] or gaps  # the first wake-ups include task start-up
    return {
        "max_gap_ms": max(gaps) / 1e6 if gaps else float("nan"),
        "p99_gap_ms": percentile(gaps, 99) / 1e6,
        "p50_gap_ms": percentile(gaps, 50) / 1e6,
        "ticks": len(gaps),
        "max_drop_ms": max(drops) / 1e6,
        "mib_s": moved[0] / MiB / elapsed,
    }


def _loop_lag(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    d = scratch("async-lag")
    out: dict[str, Any] = {}
    duration = 0.25 if settings.quick else 0.8
    backends = [BACKENDS[0], BACKENDS[2]]
    try:
        base = aiovmc.AsyncCache(os.path.join(d, "cache.vmc"), size=2 * GiB)
        cache = base.cache
        from_cache = getattr(aiovmc.AsyncCache, "from_cache", None)
        if from_cache is None:
            res.note("AsyncCache.from_cache not available: loop-lag skipped")
            return
        modes = {
            "inline": from_cache(cache, offload_threshold=INLINE),
            "offloaded": from_cache(cache, offload_threshold=OFFLOAD_SMALL),
        }
        keys = [b"lag-%d" % i for i in range(WORKERS)]

        for backend in backends:
            bname = backend[0]
            if bname == "trio":
                try:
                    import trio  # noqa: F401
                except ImportError:
                    continue

            # idle baseline: the ticker alone
            async def idle() -> dict[str, Any]:
                return await _lag_round(modes["inline"], [], b"", duration)

            base_rounds = [_anyio_run(idle, backend) for _ in range(3)]
            out[f"{bname} idle"] = {
                "max_gap_ms": median([r["max_gap_ms"] for r in base_rounds]),
                "p99_gap_ms": median([r["p99_gap_ms"] for r in base_rounds]),
                "rounds": base_rounds,
            }
            sizes = LAG_SIZES if (bname == "asyncio" or not settings.quick) else (64 * MiB,)
            for size in sizes:
                value = make_value(size)
                for k in keys:
                    cache.put(k, value)
                runs: dict[str, Any] = dict(modes)
                if size == GET_INTO_SIZE:
                    runs["offloaded get_into"] = _GetIntoMode(modes["offloaded"], keys, size)
                for mode, ac in runs.items():

                    async def main(ac: Any = ac, value: bytes = value) -> list[dict[str, Any]]:
                        rs = []
                        for _ in range(settings.warmup + settings.rounds):
                            rs.append(await _lag_round(ac, keys, value, duration))
                        return rs[settings.warmup :]

                    rs = _anyio_run(main, backend)
                    entry = {
                        "size": size,
                        "backend": bname,
                        "mode": mode,
                        "max_gap_ms": median([r["max_gap_ms"] for r in rs]),
                        "worst_gap_ms": max(r["max_gap_ms"] for r in rs),
                        "p99_gap_ms": median([r["p99_gap_ms"] for r in rs]),
                        "mib_s": median([r["mib_s"] for r in rs]),
                        "max_drop_ms": median([r["max_drop_ms"] for r in rs]),
                        "rounds": rs,
                    }
                    out[f"{bname} {mode} {size // MiB} MiB"] = entry
                    say(
                        f"  lag {bname:<7} {mode:<9} {fmt_bytes(size):>7}: max gap "
                        f"{entry['max_gap_ms']:7.2f} ms (worst {entry['worst_gap_ms']:.2f}), p99 "
                        f"{entry['p99_gap_ms']:6.2f} ms, {entry['mib_s']:8.0f} MiB/s; freeing a "
                        f"result {entry['max_drop_ms']:.2f} ms"
                    )
                del value
        cache.close()
    finally:
        rm(d)
    res.data["loop_lag"] = out
    for bname in ("asyncio", "trio"):
        e = out.get(f"{bname} offloaded 64 MiB")
        if e:
            res.checks.append(
                Check(
                    f"loop stall, 64 MiB offloaded ({bname}): max gap - tick",
                    e["max_gap_ms"] - TICK * 1e3,
                    "ms",
                    1.0,
                    "lower",
                    note=f"worst round {e['worst_gap_ms'] - TICK * 1e3:.2f} ms",
                )
            )
        idle = out.get(f"{bname} idle")
        gi = out.get(f"{bname} offloaded get_into 64 MiB")
        if gi:
            res.checks.append(
                Check(
                    f"loop stall, 64 MiB offloaded, get_into a reused buffer ({bname})",
                    gi["max_gap_ms"] - TICK * 1e3,
                    "ms",
                    None,
                    "lower",
                    note="no fresh 64 MiB result to allocate and free",
                )
            )
        if e and idle:
            res.checks.append(
                Check(
                    f"p99 gap above the idle ticker's, 64 MiB offloaded ({bname})",
                    e["p99_gap_ms"] - idle["p99_gap_ms"],
                    "ms",
                    None,
                    "lower",
                )
            )
        i = out.get(f"{bname} inline 64 MiB")
        if i:
            res.checks.append(
                Check(
                    f"loop stall, 64 MiB inline ({bname}): max gap - tick",
                    i["max_gap_ms"] - TICK * 1e3,
                    "ms",
                    None,
                    "lower",
                )
            )


# ----------------------------------------------------------------------- 4. threshold


def _offload_curve(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    import anyio

    d = scratch("async-curve")
    curve: dict[str, Any] = {}
    try:
        cache = aiovmc.Cache(os.path.join(d, "cache.vmc"), size=1 * GiB)
        cases = []
        for size in CURVE_SIZES:
            value = make_value(size)
            k = b"curve-%d" % size
            cache.put(k, value)
            ops = max(3, min(2000, (256 * MiB if not settings.quick else 64 * MiB) // size))
            cases.append(Case(f"get {size}", _sync_loop(cache.get), ops))
            cases.append(Case(f"put {size}", _put_loop(cache, value), ops))
        for case in cases:
            size = int(case.name.split()[1])
            rounds = interleaved([case], [b"curve-%d" % size] * case.ops, settings)
            curve[case.name] = {
                "size": size,
                "op": case.name.split()[0],
                "median_ns": median(rounds[case.name]),
                "rounds_ns": rounds[case.name],
            }
        cache.close()
    finally:
        rm(d)

    # the cost of one offload round trip, as the loop sees it
    trips: dict[str, float] = {}
    for backend in (BACKENDS[0], BACKENDS[2]):

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

        try:
            trips[backend[0]] = _anyio_run(trip, backend)
        except ImportError:
            pass

    gets = sorted((v["size"], v["median_ns"]) for v in curve.values() if v["op"] == "get")
    puts = sorted((v["size"], v["median_ns"]) for v in curve.values() if v["op"] == "put")
    # one inline copy of either kind stalls the loop: the slower of get and put counts
    worst = [(s, max(g, p)) for (s, g), (_s, p) in zip(gets, puts, strict=True)]
    at100 = _size_at(worst, 100_000)
    at200 = _size_at(worst, 200_000)
    rec = _recommend(at100, at200)
    res.data["offload_curve"] = {
        "points": curve,
        "to_thread_ns": trips,
        "get_size_at_100us": _size_at(gets, 100_000),
        "get_size_at_200us": _size_at(gets, 200_000),
        "copy_size_at_100us": at100,
        "copy_size_at_200us": at200,
        "put_size_at_100us": _size_at(puts, 100_000),
        "put_size_at_200us": _size_at(puts, 200_000),
        "recommended_offload_threshold": rec,
    }
    for (size, g), (_s, p) in zip(gets, puts, strict=True):
        say(
            f"  inline copy {fmt_bytes(size):>8}: get {fmt_ns(g):>10} ({size / g:.2f} GB/s)  "
            f"put {fmt_ns(p):>10} ({size / p:.2f} GB/s)"
        )
    for b, ns in trips.items():
        say(f"  to_thread.run_sync round trip ({b}): {fmt_ns(ns)}")
    say(
        f"  an inline copy (the slower of get and put) takes 100 µs at {fmt_bytes(at100)}, "
        f"200 µs at {fmt_bytes(at200)} "
        f"-> recommended default offload_threshold = {fmt_bytes(rec)}"
    )


def _size_at(points: list[tuple[int, float]], ns: float) -> float:
    """Interpolate (log-log) the size at which an op takes ``ns``."""
    for (s0, t0), (s1, t1) in itertools.pairwise(points):
        if t0 <= ns <= t1:
            if t1 == t0:
                return float(s0)
            f = (math.log(ns) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0)))
    if points and ns < points[0][1]:
        return float(points[0][0])
    return float(points[-1][0]) if points else float("nan")


def _recommend(at100: float, at200: float) -> int:
    """The power of two between the 100 µs and 200 µs sizes (the lower one if two)."""
    if at100 != at100:
        return 0
    p = 1 << max(12, math.ceil(math.log2(max(at100, 1))))
    if p > at200:  # no power of two inside the band: take the nearest to its middle
        mid = math.sqrt(at100 * at200)
        lo = 1 << math.floor(math.log2(mid))
        p = lo if mid / lo < (2 * lo) / mid else 2 * lo
    return p


# ----------------------------------------------------------------------- 5. bandwidth


def _bandwidth(res: FamilyResult, settings: Settings, aiovmc: Any) -> None:
    value = make_value(BIG)
    d = scratch("async-bw")
    out: dict[str, Any] = {}
    cases: list[Case] = []
    closers: list[Callable[[], Any]] = []
    try:
        if aiovmc is not None:
            cache = aiovmc.Cache(os.path.join(d, "cache.vmc"), size=512 * MiB)
            cache.put(b"big", value)
            cases.append(Case("aiovmc Cache.get", _sync_loop(cache.get), 5))
            closers.append(cache.close)
        path = os.path.join(d, "plain.bin")
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
            f.write(value)
        fd = os.open(path, os.O_RDWR)
        mm = mmap.mmap(fd, 0)
        os.close(fd)
        view = memoryview(mm)
        a, b = 4096, 4096 + BIG

        def plain(_k: bytes) -> bytes:
            return bytes(view[a:b])

        cases.append(Case("bytes(memoryview(mmap)[a:b])", _sync_loop(plain), 5))
        lmdb = peer("lmdb")
        if lmdb is not None:
            env = lmdb.open(os.path.join(d, "lmdb"), map_size=1 * GiB, sync=False, writemap=True)
            with env.begin(write=True) as txn:
                txn.put(b"big", value)

            def lget(k: bytes) -> Any:
                with env.begin() as txn:
                    return txn.get(k)

            cases.append(Case("lmdb get", _sync_loop(lget), 5))
            closers.append(env.close)
        # the same copies into a buffer allocated once: memcpy speed, no page faults
        buf = bytearray(BIG)
        bufview = memoryview(buf)
        if aiovmc is not None and hasattr(cache, "get_into"):
            cases.append(
                Case(
                    "aiovmc get_into (reused buffer)",
                    _sync_loop(lambda k: cache.get_into(k, buf)),
                    5,
                )
            )

        def plain_into(_k: bytes) -> None:
            bufview[:] = view[a:b]

        cases.append(Case("mmap slice into reused buffer", _sync_loop(plain_into), 5))
        rounds = interleaved(cases, [b"big"] * 5, settings)
        for name, xs in rounds.items():
            out[name] = {
                "median_ns": median(xs),
                "rounds_ns": xs,
                "gb_s": BIG / median(xs),
                "gib_s": BIG / median(xs) * 1e9 / GiB,
            }
            say(f"  64 MiB {name:<30} {fmt_ns(median(xs)):>10}  {out[name]['gib_s']:.2f} GiB/s")
        bufview.release()
        view.release()
        mm.close()
    finally:
        for c in closers:
            c()
        rm(d)
    res.data["bandwidth_64MiB"] = out
    if "aiovmc Cache.get" in out:
        res.ratios.append(
            Ratio(
                "64 MiB get bandwidth",
                out["aiovmc Cache.get"]["gib_s"],
                "mmap slice to bytes",
                out["bytes(memoryview(mmap)[a:b])"]["gib_s"],
                "GiB/s",
                "higher",
                0.8,
            )
        )
        if "aiovmc get_into (reused buffer)" in out:
            res.ratios.append(
                Ratio(
                    "64 MiB get_into bandwidth (reused buffer)",
                    out["aiovmc get_into (reused buffer)"]["gib_s"],
                    "mmap slice into reused buffer",
                    out["mmap slice into reused buffer"]["gib_s"],
                    "GiB/s",
                    "higher",
                )
            )
        if "lmdb get" in out:
            res.ratios.append(
                Ratio(
                    "64 MiB get bandwidth",
                    out["aiovmc Cache.get"]["gib_s"],
                    "lmdb get",
                    out["lmdb get"]["gib_s"],
                    "GiB/s",
                    "higher",
                )
            )


# ----------------------------------------------------------------------- entry


def run(settings: Settings, aiovmc: Any) -> FamilyResult:
    res = FamilyResult(NAME, TITLE)
    steps: list[tuple[str, Callable[..., None], bool]] = [
        ("hit path", _hit_path, True),
        ("stampede", _stampede, False),  # peers run without aiovmc
        ("loop lag", _loop_lag, True),
        ("offload threshold", _offload_curve, False),
        ("bandwidth", _bandwidth, False),
    ]
    async_ok = has_async(aiovmc)
    if aiovmc is None:
        res.note("aiovmc not available: peers only")
    elif not async_ok:
        res.note("aiovmc.AsyncCache not available: async parts not available")
    for title, fn, needs_async in steps:
        say(f"  -- {title}")
        if needs_async and not async_ok:
            res.note(f"{title}: not available (needs aiovmc.AsyncCache)")
            continue
        if title == "offload threshold" and aiovmc is None:
            res.note(f"{title}: not available (needs aiovmc.Cache)")
            continue
        if title == "stampede" and not async_ok:
            _stampede(res, settings, None)
            continue
        t0 = time.monotonic()
        try:
            fn(res, settings, aiovmc)
        except (NotImplementedError, AttributeError, TypeError) as exc:
            res.note(f"{title}: not available ({type(exc).__name__}: {exc})")
        say(f"     ({title}: {time.monotonic() - t0:.1f} s)")
    print_ratios(res.ratios)
    print_checks(res.checks)
    return res
