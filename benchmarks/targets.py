"""The performance targets of DESIGN.md §8, declared once, as data.

Each ``Target`` is one row of §8's table; each of its ``Bound``s names the figures
it reads by key (``family: table | row | col``, see ``harness.Figure``): a figure
alone, or a figure over a peer's figure (a ratio). A row is met when every bound
is, missed when one measured bound is missed; a bound whose figures were not
measured otherwise leaves the row unverified, with the reason, never passed. A
row's ``context`` figures are shown beside its bounds and never judged: what the
machine allows, measured in the same run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

OPS = {"<=": ("≤", float.__le__), ">=": ("≥", float.__ge__), "==": ("=", float.__eq__)}


@dataclasses.dataclass(frozen=True)
class Bound:
    label: str  # what this bound checks, shown with its measured figure
    figure: str
    op: str  # "<=", ">=" or "=="
    limit: float
    per: str | None = None  # the peer's figure: the bound is on figure / per


@dataclasses.dataclass(frozen=True)
class Target:
    what: str  # the §8 row
    target: str  # as §8 states it
    bounds: tuple[Bound, ...]
    unmeasured: str = ""  # why this machine cannot measure it (no bounds then)
    context: tuple[tuple[str, str], ...] = ()  # (label, figure) shown beside, not judged
    context_title: str = ""  # what the context figures are


def _sync(col: str, row: str = "aiovmc") -> str:
    return f"sync: per op | {row} | {col}"


def _ratio(label: str, col: str, limit: float, peer_col: str | None = None) -> Bound:
    return Bound(label, _sync(col), "<=", limit, _sync(peer_col or col, "lmdb"))


TARGETS: tuple[Target, ...] = (
    Target("sync `get` hit, 100 B, 100k keys random", "≤ 0.6 × lmdb",
           (_ratio("", "get 100 B", 0.6),)),
    Target("sync `get` hit, 100 B, 1,000 hot keys", "≤ 0.3 × lmdb",
           (_ratio("", "get 100 B, 1,000 hot keys", 0.3),)),
    Target("sync `get` hit, 4 KiB, 100k keys random", "≤ 0.7 × lmdb",
           (_ratio("", "get 4 KiB", 0.7),)),
    Target("`get_many`, 100 keys a call, 100 B, random", "≤ 0.3 × lmdb per key",
           (_ratio("", "get_many 100 B (per key)", 0.3, "get 100 B"),)),
    Target("sync `put` 100 B and 4 KiB (replace)", "≤ 0.6 × lmdb",
           (_ratio("100 B", "put 100 B", 0.6), _ratio("4 KiB", "put 4 KiB", 0.6))),
    Target("awaited `AsyncCache.get` hit (asyncio, trio)",
           "≤ 1.5 × sync hit and ≤ 0.5 × async-lru's hit",
           (*(Bound(f"{b} / sync", f"async: hit path | aiovmc await get ({b}) | per hit",
                    "<=", 1.5, f"async: hit path | aiovmc Cache.get (sync) [{b}] | per hit")
              for b in ("asyncio", "trio")),
            Bound("asyncio / async-lru", "async: hit path | aiovmc await get (asyncio) | per hit",
                  "<=", 0.5, "async: hit path | async-lru hit | per hit"))),
    Target("2 processes reading / putting (2 cores)", "≥ 1.9 × / ≥ 1.5 × one process",
           (Bound("reading", "scaling: 2 processes / 1 | aiovmc | get", ">=", 1.9),
            Bound("putting", "scaling: 2 processes / 1 | aiovmc | put", ">=", 1.5)),
           context=tuple((ref, f"scaling: 2 processes / 1 | {ref} | get")
                         for ref in ("1k-key dict per process",
                                     "100k-key dict per process", "bare mapping reads")),
           context_title="this machine's ceiling, readers sharing nothing (same run)"),
    Target("16 processes reading / 10 % puts, on a 16-core machine",
           "≥ 12 × / ≥ 10 × one process", (),
           unmeasured="needs 16 cores; the `scaling` family measures 1 and 2 processes "
                      "(10 % puts included) on this machine"),
    Target("64 MiB value get", "≥ 0.8 × `bytes(memoryview(mmap)[...])` bandwidth",
           (Bound("", "async: 64 MiB copies | aiovmc Cache.get | GiB/s", ">=", 0.8,
                  "async: 64 MiB copies | bytes(memoryview(mmap)[a:b]) | GiB/s"),)),
    # How late the loop handled an I/O event while the copies ran (the longest of a
    # round, median of rounds): what a stall does to a server, GIL waits and CPU
    # taken by the copy threads included; not the longest step on the loop thread,
    # which misses both. bench_async.py, section 3; the idle baseline is its table's
    # "idle (no workers)" row.
    Target("event-loop stall during concurrent 64 MiB gets/puts", "≤ 1 ms",
           tuple(Bound(b, f"async: loop stall: event lateness | {b} offloaded | 64 MiB",
                       "<=", 1.0) for b in ("asyncio", "trio"))),
    Target("pool utilisation, random values 256 B–17.5 KiB", "≥ 0.90 of capacity",
           (Bound("", "pool: utilisation | live value bytes / capacity | median of seeds",
                  ">=", 0.90),)),
    Target("live key+value bytes / capacity, 100 B values, 16 B keys", "≥ 0.6",
           (Bound("extent_size=64",
                  "pool: small values | 100 B values, 16 B keys | live key+value bytes / capacity",
                  ">=", 0.6),)),
    Target("one cold key, 500 tasks in one process", "exactly 1 loader call",
           tuple(Bound(b, f"async: stampede | aiovmc ({b}) | loader calls (max of rounds)",
                       "==", 1) for b in ("asyncio", "trio"))),
    Target("one cold key, 4 processes × 100 tasks (§9)",
           "exactly 1 loader call; waiters woken ≤ 1 ms (median) after the publication; "
           "waiters' CPU ≤ 2 % of a core during a 2 s load; SIGKILLed leader taken over "
           "≤ 0.5 s",
           (Bound("loader calls", "flight: loader calls | aiovmc host | max", "==", 1),
            Bound("wake asyncio", "flight: wake latency | asyncio | median", "<=", 1.0),
            Bound("wake trio", "flight: wake latency | trio | median", "<=", 1.0),
            Bound("CPU", "flight: waiters' CPU | aiovmc host | max per process", "<=", 2.0),
            Bound("takeover", "flight: takeover | SIGKILLed leader | max", "<=", 0.5))),
    Target("cached GET through the ASGI middleware, 2 workers under gunicorn (§10)",
           "≥ 0.8 × req/s of the same app answering a constant without any cache; "
           "≥ 2 × fastapi-cache2 with its redis backend",
           (Bound("/ plain", "web: wrk | aiovmc | req/s", ">=", 0.8, "web: wrk | plain | req/s"),
            Bound("/ fastapi-cache2 redis", "web: wrk | aiovmc | req/s", ">=", 2.0,
                  "web: wrk | fc-redis | req/s"))),
    Target("`TieredCache` L1 hit / invalidation across hosts (§11)",
           "≤ 1.1 × `AsyncCache` hit / ≤ 50 ms p99 on loopback",
           (*(Bound(f"hit {b}", f"tiered: hit path | TieredCache.get (L1 hit) | {b}", "<=",
                    1.1, f"tiered: hit path | AsyncCache.get | {b}")
              for b in ("asyncio", "trio")),
            Bound("invalidation p99", "tiered: invalidation | TieredCache: new value read | p99",
                  "<=", 50.0))),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Verdict:
    target: Target
    measured: list[tuple[Bound, float]]  # each bound's figure (or ratio)
    missing: list[tuple[Bound, str]]  # the bounds not measured, each with a missing key
    context: list[tuple[str, float]]  # the target's context figures that were measured
    verdict: str  # "PASS", "MISS" or "not measured"


def judge(target: Target, lookup: Callable[[str], float | None]) -> Verdict:
    """The verdict on one §8 row, from ``lookup(key)`` (None: not measured)."""
    measured: list[tuple[Bound, float]] = []
    missing: list[tuple[Bound, str]] = []
    for b in target.bounds:
        keys = [b.figure] + ([b.per] if b.per else [])
        values = [v for v in map(lookup, keys) if v is not None]
        if len(values) < len(keys):
            missing.append((b, next(k for k in keys if lookup(k) is None)))
        else:
            measured.append((b, values[0] / (values[1] if b.per else 1.0)))
    if not all(OPS[b.op][1](v, b.limit) for b, v in measured):
        verdict = "MISS"  # a bound measured and missed: whatever the others say
    elif missing or not target.bounds:
        verdict = "not measured"
    else:
        verdict = "PASS"
    context = [(label, v) for label, key in target.context if (v := lookup(key)) is not None]
    return Verdict(target, measured, missing, context, verdict)


def judge_all(figures: Mapping[str, float]) -> list[Verdict]:
    return [judge(t, figures.get) for t in TARGETS]
