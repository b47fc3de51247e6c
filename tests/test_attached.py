"""Attached corruption: every count, offset, tag and flag field of the header,
the shard table, the index, the LRU heaps, the entries and the free extents
(docs/format.md) is mutated in a live mapping, then operations run. Each
attempt runs in a forked child with a time limit. The rule: no signal, no hang,
no value that was never put (errors are allowed: damage is repaired, and what
repair cannot vouch for is dropped).

The bounded run (CI) gives every (field, mutation) pair one sequence of
operations, rotating through them; AIOVMC_SLOW=1 runs every sequence on every
pair.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest

import aiovmc

from .helpers import (
    ENTRY_FIELDS_AT,
    FLIGHT_FIELDS,
    FREE_FIELDS,
    HEADER_FIELDS,
    MUTATIONS,
    SHARD_FIELDS,
    extents,
    make_value,
    read_header,
    run_attempts,
)

OP_SEQUENCES = [
    ["get", "put", "len", "keys"],
    ["delete", "get", "len"],
    ["clear"],
    ["reserve", "evict", "timestamps", "get"],
    ["load", "get", "len"],
]


def _build(path: str) -> tuple[dict[bytes, bytes], bytes, bytes]:
    """A file nearly full of entries, one of them scattered over several
    extents. Returns (key -> value, a one-extent key, the scattered key)."""
    expect: dict[bytes, bytes] = {}
    with aiovmc.Cache(path, size="1MiB", extent_size=256) as cache:
        n = cache.capacity // 2048
        for i in range(n):
            key = b"key-%04d" % i
            expect[key] = make_value(key, i, 1900)
            cache.put(key, expect[key])
        for key in list(expect)[::2]:  # holes of 8 units, and no long free run
            cache.delete(key)
            del expect[key]
        chained = b"chained"
        expect[chained] = make_value(chained, 0, 6000)
        cache.put(chained, expect[chained])
        assert set(cache.keys()) == set(expect)
    with open(path, "rb") as f:
        data = f.read()
    hdr = read_header(data)
    heads = {off: n for off, n, kind in extents(data, hdr) if kind == 0x44414548}
    assert len(heads) == len(expect)
    return expect, min(k for k in expect if k != chained), chained


def _targets(small: bytes, chained: bytes) -> list[list[Any]]:
    s, c = small.hex(), chained.hex()
    out: list[list[Any]] = [
        ["header", name] for name in HEADER_FIELDS if not name.startswith("free_head")
    ]
    out += [["header", f"free_head[{k}]"] for k in (0, 1, 2, 3, 10, 12)]
    out += [["shard", s, name] for name in SHARD_FIELDS]
    out += [["slot", s, name] for name in ("unit", "tag")]
    out += [["heap", s, name] for name in ("key", "unit", "gen")]
    out += [["entry", s, name] for name in ENTRY_FIELDS_AT]
    out += [["entry", c, name] for name in ("tag", "next", "value_len", "key_len")]
    out += [["body", c, name] for name in ("tag", "next", "head")]
    out += [["free", name] for name in FREE_FIELDS]
    out += [["flight", s, name] for name in FLIGHT_FIELDS]
    out += [
        ["reserved", name]
        for name in ("tag", "state", "link_prev", "link_next", "atime_ns", "value_len")
    ]
    return out


def test_attached_mutations_give_no_signal_no_hang_no_wrong_value(tmp_path: Any) -> None:
    pristine = str(tmp_path / "pristine.cache")
    expect, small, chained = _build(pristine)
    slow = os.environ.get("AIOVMC_SLOW") == "1"
    pairs = list(itertools.product(_targets(small, chained), MUTATIONS))
    specs: list[dict[str, Any]] = []
    for i, (target, mutation) in enumerate(pairs):
        sequences = OP_SEQUENCES if slow else [OP_SEQUENCES[i % len(OP_SEQUENCES)]]
        for ops in sequences:
            specs.append(
                {
                    "pristine": pristine,
                    "path": str(tmp_path / f"attempt-{len(specs)}.cache"),
                    "target": target,
                    "mutation": mutation,
                    "ops": ops,
                    "timeout": 30.0,
                }
            )
    results = run_attempts(specs, expect, timeout=60.0 + 1.0 * len(specs))
    failures = []
    ran = 0
    for spec, result in zip(specs, results, strict=True):
        outcome = result["outcome"]
        ran += outcome == "ok"
        if outcome not in ("ok", "skipped") or result.get("wrong"):
            failures.append((spec["target"], spec["mutation"], spec["ops"], result))
    assert not failures, "\n".join(map(repr, failures[:20])) + f"\n({len(failures)} in all)"
    assert ran >= len(specs) * 0.9, f"only {ran} of {len(specs)} attempts found their field"


@pytest.mark.parametrize("field", ["count", "heap_len"])
def test_a_shard_count_damaged_while_attached_is_repaired_not_trusted(
    cache_path: str, field: str
) -> None:
    """A bit flipped in a shard's heap_len or count, then a delete (a SIGSEGV
    before), len() (4 billion) and puts (silent evictions)."""
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        for i in range(50):
            cache.put(b"k%d" % i, b"v%d" % i)
        with open(cache_path, "r+b") as f:
            data = f.read()
            from .helpers import resolve_target

            where = resolve_target(data, ["shard", b"k7".hex(), field])
            assert where is not None
            off, size = where
            f.seek(off)
            f.write((int.from_bytes(data[off : off + size], "little") ^ (1 << 30)).to_bytes(
                size, "little"
            ))
        assert cache.delete(b"k7")
        assert len(cache) == 49
        for i in range(50):
            assert cache.get(b"k%d" % i) == (None if i == 7 else b"v%d" % i)
