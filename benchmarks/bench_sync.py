"""Sync get hits, get_into, puts: 100 B and 4 KiB values over 100k keys; 64 KiB and 1 MiB.

Every library holds the same 100k 16-byte keys; a timed round walks a pre-generated
random order of them. Gets are hits; puts replace an existing key (the steady state
of a full cache). aiovmc: `Cache.get`, `Cache.get_into` a buffer of the value's size
allocated once (no result object), `Cache.put`, and `Cache.get_many` of 100 keys a
call (per key). py-lmdb (`sync=False, writemap=True`): a read transaction per get,
a write transaction per put (what a cache shared by processes must do to see and
publish each value: DESIGN §8's peer); "lmdb, one txn per round" does a round's gets
(or puts) in one transaction, LMDB's batched best case, and its get_many figure is a
read transaction per 100 keys. lmdb's get_into is its get with `buffers=True` (a
view of the map) copied into the same kind of buffer. diskcache `Cache` (SQLite) with
its defaults; cachetools `LRUCache`, a per-process dict (a floor, nothing shared);
redis-py over a unix socket to a private `redis-server`. The 1,000-hot-keys column
walks a working set that fits the CPU caches, which separates the per-call cost from
memory misses. Large values: aiovmc and lmdb only, the same get, get_into and put
over 4,000 keys of 64 KiB and 256 keys of 1 MiB (random order), where the copy (and
aiovmc's checksum of it) dominates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import cachetools
import diskcache
import lmdb
from harness import (
    Case,
    Family,
    GiB,
    KiB,
    MiB,
    Plot,
    RedisServer,
    Settings,
    Table,
    fmt,
    interleaved,
    key_order,
    loop_over,
    make_key,
    make_value,
    say,
    scratch,
)

import aiovmc

TITLE = "Sync get hit / put"
TABLE = "per op"
LARGE = "large values"
TABLES = [
    Table(TABLE, "Median time per op (100k 16-byte keys, random order unless said)",
          Plot("bars", "bench_sync.png", "Sync get hit / put, 100k keys (median)",
               xlabel="time per op", logx=True)),
    Table(LARGE, "Median time per op (64 KiB values over 4,000 keys, 1 MiB over 256, "
          "random order)",
          Plot("bars", "bench_sync_large.png", "Sync get / put of large values (median)",
               xlabel="time per op")),
]  # fmt: skip
BATCH = 100
HOT = 1_000

Loop = Callable[[], Any]


def _lmdb_get_per_txn(env: Any) -> Callable[[bytes], Any]:
    begin = env.begin

    def get(k: bytes) -> Any:
        with begin() as txn:
            return txn.get(k)

    return get


def _lmdb_get_into_per_txn(env: Any, buf: bytearray) -> Callable[[bytes], Any]:
    """A read transaction per get, the value (a view of the map) copied into ``buf``."""
    begin, out = env.begin, memoryview(buf)

    def get_into(k: bytes) -> int:
        with begin(buffers=True) as txn:
            v = txn.get(k)
            out[: len(v)] = v
            return len(v)

    return get_into


def _lmdb_put_per_txn(env: Any, value: bytes) -> Callable[[bytes], Any]:
    begin = env.begin

    def put(k: bytes) -> None:
        with begin(write=True) as txn:
            txn.put(k, value)

    return put


def _lmdb_one_txn(env: Any, value: bytes | None) -> Callable[[list[bytes]], Loop]:
    """A round's gets (value None) or puts in one transaction."""

    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            with env.begin(write=value is not None) as txn:
                if value is None:
                    get = txn.get
                    for k in keys:
                        get(k)
                else:
                    put = txn.put
                    for k in keys:
                        put(k, value)

        return loop

    return make


def _lmdb_one_txn_into(env: Any, buf: bytearray) -> Callable[[list[bytes]], Loop]:
    """A round's gets in one transaction, each value copied into ``buf``."""
    out = memoryview(buf)

    def make(keys: list[bytes]) -> Loop:
        def loop() -> None:
            with env.begin(buffers=True) as txn:
                get = txn.get
                for k in keys:
                    v = get(k)
                    out[: len(v)] = v

        return loop

    return make


def _lmdb_batches(env: Any) -> Callable[[list[tuple[bytes, ...]]], Loop]:
    def make(batches: list[tuple[bytes, ...]]) -> Loop:
        def loop() -> None:
            for batch in batches:
                with env.begin() as txn:
                    get = txn.get
                    for k in batch:
                        get(k)

        return loop

    return make


def _shared_cases(cache: Any, env: Any, value: bytes) -> dict[str, list[Case]]:
    """aiovmc's and lmdb's get, get_into and put of ``value``-sized values."""
    buf, lbuf = bytearray(len(value)), bytearray(len(value))
    return {
        "get": [
            Case("aiovmc", loop_over(cache.get)),
            Case("lmdb", loop_over(_lmdb_get_per_txn(env))),
            Case("lmdb, one txn per round", _lmdb_one_txn(env, None)),
        ],
        "get_into": [
            Case("aiovmc", loop_over(lambda k, get_into=cache.get_into: get_into(k, buf))),
            Case("lmdb", loop_over(_lmdb_get_into_per_txn(env, lbuf))),
            Case("lmdb, one txn per round", _lmdb_one_txn_into(env, lbuf)),
        ],
        "put": [
            Case("aiovmc", loop_over(lambda k, put=cache.put, v=value: put(k, v))),
            Case("lmdb", loop_over(_lmdb_put_per_txn(env, value))),
            Case("lmdb, one txn per round", _lmdb_one_txn(env, value)),
        ],
    }


def _measure(
    fam: Family, table: str, plan: list[tuple[str, list[Case], list[Any], int]], settings: Settings
) -> None:
    for col, cases, seq, per in plan:
        rounds = interleaved(cases, seq, settings)
        for name, ns in rounds.items():
            fam.add(table, name, col, [x / per for x in ns], "ns")
        say(f"  {col}: " + ", ".join(
            f"{n} {fmt(fam.value(table, n, col), 'ns')}" for n in rounds))  # fmt: skip


def _check(cache: Any, keys: list[bytes]) -> None:
    missing = sum(1 for k in keys if cache.get(k) is None)
    if missing:
        raise RuntimeError(f"aiovmc lost {missing} of {len(keys)} keys while filling")


def run(settings: Settings, fam: Family) -> None:
    n_keys = settings.pick(100_000, 100_000, 2_000)
    keys = [make_key(i) for i in range(n_keys)]
    order = [keys[i] for i in key_order(n_keys)]
    batches = [tuple(order[i : i + BATCH]) for i in range(0, n_keys, BATCH)]
    hot_keys = order[: min(HOT, n_keys)]
    hot = [hot_keys[i % len(hot_keys)] for i in key_order(n_keys, seed=7)]
    with RedisServer() as redis_server, scratch("sync") as d:
        rclient = redis_server.client()
        for size in (100, 4 * KiB):
            label = fmt(size, "B")
            value = make_value(size)
            say(f"  -- {label} values: filling {n_keys:,} keys in every store")
            cache = aiovmc.Cache(os.path.join(d, f"aiovmc-{size}"), size=1 * GiB if size > 256
                                 else 256 * MiB)  # fmt: skip
            env = lmdb.open(os.path.join(d, f"lmdb-{size}"), map_size=2 * GiB, sync=False,
                            writemap=True)  # fmt: skip
            dc = diskcache.Cache(os.path.join(d, f"diskcache-{size}"), size_limit=4 * GiB)
            lru: Any = cachetools.LRUCache(maxsize=2 * n_keys)
            rclient.flushall()
            with env.begin(write=True) as txn, dc.transact():
                pipe = rclient.pipeline(transaction=False)
                for k in keys:
                    cache.put(k, value)
                    txn.put(k, value)
                    dc.set(k, value)
                    lru[k] = value
                    pipe.set(k, value)
                pipe.execute()
            _check(cache, keys)
            shared = _shared_cases(cache, env, value)
            gets = shared["get"] + [
                Case("diskcache", loop_over(dc.get)),
                Case("cachetools", loop_over(lru.get)),
                Case("redis", loop_over(rclient.get)),
            ]
            puts = shared["put"] + [
                Case("diskcache", loop_over(lambda k, put=dc.set, v=value: put(k, v))),
                Case("cachetools", loop_over(lambda k, put=lru.__setitem__, v=value: put(k, v))),
                Case("redis", loop_over(lambda k, put=rclient.set, v=value: put(k, v))),
            ]
            plan: list[tuple[str, list[Case], list[Any], int]] = [
                (f"get {label}", gets, order, 1),
                (f"get_into {label}", shared["get_into"], order, 1),
                (f"put {label}", puts, order, 1),
            ]
            if size == 100:
                plan += [
                    (f"get {label}, 1,000 hot keys",
                     [c for c in gets if c.name not in ("diskcache", "redis")], hot, 1),
                    (f"get_many {label} (per key)",
                     [Case("aiovmc", loop_over(cache.get_many)),
                      Case("lmdb", _lmdb_batches(env))], batches, BATCH),
                ]  # fmt: skip
            try:
                _measure(fam, TABLE, plan, settings)
            finally:
                cache.close()
                env.close()
                dc.close()
        rclient.close()
    _large(settings, fam)


def _large(settings: Settings, fam: Family) -> None:
    """get, get_into and put of 64 KiB and 1 MiB values, aiovmc and lmdb only."""
    for size, n_keys in ((64 * KiB, settings.pick(4_000, 4_000, 200)),
                         (1 * MiB, settings.pick(256, 256, 16))):  # fmt: skip
        label = fmt(size, "B")
        value = make_value(size)
        keys = [make_key(i) for i in range(n_keys)]
        order = [keys[i] for i in key_order(n_keys)]
        say(f"  -- {label} values: filling {n_keys:,} keys in aiovmc and lmdb")
        with scratch("sync-large") as d:
            cache = aiovmc.Cache(os.path.join(d, "aiovmc"), size=max(256 * MiB, 3 * n_keys * size))
            env = lmdb.open(os.path.join(d, "lmdb"), map_size=2 * GiB, sync=False, writemap=True)
            try:
                with env.begin(write=True) as txn:
                    for k in keys:
                        cache.put(k, value)
                        txn.put(k, value)
                _check(cache, keys)
                shared = _shared_cases(cache, env, value)
                _measure(fam, LARGE, [(f"{op} {label}", shared[op], order, 1)
                                      for op in ("get", "get_into", "put")], settings)  # fmt: skip
            finally:
                cache.close()
                env.close()
