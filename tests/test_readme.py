"""README.md, as a newcomer meets it: its programs run, and its two commands work from
a fresh clone in a fresh virtual environment.

The fresh-clone test installs the package twice and runs the whole suite inside
itself, so it is opt-in locally (``AIOVMC_README=1``); `.ci/run` runs the same two
commands, extracted by `tests/readme.py`, on every CI run.
"""

from __future__ import annotations

import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

from .helpers import run_program
from .readme import README, assert_demo_consistent, commands, programs

ROOT = README.parent


def test_readme_shows_two_commands() -> None:
    install_demo, install_test = commands()
    assert install_demo.startswith("pip install . ") and install_demo.endswith("aiovmc demo")
    assert install_test.endswith("python -m pytest")


@pytest.mark.parametrize("index", range(len(programs())))
def test_readme_program_runs(index: int) -> None:
    program = programs()[index]
    assert re.search(r'"/dev/shm/[\w.-]+"', program), "README programs share a named file"
    done = run_program(program)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.strip()


@pytest.mark.skipif(os.environ.get("AIOVMC_README") != "1",
                    reason="installs twice and runs the suite inside: AIOVMC_README=1 runs it")
def test_readme_commands_in_a_fresh_clone(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AIOVMC_README", "VIRTUAL_ENV")}
    outputs = []
    for n, command in enumerate(commands()):
        clone, env_dir = tmp_path / f"clone{n}", tmp_path / f"venv{n}"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
        venv.create(env_dir, with_pip=True)
        env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=1500, check=False)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    demo, suite = outputs
    assert_demo_consistent(demo, workers=4, tasks=100)
    summary = suite.rstrip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary
