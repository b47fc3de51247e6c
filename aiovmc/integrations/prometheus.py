"""A prometheus_client collector for an aiovmc cache.

    from prometheus_client import REGISTRY
    from aiovmc.integrations.prometheus import CacheCollector
    REGISTRY.register(CacheCollector(cache, name="pages"))

The counters live in the cache file and are shared by every process using it,
so any one worker reports the host's totals: no prometheus_client multiprocess
mode is needed (and several workers exporting the same file report the same
numbers). prometheus_client is imported when a collector is created.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .._async_cache import AsyncCache
from .._cache import Cache
from .._metrics import METRICS, Metric, metric_values

__all__ = ["CacheCollector"]


class CacheCollector:
    """Collects `aiovmc_*` metrics of `cache` (a `Cache` or an `AsyncCache`)
    with the label ``cache=name``: counters ``aiovmc_gets_total``,
    ``_hits_total``, ``_misses_total``, ``_puts_total``, ``_evictions_total``,
    ``_expirations_total``, ``_loader_calls_total``, ``_coalesced_gets_total``,
    ``_load_takeovers_total``; gauges ``aiovmc_entries``, ``aiovmc_used_bytes``,
    ``aiovmc_capacity_bytes``."""

    def __init__(self, cache: Cache | AsyncCache, name: str = "default") -> None:
        from prometheus_client import metrics_core

        if not isinstance(cache, (Cache, AsyncCache)):
            raise TypeError(
                f"cache must be an aiovmc Cache or AsyncCache, not {type(cache).__name__}"
            )
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        self.cache = cache
        self.name = name
        self._core = metrics_core

    def describe(self) -> Iterator[Any]:
        """The metric families, without reading the cache (registration time)."""
        for metric in METRICS:
            yield self._family(metric)

    def collect(self) -> Iterator[Any]:
        for metric, value in metric_values(self.cache.statistics()):
            family = self._family(metric)
            family.add_metric([self.name], value)
            yield family

    def _family(self, metric: Metric) -> Any:
        core = self._core
        kind = core.CounterMetricFamily if metric.kind == "counter" else core.GaugeMetricFamily
        return kind(metric.name, metric.help, labels=["cache"])
