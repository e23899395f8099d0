"""Fuzz spec validation: a spec built from any values validates (and is then valid) or raises SpecError.

Run (new inputs go to the first folder; the kept corpus is only read):

    mkdir -p /tmp/specs-work
    .venv/bin/python -m fuzz.run specs /tmp/specs-work fuzz/corpus/specs -max_total_time=60 -max_len=4096

Values are drawn per declared field type (what the proto conversion and the CLIs can produce: ints of any
size, floats including NaN and infinities, any unicode text, None for optional fields, schedules of any
shape), with the declared bounds and their neighbours favoured. A finding is an exception other than
SpecError, or a spec that validates although a value breaks its own declaration (out of range, not
finite, not one of the choices, an over-long prompt).
"""

from __future__ import annotations

import math
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

from tokenflow.errors import SpecError
from tokenflow.specs import (
    MAX_PROMPT_CHARS,
    DecodeSpec,
    EditSpec,
    FieldDoc,
    InversionSpec,
    SpecField,
    spec_fields,
)

SPEC_CLASSES = (DecodeSpec, InversionSpec, EditSpec)


class Draw:
    """Reads choices from the fuzzer's bytes (zeros once they run out), so any input is a valid program."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def pick(self, options: typing.Sequence[Any]) -> Any:
        return options[self.byte() % len(options)]

    def int64(self) -> int:
        return struct.unpack("<q", self.take(8))[0]

    def double(self) -> float:
        return struct.unpack("<d", self.take(8))[0]

    def text(self, limit: int) -> str:
        length = min(int.from_bytes(self.take(2), "little"), limit)
        return self.take(length * 2).decode("utf-16-le", errors="replace")


def _number(draw: Draw, f: SpecField, as_float: bool) -> int | float:
    lo, hi = f.doc.minimum, f.doc.maximum
    edges = [0, 1, -1, 2**63 - 1, -(2**63), 2**64]
    for bound in (lo, hi):
        if bound is not None:
            edges += [bound, bound - 1, bound + 1]
    if as_float:
        edges += [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]
        near = (math.nextafter(float(b), d) for b in (lo, hi) if b is not None for d in (-math.inf, math.inf))
        edges += list(near)
    choice = draw.byte() % (len(edges) + 2)
    if choice < len(edges):
        value = edges[choice]
    elif as_float:
        value = draw.double()
    else:
        value = draw.int64()
    return float(value) if as_float else int(value)


def _schedule(draw: Draw) -> tuple[tuple[int, ...], ...]:
    rows = draw.pick((0, 1, 2, 5, 1000, 1001))
    width = draw.pick((0, 1, 3, 1025))
    # Rows repeat a few drawn ones: a million-entry schedule costs the harness little, not a million draws.
    drawn = [tuple(_number(draw, _SCHEDULE_ENTRY, False) for _ in range(min(width, 8))) for _ in range(2)]
    return tuple((drawn[i % 2] * (width // max(1, len(drawn[i % 2])) + 1))[:width] for i in range(rows))


_SCHEDULE_ENTRY = SpecField("entry", int, 0, FieldDoc(help="a frame index", minimum=0, maximum=9999))


def _value(draw: Draw, f: SpecField) -> Any:
    kind = f.type
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        if draw.byte() % 4 == 0:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if f.doc.choices is not None:
        return draw.pick((*f.doc.choices, "", "TOKENFLOW", draw.text(40)))
    if kind is str:
        limit = draw.pick((8, 64, MAX_PROMPT_CHARS + 8))
        return draw.pick((draw.text(limit), "", " ", "a\x00b", "x" * (MAX_PROMPT_CHARS + 1)))
    if kind is bool:
        return bool(draw.byte() & 1)
    if kind is int:
        return _number(draw, f, as_float=False)
    if kind is float:
        return _number(draw, f, as_float=True)
    if typing.get_origin(kind) is tuple:
        return _schedule(draw)
    raise AssertionError(f"the fuzzer has no values for {f.name}: {kind}")


def _assert_valid(spec: Any) -> None:
    """What a validated spec promises: every value within its declaration."""
    for f in spec_fields(type(spec)):
        value, doc = getattr(spec, f.name), f.doc
        where = f"{spec.section}.{f.name}={value!r:.80}"
        if doc.choices is not None:
            assert value in doc.choices, where
        elif doc.text:
            assert isinstance(value, str) and len(value) <= MAX_PROMPT_CHARS and "\x00" not in value, where
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), f"validated a non-finite number: {where}"
            assert doc.minimum is None or value >= doc.minimum, where
            assert doc.maximum is None or value <= doc.maximum, where


def build_spec(data: bytes) -> Any:
    """One spec of a class chosen by `data`, with field values drawn from `data` (not validated)."""
    draw = Draw(data)
    cls = draw.pick(SPEC_CLASSES)
    values: dict[str, Any] = {}
    for f in spec_fields(cls):
        if f.required or draw.byte() % 3:
            values[f.name] = _value(draw, f)
    return cls(**values)


def check_specs(data: bytes) -> None:
    """Build one spec of a fuzzed class from fuzzed field values and validate it."""
    spec = build_spec(data)
    cls = type(spec)
    try:
        spec.validate()
    except SpecError as exc:
        assert str(exc), "SpecError without a message"
        assert exc.field is None or exc.field.startswith(f"{cls.section}."), exc.field
        return
    _assert_valid(spec)


def fuzz_target() -> Callable[[bytes], None]:
    """The one-argument target for libFuzzer (fuzz.run)."""
    return check_specs
