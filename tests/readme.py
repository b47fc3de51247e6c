"""What README.md tells a newcomer to run, extracted from README.md itself, and what its
first command (the demo) must print.

`.ci/run` runs the two commands exactly as printed (``python3 tests/readme.py``
prints them, one a line), and `tests/test_readme.py` runs them and the README's
programs, so neither can drift from what a reader copies.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), re.M | re.S)


def commands() -> list[str]:
    """The shell commands of the README's "Two commands" section, in order."""
    section = README.read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^```console\n(.*?)\n```$", section, re.M | re.S)
    if len(found) != 2 or any("\n" in command for command in found):
        raise ValueError("README.md's 'Two commands' section must hold two one-line commands")
    return found


def programs() -> list[str]:
    """The Python programs the README shows."""
    return _blocks("python")


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return int(found.group(1).replace(",", ""))


def assert_demo_consistent(out: str, workers: int, tasks: int) -> None:
    """The demo's figures agree with each other, and the host loads a cold key once."""
    assert f"{workers} worker processes share one cache file" in out
    assert f"asked at once by every task: {workers * tasks} gets" in out
    assert "ran once on the whole host" in out
    rows = [line.split() for line in out.splitlines()]
    pids = [row for row in rows if len(row) == 3 and row[0].isdigit()]
    (total,) = [row[1:3] for row in rows if len(row) >= 3 and row[0] == "all"]
    assert len(pids) == workers
    gets, loads = (int(n.replace(",", "")) for n in total)
    assert sum(int(row[1].replace(",", "")) for row in pids) == gets
    assert sum(int(row[2].replace(",", "")) for row in pids) == loads
    file_gets = _number(r"gets ([\d,]+) = hits", out)
    hits = _number(r"= hits ([\d,]+) \+", out)
    misses = _number(r"\+ misses ([\d,]+);", out)
    assert hits + misses == file_gets == workers * tasks + gets
    loader_calls = _number(r"loader calls ([\d,]+) \(", out)
    assert loader_calls == 1 + loads
    assert _number(r"entries ([\d,]+),", out) == loader_calls  # one load per key on the host
    assert "each key was loaded once on the whole host" in out


if __name__ == "__main__":
    sys.stdout.write("".join(command + "\n" for command in commands()))
