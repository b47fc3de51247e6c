# ruff: noqa: RUF003  (µ, ×, −, – are meant: they are printed)
"""Shared machinery of the benchmark families: timing, key orders, peers, results.

Method (the same for every family, see benchmarks/README.md):

* every figure is the median of several rounds (``Settings.rounds``, at least 5),
  after ``Settings.warmup`` untimed rounds;
* a timed round is one tight loop, timed with ``time.perf_counter_ns`` around the
  whole loop, with the garbage collector disabled (and the objects alive before the
  series frozen, see ``gc_frozen``); per-op time = loop time / ops;
* key orders are drawn once from ``random.Random(SEED)`` before anything is timed;
* peers are measured in the same process and the same run, their rounds
  interleaved with aiovmc's, so drift of the machine hits every library alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import importlib.metadata
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

SEED = 20240601
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Where the cache files of every library live: the same medium for all of them.
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    warmup: int
    # target wall time of one timed round of a per-op loop (slow peers do fewer ops)
    round_seconds: float
    # fixed duration of one round of the throughput families
    duration: float

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick=True, rounds=5, warmup=1, round_seconds=0.04, duration=0.4)
        return cls(quick=False, rounds=7, warmup=1, round_seconds=0.15, duration=1.5)


# --------------------------------------------------------------------------- output


def say(msg: str = "") -> None:
    print(msg, flush=True)


def fmt_ns(ns: float) -> str:
    if ns != ns:  # NaN
        return "n/a"
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.2f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))
    return s[k]


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """The garbage collector disabled for a timed loop (no collection inside it)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Collect once, then freeze every live object for a series of rounds.

    Frozen objects are never scanned again, so the collections that run between
    rounds stay cheap even with millions of live objects (a peer holding 100k
    entries); a ``gc.collect()`` before every round took a second here.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def timed(fn: Callable[[], Any]) -> int:
    """Run ``fn`` once with the GC off; return its wall time in ns."""
    with gc_off():
        t0 = time.perf_counter_ns()
        fn()
        t1 = time.perf_counter_ns()
    return t1 - t0


@dataclasses.dataclass
class Case:
    """One thing to time: ``make(keys)`` returns a zero-argument loop over ``keys``."""

    name: str
    make: Callable[[list[Any]], Callable[[], Any]]
    # ops per round; None = decide by calibration (slow peers do fewer ops)
    ops: int | None = None


def calibrate_ops(case: Case, order: list[Any], settings: Settings) -> int:
    """Pick how many ops one round of ``case`` does so it lasts ~round_seconds."""
    if case.ops is not None:
        return min(case.ops, len(order))
    probe = order[:1_000]
    fn = case.make(probe)
    fn()  # warm
    ns = timed(fn) / len(probe)
    want = int(settings.round_seconds * 1e9 / max(ns, 1.0))
    lo = 1_000 if settings.quick else 2_000
    return max(min(lo, len(order)), min(len(order), want))


def interleaved(
    cases: Sequence[Case], order: list[Any], settings: Settings
) -> dict[str, list[float]]:
    """Time every case, rounds interleaved; return ns/op per round for each case.

    Each case gets its own op count (calibrated), and round ``r`` walks the slice of
    the pre-generated random ``order`` starting at ``r * ops`` (wrapping), so rounds
    of a slow peer do not all hit the same few keys.
    """
    n = len(order)
    plan: list[tuple[Case, int, list[Callable[[], Any]]]] = []
    for case in cases:
        ops = calibrate_ops(case, order, settings)
        fns = []
        for r in range(settings.warmup + settings.rounds):
            start = (r * ops) % n
            keys = (order[start:] + order[:start])[:ops] if ops < n else order
            fns.append(case.make(keys))
        plan.append((case, ops, fns))
    out: dict[str, list[float]] = {case.name: [] for case in cases}
    with gc_frozen():
        for r in range(settings.warmup + settings.rounds):
            for case, ops, fns in plan:
                ns = timed(fns[r])
                if r >= settings.warmup:
                    out[case.name].append(ns / ops)
    return out


def key_order(n: int, count: int | None = None, *, seed: int = SEED) -> list[int]:
    """A fixed pseudo-random order of ``count`` indices into ``range(n)``."""
    rng = random.Random(seed)
    idx = list(range(n))
    rng.shuffle(idx)
    if count is not None and count > n:
        more = [rng.randrange(n) for _ in range(count - n)]
        idx.extend(more)
    return idx[: count or n]


def make_key(i: int) -> bytes:
    """16-byte keys, the same for every library."""
    return b"key-%012d" % i


def make_value(size: int, *, seed: int = SEED) -> bytes:
    return random.Random(seed + size).randbytes(size)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Ratio:
    """aiovmc / peer for one metric, with the DESIGN.md §8 target when there is one."""

    what: str
    aiovmc: float
    peer_name: str
    peer: float
    unit: str
    better: str  # "lower" or "higher": which direction is good for the aiovmc figure
    target: float | None = None  # the ratio bound of DESIGN.md §8
    note: str = ""

    @property
    def ratio(self) -> float:
        if not self.peer or self.peer != self.peer or self.aiovmc != self.aiovmc:
            return float("nan")
        return self.aiovmc / self.peer

    @property
    def verdict(self) -> str:
        r = self.ratio
        if self.target is None or r != r:
            return "info" if self.target is None else "n/a"
        ok = r <= self.target if self.better == "lower" else r >= self.target
        return "PASS" if ok else "MISS"

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        d["verdict"] = self.verdict
        return d


@dataclasses.dataclass
class Check:
    """An absolute target (not a ratio), e.g. "≥ 0.90 of capacity"."""

    what: str
    value: float
    unit: str
    target: float | None
    better: str  # "lower", "higher" or "equal"
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None or self.value != self.value:
            return "info" if self.target is None else "n/a"
        if self.better == "equal":
            ok = self.value == self.target
        elif self.better == "lower":
            ok = self.value <= self.target
        else:
            ok = self.value >= self.target
        return "PASS" if ok else "MISS"

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict
        return d


class FamilyResult:
    """What one family hands back to run.py (and to the JSON file)."""

    def __init__(self, name: str, title: str) -> None:
        self.name = name
        self.title = title
        self.data: dict[str, Any] = {}
        self.ratios: list[Ratio] = []
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.t0 = time.time()

    def note(self, msg: str) -> None:
        say(f"  note: {msg}")
        self.notes.append(msg)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - self.t0, 1),
            "data": self.data,
            "ratios": [r.as_dict() for r in self.ratios],
            "checks": [c.as_dict() for c in self.checks],
            "notes": self.notes,
        }


def print_ratios(ratios: Sequence[Ratio]) -> None:
    for r in ratios:
        tgt = ""
        if r.target is not None:
            tgt = f"  target {'≤' if r.better == 'lower' else '≥'} {r.target:g}  {r.verdict}"
        fa = fmt_ns(r.aiovmc) if r.unit == "ns" else f"{r.aiovmc:,.4g} {r.unit}"
        fp = fmt_ns(r.peer) if r.unit == "ns" else f"{r.peer:,.4g} {r.unit}"
        say(f"  {r.what:<44} {fa:>12} vs {r.peer_name:<22} {fp:>12}  ratio {r.ratio:6.3f}{tgt}")


def relation(better: str) -> str:
    return {"lower": "≤", "higher": "≥", "equal": "="}[better]


def print_checks(checks: Sequence[Check]) -> None:
    for c in checks:
        tgt = ""
        if c.target is not None:
            tgt = f"  target {relation(c.better)} {c.target:g}  {c.verdict}"
        say(f"  {c.what:<56} {c.value:,.4g} {c.unit}{tgt}")


# --------------------------------------------------------------------------- aiovmc


def aiovmc_module() -> Any | None:
    """The aiovmc package if its sync core is importable, else None."""
    try:
        mod = importlib.import_module("aiovmc")
        mod.Cache  # noqa: B018 - probing
    except Exception as exc:
        say(f"  aiovmc not available ({type(exc).__name__}: {exc})")
        return None
    return mod


def has_async(mod: Any) -> bool:
    return mod is not None and hasattr(mod, "AsyncCache")


def has_reserve(mod: Any) -> bool:
    return mod is not None and hasattr(mod.Cache, "reserve")


def peer(name: str) -> Any | None:
    """Import an optional peer; None (and a printed note) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        say(f"  peer {name!r} not installed: skipped (pip install -e '.[bench]')")
        return None


def scratch(prefix: str, base: str | None = None) -> str:
    """A fresh directory on tmpfs (or ``base``) for one library's files."""
    return tempfile.mkdtemp(prefix=f"aiovmc-bench-{prefix}-", dir=base or SHM)


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def disk_dir() -> str:
    """A directory on a block device (not tmpfs), for the persistence family."""
    for d in ("/var/tmp", "/tmp", os.path.expanduser("~")):
        if os.path.isdir(d) and fs_type(d) not in ("tmpfs", "ramfs"):
            return d
    return "/var/tmp"


def fs_type(path: str) -> str:
    """The filesystem type of ``path`` from /proc/mounts (longest mount prefix)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1]
                    if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(
                        best
                    ):
                        best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


# --------------------------------------------------------------------------- redis


class RedisServer:
    """A private redis-server, no persistence, stopped by ``stop``: on a unix socket,
    or with ``tcp=True`` on a free 127.0.0.1 port (for clients that take only a
    host and port). ``url`` says where it listens."""

    def __init__(self, *, tcp: bool = False) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="aiovmc-bench-redis-", dir="/tmp")
        self.sock = os.path.join(self.dir, "redis.sock")
        self.port = 0
        if tcp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.sock}"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> Any:
        """Start the server; a connected redis-py client once it answers."""
        import redis

        where = (["--port", str(self.port), "--bind", "127.0.0.1"] if self.port
                 else ["--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700"])
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", *where, "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--maxmemory", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            client = (redis.Redis(host="127.0.0.1", port=self.port) if self.port
                      else redis.Redis(unix_socket_path=self.sock))
            try:
                client.ping()
                return client
            except redis.exceptions.ConnectionError:
                client.close()
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- machine


def idle_fraction(seconds: float = 1.0) -> float:
    """The fraction of CPU time idle machine-wide over ``seconds`` (from /proc/stat).

    Below ~0.9 on an otherwise idle run something else competes for the CPUs.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        return sum(vals), vals[3] + vals[4]

    try:
        t1, i1 = sample()
        time.sleep(seconds)
        t2, i2 = sample()
    except OSError:
        return float("nan")
    return (i2 - i1) / max(1, t2 - t1)


def lib_versions() -> dict[str, str]:
    names = [
        "aiovmc",
        "cffi",
        "anyio",
        "trio",
        "uvloop",
        "lmdb",
        "diskcache",
        "cachetools",
        "async-lru",
        "cachebox",
        "theine",
        "aiocache",
        "cashews",
        "redis",
        "matplotlib",
    ]
    out: dict[str, str] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "-"
    if shutil.which("redis-server"):
        try:
            v = subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True, timeout=5
            ).stdout
            out["redis-server"] = v.split("v=")[1].split()[0] if "v=" in v else v.strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            out["redis-server"] = "?"
    else:
        out["redis-server"] = "-"
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k in (
                "Model name",
                "CPU(s)",
                "Thread(s) per core",
                "Core(s) per socket",
                "Hypervisor vendor",
                "L2 cache",
                "L3 cache",
            ):
                info[k] = v
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            info["MemTotal"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    info["shm_fs"] = fs_type(SHM)
    info["disk_dir"] = disk_dir()
    info["disk_fs"] = fs_type(info["disk_dir"])
    return info
