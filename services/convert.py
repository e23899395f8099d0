"""Proto <-> library conversion: specs, enum values, times, progress.

Closed sets are proto enums whose values are named after the library's strings: the library value
"per-frame" of `EditSpec.method` is `EDIT_METHOD_PER_FRAME` (the prefix is the enum type's name in
UPPER_SNAKE case, `-` becomes `_`); `*_UNSPECIFIED` (0) means the library default. The same rule names
artifact kinds, stages and phases, so no value is listed twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import duration_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message

from services.store import is_digest
from tokenflow.errors import SpecError
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec, spec_fields
from tokenflow_pb.v1 import common_pb2

__all__ = [
    "artifact_kind",
    "check_digest",
    "decode_spec_from_proto",
    "duration",
    "edit_spec_from_proto",
    "enum_name",
    "enum_prefix",
    "enum_value",
    "inversion_spec_from_proto",
    "kind_name",
    "progress_message",
    "spec_from_proto",
    "spec_to_proto",
]

M = TypeVar("M", bound=Message)


# ----------------------------------------------------------------------------------------------------------
# request fields


def check_digest(value: str, what: str, hint: str) -> str:
    """Reject a malformed content address with a message saying where a good one comes from."""
    if not is_digest(value):
        raise SpecError(
            f"{what} {value[:80]!r} is not a digest: expected 64 lowercase hex characters; {hint}", field=what
        )
    return value


# ----------------------------------------------------------------------------------------------------------
# enums


def _descriptor(enum: EnumTypeWrapper | EnumDescriptor) -> EnumDescriptor:
    return enum if isinstance(enum, EnumDescriptor) else enum.DESCRIPTOR


def enum_prefix(enum: EnumTypeWrapper | EnumDescriptor) -> str:
    """`EditMethod` -> `EDIT_METHOD_`: the prefix of every value of the enum."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", _descriptor(enum).name).upper() + "_"


def enum_value(enum: EnumTypeWrapper | EnumDescriptor, name: str | None) -> int:
    """The enum number of a library value ("per-frame" -> EDIT_METHOD_PER_FRAME); None -> 0 (unset).

    ValueError when the enum has no such value (a library value the proto does not know: a test checks
    that cannot happen for the closed sets).
    """
    if name is None:
        return 0
    desc = _descriptor(enum)
    value = desc.values_by_name.get(enum_prefix(desc) + name.upper().replace("-", "_"))
    if value is None:
        raise ValueError(f"{desc.full_name} has no value for {name!r}")
    return value.number


def enum_name(enum: EnumTypeWrapper | EnumDescriptor, number: int) -> str | None:
    """The library value of an enum number (EDIT_METHOD_PER_FRAME -> "per-frame"); None for 0 / unknown."""
    desc = _descriptor(enum)
    value = desc.values_by_number.get(number)
    if value is None or number == 0:
        return None
    return value.name[len(enum_prefix(desc)) :].lower().replace("_", "-")


def artifact_kind(kind: str) -> int:
    """ArtifactKind number of a store kind ("video" -> ARTIFACT_KIND_VIDEO)."""
    return enum_value(common_pb2.ArtifactKind, kind)


def kind_name(number: int) -> str | None:
    """Store kind of an ArtifactKind number (None for UNSPECIFIED or unknown numbers)."""
    return enum_name(common_pb2.ArtifactKind, number)


def duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(round(max(0.0, float(seconds)) * 1e9)))
    return out


# ----------------------------------------------------------------------------------------------------------
# progress: a job's progress dict (proto field names, seconds as floats, strings for enums) -> Progress

_SECONDS_FIELDS = {"eta_seconds": "eta", "elapsed_seconds": "elapsed", "step_seconds": "step_time"}
_ENUM_FIELDS = {"stage": common_pb2.Stage, "phase": common_pb2.Phase}
_PROGRESS_FIELDS = frozenset(common_pb2.Progress.DESCRIPTOR.fields_by_name) - {"job_id"}


def progress_message(job_id: str, data: Mapping[str, Any]) -> common_pb2.Progress:
    """A Progress message from the dict a job reports (see services.jobs.ProgressEvent).

    Times arrive as seconds (`eta_seconds`, `elapsed_seconds`) and become Durations; stage and phase
    arrive as the library's strings and become enum values (an unknown phase is reported unset rather
    than failing the stream).
    """
    msg = common_pb2.Progress(job_id=job_id)
    for key, value in data.items():
        if value is None:
            continue
        if key in _SECONDS_FIELDS:
            getattr(msg, _SECONDS_FIELDS[key]).CopyFrom(duration(value))
        elif key in _ENUM_FIELDS:
            try:
                setattr(msg, key, enum_value(_ENUM_FIELDS[key], str(value)))
            except ValueError:
                continue
        elif key in _PROGRESS_FIELDS:
            setattr(msg, key, value)
    return msg


# ----------------------------------------------------------------------------------------------------------
# proto specs <-> library specs, generic over the spec declarations (tokenflow.specs.spec_fields)
#
# Per field, by its declaration and the proto field of the same name:
# * `choices` <-> an enum (0 = the default);
# * a tuple of int tuples (keyframe_schedule) <-> a repeated message with one repeated `frames` field;
# * an `optional` proto field unset -> the default; a field whose default is None (max_frames) -> None
#   when the proto holds 0 ("all");
# * anything else is copied as is. Non-finite floats are refused here (proto doubles can carry NaN).

S = TypeVar("S")


def _proto_field(msg: Message, name: str) -> FieldDescriptor:
    field = msg.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise TypeError(f"{msg.DESCRIPTOR.full_name} has no field {name!r}: the proto and the spec disagree")
    return field


def spec_from_proto(cls: type[S], msg: Message, section: str) -> S:
    """The library spec `cls` from its proto message (not validated: call `.validate()`)."""
    values: dict[str, Any] = {}
    for f in spec_fields(cls):
        field = _proto_field(msg, f.name)
        path = f"{section}.{f.name}"
        raw = getattr(msg, f.name)
        if f.doc.choices is not None:
            value: Any = f.default if raw == 0 else enum_name(field.enum_type, raw)
            if value is None or value not in f.doc.choices:
                raise SpecError(
                    f"{path} {raw} is unknown: use one of the {field.enum_type.name} values", field=path
                )
        elif field.is_repeated:
            value = tuple(tuple(int(v) for v in row.frames) for row in raw) or f.default
        elif field.has_presence and not msg.HasField(f.name) and not f.required:
            value = f.default
        elif f.default is None and not raw:
            value = None
        else:
            value = raw
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{path} must be a finite number, got {value}", field=path)
        values[f.name] = value
    return cls(**values)


def spec_to_proto(spec: Any, msg_cls: type[M]) -> M:
    """The proto message of a library spec; fields equal to their default stay unset where they can."""
    msg = msg_cls()
    for f in spec_fields(type(spec)):
        field = _proto_field(msg, f.name)
        value = getattr(spec, f.name)
        if f.doc.choices is not None:
            setattr(msg, f.name, enum_value(field.enum_type, value))
        elif field.is_repeated:
            for row in value or ():
                getattr(msg, f.name).add(frames=list(row))
        elif value is None:
            continue
        elif field.has_presence and not f.required and value == f.default:
            continue
        else:
            setattr(msg, f.name, value)
    return msg


def decode_spec_from_proto(msg: common_pb2.DecodeSpec) -> DecodeSpec:
    """Validated DecodeSpec (width and height 0 = automatic size)."""
    return spec_from_proto(DecodeSpec, msg, "decode").validate()


def inversion_spec_from_proto(msg: common_pb2.InversionSpec) -> InversionSpec:
    """Validated InversionSpec."""
    return spec_from_proto(InversionSpec, msg, "inversion").validate()


def edit_spec_from_proto(msg: common_pb2.EditSpec) -> EditSpec:
    """Validated EditSpec."""
    return spec_from_proto(EditSpec, msg, "edit").validate()
