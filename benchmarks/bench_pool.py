"""How much of the pool holds values, and what one entry costs.

Utilisation: a 64 MiB cache (policy "lru", default extent size) receives puts of
fresh 16-byte keys with value sizes uniform in 256 B..17.5 KiB (one seed a round)
until the first eviction, then until 4× as many puts. `used_bytes / capacity`
comes from `statistics()`; live value bytes from a walk of `keys()` summing the
sizes stored (cross-checked with `get_into(key, bytearray(0))`, which returns a
stored size without copying); both are sampled along the way; one seed again with
64 B extents. Small values: the same with 100 B values (16 B keys) and 64 B extents
(`extent_size=64`: a 172 B entry takes 192 B), then with the default 256 B extents;
live key+value bytes at the end over the capacity and over the whole file (the
index and LRU heaps, sized for the file's entry budget, are outside the capacity).
Per-entry overhead: an empty 64 MiB cache receives fixed-size values until a quarter
of it is used, without eviction: (used_bytes − value bytes − key bytes) / entries.
Entry layout: values of growing size under fresh keys; the smallest allocation is
the first `used_bytes` step, and its fixed part what a 16 B key and the largest
value that still fits leave of it. Hot path: get and put (replace) of 100 B values,
100k keys in random order, in two 64 MiB caches of 64 B and 256 B extents, rounds
interleaved: what the finer unit (and its larger index) costs per operation.
"""

from __future__ import annotations

import os
import random
from typing import Any

from harness import (
    SEED,
    Case,
    Family,
    KiB,
    MiB,
    Plot,
    Settings,
    Table,
    fmt,
    interleaved,
    key_order,
    loop_over,
    make_key,
    median,
    say,
    scratch,
)

import aiovmc

TITLE = "Pool utilisation and per-entry overhead"
UTIL = "utilisation"
TABLES = [
    Table(UTIL, "64 MiB cache, values uniform in 256 B..17.5 KiB, 16 B keys, at the end of "
                "4× the puts of the first eviction (rounds: one seed each)"),
    Table("small values", "64 MiB cache, 100 B values, 16 B keys, after 2× the puts of the "
                          "first eviction; 64 B extents unless said"),
    Table("per-entry overhead", "Fixed-size values (16 B keys), a quarter of the pool used"),
    Table("entry layout", "The smallest allocation and an entry's fixed part"),
    Table("hot path", "100 B values, 16 B keys, 100k keys in random order, 64 MiB caches; "
                      "ns per operation, rounds interleaved"),
    Table("fill", "", Plot("lines", "bench_pool.png", "64 MiB cache, values 256 B..17.5 KiB",
                           xlabel="puts / puts at first eviction",
                           ylabel="fraction of capacity", hline=0.90, hline_label="target 0.90"),
          listed=False),
]  # fmt: skip
SIZE = 64 * MiB
LO, HI = 256, 17 * KiB + 512
KEY_LEN = 16
SMALL_SIZES = (16, 64, 100, 200, 1000, 4000)


def _key(i: int) -> bytes:
    return b"pool-%011d" % i


def _fill(
    d: str, seed: int, lo: int, hi: int, times: int, sample: bool, extent: int = 256
) -> dict[str, Any]:
    """Puts of sizes uniform in lo..hi until ``times`` × the puts of the first eviction,
    sampling the live bytes along the way if ``sample``."""
    rng = random.Random(seed)
    blob = memoryview(rng.randbytes(hi))
    sizes: dict[bytes, int] = {}
    samples: list[tuple[int, float, float]] = []
    path = os.path.join(d, f"fill-{seed}-{lo}-{extent}")
    with aiovmc.Cache(path, size=SIZE, extent_size=extent) as c:
        cap = c.capacity
        first = 0
        i = 0
        while not first or i < times * first:
            n = rng.randint(lo, hi)
            k = _key(i)
            c.put(k, blob[:n])
            sizes[k] = n
            i += 1
            if not first and c.statistics().evictions:
                first = i
            elif sample and first and i % max(1, first // 25) == 0:
                live = sum(sizes[k] for k in c.keys())  # noqa: SIM118 (a Cache)
                samples.append((i, c.statistics().used_bytes / cap, live / cap))
        st = c.statistics()
        ks = c.keys()
        walk = sum(sizes[k] for k in ks)
        buf = bytearray(0)
        stored = sum(c.get_into(k, buf) or 0 for k in ks)
        if stored != walk or len(ks) != st.entries:
            raise RuntimeError(
                f"seed {seed}: keys() holds {len(ks)} keys of {walk} value bytes, but "
                f"statistics() says {st.entries} entries and get_into {stored} bytes"
            )
        return {
            "capacity": cap, "first": first, "puts": i, "entries": st.entries,
            "used": st.used_bytes / cap, "live": walk / cap,
            "live_kv": (walk + KEY_LEN * len(ks)) / cap,
            "live_kv_file": (walk + KEY_LEN * len(ks)) / os.path.getsize(path),
            "min_live": min((s[2] for s in samples), default=walk / cap),
            "overhead": (st.used_bytes - walk - KEY_LEN * len(ks)) / len(ks),
            "samples": samples,
        }  # fmt: skip


def _overhead(d: str, value_size: int) -> tuple[int, float]:
    """Entries and used bytes per entry with fixed-size values, no eviction."""
    value = random.Random(SEED).randbytes(value_size)
    with aiovmc.Cache(os.path.join(d, f"overhead-{value_size}"), size=SIZE) as c:
        i = 0
        while i % 256 or c.statistics().used_bytes < c.capacity // 4:
            c.put(_key(i), value)
            i += 1
        st = c.statistics()
        if st.evictions:
            raise RuntimeError("the overhead fill evicted")
        return st.entries, st.used_bytes / st.entries


def _layout(d: str) -> tuple[int, int]:
    """The smallest allocation, and the largest value (16 B key) that fits in it."""
    with aiovmc.Cache(os.path.join(d, "layout"), size=4 * MiB) as c:
        deltas = []
        for v in range(1025):
            before = c.statistics().used_bytes
            c.put(_key(v), b"x" * v)
            deltas.append(c.statistics().used_bytes - before)
        return deltas[0], max(v for v, dl in enumerate(deltas) if dl == deltas[0])


def _hot_path(d: str, settings: Settings, fam: Family) -> None:
    """get and put (replace) of 100 B values with 64 B and 256 B extents."""
    n = settings.pick(100_000, 100_000, 2_000)
    keys = [make_key(i) for i in range(n)]
    order = [keys[i] for i in key_order(n)]
    value = b"v" * 100
    caches = {u: aiovmc.Cache(os.path.join(d, f"hot-{u}"), size=SIZE, extent_size=u)
              for u in (64, 256)}  # fmt: skip
    try:
        for c in caches.values():
            for k in keys:
                c.put(k, value)
        for op in ("get", "put"):
            cases = [
                Case(f"{u} B extents", loop_over(c.get) if op == "get"
                     else loop_over(lambda k, put=c.put: put(k, value)))
                for u, c in caches.items()
            ]  # fmt: skip
            rounds = interleaved(cases, order, settings)
            row = f"{op} 100 B" if op == "get" else "put 100 B (replace)"
            for name, ns in rounds.items():
                fam.add("hot path", row, name, ns, "ns")
            ratio = median(rounds["64 B extents"]) / median(rounds["256 B extents"])
            fam.add("hot path", row, "64 B / 256 B", ratio, "")
            say(f"  {row}: 64 B extents / 256 B extents {ratio:.3f}")
    finally:
        for c in caches.values():
            c.close()


def run(settings: Settings, fam: Family) -> None:
    seeds = [SEED + s for s in range(settings.rounds)]
    with scratch("pool") as d:
        runs = [_fill(d, s, LO, HI, 4, sample=True) for s in seeds]
        mix64 = _fill(d, SEED, LO, HI, 4, sample=False, extent=64)
        small = {unit: _fill(d, SEED, 100, 100, 2, sample=False, extent=unit)
                 for unit in (64, 256)}  # fmt: skip
        over = {vs: _overhead(d, vs) for vs in SMALL_SIZES}
        extent, fits = _layout(d)
        _hot_path(d, settings, fam)
    col = "median of seeds"
    for label, k, unit in (
        ("used_bytes / capacity", "used", ""),
        ("live value bytes / capacity", "live", ""),
        ("live value bytes / capacity, lowest after the 1st eviction", "min_live", ""),
        ("overhead per entry, mixed sizes (excl. key)", "overhead", "B"),
        ("puts at the first eviction", "first", ""),
    ):
        fam.add(UTIL, label, col, [r[k] for r in runs], unit)
    fam.add(UTIL, "capacity / file size", col, runs[0]["capacity"] / SIZE, "")
    fam.add(UTIL, "live value bytes / capacity, 64 B extents", col, mix64["live"], "")
    fam.add(UTIL, "capacity / file size, 64 B extents", col, mix64["capacity"] / SIZE, "")
    for unit, row in (
        (64, "100 B values, 16 B keys"),
        (256, "100 B values, 16 B keys, 256 B extents (the default)"),
    ):
        r = small[unit]
        fam.add("small values", row, "live key+value bytes / capacity", r["live_kv"], "")
        fam.add("small values", row, "live key+value bytes / file size", r["live_kv_file"], "")
        fam.add("small values", row, "entries", r["entries"], "")
    for vs, (entries, used) in over.items():
        row = f"{vs} B values"
        fam.add("per-entry overhead", row, "entries", entries, "")
        fam.add("per-entry overhead", row, "used bytes per entry", used, "B")
        fam.add("per-entry overhead", row, "overhead (excl. key)", used - vs - KEY_LEN, "B")
    fam.add("entry layout", "smallest allocation", "bytes", extent, "B")
    fam.add("entry layout", "largest value it holds with a 16 B key", "bytes", fits, "B")
    fam.add("entry layout", "fixed part of an entry (header, checksum, ...)", "bytes",
            extent - KEY_LEN - fits, "B")  # fmt: skip
    r0 = runs[0]
    for i, used, live in r0["samples"]:
        x = i / r0["first"]
        fam.add("fill", "used_bytes / capacity", f"{x:.2f}", used, "", x=x)
        fam.add("fill", "live value bytes / capacity", f"{x:.2f}", live, "", x=x)
    say(f"  capacity {fmt(r0['capacity'], 'B')} of {fmt(SIZE, 'B')}; live values "
        f"{median([r['live'] for r in runs]):.3f} of capacity ({mix64['live']:.3f} with 64 B "
        f"extents); 100 B values: live key+value / capacity, / file "
        + ", ".join(f"{small[u]['live_kv']:.3f}, {small[u]['live_kv_file']:.3f} with {u} B extents"
                    for u in (64, 256))
        + f"; smallest allocation {extent} B")  # fmt: skip
