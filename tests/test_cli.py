"""`python -m aiovmc`: the demo a newcomer runs first, and the stats command."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import aiovmc

from .readme import assert_demo_consistent


def test_demo_output_is_consistent() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiovmc", "demo", "--workers", "3", "--tasks", "20",
         "--seconds", "0.5", "--keys", "300"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert_demo_consistent(result.stdout, workers=3, tasks=20)


def test_stats_command_shows_every_counter(cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size=1 << 20) as c:
        c.put(b"k", b"v")
        c.get(b"k")
        stats = c.statistics()
    result = subprocess.run(
        [sys.executable, "-m", "aiovmc", "stats", cache_path],
        capture_output=True, text=True, timeout=60, check=True,
    )
    printed = dict(re.findall(r"^\s+(\w+)\s+(\d+)$", result.stdout, re.M))
    assert printed == {f.name: str(getattr(stats, f.name)) for f in dataclasses.fields(stats)}
    assert printed["hits"] == "1" and printed["entries"] == "1"
