"""``python -m aiovmc``: a demonstration, and a look inside a cache file.

    python -m aiovmc demo [--workers 4] [--tasks 100] [--seconds 2] [--keys 2000] [--keep]
    python -m aiovmc stats PATH [--format text|json|prometheus] [--watch SECONDS]

``stats`` reads the file without changing a byte of it (see `aiovmc._metrics`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence

from ._demo import demo
from ._errors import AiovmcError
from ._metrics import Snapshot, metric_values, read_snapshot, render_prometheus


def _text(snap: Snapshot, rates: dict[str, float] | None) -> str:
    stats = snap.statistics
    entries = "1 entry" if stats.entries == 1 else f"{stats.entries} entries"
    lines = [f"{snap.path}: {entries}, {stats.used_bytes} of {stats.capacity} bytes used"]
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        rate = "" if rates is None or field.name not in rates else f"  {rates[field.name]:.1f}/s"
        lines.append(f"  {field.name:15} {value}{rate}")
    lines.append(f"  timestamps: last publication {snap.last_timestamp}, "
                 f"persisted up to {snap.persisted_timestamp}")
    return "\n".join(lines)


def _json(snap: Snapshot, rates: dict[str, float] | None) -> str:
    record: dict[str, object] = {
        "path": snap.path,
        **dataclasses.asdict(snap.statistics),
        "last_timestamp": snap.last_timestamp,
        "persisted_timestamp": snap.persisted_timestamp,
    }
    if rates is not None:
        record["rates_per_second"] = rates
    return json.dumps(record)


def show_stats(path: str, fmt: str, watch: float | None, count: int | None, name: str) -> int:
    """Print the file's statistics; with `watch`, again every `watch` seconds
    with rates per second (`count` reports in all; None: until interrupted)."""
    previous: tuple[float, Snapshot] | None = None
    printed = 0
    try:
        while True:
            snap = read_snapshot(path)
            now = time.monotonic()
            rates = None
            if previous is not None:
                elapsed = max(now - previous[0], 1e-9)
                before = dict(metric_values(previous[1].statistics))
                rates = {
                    metric.field: (value - before[metric]) / elapsed
                    for metric, value in metric_values(snap.statistics)
                    if metric.kind == "counter"
                }
            if fmt == "json":
                print(_json(snap, rates), flush=True)
            elif fmt == "prometheus":
                print(render_prometheus(snap.statistics, name), end="", flush=True)
            else:
                print(_text(snap, rates), flush=True)
            printed += 1
            if watch is None or (count is not None and printed >= count):
                return 0
            previous = (now, snap)
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `stats ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (AiovmcError, OSError) as exc:
        print(f"python -m aiovmc stats: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiovmc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="worker processes sharing one cache file")
    run.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    run.add_argument("--tasks", type=int, default=100, help="asyncio tasks per worker (100)")
    run.add_argument("--seconds", type=float, default=2.0, help="length of the traffic (2)")
    run.add_argument("--keys", type=int, default=2000, help="distinct keys of the traffic (2000)")
    run.add_argument("--keep", action="store_true", help="keep the cache file afterwards")
    inspect = commands.add_parser(
        "stats", help="print the statistics of a cache file (read-only: changes no byte of it)"
    )
    inspect.add_argument("path")
    inspect.add_argument("--format", choices=("text", "json", "prometheus"), default="text")
    inspect.add_argument("--watch", type=float, metavar="SECONDS",
                         help="print again every SECONDS, with rates per second")
    inspect.add_argument("--count", type=int, metavar="N",
                         help="with --watch: stop after N reports")
    inspect.add_argument("--name", help="the 'cache' label of the prometheus format "
                                        "(default: the path)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.workers, args.tasks, args.seconds, args.keys, args.keep)
    if args.watch is not None and args.watch <= 0:
        parser.error(f"--watch takes a positive number of seconds, not {args.watch}")
    return show_stats(args.path, args.format, args.watch, args.count, args.name or args.path)


if __name__ == "__main__":
    sys.exit(main())
