# ruff: noqa: RUF003  (µ, ×, −, – are meant: they are printed)
"""Family ``sync``: one-key get hits and puts, 100 B and 4 KiB values, 100k keys.

Every library holds the same 100k 16-byte keys; a timed round walks a pre-generated
random order of them (fixed seed). Gets are hits; puts replace an existing key (the
steady state of a full cache).

* aiovmc ``Cache.get`` / ``Cache.put`` on a file in /dev/shm.
* py-lmdb, ``sync=False, writemap=True``, file in /dev/shm. Gets run inside one read
  transaction per round (``env.begin()``), the best case for LMDB. Puts are reported
  twice: one write transaction per put (``lmdb put/txn``, the primary peer: a cache
  ``put`` is one durable-in-memory publication) and all puts of a round in one write
  transaction (``lmdb put, 1 txn``: the batched best case).
* diskcache ``Cache`` (SQLite + files) in /dev/shm, default settings.
* cachetools ``LRUCache``: a per-process dict; the reference floor, not a peer in
  kind (nothing is shared between processes).
* redis over a unix socket (a private ``redis-server``, no persistence), when
  ``redis-server`` is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from _common import (
    Case,
    FamilyResult,
    GiB,
    KiB,
    MiB,
    Ratio,
    RedisServer,
    Settings,
    fmt_ns,
    interleaved,
    key_order,
    make_key,
    make_value,
    median,
    peer,
    print_ratios,
    rm,
    say,
    scratch,
)

NAME = "sync"
TITLE = "Sync get hit / put, 100 B and 4 KiB values, 100k keys, random order"
N_KEYS = 100_000
SIZES = (100, 4 * KiB)
HOT = 1_000

Loop = Callable[[], Any]


def _store_aiovmc(aiovmc: Any, size: int, keys: list[bytes], value: bytes) -> tuple[Any, Any]:
    d = scratch("aiovmc")
    budget = 256 * MiB if size <= 256 else 1 * GiB
    c = aiovmc.Cache(os.path.join(d, "cache.vmc"), size=budget)
    put = c.put
    for k in keys:
        put(k, value)
    return c, lambda: (c.close(), rm(d))


def _store_lmdb(lmdb: Any, keys: list[bytes], value: bytes) -> tuple[Any, Any]:
    d = scratch("lmdb")
    env = lmdb.open(d, map_size=2 * GiB, sync=False, writemap=True, max_dbs=0)
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k, value)
    return env, lambda: (env.close(), rm(d))


def _store_diskcache(diskcache: Any, keys: list[bytes], value: bytes) -> tuple[Any, Any]:
    d = scratch("diskcache")
    dc = diskcache.Cache(d, size_limit=4 * GiB)
    with dc.transact():  # one SQLite transaction: only the fill is batched
        for k in keys:
            dc.set(k, value)
    return dc, lambda: (dc.close(), rm(d))


def _store_cachetools(cachetools: Any, keys: list[bytes], value: bytes) -> tuple[Any, Any]:
    lru = cachetools.LRUCache(maxsize=len(keys) * 2)
    for k in keys:
        lru[k] = value
    return lru, lru.clear


def _store_redis(client: Any, keys: list[bytes], value: bytes) -> tuple[Any, Any]:
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for i, k in enumerate(keys):
        pipe.set(k, value)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return client, client.flushall


# ---- loops: the same shape for every library: a local bound method over a key list


def _get_loop(get: Callable[[bytes], Any]) -> Callable[[list[bytes]], Loop]:
    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            for k in keys:
                get(k)

        return loop

    return make


def _put_loop(put: Callable[[bytes, bytes], Any], value: bytes) -> Callable[[list[bytes]], Loop]:
    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            for k in keys:
                put(k, value)

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


def _lmdb_put_per_txn(env: Any, value: bytes) -> Callable[[list[bytes]], Loop]:
    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            begin = env.begin
            for k in keys:
                txn = begin(write=True)
                txn.put(k, value)
                txn.commit()

        return loop

    return make


def _lmdb_put_one_txn(env: Any, value: bytes) -> Callable[[list[bytes]], Loop]:
    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            with env.begin(write=True) as txn:
                put = txn.put
                for k in keys:
                    put(k, value)

        return loop

    return make


def run(settings: Settings, aiovmc: Any) -> FamilyResult:
    res = FamilyResult(NAME, TITLE)
    lmdb = peer("lmdb")
    diskcache = peer("diskcache")
    cachetools = peer("cachetools")
    redis_server: RedisServer | None = None
    redis_client = None
    if RedisServer.available() and peer("redis") is not None:
        redis_server = RedisServer()
        try:
            redis_client = redis_server.start()
        except Exception as exc:
            res.note(f"redis-server did not start ({exc}); redis skipped")
            redis_server = None
    else:
        res.note("redis-server not on PATH (or redis client missing): redis skipped")
    if aiovmc is None:
        res.note("aiovmc not available: peers only")

    keys = [make_key(i) for i in range(N_KEYS)]
    order = [keys[i] for i in key_order(N_KEYS)]
    try:
        for size in SIZES:
            value = make_value(size)
            label = "100 B" if size == 100 else f"{size // KiB} KiB"
            say(f"  -- {label} values: filling {N_KEYS:,} keys in every store")
            stores: dict[str, tuple[Any, Any]] = {}
            try:
                if aiovmc is not None:
                    stores["aiovmc"] = _store_aiovmc(aiovmc, size, keys, value)
                    c = stores["aiovmc"][0]
                    misses = sum(1 for k in keys if c.get(k) is None)
                    if misses:
                        res.note(f"aiovmc {label}: {misses} of {N_KEYS} keys missing after fill")
                if lmdb is not None:
                    stores["lmdb"] = _store_lmdb(lmdb, keys, value)
                if diskcache is not None:
                    stores["diskcache"] = _store_diskcache(diskcache, keys, value)
                if cachetools is not None:
                    stores["cachetools"] = _store_cachetools(cachetools, keys, value)
                if redis_client is not None:
                    stores["redis"] = _store_redis(redis_client, keys, value)

                gets: list[Case] = []
                puts: list[Case] = []
                for name, (obj, _close) in stores.items():
                    if name == "aiovmc":
                        gets.append(Case("aiovmc", _get_loop(obj.get)))
                        puts.append(Case("aiovmc", _put_loop(obj.put, value)))
                    elif name == "lmdb":
                        gets.append(Case("lmdb", _lmdb_get(obj)))
                        puts.append(Case("lmdb put/txn", _lmdb_put_per_txn(obj, value)))
                        puts.append(Case("lmdb put, 1 txn", _lmdb_put_one_txn(obj, value)))
                    elif name == "diskcache":
                        gets.append(Case("diskcache", _get_loop(obj.get)))
                        puts.append(Case("diskcache", _put_loop(obj.set, value)))
                    elif name == "cachetools":
                        gets.append(Case("cachetools", _get_loop(obj.get)))
                        puts.append(Case("cachetools", _put_loop(obj.__setitem__, value)))
                    elif name == "redis":
                        gets.append(Case("redis", _get_loop(obj.get)))
                        puts.append(Case("redis", _put_loop(obj.set, value)))

                plan: list[tuple[str, list[Case], list[bytes]]] = [
                    ("get", gets, order),
                    ("put", puts, order),
                ]
                if size == SIZES[0]:
                    # info: a hot working set of 1,000 keys (fits the CPU caches), which
                    # separates the per-call cost from the cache misses of random access
                    hot_keys = [keys[i] for i in key_order(N_KEYS)[:HOT]]
                    hot = [hot_keys[i % HOT] for i in key_order(N_KEYS, seed=7)]
                    plan.append(
                        (
                            f"get hot {HOT}",
                            [c for c in gets if c.name in ("aiovmc", "lmdb", "cachetools")],
                            hot,
                        )
                    )
                for op, cases, keyseq in plan:
                    rounds = interleaved(cases, keyseq, settings)
                    block = {
                        name: {"median_ns": median(v), "rounds_ns": v} for name, v in rounds.items()
                    }
                    res.data[f"{op} {label}"] = block
                    say(
                        f"  {op} {label}: "
                        + ", ".join(f"{n} {fmt_ns(b['median_ns'])}" for n, b in block.items())
                    )
            finally:
                for _obj, close in stores.values():
                    try:
                        close()
                    except Exception as exc:
                        say(f"  (close failed: {exc})")

        # ratios
        for label in ("100 B", "4 KiB"):
            g = res.data.get(f"get {label}", {})
            p = res.data.get(f"put {label}", {})
            a_get = g.get("aiovmc", {}).get("median_ns", float("nan"))
            a_put = p.get("aiovmc", {}).get("median_ns", float("nan"))
            if "lmdb" in g:
                res.ratios.append(
                    Ratio(
                        f"get hit {label}",
                        a_get,
                        "lmdb (read txn)",
                        g["lmdb"]["median_ns"],
                        "ns",
                        "lower",
                        0.5,
                    )
                )
            if "lmdb put/txn" in p:
                res.ratios.append(
                    Ratio(
                        f"put {label}",
                        a_put,
                        "lmdb put/txn",
                        p["lmdb put/txn"]["median_ns"],
                        "ns",
                        "lower",
                        0.7,
                    )
                )
                res.ratios.append(
                    Ratio(
                        f"put {label}",
                        a_put,
                        "lmdb put, 1 txn",
                        p["lmdb put, 1 txn"]["median_ns"],
                        "ns",
                        "lower",
                        note="batched best case; no target",
                    )
                )
            for other in ("diskcache", "cachetools", "redis"):
                if other in g:
                    res.ratios.append(
                        Ratio(
                            f"get hit {label}", a_get, other, g[other]["median_ns"], "ns", "lower"
                        )
                    )
                if other in p:
                    res.ratios.append(
                        Ratio(f"put {label}", a_put, other, p[other]["median_ns"], "ns", "lower")
                    )
        h = res.data.get(f"get hot {HOT} 100 B", {})
        if "aiovmc" in h and "lmdb" in h:
            res.ratios.append(
                Ratio(
                    f"get hit 100 B, {HOT} hot keys",
                    h["aiovmc"]["median_ns"],
                    "lmdb (read txn)",
                    h["lmdb"]["median_ns"],
                    "ns",
                    "lower",
                    note="info: working set in CPU caches",
                )
            )
        print_ratios(res.ratios)
    finally:
        if redis_server is not None:
            redis_server.stop()
    return res
