"""`python -m aiovmc`: the demo a newcomer runs first, and the stats command."""

from __future__ import annotations

import subprocess
import sys

import aiovmc


def test_demo_runs_workers_sharing_one_file() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiovmc", "demo", "--workers", "3", "--seconds", "0.5"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3 worker processes" in out and "shared statistics" in out
    rows = [line.split() for line in out.splitlines()]
    worker_rows = [row for row in rows if len(row) == 3 and row[0].isdigit()]
    assert len(worker_rows) == 3
    assert "hit ratio" in out


def test_stats_command(cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size=1 << 20) as c:
        c.put(b"k", b"v")
        c.get(b"k")
    result = subprocess.run(
        [sys.executable, "-m", "aiovmc", "stats", cache_path],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert "1 entries" in result.stdout and "hits            1" in result.stdout
