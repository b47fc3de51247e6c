"""Run aiovmc's benchmark families side by side with its peers; see benchmarks/README.md.

    python benchmarks/run.py [--quick | --smoke] [--only NAME[,NAME...]] [--json OUT]
                             [--no-report]

Every family's figures are merged into the results file (default
benchmarks/results/results.json): a family run replaces that family's figures, the
others are kept. docs/benchmarks.md is then regenerated from the whole file
(benchmarks/report.py) unless ``--no-report``, ``--smoke`` or another ``--json``.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "results.json")
FORMAT = 2

# The order matters a little: the multi-process families run before anything has
# started threads in this process.
FAMILIES = ("sync", "scaling", "pool", "flight", "persist", "async", "tiered", "web")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    mode.add_argument("--smoke", action="store_true",
                      help="each family's smallest configuration once (checks the harness)")
    ap.add_argument("--only", metavar="NAME", help="families to run: " + ", ".join(FAMILIES))
    ap.add_argument("--json", metavar="OUT", help=f"results file (default {RESULTS})")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate the docs page")
    return ap.parse_args(argv)  # fmt: skip


def snapshot_aiovmc() -> dict[str, str]:
    """Import aiovmc (with its compiled core) from a private copy, in this process and
    the processes it spawns: a rebuild of an editable install during a run must not
    give the workers another build than the parent."""
    spec = importlib.util.find_spec("aiovmc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("aiovmc is not installed: pip install -e '.[bench]'")
    src = next(iter(spec.submodule_search_locations))
    git = subprocess.run(["git", "-C", src, "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
    dst = tempfile.mkdtemp(prefix="aiovmc-bench-snapshot-")
    shutil.copytree(src, os.path.join(dst, "aiovmc"), ignore=shutil.ignore_patterns("__pycache__"))
    atexit.register(shutil.rmtree, dst, True)
    sys.path.insert(0, dst)
    os.environ["PYTHONPATH"] = os.pathsep.join([dst, HERE, os.environ.get("PYTHONPATH", "")])
    return {"source": src, "git": git}


def load(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {"format": FORMAT, "families": {}}
    with open(path) as f:
        results: dict[str, Any] = json.load(f)
    if results.get("format") != FORMAT:
        raise RuntimeError(f"{path} is not a format-{FORMAT} results file: move it away")
    return results


def run_family(name: str, settings: Any, aiovmc_info: dict[str, str]) -> dict[str, Any]:
    import harness

    idle = harness.idle_fraction(1.0)
    load_before = os.getloadavg()[0]
    if idle < 0.9:
        harness.say(f"  WARNING: the CPUs were {idle:.0%} idle just before this family (load "
                    f"average {load_before:.2f}): other processes compete for them")
    mod = importlib.import_module(f"bench_{name}")
    fam = harness.Family(mod.TABLES)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.monotonic()
    mod.run(settings, fam)
    return {
        "title": mod.TITLE, "doc": mod.__doc__.strip(), "mode": settings.mode,
        "rounds": settings.rounds, "warmup": settings.warmup, "started": started,
        "seconds": round(time.monotonic() - t0, 1), "idle_before": round(idle, 3),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "aiovmc": aiovmc_info, "machine": harness.machine(), "versions": harness.versions(),
        "tables": [dataclasses.asdict(t) for t in fam.tables.values()],
        "figures": [dataclasses.asdict(f) for f in fam.figures.values()],
        "notes": fam.notes,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        print(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
        return 2
    signal.signal(signal.SIGTERM, _terminate)  # the same clean-up as Ctrl-C
    aiovmc_info = snapshot_aiovmc()
    sys.path.insert(1, HERE)
    import harness
    import report

    settings = harness.Settings.make("smoke" if args.smoke else "quick" if args.quick else "full")
    out = args.json or (os.path.join(tempfile.gettempdir(), "aiovmc-bench-smoke.json")
                        if args.smoke else RESULTS)  # fmt: skip
    results = load(out) if not args.smoke else {"format": FORMAT, "families": {}}
    harness.say(f"aiovmc benchmarks, {settings.mode}: {settings.rounds} rounds + "
                f"{settings.warmup} warm-up; {', '.join(names)}; aiovmc {aiovmc_info['git']} "
                f"from {aiovmc_info['source']}")  # fmt: skip
    for name in names:
        harness.say(f"\n== {name} ==")
        results["families"][name] = run_family(name, settings, aiovmc_info)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out + ".tmp", out)
        harness.say(f"   ({results['families'][name]['seconds']} s) -> {out}")
    harness.say("\n== DESIGN.md §8 ==")
    for line in report.summary(results):
        harness.say(line)
    if not (args.no_report or args.smoke or args.json):
        report.render(out)
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
