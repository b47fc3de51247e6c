"""``python -m aiovmc``: a demonstration, and a look inside a cache file.

    python -m aiovmc demo [--workers 4] [--seconds 2] [--keys 2000]
    python -m aiovmc stats PATH
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._cache import Cache
from ._demo import demo


def show_stats(path: str) -> int:
    with Cache(path) as cache:
        stats = cache.statistics()
        print(f"{path}: {stats.entries} entries, {stats.used_bytes} of {stats.capacity} bytes used")
        for field in ("puts", "gets", "hits", "misses", "evictions", "expirations"):
            print(f"  {field:12} {getattr(stats, field)}")
        print(f"  committed timestamp {cache.committed_timestamp}, "
              f"persisted timestamp {cache.persisted_timestamp}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiovmc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="several processes sharing one cache file")
    run.add_argument("--workers", type=int, default=4)
    run.add_argument("--seconds", type=float, default=2.0)
    run.add_argument("--keys", type=int, default=2000)
    inspect = commands.add_parser("stats", help="print the statistics of a cache file")
    inspect.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.workers, args.seconds, args.keys)
    return show_stats(args.path)


if __name__ == "__main__":
    sys.exit(main())
