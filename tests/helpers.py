"""Helpers shared by the multi-process, crash and hostile-file tests.

Values are self-describing: any process that reads a value can check, with no
other knowledge, that it is intact and that it belongs to the key it was read
under. A value is

    b"AVv1" | u16 key length | u64 sequence number | u32 payload length |
    key | payload | 16-byte BLAKE2b digest of everything before it

where the payload is a deterministic function of (key, sequence). A torn value,
a value of another key, or bytes that were never a value all fail `check_value`.

Worker functions live here (not in the test modules) so that "spawn" children
import something small; they report through plain multiprocessing primitives.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_MAGIC = b"AVv1"
_HEAD = struct.Struct("<4sHQI")
_DIGEST = 16
OVERHEAD = _HEAD.size + _DIGEST  # plus the key

# Every wait in these tests is bounded by this many seconds (unless told otherwise).
WAIT = 30.0


class CorruptValue(AssertionError):
    """A value read from the cache failed its self-check."""


def run_program(program: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python program (a file, or source text) in a fresh interpreter, as a user would.

    The cache files it names under /dev/shm are removed before and after: a file left
    by an earlier run (or by an older aiovmc, in another format) must not change what
    it prints."""
    source = program.read_text() if isinstance(program, Path) else program
    files = [Path(name) for name in re.findall(r'"(/dev/shm/[\w.-]+)"', source)]
    for path in files:
        path.unlink(missing_ok=True)
    try:
        command = [str(program)] if isinstance(program, Path) else ["-c", program]
        return subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, timeout=timeout, check=False
        )
    finally:
        for path in files:
            path.unlink(missing_ok=True)


def private_file_stats(path: str, pid: int | None = None) -> list[os.stat_result]:
    """The stat of every descriptor of process `pid` (default: this one) open on the
    unlinked file that was created as `path` (how a private cache's file is reached)."""
    fd_dir = f"/proc/{os.getpid() if pid is None else pid}/fd"
    found = []
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
            if target == f"{path} (deleted)":
                found.append(os.stat(f"{fd_dir}/{name}"))
        except FileNotFoundError:
            continue  # closed meanwhile (the listing's own descriptor, say)
    return found


def _payload(key: bytes, seq: int, size: int) -> bytes:
    if size <= 0:
        return b""
    seed = hashlib.blake2b(key + seq.to_bytes(8, "little"), digest_size=16).digest()
    return random.Random(seed).randbytes(size)


def make_value(key: bytes, seq: int, size: int = 64) -> bytes:
    """A self-verifying value of about `size` bytes (at least the key and OVERHEAD)."""
    payload = _payload(key, seq, max(0, size - OVERHEAD - len(key)))
    body = _HEAD.pack(_MAGIC, len(key), seq, len(payload)) + key + payload
    return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()


def check_value(key: bytes, value: Any) -> int:
    """Verify a value read under `key`; returns its sequence number.

    Raises CorruptValue if it is torn, foreign, or belongs to another key.
    """
    if not isinstance(value, bytes):
        raise CorruptValue(f"value of {key!r} is a {type(value).__name__}, not bytes")
    if len(value) < OVERHEAD:
        raise CorruptValue(f"value of {key!r} is too short ({len(value)} bytes)")
    body, digest = value[:-_DIGEST], value[-_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise CorruptValue(f"value of {key!r} ({len(value)} bytes) fails its digest")
    magic, klen, seq, plen = _HEAD.unpack_from(body)
    if magic != _MAGIC or _HEAD.size + klen + plen != len(body):
        raise CorruptValue(f"value of {key!r} has an inconsistent header")
    stored_key = body[_HEAD.size : _HEAD.size + klen]
    if stored_key != key:
        raise CorruptValue(f"value read under {key!r} belongs to {stored_key!r}")
    return int(seq)


def value_key(value: bytes) -> bytes:
    """The key a (verified-looking) value claims to belong to."""
    _magic, klen, _seq, _plen = _HEAD.unpack_from(value)
    return value[_HEAD.size : _HEAD.size + klen]


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll `predicate` until true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)


def run_threads(threads: Iterable[threading.Thread], timeout: float = WAIT) -> None:
    """Start every thread, then join them all within `timeout` seconds in all;
    fail on a hang."""
    threads = list(threads)
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in threads if t.is_alive()], "threads still running (a hang)"


def join_all(procs: Iterable[Any], timeout: float = WAIT) -> None:
    """Join every process within `timeout` seconds in all; kill and fail on a hang."""
    deadline = time.monotonic() + timeout
    hung = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(p)
    for p in hung:
        p.kill()
        p.join(5)
    assert not hung, f"processes still running after {timeout}s: {[p.pid for p in hung]}"


# ---------------------------------------------------------------------------
# Workers (run in child processes; they report through queues and values)
# ---------------------------------------------------------------------------


def _open(path: str, **kwargs: Any) -> Any:
    import aiovmc

    return aiovmc.Cache(path, **kwargs)


def verify_get(cache: Any, key: bytes) -> int | None:
    """get + self-check; the sequence number or None on a miss."""
    value = cache.get(key)
    if value is None:
        return None
    return check_value(key, value)


def rw_worker(
    path: str,
    wid: int,
    nkeys: int,
    ops: int,
    seed: int,
    out: Any,
    prefix: bytes = b"k",
    sizes: tuple[int, ...] = (40, 200, 1000, 5000, 20000),
) -> None:
    """Random puts/gets/deletes/adds over keys shared by every worker; every
    value read is verified. Reports (wid, counters, timestamps, error)."""
    rng = random.Random(seed)
    counts = {"puts": 0, "gets": 0, "hits": 0, "deletes": 0, "adds": 0}
    stamps: list[int] = []
    error = None
    try:
        with _open(path) as cache:
            for i in range(ops):
                key = prefix + b"%d" % rng.randrange(nkeys)
                r = rng.random()
                if r < 0.45:
                    size = rng.choice(sizes)
                    stamps.append(cache.put(key, make_value(key, wid << 32 | i, size)))
                    counts["puts"] += 1
                elif r < 0.9:
                    counts["gets"] += 1
                    if verify_get(cache, key) is not None:
                        counts["hits"] += 1
                elif r < 0.95:
                    cache.delete(key)
                    counts["deletes"] += 1
                else:
                    if cache.add(key, make_value(key, wid << 32 | i, 300)):
                        counts["puts"] += 1
                    counts["adds"] += 1
    except BaseException as exc:  # reported to the parent, which fails the test
        error = f"{type(exc).__name__}: {exc}"
    out.put((wid, counts, stamps, error))


def chaos_worker(
    path: str, wid: int, nkeys: int, seed: int, progress: Any, errors: Any, stop: Any
) -> None:
    """Run puts, gets, deletes, evictions and reservations until `stop` is set.
    Designed to be SIGKILLed at any moment, so it touches no lock outside the
    cache: `stop` is a RawValue flag and `progress` a RawArray (a process killed
    holding a multiprocessing lock would hang the others, and the test).
    Every value read is verified; `progress[wid]` counts finished operations
    so the parent can see the survivors keep moving. A failure is written to
    `errors` and the worker exits with status 3."""
    import aiovmc

    rng = random.Random(seed)
    try:
        cache = aiovmc.Cache(path)
        seq = 0
        while not stop.value:
            seq += 1
            key = b"c%d" % rng.randrange(nkeys)
            r = rng.random()
            if r < 0.35:
                size = rng.choice((100, 2000, 9000, 30000, 70000))
                cache.put(key, make_value(key, seq, size))
            elif r < 0.65:
                verify_get(cache, key)
            elif r < 0.72:
                cache.delete(key)
            elif r < 0.8:
                cache.evict(None if rng.random() < 0.7 else key)
            elif r < 0.95:
                value = make_value(key, seq, rng.choice((500, 8000, 40000)))
                try:
                    res = cache.reserve(key, len(value))
                except aiovmc.CacheFullError:
                    pass  # other workers' open reservations hold the room
                else:
                    # Fill in two halves so a kill can land between them.
                    half = len(value) // 2
                    res.buffer[:half] = value[:half]
                    res.buffer[half:] = value[half:]
                    if rng.random() < 0.8:
                        res.publish()
                    else:
                        res.cancel()
            else:
                for k in cache.keys()[:20]:
                    verify_get(cache, k)
            progress[wid] += 1
        cache.close()
    except BaseException as exc:
        errors.put(f"worker {wid} (pid {os.getpid()}): {type(exc).__name__}: {exc}")
        os._exit(3)


# ---------------------------------------------------------------------------
# The file layout (native/vmc_format.h), for tests that damage files on purpose
# ---------------------------------------------------------------------------

# The header's first block. The format is young: three layouts exist (without
# `heap_off`, with it, and format version 2 with the flight table's
# `flights_off` and `n_flights`, whose spare word version 3 made `max_entries`);
# read_header() tells them apart by the geometry checksum.
_LAYOUTS = [
    (
        struct.Struct("<8sIIQQQQQIIIIIIQQQIIQ"),
        "magic format_version abi_signature file_size shards_off index_off heap_off pool_off "
        "unit_size unit_shift pool_units n_shards slots_per_shard policy default_ttl_ns "
        "hash_seed flights_off n_flights max_entries geometry_check",
    ),
    (
        struct.Struct("<8sIIQQQQIIIIIIQQQ"),
        "magic format_version abi_signature file_size shards_off index_off pool_off "
        "unit_size unit_shift pool_units n_shards slots_per_shard policy default_ttl_ns "
        "hash_seed geometry_check",
    ),
    (
        struct.Struct("<8sIIQQQQQIIIIIIQQQ"),
        "magic format_version abi_signature file_size shards_off index_off heap_off pool_off "
        "unit_size unit_shift pool_units n_shards slots_per_shard policy default_ttl_ns "
        "hash_seed geometry_check",
    ),
]
_GEOMETRY_SEED = 0x67656F6D
PAGE = 4096
KIND_FREE, KIND_HEAD, KIND_BODY = 0x45455246, 0x44414548, 0x59444F42
ENTRY = struct.Struct("<QIIIIHBBIQQQ")  # struct vmc_entry, 56 bytes
ENTRY_FIELDS = [
    "tag",
    "next",
    "value_len",
    "lru_prev",
    "lru_next",
    "key_len",
    "state",
    "reserved0",
    "checksum",
    "expires_ns",
    "stamp",
    "atime_ns",
]


def _layout(data: bytes | bytearray) -> tuple[struct.Struct, list[str]]:
    """The header layout whose geometry checksum matches `data` (the first
    one if none does: a damaged header)."""
    for st, names in _LAYOUTS:
        if len(data) >= st.size:
            body = bytes(data[: st.size - 8])
            check = int.from_bytes(data[st.size - 8 : st.size], "little")
            if vmc_hash(body, _GEOMETRY_SEED) == check:
                return st, names.split()
    return _LAYOUTS[0][0], _LAYOUTS[0][1].split()


def read_header(data: bytes | bytearray) -> dict[str, Any]:
    """The first block of a cache file's header as a dict (plus "_size", the
    block's size in bytes)."""
    st, names = _layout(data)
    out = dict(zip(names, st.unpack_from(data), strict=True))
    out["_size"] = st.size
    return out


def extents(data: bytes, hdr: dict[str, Any]) -> list[tuple[int, int, int]]:
    """Walk the pool's tags: [(file offset, units, kind)], stopping at a bad tag."""
    out = []
    shift, units = hdr["unit_shift"], hdr["pool_units"]
    u = 1
    while u <= units:
        off = hdr["pool_off"] + ((u - 1) << shift)
        tag = int.from_bytes(data[off : off + 8], "little")
        n, kind = tag & 0xFFFFFFFF, (tag >> 32) & ~1  # the low bit of the kind is PREV_FREE
        if n == 0 or n > units - u + 1 or kind not in (KIND_FREE, KIND_HEAD, KIND_BODY):
            break
        out.append((off, n, kind))
        u += n
    return out


# The core's hash (native/vmc_hash.h), to forge headers whose checksum is right.
_M64 = (1 << 64) - 1
_K0, _K1, _K2, _K3, _K4, _K5, _K6 = (
    0x9E3779B97F4A7C15,
    0xD6E8FEB86659FD93,
    0xA0761D6478BD642F,
    0xE7037ED1A0B428DB,
    0x8EBC6AF09C88C6E3,
    0x589965CC75374CC3,
    0x1D8E4E27C47D124F,
)
_LANE_K = (_K1, _K2, _K3, _K4, _K5, _K6)  # each lane's constant
_BLOCK = 16 * len(_LANE_K)


def _fold(a: int, b: int) -> int:
    r = (a & _M64) * (b & _M64)
    return (r & _M64) ^ (r >> 64)


def _rd(p: bytes, at: int, n: int) -> int:
    return int.from_bytes(p[at : at + n], "little")


def vmc_hash(p: bytes, seed: int) -> int:
    """native/vmc_hash.h's vmc_hash, in Python."""
    n = len(p)
    s = _fold(seed ^ _K0, n ^ _K1)
    if n <= 16:
        if n >= 8:
            a, b = _rd(p, 0, 8), _rd(p, n - 8, 8)
        elif n >= 4:
            a, b = _rd(p, 0, 4), _rd(p, n - 4, 4)
        elif n > 0:
            a, b = (p[0] << 16) | (p[n >> 1] << 8) | p[n - 1], 0
        else:
            a = b = 0
    else:
        at, left = 0, n
        if left > _BLOCK:
            lanes = [s] + [s ^ k for k in _LANE_K[1:]]
            while True:
                for i, k in enumerate(_LANE_K):
                    o = at + 16 * i
                    lanes[i] = _fold(_rd(p, o, 8) ^ k, _rd(p, o + 8, 8) ^ lanes[i])
                at += _BLOCK
                left -= _BLOCK
                if left <= _BLOCK:
                    break
            s = 0
            for lane in lanes:
                s ^= lane
        while left > 16:
            s = _fold(_rd(p, at, 8) ^ _K1, _rd(p, at + 8, 8) ^ s)
            at += 16
            left -= 16
        a, b = _rd(p, at + left - 16, 8), _rd(p, at + left - 8, 8)
    return _fold(_K1 ^ n, _fold(a ^ _K1, b ^ s))


def forge_header(data: bytearray, **fields: int) -> None:
    """Rewrite header fields in place and recompute geometry_check, so that
    only the header's consistency checks stand between the file and the core.
    Values wrap to the field's width, as in C."""
    st, names = _layout(data)
    hdr = dict(zip(names, st.unpack_from(data), strict=True))
    hdr.update(fields)
    for name, code in zip(names[1:], st.format[3:], strict=True):  # after "<8s"
        hdr[name] &= 0xFFFFFFFF if code == "I" else 0xFFFFFFFFFFFFFFFF
    packed = bytearray(st.pack(*(hdr[f] for f in names)))
    check = vmc_hash(bytes(packed[: st.size - 8]), _GEOMETRY_SEED)
    packed[st.size - 8 :] = check.to_bytes(8, "little")
    data[: st.size] = packed


def header_fields(data: bytes | bytearray) -> list[str]:
    """The names of the header's fields, in order (see read_header)."""
    return _layout(data)[1]


# ---------------------------------------------------------------------------
# Isolated attempts: every attempt runs in a forked child of a fresh
# interpreter, so a crash (a signal) or a hang is caught and reported
# ---------------------------------------------------------------------------


def _attempt(spec: dict[str, Any], expect: dict[bytes, bytes]) -> dict[str, Any]:
    """Open spec["path"] and, if that works, check that every value it returns
    is the one in `expect` (or, for other keys, self-verifying). In a child."""
    import aiovmc

    kwargs = spec.get("kwargs", {})
    try:
        cache = aiovmc.Cache(spec["path"], **kwargs)
    except aiovmc.AiovmcError as exc:
        return {"outcome": "error", "type": type(exc).__name__, "message": str(exc)}
    except OSError as exc:
        return {"outcome": "error", "type": "OSError", "message": str(exc)}
    result: dict[str, Any] = {
        "outcome": "ok",
        "recovered": cache.info.recovered,
        "kept": cache.info.recovered_entries,
        "dropped": cache.info.dropped_entries,
        "wrong": [],
        "op_errors": [],
        "hits": 0,
    }
    wrong, op_errors = result["wrong"], result["op_errors"]
    if not spec.get("check", True):
        expect = {}

    def judge(key: bytes, value: Any) -> None:
        if value is None:
            return
        result["hits"] += 1
        if key in expect:
            if value != expect[key]:
                wrong.append(key.hex())
        else:
            try:
                check_value(key, value)
            except CorruptValue:
                wrong.append(key.hex())

    def guarded(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except aiovmc.AiovmcError as exc:
            op_errors.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    for flip in spec.get("attached_flips", []):  # damage the file under the live mapping
        with open(spec["path"], "r+b") as f:
            f.seek(flip[0])
            byte = f.read(1)
            f.seek(flip[0])
            f.write(bytes([byte[0] ^ flip[1]]))
    for key in expect:
        judge(key, guarded("get", functools.partial(cache.get, key)))
    for key in guarded("keys", cache.keys) or []:
        judge(key, guarded("get", functools.partial(cache.get, key)))
    if spec.get("work"):  # the cache must keep working: writes, reads, evictions
        rng = random.Random(1)
        for i in range(200):
            key = b"work-%d" % rng.randrange(40)
            if rng.random() < 0.6:
                guarded("put", functools.partial(cache.put, key, make_value(key, i, 3000)))
            elif rng.random() < 0.8:
                judge(key, guarded("get", functools.partial(cache.get, key)))
            else:
                guarded("delete", functools.partial(cache.delete, key))
        guarded("evict", cache.evict)
        guarded("purge", cache.purge_expired)
        stats = guarded("statistics", cache.statistics)
        if stats is not None:
            result["entries"] = stats.entries
            result["used_bytes"] = stats.used_bytes
            result["capacity"] = stats.capacity
        result["len"] = guarded("len", lambda: len(cache))
    cache.close()
    return result


def attempts_main() -> None:
    """Read {"expect": {key hex: value hex}, "specs": [...]} on stdin; run each
    spec in a forked child with a time limit; print a JSON list of results
    (crashes and hangs included)."""
    import json
    import select
    import signal
    import sys

    import aiovmc  # noqa: F401  (imported once, before the forks)

    request = json.load(sys.stdin)
    specs = request["specs"]
    expect = {bytes.fromhex(k): bytes.fromhex(v) for k, v in request["expect"].items()}
    results = []
    for spec in specs:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                attempt = _attached_attempt if "target" in spec else _attempt
                out = json.dumps(attempt(spec, expect)).encode()
            except BaseException as exc:  # reported as a failure
                out = json.dumps(
                    {"outcome": "exception", "type": type(exc).__name__, "message": str(exc)}
                ).encode()
            with os.fdopen(w, "wb") as f:
                f.write(out)
            os._exit(0)
        os.close(w)
        chunks = []
        deadline = time.monotonic() + spec.get("timeout", 20.0)
        hung = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                hung = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        res: dict[str, Any]
        if hung:
            res = {"outcome": "hang"}
        elif os.WIFSIGNALED(status):
            res = {"outcome": "crash", "signal": os.WTERMSIG(status)}
        elif os.WEXITSTATUS(status) != 0 or not chunks:
            res = {"outcome": "crash", "status": os.WEXITSTATUS(status)}
        else:
            res = json.loads(b"".join(chunks))
        results.append(res)
    json.dump(results, sys.stdout)


def run_attempts(
    specs: list[dict[str, Any]],
    expect: dict[bytes, bytes] | None = None,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run attempt specs in a fresh interpreter (see attempts_main). Each spec:
    path, kwargs (for Cache), check (compare with `expect`, default True),
    work (then use the cache), attached_flips ([offset, xor mask] applied
    to the file after opening it), timeout."""
    import json
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    if timeout is None:
        timeout = 60.0 + 2.0 * len(specs)
    proc = subprocess.run(
        [sys.executable, "-c", "import helpers; helpers.attempts_main()"],
        input=json.dumps(
            {"expect": {k.hex(): v.hex() for k, v in (expect or {}).items()}, "specs": specs}
        ).encode(),
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=here,
        check=False,
    )
    assert proc.returncode == 0, (
        f"the attempt driver failed with status {proc.returncode}: {proc.stderr.decode()[-3000:]}"
    )
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    assert len(results) == len(specs)
    return results


# ---------------------------------------------------------------------------
# Attached corruption: a field of the live mapping is mutated, then operations
# run. The fields come from docs/format.md; offsets are resolved in the child,
# after it opened (and recovered) the file.
# ---------------------------------------------------------------------------

HEADER_FIELDS = {  # name: (offset, size)
    "clock": (320, 8),
    "persisted": (384, 8),
    "needs_repair": (392, 4),
    "fresh": (396, 4),
    "reserved_head": (296, 4),
    "heads": (300, 4),
    "free_units": (304, 8),
    "last_reclaim_ns": (312, 8),
    "next_owner": (488, 8),
    "loader_calls": (496, 8),
    "coalesced_gets": (504, 8),
    "load_takeovers": (512, 8),
    "spares[0].owner": (576, 8),
    "spares[0].unit": (584, 4),
    **{f"free_head[{k}]": (168 + 4 * k, 4) for k in range(32)},
}
SPARE_SLOTS, SPARE_SLOT_SIZE = 48, 64  # struct vmc_spare_slot, from offset 576


def slot_hits(path: str) -> list[int]:
    """The hits each spare slot of the file at `path` counted: the optimistic
    gets' (docs/format.md, "Spare slots")."""
    with open(path, "rb") as f:
        data = f.read(PAGE)
    return [
        int.from_bytes(data[off + 16 : off + 24], "little")
        for off in range(576, 576 + SPARE_SLOTS * SPARE_SLOT_SIZE, SPARE_SLOT_SIZE)
    ]


SHARD_FIELDS = {"heap_len": (40, 4), "count": (72, 4), "top_atime": (64, 8), "seq": (104, 8)}
ENTRY_FIELDS_AT = {
    "tag": (0, 8),
    "next": (8, 4),
    "value_len": (12, 4),
    "link_prev": (16, 4),
    "link_next": (20, 4),
    "key_len": (24, 2),
    "state": (26, 1),
    "checksum": (28, 4),
    "expires_ns": (32, 8),
    "stamp": (40, 8),
    "atime_ns": (48, 8),
}
BODY_FIELDS = {"tag": (0, 8), "next": (8, 4), "head": (12, 4)}
FREE_FIELDS = {"tag": (0, 8), "prev": (8, 4), "next": (12, 4), "footer": (-8, 8)}
SLOT_FIELDS = {"unit": (0, 4), "tag": (4, 4)}
HEAP_FIELDS = {"key": (0, 8), "unit": (8, 4), "gen": (12, 4)}
FLIGHT_FIELDS = {
    "gen": (0, 4),
    "state": (4, 1),
    "outcome": (5, 1),
    "key_len": (6, 2),
    "hash": (8, 8),
    "owner": (16, 8),
    "started_ns": (24, 8),
}
MUTATIONS = ["bit0", "bit7", "bit_mid", "bit_top", "zero", "ones", "plus1", "minus1"]


def mutate(old: int, size: int, how: str) -> int:
    """`old` (a size-byte field) after mutation `how`."""
    bits = size * 8
    mask = (1 << bits) - 1
    return {
        "bit0": old ^ 1,
        "bit7": old ^ (1 << min(7, bits - 1)),
        "bit_mid": old ^ (1 << (bits // 2)),
        "bit_top": old ^ (1 << (bits - 1)),
        "zero": 0,
        "ones": mask,
        "plus1": (old + 1) & mask,
        "minus1": (old - 1) & mask,
    }[how]


def find_head(data: bytes, hdr: dict[str, Any], key: bytes) -> tuple[int, int, int] | None:
    """(shard, slot index, head unit) of `key` in a live file's index."""
    h = vmc_hash(key, hdr["hash_seed"])
    shard, tag, slots = h & 63, h >> 32, hdr["slots_per_shard"]
    base = hdr["index_off"] + shard * slots * 8
    i = (tag * slots) >> 32
    for _ in range(slots):
        v = int.from_bytes(data[base + 8 * i : base + 8 * i + 8], "little")
        if v == 0:
            return None
        unit = v & 0xFFFFFFFF
        if v >> 32 == tag and 1 <= unit <= hdr["pool_units"]:
            off = hdr["pool_off"] + ((unit - 1) << hdr["unit_shift"])
            e = ENTRY.unpack_from(data, off)
            if data[off + 56 : off + 56 + e[5]] == key:
                return shard, i, unit
        i = (i + 1) % slots
    return None


def resolve_target(data: bytes, target: list[Any]) -> tuple[int, int] | None:
    """The (file offset, size) of a field named by `target`, or None if the
    file has no such field now (e.g. no free extent)."""
    hdr = read_header(data)

    def unit_off(u: int) -> int:
        return int(hdr["pool_off"] + ((u - 1) << hdr["unit_shift"]))

    kind = target[0]
    if kind == "header":
        return HEADER_FIELDS[target[1]]
    if kind == "free":
        for k in range(32):
            u = int.from_bytes(data[168 + 4 * k : 172 + 4 * k], "little")
            if u:
                off, size = FREE_FIELDS[target[1]]
                if off < 0:  # from the end of the extent
                    tag = int.from_bytes(data[unit_off(u) : unit_off(u) + 8], "little")
                    off += (tag & 0xFFFFFFFF) << hdr["unit_shift"]
                return unit_off(u) + off, size
        return None
    if kind == "reserved":
        u = int.from_bytes(data[296:300], "little")
        if not u:
            return None
        off, size = ENTRY_FIELDS_AT[target[1]]
        return unit_off(u) + off, size
    if kind == "flight":  # the home slot of the key's flight
        h = vmc_hash(bytes.fromhex(target[1]), hdr["hash_seed"])
        slot = (h >> 40) & (hdr["n_flights"] - 1)
        off, size = FLIGHT_FIELDS[target[2]]
        return hdr["flights_off"] + 32 * slot + off, size
    found = find_head(data, hdr, bytes.fromhex(target[1]))
    if found is None:
        return None
    shard, slot, unit = found
    if kind == "shard":
        off, size = SHARD_FIELDS[target[2]]
        return PAGE + 128 * shard + off, size
    if kind == "slot":
        off, size = SLOT_FIELDS[target[2]]
        return hdr["index_off"] + (shard * hdr["slots_per_shard"] + slot) * 8 + off, size
    head = unit_off(unit)
    e = dict(zip(ENTRY_FIELDS, ENTRY.unpack_from(data, head), strict=True))
    if kind == "entry":
        off, size = ENTRY_FIELDS_AT[target[2]]
        return head + off, size
    if kind == "heap":
        off, size = HEAP_FIELDS[target[2]]
        item = hdr["heap_off"] + (shard * hdr["slots_per_shard"] + e["lru_prev"]) * 16
        return item + off, size
    if kind == "body":
        if not e["next"]:
            return None
        off, size = BODY_FIELDS[target[2]]
        return unit_off(e["next"]) + off, size
    raise ValueError(f"unknown target {target!r}")


def _attached_attempt(spec: dict[str, Any], expect: dict[bytes, bytes]) -> dict[str, Any]:
    """Open the file, mutate one field of the live mapping, run `ops`; report
    every value that was never put, and impossible answers. In a child."""
    import shutil

    import aiovmc

    path = spec["path"]
    shutil.copyfile(spec["pristine"], path)
    cache = aiovmc.Cache(path)
    pending = cache.reserve(b"pending", 3000) if spec["target"][0] == "reserved" else None
    wrong: list[str] = []
    errors: list[str] = []
    # the values each key may show: its current value, or nothing (damage
    # found and repaired may drop any entry)
    allowed = {k: {v, None} for k, v in expect.items()}
    ever = len(expect)

    def look(key: bytes, what: str) -> None:
        try:
            value = cache.get(key)
        except aiovmc.AiovmcError as exc:
            errors.append(f"{what} get: {type(exc).__name__}: {exc}")
            return
        if value not in allowed.get(key, {None}):
            wrong.append(f"{what}: {key!r} -> {(value or b'')[:40]!r}")

    def guarded(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except aiovmc.AiovmcError as exc:
            errors.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    with open(path, "r+b") as f:
        data = f.read()
        where = resolve_target(data, spec["target"])
        if where is None:
            cache.close()
            return {"outcome": "skipped"}
        off, size = where
        old = int.from_bytes(data[off : off + size], "little")
        f.seek(off)
        f.write(mutate(old, size, spec["mutation"]).to_bytes(size, "little"))
    keys = sorted(expect)
    for op in spec["ops"]:
        if op == "get":
            for key in keys:
                look(key, "get")
        elif op == "put":
            for i, key in enumerate(keys[: len(keys) // 2]):
                new = make_value(key, 1000 + i, len(expect[key]))
                ever += 1
                if guarded("put", functools.partial(cache.put, key, new)) is None:
                    allowed[key] = allowed[key] | {None}
                else:
                    allowed[key] = {new, None}
                look(key, "after put")
        elif op == "delete":
            for key in keys[::3]:
                if guarded("delete", functools.partial(cache.delete, key)) is not None:
                    allowed[key] = {None}
                look(key, "after delete")
        elif op == "clear":
            if guarded("clear", cache.clear) is not None:
                allowed = {k: {None} for k in allowed}
                n = guarded("len", lambda: len(cache))
                if n not in (0, None):
                    wrong.append(f"len() is {n} after clear()")
            with open(path, "r+b") as f:  # a repair must not bring anything back
                f.seek(HEADER_FIELDS["needs_repair"][0])
                f.write((1).to_bytes(4, "little"))
            for key in keys:
                look(key, "after clear and repair")
        elif op == "reserve":
            key = keys[-1]
            r = guarded("reserve", functools.partial(cache.reserve, key, 5000))
            if r is not None:
                new = make_value(key, 2000, 5000)
                r.buffer[:] = new
                ever += 1
                if guarded("publish", r.publish) is not None:
                    allowed[key] = {new, None}
                look(key, "after publish")
        elif op == "len":
            n = guarded("len", lambda: len(cache))
            if n is not None and not 0 <= n <= ever:
                wrong.append(f"len() is {n}, but only {ever} values were ever put")
            stats = guarded("statistics", cache.statistics)
            if stats is not None and not (
                0 <= stats.entries <= ever and 0 <= stats.used_bytes <= stats.capacity
            ):
                wrong.append(f"statistics {stats}")
        elif op == "load":  # a miss that loads, host-wide single flight included
            for i, key in enumerate(keys[:3]):
                new = make_value(key, 3000 + i, len(expect[key]))
                guarded("delete", functools.partial(cache.delete, key))
                cache.on_miss = lambda _key, new=new: new
                ever += 1
                got = guarded("load", functools.partial(cache.get, key))
                cache.on_miss = None
                if got is not None and got != new:
                    wrong.append(f"load: {key!r} -> {got[:40]!r}")
                allowed[key] = {new, None}
                look(key, "after load")
        elif op == "keys":
            for key in guarded("keys", cache.keys) or []:
                if key not in allowed:
                    wrong.append(f"keys() lists {key!r}, never put")
        elif op == "evict":
            guarded("evict", cache.evict)
            guarded("purge", cache.purge_expired)
        elif op == "timestamps":
            for name in ("committed_timestamp", "persisted_timestamp"):
                ts = guarded(name, functools.partial(getattr, cache, name))
                if ts is not None and not 0 <= ts < 1 << 62:
                    wrong.append(f"{name} is {ts}")
            guarded("persist", cache.persist)
        else:
            raise ValueError(f"unknown op {op!r}")
    for key in keys:
        look(key, "at the end")
    if pending is not None:
        pending._abandon()
    cache.close()
    os.unlink(path)
    return {"outcome": "ok", "wrong": wrong, "op_errors": errors}


def spare_slot_units(data: bytes) -> list[bytes]:
    """The `unit` word of each spare slot of a file's bytes."""
    at, size = HEADER_FIELDS["spares[0].unit"]
    starts = range(at, at + SPARE_SLOTS * SPARE_SLOT_SIZE, SPARE_SLOT_SIZE)
    return [data[start : start + size] for start in starts]


def spare_mark(hdr: dict[str, Any]) -> int:
    """The file's spare mark, a spare's nonce (native/vmc_handle.h, vmc_spare_mark)."""
    return 0x80000000 | (vmc_hash(b"spare mark", hdr["hash_seed"]) >> 33)


def plant_forged_spare(path: str, writer: Any, key: bytes, nonce: int) -> bytes:
    """Point the one spare slot of the file at `path` that names a spare at a head
    forged inside a value: `writer` (a handle that keeps no spare of its own) puts
    under `key` a value of 8 units whose third unit holds a one-unit RESERVED head of
    the slot's owner with `nonce` (the file's spare mark: a spare, as far as any
    field tells). Returns the value."""
    data = Path(path).read_bytes()
    hdr = read_header(data)
    unit = 1 << hdr["unit_shift"]
    slot_owner, _ = HEADER_FIELDS["spares[0].owner"]
    slot_unit, unit_size = HEADER_FIELDS["spares[0].unit"]
    (slot,) = [  # the slots that name a spare: one
        slot_owner + SPARE_SLOT_SIZE * i for i, u in enumerate(spare_slot_units(data)) if any(u)
    ]
    owner = int.from_bytes(data[slot : slot + 8], "little")
    # tag, next, value_len, link_prev, link_next, key_len, state RESERVED,
    # reserved0, checksum (the nonce), expires_ns, stamp, atime_ns (the owner id)
    forged = ENTRY.pack(KIND_HEAD << 32 | 1, 0, 0, 0, 0, 0, 1, 0, nonce, 0, 0, owner)
    at = 2 * unit - ENTRY.size - len(key)  # where the value meets the third unit
    value = bytes(at) + forged
    value += bytes(8 * unit - ENTRY.size - len(key) - len(value))
    writer.put(key, value)
    data = Path(path).read_bytes()
    found = find_head(data, hdr, key)
    assert found is not None
    victim = found[2]
    head = hdr["pool_off"] + (victim - 1) * unit
    assert int.from_bytes(data[head : head + 4], "little") == 8  # one extent of 8 units
    with open(path, "r+b") as f:  # the file's pages are the mapping's
        f.seek(slot + slot_unit - slot_owner)
        f.write((victim + 2).to_bytes(unit_size, "little"))
    return value
