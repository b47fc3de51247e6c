"""Hostile files: never crash the interpreter, never return a wrong value.

Every attempt to open a damaged or foreign file runs in a child process (a
forked child of a fresh interpreter, see helpers.run_attempts), so that a
segfault or a hang is reported as such instead of taking pytest down.

The rules (DESIGN.md §3, §5, §6):
- anything that is not a sound aiovmc file (empty, truncated, foreign, random,
  corrupt header) is refused with CacheFormatError and left byte-for-byte
  untouched;
- a file whose header is sound but whose shard table, index or pool is
  damaged is recovered by its first opener, who verifies checksums: every get
  returns the exact original value or a miss, and the cache keeps working;
- corruption while attached is outside the trust model, but still must not
  crash the process.

`AIOVMC_SLOW=1` runs many more mutations.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aiovmc

from .helpers import (
    ENTRY,
    KIND_BODY,
    KIND_HEAD,
    PAGE,
    extents,
    forge_header,
    make_value,
    private_file_stats,
    read_header,
    run_attempts,
)

# Where the mutable part of the header page lives (native/vmc_format.h):
# struct vmc_pool at 128 (its mutex first), then the clock block at 320.
POOL_OFF, POOL_MUTEX_SIZE = 128, 40
CLOCK_OFF, PERSISTED_OFF, NEEDS_REPAIR_OFF = 320, 384, 392
SHARD_MUTEX_SIZE = 40  # the mutex opens every struct vmc_shard
FLIGHT_LOCK_OFF, FLIGHT_LOCK_SIZE = 448, 40  # the flight table's mutex, in the header page


@pytest.fixture(scope="module")
def hostile_dir() -> Iterator[Path]:
    base = (
        Path("/dev/shm")
        if os.access("/dev/shm", os.W_OK)
        else Path(os.environ.get("TMPDIR", "/tmp"))
    )
    path = base / f"aiovmc-hostile-{uuid.uuid4().hex}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Template:
    """A populated, closed cache file: values scattered over BODY extents,
    some with a TTL, the pool fragmented."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "template.cache"
        rng = random.Random(5)
        with aiovmc.Cache(self.path, size="1MiB") as cache:
            i = 0
            while cache.statistics().used_bytes < 0.97 * cache.capacity:
                key = b"s%d" % i
                cache.put(key, make_value(key, i, 140))
                i += 1
            for j in range(0, i, 2):  # holes everywhere: big values must scatter
                cache.delete(b"s%d" % j)
            for j in range(40):
                key = b"t%d" % j
                cache.put(
                    key,
                    make_value(key, j, rng.choice((60, 500, 3000, 9000))),
                    ttl=3600 if j % 3 == 0 else None,
                )
            self.expect = {key: cache[key] for key in list(cache.keys())}
        self.data = self.path.read_bytes()
        self.hdr = read_header(self.data)
        self.extents = extents(self.data, self.hdr)
        assert any(kind == KIND_BODY for _, _, kind in self.extents), "no scattered value"
        assert len(self.expect) > 1000


@pytest.fixture(scope="module")
def template(hostile_dir: Path) -> Template:
    return Template(hostile_dir)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def _describe(spec: dict[str, Any], res: dict[str, Any]) -> str:
    extra = {k: v for k, v in spec.items() if k not in ("path", "attached_flips")}
    return f"{spec['path']} {extra} -> {res}"


def _assert_refused_untouched(specs: list[dict[str, Any]], digests: list[str]) -> None:
    results = run_attempts(specs)
    for spec, res, digest in zip(specs, results, digests, strict=True):
        assert res["outcome"] == "error", _describe(spec, res)
        assert res["type"] == "CacheFormatError", _describe(spec, res)
        assert spec["path"] in res["message"], f"the message does not name the file: {res}"
        assert _digest(Path(spec["path"])) == digest, f"{spec['path']} was modified"


def _assert_sound(
    specs: list[dict[str, Any]],
    template: Template,
    *,
    refusal_ok: bool,
    allowed_op_errors: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Each attempt either opens a cache that returns only exact original
    values (or misses) and keeps working, or (if `refusal_ok`) is refused with
    CacheFormatError leaving the file untouched. Never a crash or a hang."""
    digests = [_digest(Path(s["path"])) for s in specs]
    results = run_attempts(specs, template.expect)
    for spec, res, digest in zip(specs, results, digests, strict=True):
        what = _describe(spec, res)
        assert res["outcome"] in ("ok", "error"), what
        if res["outcome"] == "error":
            assert refusal_ok and res["type"] == "CacheFormatError", what
            assert _digest(Path(spec["path"])) == digest, f"refused but modified: {what}"
            continue
        assert not res["wrong"], f"wrong values returned: {what}"
        errors = [e for e in res["op_errors"] if not e.startswith(allowed_op_errors or ("\0",))]
        assert not errors, f"the recovered cache does not work: {what}"
        assert res["entries"] == res["len"], what
        assert res["used_bytes"] <= res["capacity"], what
    return results


# ---------------------------------------------------------------------------
# Not a cache at all: refused, untouched
# ---------------------------------------------------------------------------

OPEN_MODES = [{}, {"size": "1MiB"}, {"size": "1MiB", "reset": True}]


def test_empty_file_is_refused_untouched(hostile_dir: Path) -> None:
    specs, digests = [], []
    for i, kwargs in enumerate(OPEN_MODES):
        path = _write(hostile_dir, f"empty{i}", b"")
        specs.append({"path": str(path), "kwargs": kwargs, "check": False})
        digests.append(_digest(path))
    _assert_refused_untouched(specs, digests)
    for spec in specs:
        assert os.path.getsize(str(spec["path"])) == 0


def test_truncated_or_extended_files_are_refused_untouched(
    hostile_dir: Path, template: Template
) -> None:
    size = len(template.data)
    pool = template.hdr["pool_off"]
    cuts = {
        1,
        7,
        8,
        12,
        95,
        96,
        97,
        200,
        template.hdr["_size"],
        PAGE - 1,
        PAGE,
        PAGE + 1,
        3 * PAGE,
        template.hdr["index_off"],
        pool - 1,
        pool,
        pool + 1,
        size // 2,
        size - PAGE,
        size - 256,
        size - 1,
    }
    rng = random.Random(11)
    cuts |= {rng.randrange(1, size) for _ in range(15)}
    specs, digests = [], []
    for cut in sorted(cuts):
        path = _write(hostile_dir, f"cut{cut}", template.data[:cut])
        specs.append({"path": str(path), "kwargs": rng.choice(OPEN_MODES[:2]), "check": False})
        digests.append(_digest(path))
    for extra in (1, 4096, 1 << 20):
        path = _write(hostile_dir, f"ext{extra}", template.data + b"\0" * extra)
        specs.append({"path": str(path), "check": False})
        digests.append(_digest(path))
    _assert_refused_untouched(specs, digests)


def _foreign_files() -> dict[str, bytes]:
    rng = random.Random(3)
    png = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + rng.randbytes(2000)
    text = b"".join(b"line %d of a perfectly ordinary text file\n" % i for i in range(40000))
    sqlite = b"SQLite format 3\0" + rng.randbytes(PAGE * 256 - 16)
    elf = Path(sys.executable).read_bytes()[: 1 << 20]
    return {
        "png": png,
        "text": text,
        "sqlite": sqlite,
        "elf": elf,
        "zeros": bytes(1 << 20),
        "ones": b"\xff" * (1 << 20),
        "random-small": rng.randbytes(300),
        "random-page": rng.randbytes(PAGE),
        "random-1MiB": rng.randbytes(1 << 20),
        # The right magic, then garbage: a corrupt header, not a cache.
        "magic-random": b"AIOVMC\x00\x01" + rng.randbytes((1 << 20) - 8),
        "magic-zeros": b"AIOVMC\x00\x01" + bytes((1 << 20) - 8),
    }


def test_foreign_and_random_files_are_refused_untouched(hostile_dir: Path) -> None:
    """A PNG, a text file, an executable, a SQLite database, random bytes...:
    CacheFormatError whatever the open mode (attach, create, reset), and
    not one byte changed."""
    specs, digests = [], []
    for name, data in _foreign_files().items():
        # reset=True recreates a file that carries the aiovmc magic (that is
        # what it is for); anything else it refuses like the other modes.
        modes = OPEN_MODES[:2] if name.startswith("magic") else OPEN_MODES
        for i, kwargs in enumerate(modes):
            path = _write(hostile_dir, f"foreign-{name}-{i}", data)
            specs.append({"path": str(path), "kwargs": kwargs, "check": False})
            digests.append(_digest(path))
    _assert_refused_untouched(specs, digests)


def test_other_format_version_and_abi_are_refused_untouched(
    hostile_dir: Path, template: Template
) -> None:
    """A header from another format version or another build (ABI signature),
    with a correct geometry checksum: refused, untouched."""
    specs, digests = [], []
    for i, fields in enumerate(
        [{"format_version": 2}, {"format_version": 4}, {"abi_signature": 0x12345678}]
    ):
        data = bytearray(template.data)
        forge_header(data, **fields)
        path = _write(hostile_dir, f"version{i}", bytes(data))
        specs.append({"path": str(path), "check": False})
        digests.append(_digest(path))
    _assert_refused_untouched(specs, digests)


# ---------------------------------------------------------------------------
# Damaged caches: refused, or recovered with only right values
# ---------------------------------------------------------------------------


def _flipped(template: Template, positions: list[int], rng: random.Random) -> bytes:
    data = bytearray(template.data)
    for pos in positions:
        data[pos] ^= 1 << rng.randrange(8)
    return bytes(data)


def _header_flip_specs(
    template: Template, directory: Path, n: int, seed: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    specs = []
    # Every bit of the clock, the persisted watermark and the repair flag
    # (the clock has its cache line to itself: the other two are on the next).
    for pos in [*range(CLOCK_OFF, CLOCK_OFF + 8), *range(PERSISTED_OFF, NEEDS_REPAIR_OFF + 4)]:
        for bit in range(8):
            data = bytearray(template.data)
            data[pos] ^= 1 << bit
            path = _write(directory, f"hdr-{pos}-{bit}", bytes(data))
            specs.append({"path": str(path), "work": True, "flip": [pos, bit]})
    for i in range(n):
        nflips = rng.choice((1, 1, 2, 8))
        positions = [
            rng.randrange(0, 400) if rng.random() < 0.7 else rng.randrange(PAGE)
            for _ in range(nflips)
        ]
        path = _write(directory, f"hdr-r{i}", _flipped(template, positions, rng))
        specs.append({"path": str(path), "work": True, "positions": positions})
    return specs


def test_header_page_bit_flips(hostile_dir: Path, template: Template) -> None:
    """Flipped bits anywhere in the header page of a closed cache: either
    CacheFormatError (file untouched) or a cache that works and returns only
    right values. Every bit of the clock block is flipped once."""
    specs = _header_flip_specs(template, hostile_dir, 120, seed=1)
    results = _assert_sound(specs, template, refusal_ok=True)
    # The geometry block is checksummed: a flip there is always refused.
    for spec, res in zip(specs, results, strict=True):
        positions = spec.get("positions", [])
        if (
            positions
            and all(p < template.hdr["_size"] for p in positions)
            and len(set(positions)) == len(positions)
        ):
            assert res["outcome"] == "error", _describe(spec, res)


def test_clock_with_its_top_bit_flipped_keeps_puts_working(
    hostile_dir: Path, template: Template
) -> None:
    """One flipped bit in the header's clock (bit 63: outside the geometry
    checksum) must not turn every put into an error. Today recovery keeps the
    clock as it is; the next timestamp is >= 2**63, which the core returns as
    an int64 (negative), so put/add/publish/persist/committed_timestamp raise
    AiovmcError("unexpected status ...") -- after the put has been stored."""
    data = bytearray(template.data)
    data[CLOCK_OFF + 7] ^= 0x80
    path = _write(hostile_dir, "clock-top-bit", bytes(data))
    script = f"""
import aiovmc
with aiovmc.Cache({str(path)!r}) as cache:
    assert cache.info.recovered
    ts = cache.put(b"after", b"value")
    assert cache.get(b"after") == b"value"
    assert 0 < ts <= cache.committed_timestamp <= 2**63 - 1, ts
    assert cache.persist() >= ts
"""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("region", ["shards", "index", "pool", "entry-headers", "mixed"])
def test_flipped_bits_in_closed_cache_never_give_wrong_values(
    region: str, hostile_dir: Path, template: Template
) -> None:
    """Flip bits in the shard table, the index or the pool (values, keys,
    entry and body headers, tags) of a populated, closed file. The first
    opener recovers it: every get returns the exact original value or a
    miss, never another value; the cache keeps working; no crash."""
    specs = _region_flip_specs(template, hostile_dir, region, 60, seed=sum(region.encode()))
    results = _assert_sound(specs, template, refusal_ok=False)
    assert all(r["recovered"] for r in results)


def _region_positions(template: Template, region: str, rng: random.Random, n: int) -> list[int]:
    hdr = template.hdr
    out = []
    for _ in range(n):
        r = (
            region
            if region != "mixed"
            else rng.choice(("shards", "index", "pool", "entry-headers"))
        )
        if r == "shards":
            out.append(rng.randrange(hdr["shards_off"], hdr["index_off"]))
        elif r == "index":
            out.append(rng.randrange(hdr["index_off"], hdr["pool_off"]))
        elif r == "pool":
            out.append(rng.randrange(hdr["pool_off"], len(template.data)))
        else:
            off, _, kind = rng.choice(template.extents)
            size = ENTRY.size if kind == KIND_HEAD else 16
            out.append(off + rng.randrange(size + (8 if kind == KIND_HEAD else 0)))
    return out


def _region_flip_specs(
    template: Template, directory: Path, region: str, n: int, seed: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        nflips = rng.choice((1, 1, 1, 2, 4, 16, 64))
        positions = _region_positions(template, region, rng, nflips)
        path = _write(directory, f"{region}-{i}", _flipped(template, positions, rng))
        specs.append({"path": str(path), "work": True, "positions": positions[:8]})
    return specs


def test_overwritten_ranges_never_give_wrong_values(hostile_dir: Path, template: Template) -> None:
    """Whole ranges of the pool zeroed, filled with 0xff or random bytes, or
    replaced by a copy of another extent (a well-formed entry in the wrong
    place): recovery keeps only entries that verify."""
    rng = random.Random(21)
    specs = []
    for i in range(40):
        data = bytearray(template.data)
        how = rng.choice(("zero", "ff", "random", "copy"))
        off, units, _ = rng.choice(template.extents)
        length = min(units << template.hdr["unit_shift"], rng.choice((8, 64, 256, 4096, 65536)))
        if how == "copy":
            src, sunits, _ = rng.choice(template.extents)
            length = min(length, sunits << template.hdr["unit_shift"])
            data[off : off + length] = template.data[src : src + length]
        else:
            fill = {"zero": bytes(length), "ff": b"\xff" * length}.get(how) or rng.randbytes(length)
            data[off : off + length] = fill[: len(data) - off]
        path = _write(hostile_dir, f"range-{i}", bytes(data[: len(template.data)]))
        specs.append({"path": str(path), "work": True, "how": how, "at": off, "len": length})
    _assert_sound(specs, template, refusal_ok=False)


def _forged_specs(template: Template, directory: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Headers whose geometry checksum is right but whose fields lie: a
    different (consistent) geometry, TTL, hash seed or policy."""
    rng = random.Random(seed)
    hdr = template.hdr
    specs = []
    for i in range(n):
        kind = rng.choice(("geometry", "geometry", "ttl", "seed", "policy", "raw"))
        if kind == "geometry":
            shift = rng.choice((6, 8, 8, 9, 10, 12))
            units = rng.randrange(1, hdr["pool_units"] * 2)
            slots = units // 64 * 3 // 2 + 64
            index = (64 * slots * 8 + PAGE - 1) // PAGE * PAGE
            fields = {
                "pool_units": units,
                "unit_shift": shift,
                "unit_size": 1 << shift,
                "slots_per_shard": slots,
                "pool_off": hdr["index_off"] + index,
            }
        elif kind == "ttl":
            fields = {"default_ttl_ns": rng.choice((1, 2**63, 2**64 - 1, rng.getrandbits(64)))}
        elif kind == "seed":
            fields = {"hash_seed": rng.getrandbits(64)}
        elif kind == "policy":
            fields = {"policy": rng.choice((1, 2, 0xFFFFFFFF))}
        else:
            name = rng.choice(
                [
                    "file_size",
                    "shards_off",
                    "index_off",
                    "pool_off",
                    "unit_size",
                    "unit_shift",
                    "pool_units",
                    "n_shards",
                    "slots_per_shard",
                    "max_entries",
                ]
            )
            fields = {
                name: rng.getrandbits(32) if rng.random() < 0.5 else hdr[name] + rng.choice((-1, 1))
            }
        data = bytearray(template.data)
        forge_header(data, **fields)
        path = _write(directory, f"forged-{i}", bytes(data))
        specs.append({"path": str(path), "work": True, "fields": fields})
    return specs


def test_forged_headers_never_give_wrong_values(hostile_dir: Path, template: Template) -> None:
    """A header forged with a valid checksum (anyone can compute it): refused
    (untouched), or a cache that returns no wrong value and does not crash."""
    specs = _forged_specs(template, hostile_dir, 60, seed=4)
    _assert_sound(specs, template, refusal_ok=True, allowed_op_errors=("put: CacheFullError",))


def _attached_specs(template: Template, directory: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Flips applied to the file while a handle has it mapped. Mutex words
    are left alone: a lock word scribbled over by another process may read
    as "held" forever, which no lock can detect."""
    rng = random.Random(seed)
    hdr = template.hdr
    specs = []
    for i in range(n):
        region = rng.choice(("header", "shards", "index", "pool", "entry-headers"))
        flips = []
        for _ in range(rng.choice((1, 3, 10, 50))):
            if region == "header":
                pos = rng.randrange(POOL_OFF + POOL_MUTEX_SIZE, PAGE)
                if FLIGHT_LOCK_OFF <= pos < FLIGHT_LOCK_OFF + FLIGHT_LOCK_SIZE:
                    pos += FLIGHT_LOCK_SIZE
            elif region == "shards":
                pos = rng.randrange(hdr["shards_off"], hdr["flights_off"])
                shard_size = (hdr["flights_off"] - hdr["shards_off"]) // 64
                if (pos - hdr["shards_off"]) % shard_size < SHARD_MUTEX_SIZE:
                    pos += SHARD_MUTEX_SIZE
            else:
                pos = _region_positions(template, region, rng, 1)[0]
            flips.append([pos, 1 << rng.randrange(8)])
        path = _write(directory, f"attached-{i}", template.data)
        specs.append(
            {
                "path": str(path),
                "work": True,
                "check": False,
                "attached_flips": flips,
                "timeout": 10.0,
                "region": region,
            }
        )
    return specs


def test_corruption_while_attached_does_not_crash(hostile_dir: Path, template: Template) -> None:
    """Outside the trust model (values may be wrong), but the process must
    neither crash nor hang: every offset read from the mapping is checked."""
    specs = _attached_specs(template, hostile_dir, 80, seed=8)
    results = run_attempts(specs, template.expect)
    for spec, res in zip(specs, results, strict=True):
        assert res["outcome"] == "ok", _describe(spec, res)


# ---------------------------------------------------------------------------
# Paths that are not regular files of ours
# ---------------------------------------------------------------------------


def test_directory_is_refused(hostile_dir: Path) -> None:
    d = hostile_dir / "a-directory"
    d.mkdir(exist_ok=True)
    specs = [{"path": str(d), "kwargs": kw, "check": False} for kw in OPEN_MODES]
    for res in run_attempts(specs):
        assert res["outcome"] == "error" and res["type"] == "CacheFormatError", res
    assert d.is_dir() and not any(d.iterdir())


def test_symlinks_are_refused_and_their_targets_untouched(
    hostile_dir: Path, template: Template
) -> None:
    """aiovmc never follows a symbolic link (O_NOFOLLOW): a link to a cache,
    to a foreign file, or dangling (with size=, which would create the
    target) is refused, and the target stays as it was (or absent)."""
    target = _write(hostile_dir, "link-target.cache", template.data)
    foreign = _write(hostile_dir, "link-foreign.txt", b"not yours\n" * 100)
    absent = hostile_dir / "link-absent.cache"
    links = []
    for name, to in (("to-cache", target), ("to-foreign", foreign), ("dangling", absent)):
        link = hostile_dir / f"link-{name}"
        link.symlink_to(to)
        links.append(link)
    digests = {p: _digest(p) for p in (target, foreign)}
    specs = [
        {"path": str(link), "kwargs": kw, "check": False} for link in links for kw in OPEN_MODES
    ]
    for spec, res in zip(specs, run_attempts(specs), strict=True):
        assert res["outcome"] == "error" and res["type"] == "CacheFormatError", _describe(spec, res)
    assert {p: _digest(p) for p in digests} == digests
    assert not absent.exists(), "a dangling symlink's target was created"
    assert all(link.is_symlink() for link in links)


def test_special_files_are_refused(hostile_dir: Path) -> None:
    """A FIFO, a character device and a unix socket are not cache files:
    CacheFormatError (not an OSError, not a hang on the FIFO)."""
    fifo = hostile_dir / "a-fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    sock_path = hostile_dir / "a-socket"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        specs = [
            {"path": p, "kwargs": kw, "check": False, "timeout": 10.0}
            for p in (str(fifo), "/dev/null", str(sock_path))
            for kw in OPEN_MODES[:2]
        ]
        for spec, res in zip(specs, run_attempts(specs), strict=True):
            what = _describe(spec, res)
            assert res["outcome"] == "error" and res["type"] == "CacheFormatError", what
    finally:
        sock.close()
    assert stat.S_ISFIFO(fifo.stat().st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_file_of_another_user_is_refused_unless_allowed(
    hostile_dir: Path, template: Template
) -> None:
    """A cache file owned by someone else (here: nobody) could feed this
    process anything: refused (untouched) unless allow_other_owner=True."""
    path = _write(hostile_dir, "nobodys.cache", template.data)
    os.chown(path, 65534, 65534)
    refused, allowed = run_attempts(
        [
            {"path": str(path), "check": False},
            {"path": str(path), "kwargs": {"allow_other_owner": True}, "work": True},
        ],
        template.expect,
    )
    assert refused["outcome"] == "error" and refused["type"] == "CacheFormatError", refused
    assert "allow_other_owner" in refused["message"]
    assert allowed["outcome"] == "ok" and not allowed["wrong"] and not allowed["op_errors"], allowed
    assert allowed["hits"] >= len(template.expect)
    assert os.stat(path).st_uid == 65534


def test_new_file_mode(hostile_dir: Path) -> None:
    """A new file is 0600 by default, whatever the umask; `mode=` is honoured;
    no temporary file is left in the directory."""
    old = os.umask(0o022)
    try:
        default = hostile_dir / "mode-default.cache"
        aiovmc.Cache(default, size="1MiB").close()
        custom = hostile_dir / "mode-0640.cache"
        aiovmc.Cache(custom, size="1MiB", mode=0o640).close()
        os.umask(0)
        loose = hostile_dir / "mode-umask0.cache"
        aiovmc.Cache(loose, size="1MiB").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(default.stat().st_mode) == 0o600
    assert stat.S_IMODE(custom.stat().st_mode) == 0o640
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    assert not [p for p in hostile_dir.iterdir() if p.name.endswith(".tmp")]
    with aiovmc.Cache(size="1MiB") as private:
        opened = private_file_stats(private.path)
        assert opened and all(stat.S_IMODE(st.st_mode) == 0o600 for st in opened)


# ---------------------------------------------------------------------------
# Opt-in: many more mutations
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_many_mutations(seed: int, hostile_dir: Path, template: Template) -> None:
    directory = hostile_dir / f"fuzz-{seed}"
    directory.mkdir()
    try:
        specs = _header_flip_specs(template, directory, 300, seed)
        _assert_sound(specs, template, refusal_ok=True)
        for f in directory.iterdir():
            f.unlink()
        for region in ("shards", "index", "pool", "entry-headers", "mixed"):
            specs = _region_flip_specs(template, directory, region, 300, seed * 7 + len(region))
            _assert_sound(specs, template, refusal_ok=False)
            for f in directory.iterdir():
                f.unlink()
        specs = _forged_specs(template, directory, 300, seed)
        _assert_sound(specs, template, refusal_ok=True, allowed_op_errors=("put: CacheFullError",))
        for f in directory.iterdir():
            f.unlink()
        specs = _attached_specs(template, directory, 300, seed)
        for spec, res in zip(
            specs, run_attempts(specs, template.expect, timeout=1500), strict=True
        ):
            assert res["outcome"] == "ok", _describe(spec, res)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_damaged_large_value_while_attached_does_not_hang(hostile_dir: Path) -> None:
    """A value large enough to be copied outside the shard lock (hundreds of
    KiB, scattered over BODY extents) whose chain is damaged while the file is
    attached: `get` must give up (an error or a miss), not retry forever."""
    path = hostile_dir / "big-chain.cache"
    with aiovmc.Cache(path, size="4MiB") as cache:
        i = 0
        while cache.statistics().used_bytes < 0.98 * cache.capacity:
            cache.put(b"s%d" % i, make_value(b"s%d" % i, i, 150))
            i += 1
        for j in range(0, i, 2):  # only one-unit holes: the big value scatters
            cache.delete(b"s%d" % j)
        cache.put(b"big", make_value(b"big", 1, 600_000))
    data = path.read_bytes()
    hdr = read_header(data)
    exts = extents(data, hdr)
    head_unit = next(
        1 + ((off - hdr["pool_off"]) >> hdr["unit_shift"])
        for off, _, kind in exts
        if kind == KIND_HEAD and data[off + ENTRY.size : off + ENTRY.size + 3] == b"big"
    )
    bodies = [
        off
        for off, _, kind in exts
        if kind == KIND_BODY and int.from_bytes(data[off + 12 : off + 16], "little") == head_unit
    ]
    assert len(bodies) > 100
    victim = bodies[len(bodies) // 2]
    (res,) = run_attempts(
        [
            {
                "path": str(path),
                "check": False,
                "attached_flips": [[victim + 12, 0xFF]],  # the body's `head` back-link
                "timeout": 8.0,
            }
        ]
    )
    assert res["outcome"] == "ok", res
