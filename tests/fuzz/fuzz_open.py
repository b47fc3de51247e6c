"""Atheris harness for the open/recovery path of aiovmc.

Every input becomes a cache file, which is then opened (the first opener
recovers it) and read back. The harness fails (raises, and atheris records the
input) if the process crashes, if opening raises anything but the documented
errors, or if any `get` returns a value that is not the exact original one (or
a miss). See tests/fuzz/README.md for how to run it.

Input format (first byte selects the mode):
  0: the bytes that follow are the whole file (foreign, truncated, random);
  1: records of (u32 offset, u8 xor mask) applied to a populated template file;
  2: like 1, but the header is first forged with a right geometry checksum
     from the next 16 bytes (field index, value), so mutations get past it.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

with atheris.instrument_imports():
    from helpers import CorruptValue, check_value, forge_header, header_fields, make_value

    import aiovmc

WORKDIR = tempfile.mkdtemp(prefix="aiovmc-fuzz-")
TEMPLATE = os.path.join(WORKDIR, "template.cache")
TARGET = os.path.join(WORKDIR, "target.cache")


def _make_template() -> tuple[bytes, dict[bytes, bytes]]:
    with aiovmc.Cache(TEMPLATE, size="1MiB") as cache:
        i = 0
        while cache.statistics().used_bytes < 0.9 * cache.capacity:
            key = b"s%d" % i
            cache.put(key, make_value(key, i, 140))
            i += 1
        for j in range(0, i, 2):
            cache.delete(b"s%d" % j)
        for j in range(30):
            key = b"t%d" % j
            value = make_value(key, j, (60, 500, 3000, 9000)[j % 4])
            cache.put(key, value, ttl=3600 if j % 3 else None)
        expect = {key: cache.get(key) for key in list(cache.keys())}
    with open(TEMPLATE, "rb") as f:
        return f.read(), expect


TEMPLATE_DATA, EXPECT = _make_template()


def _build(data: bytes) -> bytes:
    if not data:
        return b""
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        return rest
    out = bytearray(TEMPLATE_DATA)
    if mode == 2 and len(rest) >= 16:
        index, value = struct.unpack_from("<QQ", rest)
        names = header_fields(out)
        name = names[1 + index % (len(names) - 2)]  # neither the magic nor the check
        forge_header(out, **{name: value})  # wrapped to the field's width
        rest = rest[16:]
    for at in range(0, len(rest) - 4, 5):
        offset, mask = struct.unpack_from("<IB", rest, at)
        offset %= len(out)
        out[offset] ^= mask or 1
    return bytes(out)


def _judge(key: bytes, value: object) -> None:
    if value is None:
        return
    if key in EXPECT:
        if value != EXPECT[key]:
            raise AssertionError(f"wrong value for {key!r}")
    else:
        try:
            check_value(key, value)
        except CorruptValue as exc:
            raise AssertionError(f"wrong value for {key!r}: {exc}") from None


def TestOneInput(data: bytes) -> None:  # atheris' name
    contents = _build(data)
    with open(TARGET, "wb") as f:
        f.write(contents)
    try:
        cache = aiovmc.Cache(TARGET)
    except aiovmc.CacheFormatError:
        with open(TARGET, "rb") as f:
            if f.read() != contents:
                raise AssertionError("a refused file was modified") from None
        return
    with cache:
        for key in EXPECT:
            _judge(key, cache.get(key))
        for key in list(cache.keys()):
            _judge(key, cache.get(key))
        for i in range(20):
            key = b"w%d" % (i % 7)
            try:
                cache.put(key, make_value(key, i, 2000))
            except aiovmc.CacheFullError:
                pass  # a forged header may say policy "none"
            _judge(key, cache.get(key))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
