"""`python -m aiovmc stats` (read-only: not a byte of the file changes) and the
Prometheus collector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import aiovmc
from aiovmc._metrics import METRICS
from aiovmc.integrations.prometheus import CacheCollector

USER = textwrap.dedent(
    """
    import sys, aiovmc
    cache = aiovmc.Cache(sys.argv[1], size="2MiB")
    for i in range(10):
        cache.put(f"k{i}", b"v" * 300)
    for i in range(15):
        cache.get(f"k{i}")
    r = cache.reserve("half-written", 1000)  # open while the process lives (or dies)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def stats(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiovmc", "stats", path, *args],
                          capture_output=True, text=True, timeout=60, check=False)


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.name.endswith("_created")}


def check_unchanged(path: str) -> dict[str, Any]:
    """Every format, every byte of the file before and after."""
    before = Path(path).read_bytes()
    text = stats(path)
    prom = stats(path, "--format", "prometheus", "--name", "pages")
    js = stats(path, "--format", "json")
    assert Path(path).read_bytes() == before
    for done in (text, prom, js):
        assert done.returncode == 0 and done.stderr == "", done.stderr
    record: dict[str, Any] = json.loads(js.stdout)
    assert f"entries         {record['entries']}" in text.stdout
    for field in aiovmc.CacheStatistics.__dataclass_fields__:
        assert field in record and f"  {field} " in text.stdout
    values = samples(prom.stdout)
    assert values['aiovmc_hits_total'] == record["hits"]
    assert {m.name + ("_total" if m.kind == "counter" else "") for m in METRICS} == set(values)
    return record


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_stats_changes_no_byte(cache_path: str, ending: str) -> None:
    with subprocess.Popen([sys.executable, "-c", USER, cache_path], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as user:
        assert user.stdout is not None and user.stdout.readline() == "ready\n"
        record = check_unchanged(cache_path)  # while another process uses the file
        assert (record["puts"], record["gets"], record["hits"], record["misses"]) == (10, 15, 10, 5)
        assert record["entries"] == 10 and record["used_bytes"] > 10 * 300
        if ending == "exit":
            user.communicate("\n", timeout=60)
        else:  # dead with a reservation open: what a normal open would recover and reclaim
            user.kill()
    after = check_unchanged(cache_path)  # and when no process does
    if ending == "exit":  # closing cancelled the reservation
        assert after["used_bytes"] < record["used_bytes"]
        after["used_bytes"] = record["used_bytes"]
    assert after == record
    with aiovmc.Cache(cache_path) as cache:  # the next real open still recovers it
        assert cache.statistics().entries == 10


def test_watch_prints_rates(cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        cache.put("a", b"1")
        done = stats(cache_path, "--format", "json", "--watch", "0.05", "--count", "2")
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert "rates_per_second" not in first
    assert second["rates_per_second"]["puts"] == 0.0 and "entries" not in second["rates_per_second"]


def test_stats_refuses_what_is_not_a_cache(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a cache" * 1000)
    done = stats(str(junk))
    assert done.returncode == 1 and "not an aiovmc cache file" in done.stderr
    assert junk.read_bytes() == b"not a cache" * 1000
    link = tmp_path / "link"
    link.symlink_to(junk)
    assert "symbolic link" in stats(str(link)).stderr
    assert "does not exist" in stats(str(tmp_path / "none")).stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening must not wait for a writer
    assert "not a regular file" in stats(str(fifo)).stderr
    assert stats(str(junk), "--watch", "0").returncode == 2


@pytest.mark.anyio
async def test_collector_reports_the_files_counters(cache_path: str) -> None:
    async with aiovmc.AsyncCache(cache_path, size="1MiB") as cache:
        await cache.put("a", b"1")
        await cache.get("a")
        await cache.get("b")
        registry = CollectorRegistry()
        registry.register(CacheCollector(cache, name="pages"))
        exported = samples(generate_latest(registry).decode())
        assert exported["aiovmc_gets_total"] == 2 and exported["aiovmc_hits_total"] == 1
        assert exported["aiovmc_capacity_bytes"] == cache.cache.capacity
        # the CLI writes the same samples itself
        assert samples(stats(cache_path, "--format", "prometheus", "--name", "pages").stdout) \
            == exported
        with aiovmc.Cache(cache_path) as other:  # another handle on the file: the same totals
            registry = CollectorRegistry()
            registry.register(CacheCollector(other, name="pages"))
            assert samples(generate_latest(registry).decode()) == exported


def test_collector_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="Cache or AsyncCache"):
        CacheCollector("/dev/shm/x.cache")  # type: ignore[arg-type]


def test_import_aiovmc_imports_no_framework() -> None:
    code = ("import sys, aiovmc, aiovmc.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'aiohttp', 'litestar', 'prometheus_client', "
            "'fastapi_cache', 'httpx', 'uvicorn', 'redis')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert done.stdout.strip() == "[]"
