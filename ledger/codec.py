"""One codec for the records that cross a boundary: a dataclass ↔ a JSON-able dict.

Driven by the dataclass's type hints, so a record is described once (its class) and every
writer and reader agrees on it: bytes travel as hex, datetimes as ISO 8601 in UTC, enums by
value, tuples and lists as JSON arrays, nested dataclasses as objects; `dict[str, Any]` fields
are JSON already and pass through. Decoding is strict — an unknown field, a missing required
field or a value of the wrong shape raises `CodecError` — because a record that cannot be read
back exactly must be set aside, never half-read. Persisted formats put a version beside what this
produces (the spool, fold snapshots); this module only converts.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from ledger.errors import CodecError

T = TypeVar("T")


def to_json(item: Any) -> Any:
    """`item` (a dataclass instance, or anything inside one) as JSON-able values."""
    kind = type(item)
    if kind in _PLAIN:
        return item
    if dataclasses.is_dataclass(kind):
        return {name: to_json(getattr(item, name)) for name in _field_names(kind)}
    if kind is bytes:
        return item.hex()
    if isinstance(item, datetime):
        if item.tzinfo is None:
            raise CodecError(f"naive datetime {item!r}: every stored time carries its zone")
        return item.astimezone(UTC).isoformat()
    if isinstance(item, enum.Enum):
        return item.value
    if isinstance(item, tuple | list):
        return [to_json(value) for value in item]
    return item


def from_json(cls: type[T], data: Any) -> T:
    """The `cls` instance `to_json` made `data` from; `CodecError` when it cannot be one."""
    try:
        return typing.cast(T, _decoder(typing.cast(Any, cls))(data))
    except CodecError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CodecError(f"not a {getattr(cls, '__name__', cls)}: {exc}") from exc


_PLAIN = {str, int, float, bool, type(None), dict}
Decoder = Callable[[Any], Any]


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _decoder(hint: Any) -> Decoder:
    """A function from JSON values to `hint`'s type, built once per type from its hints."""
    if hint is Any:
        return _identity
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        return _union(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder(args[0])
            return lambda value: tuple(item(v) for v in _expect(value, list, hint))
        items = [_decoder(a) for a in args]

        def fixed(value: Any) -> tuple[Any, ...]:
            if len(_expect(value, list, hint)) != len(items):
                raise CodecError(f"{value!r} does not have the {len(items)} items of {hint}")
            return tuple(d(v) for d, v in zip(items, value, strict=True))

        return fixed
    if origin is list:
        (element,) = typing.get_args(hint)
        each = _decoder(element)
        return lambda value: [each(v) for v in _expect(value, list, hint)]
    if origin is dict:
        key, element = typing.get_args(hint)
        if key is not str:
            raise CodecError(f"JSON object keys are strings, not {key}")
        each = _decoder(element)
        return lambda value: {k: each(v) for k, v in _expect(value, dict, hint).items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _dataclass(hint)
    if hint is bytes:
        return lambda value: bytes.fromhex(_expect(value, str, hint))
    if hint is datetime:
        return _time
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    if hint is float:
        return _float
    if hint in (int, str, bool):
        def exact(value: Any) -> Any:
            if type(value) is not hint:
                raise CodecError(f"{value!r} is not a {hint.__name__}")
            return value

        return exact
    raise CodecError(f"the codec cannot decode {hint}")


def _union(hint: Any) -> Decoder:
    options = [o for o in typing.get_args(hint) if o is not type(None)]
    nullable = len(options) < len(typing.get_args(hint))
    decoders = [_decoder(o) for o in options]

    def decode(value: Any) -> Any:
        if value is None:
            if nullable:
                return None
            raise CodecError(f"null where {hint} was expected")
        for option in decoders:
            try:
                return option(value)
            except (CodecError, TypeError, ValueError):
                continue
        raise CodecError(f"{value!r} is none of {hint}")

    return decode


def _dataclass(cls: type) -> Decoder:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    decoders = {f.name: _decoder(hints[f.name]) for f in fields}
    required = {
        f.name for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }

    def decode(value: Any) -> Any:
        if not _expect(value, dict, cls).keys() <= decoders.keys():
            unknown = sorted(set(value) - set(decoders))
            raise CodecError(f"{cls.__name__} has no field(s) {unknown}")
        arguments = {name: decoders[name](v) for name, v in value.items()}
        if not required <= arguments.keys():
            raise CodecError(f"{cls.__name__} lacks field(s) {sorted(required - arguments.keys())}")
        return cls(**arguments)

    return decode


def _time(value: Any) -> datetime:
    parsed = datetime.fromisoformat(_expect(value, str, datetime))
    if parsed.tzinfo is None:
        raise CodecError(f"time {value!r} has no zone")
    return parsed.astimezone(UTC)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{value!r} is not a number")
    return float(value)


def _identity(value: Any) -> Any:
    return value


def _expect(value: Any, kind: type, hint: Any) -> Any:
    if not isinstance(value, kind):
        raise CodecError(f"{value!r} cannot be a {hint}")
    return value
