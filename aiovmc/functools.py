"""`cached`: memoise an async function's results in an aiovmc cache.

::

    from aiovmc import AsyncCache
    from aiovmc.functools import cached

    cache = AsyncCache("/dev/shm/app.cache", size="256MiB")

    @cached(cache, ttl=60)
    async def user_profile(user_id: int) -> dict[str, object]:
        ...

Results are stored in the shared file, so every process using it benefits; while
a call is computing a result, concurrent calls with the same arguments in the
same process wait for it rather than compute it again (the single-flight of
`aiovmc._coalesce`: errors reach every waiter and are never cached; a cancelled
caller hands the computation over to another waiter).

**Keys.** ``key(*args, **kwargs)`` builds the cache key (a ``str`` or ``bytes``,
used as it is). By default the key is the function's module and qualified name
followed by its arguments, bound to the signature (so ``f(1, b=2)`` and
``f(a=1, b=2)`` share a key) with defaults applied, e.g.
``"app.users:user_profile(user_id=42)"``. Arguments are written out so that the
key is the same in every process and every run (never ``hash()``, which is salted
per process): ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``,
``bytearray``, tuples, lists, dicts and sets of these (dicts and sets sorted),
enum members, and ``datetime``/``date``/``time``/``timedelta``, ``Decimal``,
``Fraction``, ``UUID`` and paths. Any other argument (an instance of your class,
``self`` of a method) raises `TypeError`: give ``key=`` instead. Keys longer than
`MAX_READABLE_KEY` bytes keep their readable prefix and end in a SHA-256 digest of
the arguments.

**Versions.** ``version=`` (a ``str`` or an ``int``) starts every key of the
function with ``v{version}:``, e.g. ``"v2:app.users:user_profile(user_id=42)"``,
with the default key builder or your own. Change it whenever a deploy changes
what the function returns (its shape, its meaning, its serializer): the new code
then never reads a result the old code stored in the shared file — during a
rolling restart both run at once — and the old entries leave by LRU or TTL.

**Serializers.** ``"pickle"`` (default: any picklable result), ``"json"`` (results
made of JSON types; tuples come back as lists), ``"raw"`` (the function returns a
bytes-like object and callers get ``bytes``; a result of None is not cached) or any
object with ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``. Every caller,
the one that computed the result included, gets ``loads(dumps(result))``: a fresh
object, the same as a later hit returns.

**Trust model.** Unpickling runs code chosen by whoever wrote the bytes. A cache
file is shared by every process that can open it, so with ``"pickle"`` anyone who
can write the file can execute code in every process that reads from it. The file
is created with mode 0o600 (owner only) by default: keep it that way, or owned by a
group you trust as much as the program itself, and never point a pickling cache at
a file other users can write. Use ``"json"`` or ``"raw"`` when that is not
acceptable.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import json
import pathlib
import pickle
import uuid
from collections.abc import Callable, Coroutine
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from ._async_cache import AsyncCache
from ._cache import Cache

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

P = ParamSpec("P")

__all__ = ["MAX_READABLE_KEY", "CachedFunction", "Serializer", "cached"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: Default keys longer than this many bytes end in a digest of the arguments.
MAX_READABLE_KEY: Final = 512


class Serializer(Protocol):
    """What ``serializer=`` accepts besides the names: ``dumps`` and ``loads``."""

    def dumps(self, obj: Any, /) -> Buffer: ...

    def loads(self, data: bytes, /) -> Any: ...


class _Pickle:
    @staticmethod
    def dumps(obj: Any, /) -> bytes:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(data: bytes, /) -> Any:
        return pickle.loads(data)


class _Json:
    @staticmethod
    def dumps(obj: Any, /) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def loads(data: bytes, /) -> Any:
        return json.loads(data)


class _Raw:
    @staticmethod
    def dumps(obj: Any, /) -> Any:
        if obj is None:
            return None  # not cached; the caller gets None
        try:
            memoryview(obj).release()
        except TypeError:
            raise TypeError(
                f'serializer="raw" needs a bytes-like result, not {type(obj).__name__}'
            ) from None
        return obj

    @staticmethod
    def loads(data: bytes, /) -> bytes:
        return data


_SERIALIZERS: Final[dict[str, Serializer]] = {"pickle": _Pickle(), "json": _Json(), "raw": _Raw()}


def _serializer(spec: str | Serializer) -> Serializer:
    if isinstance(spec, str):
        try:
            return _SERIALIZERS[spec]
        except KeyError:
            names = ", ".join(map(repr, _SERIALIZERS))
            raise ValueError(
                f"unknown serializer {spec!r}: use one of {names} or an object "
                "with dumps() and loads()"
            ) from None
    if not (callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None))):
        raise TypeError(f"serializer {spec!r} has no dumps() and loads()")
    return spec


_REPR_TYPES: Final = (
    datetime.date,  # datetime.datetime too
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    fractions.Fraction,
    uuid.UUID,
    pathlib.PurePath,
)


def _canonical(value: object) -> str:
    """A text for ``value`` that is the same in every process and every run."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return repr(value)  # subclasses (an IntEnum, say) have their own rules
    if isinstance(value, enum.Enum):
        cls = type(value)
        return f"{cls.__module__}.{cls.__qualname__}.{value.name}"
    if type(value) is bytearray:
        return f"bytearray({bytes(value)!r})"
    if type(value) is tuple:
        return "(" + "".join(_canonical(v) + "," for v in value) + ")"
    if type(value) is list:
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    if type(value) is dict:
        items = sorted((_canonical(k), _canonical(v)) for k, v in value.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if type(value) in (set, frozenset):
        return "{" + ",".join(sorted(_canonical(v) for v in value)) + "}"  # type: ignore[attr-defined]
    if isinstance(value, _REPR_TYPES):
        return repr(value)
    raise TypeError(
        f"cached(): cannot build a stable cache key from an argument of type "
        f"{type(value).__qualname__} ({value!r:.80}); pass key=... to cached()"
    )


def _default_key_builder(func: Callable[..., Any]) -> Callable[..., str]:
    """Build the default key function of ``func`` (see the module docstring)."""
    signature = inspect.signature(func)
    prefix = f"{func.__module__}:{func.__qualname__}"

    def make_key(*args: Any, **kwargs: Any) -> str:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = ", ".join(f"{n}={_canonical(v)}" for n, v in bound.arguments.items())
        key = f"{prefix}({arguments})"
        if len(key.encode()) <= MAX_READABLE_KEY:
            return key
        digest = hashlib.sha256(arguments.encode()).hexdigest()
        head = key.encode()[: MAX_READABLE_KEY - len(digest) - 1].decode(errors="ignore")
        return f"{head}#{digest}"

    return make_key


def _version_prefix(version: object) -> str | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        raise TypeError(f"cached(): version must be a str or an int, not {type(version).__name__}")
    if version == "":
        raise ValueError("cached(): version must not be empty (None means no version)")
    return f"v{version}:"


def _prefixed(prefix: str, build_key: Callable[..., str | bytes]) -> Callable[..., str | bytes]:
    encoded = prefix.encode()

    def make_key(*args: Any, **kwargs: Any) -> str | bytes:
        built = build_key(*args, **kwargs)
        return prefix + built if isinstance(built, str) else encoded + bytes(built)

    return make_key


class _Missing(enum.Enum):
    MISSING = enum.auto()


class CachedFunction(Protocol, Generic[P, T_co]):
    """What `cached` returns: the async function, plus ``cache``, ``cache_key``
    and ``invalidate``."""

    #: The `AsyncCache` results are stored in (for its `statistics()`, say).
    cache: AsyncCache
    __name__: str
    __qualname__: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T_co]: ...

    # A decorated method binds like a function (argument types are not tracked).
    @overload
    def __get__(self, instance: None, owner: type | None = None, /) -> Self: ...

    @overload
    def __get__(
        self, instance: object, owner: type | None = None, /
    ) -> Callable[..., Coroutine[Any, Any, T_co]]: ...

    def __get__(self, instance: object, owner: type | None = None, /) -> Any: ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str | bytes:
        """The cache key of a call with these arguments. Never waits."""
        ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the cached result of a call with these arguments; True if there
        was one. Never waits."""
        ...


def cached(
    cache: AsyncCache | Cache,
    *,
    ttl: float | None = None,
    key: Callable[..., str | bytes] | None = None,
    serializer: str | Serializer = "pickle",
    version: str | int | None = None,
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], CachedFunction[P, T]]:
    """Decorate an async function so that its results are cached in ``cache``.

    ``cache`` is an `AsyncCache` or a `Cache` (wrapped with
    `AsyncCache.from_cache`). ``ttl`` is the results' time-to-live in seconds (None:
    the cache's default). ``key(*args, **kwargs)`` builds a call's key (default:
    module, qualified name and arguments; see the module docstring),
    ``serializer`` turns results into bytes and back, and ``version`` starts every
    key with ``v{version}:`` (change it when the function's results change shape).

    A call waits exactly as `AsyncCache.get` does: a hit on a small result returns
    without a checkpoint; a miss runs the function, coalesced with concurrent calls
    with the same key. Cancelling a call cancels only that call.
    """
    if isinstance(cache, Cache):
        acache = AsyncCache.from_cache(cache)
    elif isinstance(cache, AsyncCache):
        acache = cache
    else:
        raise TypeError(
            f"cached() needs an aiovmc.AsyncCache or aiovmc.Cache, not {type(cache).__name__}"
        )
    codec = _serializer(serializer)
    dumps, loads = codec.dumps, codec.loads
    prefix = _version_prefix(version)

    def decorate(func: Callable[P, Coroutine[Any, Any, T]]) -> CachedFunction[P, T]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"cached() decorates async functions; {func!r} is not one")
        build_key: Callable[..., str | bytes] = key or _default_key_builder(func)
        make_key = build_key if prefix is None else _prefixed(prefix, build_key)
        get = acache.get

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            async def load(_key: bytes) -> Any:
                return dumps(await func(*args, **kwargs))

            data = await get(make_key(*args, **kwargs), _Missing.MISSING, on_miss=load, ttl=ttl)
            if data is _Missing.MISSING:
                return None  # type: ignore[return-value]  # the raw serializer saw None
            return cast(T, loads(data))

        def cache_key(*args: P.args, **kwargs: P.kwargs) -> str | bytes:
            return make_key(*args, **kwargs)

        async def invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
            return await acache.delete(make_key(*args, **kwargs))

        wrapper.cache = acache  # type: ignore[attr-defined]
        wrapper.cache_key = cache_key  # type: ignore[attr-defined]
        wrapper.invalidate = invalidate  # type: ignore[attr-defined]
        return cast(CachedFunction[P, T], wrapper)

    return decorate
