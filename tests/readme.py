"""What README.md tells a newcomer to run, extracted from README.md itself.

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


if __name__ == "__main__":
    sys.stdout.write("".join(command + "\n" for command in commands()))
