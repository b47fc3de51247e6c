"""``python -m aiovmc``: a demonstration, and a look inside a cache file.

    python -m aiovmc demo [--workers 4] [--tasks 100] [--seconds 2] [--keys 2000] [--keep]
    python -m aiovmc stats PATH
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from ._cache import Cache
from ._demo import demo


def show_stats(path: str) -> int:
    with Cache(path) as cache:
        stats = cache.statistics()
        print(f"{path}: {stats.entries} entries, {stats.used_bytes} of {stats.capacity} bytes used")
        for field in dataclasses.fields(stats):
            print(f"  {field.name:15} {getattr(stats, field.name)}")
        print(f"  committed timestamp {cache.committed_timestamp}, "
              f"persisted timestamp {cache.persisted_timestamp}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiovmc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="worker processes sharing one cache file")
    run.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    run.add_argument("--tasks", type=int, default=100, help="asyncio tasks per worker (100)")
    run.add_argument("--seconds", type=float, default=2.0, help="length of the traffic (2)")
    run.add_argument("--keys", type=int, default=2000, help="distinct keys of the traffic (2000)")
    run.add_argument("--keep", action="store_true", help="keep the cache file afterwards")
    inspect = commands.add_parser("stats", help="print the statistics of a cache file")
    inspect.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.workers, args.tasks, args.seconds, args.keys, args.keep)
    return show_stats(args.path)


if __name__ == "__main__":
    sys.exit(main())
