"""Statistics for people and monitoring: read-only snapshots of a file, and
the metric names shared by `python -m aiovmc stats` and the Prometheus
collector (`aiovmc.integrations.prometheus`), which add no dependency here."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import NamedTuple

from ._cache import CacheStatistics
from ._native import peek

__all__ = ["METRICS", "Metric", "Snapshot", "read_snapshot", "render_prometheus"]


class Metric(NamedTuple):
    field: str  # the CacheStatistics field
    name: str  # the Prometheus name (a counter's without its _total suffix)
    kind: str  # "counter" or "gauge"
    help: str


METRICS = (
    Metric("gets", "aiovmc_gets", "counter", "Keys looked up by get, get_into and get_many."),
    Metric("hits", "aiovmc_hits", "counter", "Lookups that found their key."),
    Metric("misses", "aiovmc_misses", "counter", "Lookups that did not find their key."),
    Metric("puts", "aiovmc_puts", "counter", "Values stored by put, add, publish and loaders."),
    Metric("evictions", "aiovmc_evictions", "counter",
           "Entries evicted to make room or by evict()."),
    Metric("expirations", "aiovmc_expirations", "counter", "Entries dropped because they expired."),
    Metric("loader_calls", "aiovmc_loader_calls", "counter", "Loader (on_miss) calls."),
    Metric("coalesced_gets", "aiovmc_coalesced_gets", "counter",
           "Gets answered by a load that another task or process ran."),
    Metric("load_takeovers", "aiovmc_load_takeovers", "counter",
           "Loads taken over from a failed, cancelled, dead or timed-out leader."),
    Metric("entries", "aiovmc_entries", "gauge", "Entries stored."),
    Metric("used_bytes", "aiovmc_used_bytes", "gauge",
           "Pool bytes held by entries and open reservations, overhead included."),
    Metric("capacity", "aiovmc_capacity_bytes", "gauge", "Usable pool bytes."),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A cache file's statistics as read by `read_snapshot`."""

    path: str
    statistics: CacheStatistics
    last_timestamp: int
    persisted_timestamp: int


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """The statistics of the cache file at `path`, read without changing a byte
    of it (no lock, no recovery, no reclaim, no counter), whether other
    processes use it or none does."""
    raw, last, persisted = peek(os.fspath(path))
    fields = dataclasses.fields(CacheStatistics)
    stats = CacheStatistics(**{f.name: int(getattr(raw, f.name, 0)) for f in fields})
    return Snapshot(os.fspath(path), stats, last, persisted)


def metric_values(stats: CacheStatistics) -> Iterator[tuple[Metric, int]]:
    for metric in METRICS:
        yield metric, int(getattr(stats, metric.field, 0))


def render_prometheus(stats: CacheStatistics, cache: str) -> str:
    """The Prometheus text exposition format (version 0.0.4) of `stats`."""
    label = cache.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines = []
    for metric, value in metric_values(stats):
        name = f"{metric.name}_total" if metric.kind == "counter" else metric.name
        lines.append(f"# HELP {name} {metric.help}")
        lines.append(f"# TYPE {name} {metric.kind}")
        lines.append(f'{name}{{cache="{label}"}} {value}')
    return "\n".join(lines) + "\n"
