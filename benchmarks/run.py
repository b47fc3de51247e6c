# ruff: noqa: RUF003  (µ, ×, −, – are meant: they are printed)
"""Run aiovmc's benchmarks side by side with its peers; see benchmarks/README.md.

    python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--json OUT] [--no-report]

Each family prints its medians and the ratios aiovmc / peer (with the DESIGN.md §8
target and PASS/MISS where there is one), and its results go to one JSON file
(default ``benchmarks/results/full.json``, or ``quick.json`` with ``--quick``).
``--only`` replaces just those families in an existing results file. A full run then
renders the plots (``docs/img/bench_*.png``) and the generated tables of
``docs/benchmarks.md`` (``python benchmarks/report.py`` does that alone).
"""

from __future__ import annotations

import argparse
import atexit
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
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import (  # noqa: E402
    Settings,
    aiovmc_module,
    idle_fraction,
    lib_versions,
    machine,
    print_checks,
    print_ratios,
    say,
)

# Order matters a little: the multi-process family runs before anything has started
# threads in this process; the async family (worker threads) runs late.
FAMILIES: dict[str, str] = {
    "sync": "bench_sync",
    "scaling": "bench_scaling",
    "pool": "bench_pool",
    "async": "bench_async",
    "persist": "bench_persist",
    "flight": "bench_flight",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="fewer and shorter rounds (whole suite in ~3 minutes)"
    )
    ap.add_argument(
        "--only", metavar="NAME", help="comma-separated families to run: " + ", ".join(FAMILIES)
    )
    ap.add_argument(
        "--json", metavar="OUT", help="results file (default benchmarks/results/{full,quick}.json)"
    )
    ap.add_argument(
        "--no-report", action="store_true", help="do not render plots and docs/benchmarks.md tables"
    )
    ap.add_argument(
        "--report", action="store_true", help="render plots and tables even after --quick"
    )
    return ap.parse_args(argv)


def snapshot_aiovmc() -> dict[str, Any]:
    """Copy the aiovmc package (with its compiled core) to a private directory and
    import it from there, for this process and the processes it spawns.

    An editable install follows the work tree: a rebuild during a run would give
    the worker processes another build than the parent (and another file format).
    """
    info: dict[str, Any] = {}
    spec = importlib.util.find_spec("aiovmc")
    if spec is None or not spec.submodule_search_locations:
        return info
    src = next(iter(spec.submodule_search_locations))
    root = os.path.dirname(src)
    try:
        rev = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    dst_root = tempfile.mkdtemp(prefix="aiovmc-bench-snapshot-")
    shutil.copytree(
        src, os.path.join(dst_root, "aiovmc"), ignore=shutil.ignore_patterns("__pycache__")
    )
    sys.path.insert(0, dst_root)
    atexit.register(shutil.rmtree, dst_root, True)
    info.update({"source": src, "git": rev, "snapshot": dst_root})
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM runs the same clean-up as Ctrl-C (temporary files, redis-server).
    signal.signal(signal.SIGTERM, _terminate)
    snap = snapshot_aiovmc()
    names = list(FAMILIES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in FAMILIES]
        if unknown:
            say(f"unknown family {unknown}; choose from {', '.join(FAMILIES)}")
            return 2
    settings = Settings.make(args.quick)
    out = args.json or os.path.join(HERE, "results", "quick.json" if args.quick else "full.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    results: dict[str, Any] = {"meta": {}, "families": {}}
    if args.only and os.path.exists(out):
        with open(out) as f:
            results = json.load(f)
    meta = results.setdefault("meta", {})
    meta.update(
        {
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": settings.quick,
            "rounds": settings.rounds,
            "warmup": settings.warmup,
            "machine": machine(),
            "versions": lib_versions(),
        }
    )
    meta.setdefault("runs", []).append(
        {"argv": sys.argv[1:], "families": names, "started": meta["updated"]}
    )
    meta["runs"] = meta["runs"][-10:]

    say(
        f"aiovmc benchmarks ({'quick' if settings.quick else 'full'}): "
        f"{settings.rounds} rounds + {settings.warmup} warm-up, medians; families: "
        + ", ".join(names)
    )
    m = meta["machine"]
    say(f"machine: {m.get('Model name', '?')}, {m.get('cpus')} CPUs, Python {m['python']}")
    aiovmc = aiovmc_module()
    if snap and aiovmc is not None:
        meta["aiovmc"] = {"source": snap["source"], "git": snap["git"]}
        say(f"aiovmc {snap['git'] or ''} from {snap['source']} (snapshot for this run)")

    t_all = time.monotonic()
    for name in names:
        say(f"\n== {name} ==")
        # Is anything else running? Every figure, the 2-process one most, suffers if so.
        idle = idle_fraction(1.0)
        load_before = os.getloadavg()
        if idle < 0.9:
            say(
                f"  WARNING: the CPUs were only {idle:.0%} idle just before this family "
                f"(load average {load_before[0]:.2f}): other processes compete for them"
            )
        t0 = time.monotonic()
        try:
            mod = importlib.import_module(FAMILIES[name])
            fam = mod.run(settings, aiovmc)
            d = fam.as_dict()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            traceback.print_exc()
            d = {
                "name": name,
                "error": f"{type(exc).__name__}: {exc}",
                "data": {},
                "ratios": [],
                "checks": [],
                "notes": [],
            }
        d["quick"] = settings.quick
        # the 1-minute load average before and after: > ~0.3 means someone else was busy
        d["loadavg"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        d["idle_before"] = round(idle, 3)
        results["families"][name] = d
        say(f"   ({time.monotonic() - t0:.1f} s)")
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=1, sort_keys=False, default=_json_default)
        os.replace(out + ".tmp", out)

    say(f"\n== summary ({time.monotonic() - t_all:.0f} s) -> {os.path.relpath(out)} ==")
    from _common import Check, Ratio

    for name in names:
        fam = results["families"].get(name, {})
        if fam.get("error"):
            say(f"[{name}] ERROR {fam['error']}")
            continue
        rs = [r for r in fam.get("ratios", []) if r.get("target") is not None]
        cs = [c for c in fam.get("checks", []) if c.get("target") is not None]
        if rs or cs:
            say(f"[{name}]")
            print_ratios([Ratio(**{k: r[k] for k in Ratio.__dataclass_fields__}) for r in rs])
            print_checks([Check(**{k: c[k] for k in Check.__dataclass_fields__}) for c in cs])

    if not args.no_report and (args.report or not settings.quick):
        try:
            import report

            report.render(out)
        except Exception:
            traceback.print_exc()
            say("report rendering failed; results are in " + out)
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _json_default(o: Any) -> Any:
    if hasattr(o, "as_dict"):
        return o.as_dict()
    if isinstance(o, float):
        return None
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
