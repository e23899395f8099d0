"""Proto <-> spec conversion is derived from the spec declarations: checked field by field, both ways."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.convert import (
    decode_spec_from_proto,
    duration,
    edit_spec_from_proto,
    enum_name,
    enum_value,
    inversion_spec_from_proto,
    progress_message,
    spec_from_proto,
    spec_to_proto,
)
from tokenflow.errors import SpecError
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec, spec_fields
from tokenflow_pb.v1 import common_pb2

SPECS: list[tuple[type, Any, str]] = [
    (DecodeSpec, common_pb2.DecodeSpec, "decode"),
    (InversionSpec, common_pb2.InversionSpec, "inversion"),
    (EditSpec, common_pb2.EditSpec, "edit"),
]


def _default(cls: type) -> Any:
    return cls(prompt="a cat") if cls is EditSpec else cls()


def _other_value(f: Any, spec: Any) -> Any:
    """A valid value different from the field's default, chosen from its declaration."""
    doc, default = f.doc, getattr(spec, f.name)
    if doc.choices is not None:
        return next(c for c in doc.choices if c != default)
    if f.name == "keyframe_schedule":
        return ((1, 5), (2, 6))
    if f.name in ("width", "height"):
        return 128
    if isinstance(default, bool):
        return not default
    if isinstance(default, str):
        return default + " and more"
    if isinstance(default, float):
        hi = doc.maximum if doc.maximum is not None else default + 1
        return (default + hi) / 2 if default != hi else default / 2
    if default is None:  # max_frames
        return 7
    lo = doc.minimum if doc.minimum is not None else 0
    return default + 1 if doc.maximum is None or default + 1 <= doc.maximum else max(lo, default - 1)


@pytest.mark.parametrize(("cls", "msg_cls", "section"), SPECS, ids=[s[2] for s in SPECS])
def test_an_empty_message_means_every_default(cls: type, msg_cls: Any, section: str) -> None:
    msg = msg_cls(prompt="a cat") if cls is EditSpec else msg_cls()
    assert spec_from_proto(cls, msg, section) == _default(cls)


@pytest.mark.parametrize(("cls", "msg_cls", "section"), SPECS, ids=[s[2] for s in SPECS])
def test_every_field_round_trips(cls: type, msg_cls: Any, section: str) -> None:
    base = _default(cls)
    for f in spec_fields(cls):
        changed = base.replace(**{f.name: _other_value(f, base)})
        if cls is DecodeSpec and f.name in ("width", "height"):
            changed = changed.replace(width=128, height=128)
        msg = spec_to_proto(changed, msg_cls)
        back = spec_from_proto(cls, msg, section)
        assert back == changed, f.name
        assert msg_cls.FromString(msg.SerializeToString()) == msg
    assert spec_from_proto(cls, spec_to_proto(base, msg_cls), section) == base


def test_optional_fields_set_to_zero_are_not_defaults() -> None:
    spec = edit_spec_from_proto(common_pb2.EditSpec(prompt="a cat", guidance_scale=0.0, negative_prompt=""))
    assert spec.guidance_scale == 0.0 and spec.negative_prompt == ""
    assert edit_spec_from_proto(common_pb2.EditSpec(prompt="a cat")).guidance_scale == 7.5
    assert inversion_spec_from_proto(common_pb2.InversionSpec(reconstruct=False)).reconstruct is False
    assert decode_spec_from_proto(common_pb2.DecodeSpec(max_frames=0)).max_frames is None  # 0 = all


def test_enums_map_by_name() -> None:
    spec = edit_spec_from_proto(
        common_pb2.EditSpec(
            prompt="a cat",
            method=common_pb2.EDIT_METHOD_PER_FRAME,
            propagation_weighting=common_pb2.PROPAGATION_WEIGHTING_LINEAR,
        )
    )
    assert spec.method == "per-frame" and spec.propagation_weighting == "linear"
    assert enum_value(common_pb2.EditMethod, "per-frame") == common_pb2.EDIT_METHOD_PER_FRAME
    assert enum_name(common_pb2.ArtifactKind, common_pb2.ARTIFACT_KIND_PROPAGATION) == "propagation"
    assert enum_name(common_pb2.Phase, 0) is None
    with pytest.raises(ValueError):
        enum_value(common_pb2.Phase, "dancing")


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (common_pb2.EditSpec(prompt="a cat", method=99), "edit.method"),
        (common_pb2.EditSpec(prompt="a cat", guidance_scale=math.nan), "edit.guidance_scale"),
        (common_pb2.EditSpec(prompt="a cat", pnp_f_t=math.inf), "edit.pnp_f_t"),
        (common_pb2.EditSpec(prompt="a cat", crf=99), "edit.crf"),
    ],
)
def test_bad_values_name_their_field(msg: common_pb2.EditSpec, field: str) -> None:
    with pytest.raises(SpecError) as info:
        edit_spec_from_proto(msg)
    assert info.value.field == field


def test_progress_messages_carry_enums_and_durations() -> None:
    msg = progress_message(
        "ab" * 32,
        {"stage": "inversion", "phase": "invert", "step": 3, "eta_seconds": 1.5, "elapsed_seconds": 2.25},
    )
    assert msg.stage == common_pb2.STAGE_INVERSION and msg.phase == common_pb2.PHASE_INVERT
    assert msg.eta.ToNanoseconds() == 1_500_000_000 and msg.elapsed == duration(2.25)
    assert msg.step == 3 and msg.job_id == "ab" * 32
    unknown = progress_message("ab" * 32, {"phase": "something new", "message": "hi"})
    assert unknown.phase == common_pb2.PHASE_UNSPECIFIED and unknown.message == "hi"
    assert not unknown.HasField("eta")
