"""The C core under the sanitizers: tests/native/stress.c, many threads on one
handle doing every operation on a few keys (large values take the unlocked
copy path), built with ThreadSanitizer (data races: C11 undefined behaviour)
and with AddressSanitizer + UndefinedBehaviorSanitizer and the core's debug
assertions. Each build must run clean, and every value read must verify.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZERS = {
    "thread": ["-fsanitize=thread"],
    "address,undefined": [
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
        "-DVMC_DEBUG",
    ],
}
# Seconds (x100) of stress per build: bounded for CI; AIOVMC_SLOW=1 runs longer.
DURATION = "3000" if os.environ.get("AIOVMC_SLOW") == "1" else "250"


@pytest.mark.parametrize("sanitizer", list(SANITIZERS))
def test_the_core_under_threads_is_sanitizer_clean(tmp_path: Any, sanitizer: str) -> None:
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    assert compiler, "a C compiler is needed to build aiovmc"
    binary = str(tmp_path / "stress")
    # The core without the CPython fast path (vmc_fast.c needs Python.h; the
    # stress drives the no-wait calls it makes, vmc_get_sink and vmc_contains_now).
    sources = sorted(
        path
        for path in glob.glob(os.path.join(ROOT, "native", "vmc_*.c"))
        if os.path.basename(path) != "vmc_fast.c"
    )
    build = subprocess.run(
        [compiler, "-O1", "-g", "-std=gnu11", "-D_GNU_SOURCE", "-Wall", "-Wextra",
         "-Wno-unused-parameter", "-Werror", *SANITIZERS[sanitizer],
         "-I", os.path.join(ROOT, "native"), *sources,
         os.path.join(ROOT, "tests", "native", "stress.c"), "-o", binary, "-lpthread"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 history_size=4",
               ASAN_OPTIONS="detect_leaks=1 abort_on_error=0")
    env.pop("LD_PRELOAD", None)
    run = subprocess.run(
        [binary, str(tmp_path / "stress.cache"), "4", DURATION],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert run.returncode == 0 and "Sanitizer" not in run.stderr, run.stderr[-5000:]
    assert "0 failures" in run.stdout
