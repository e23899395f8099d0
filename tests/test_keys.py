"""Content keys are exact: a field that does not determine an artifact never changes its key, and every
field that does changes it. The expectations are written out here by hand, per method and artifact kind,
independently of the declarations they check.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tokenflow.keys import KEY_SCHEMA, edit_key, inversion_key
from tokenflow.methods import METHODS
from tokenflow.schedule import draw_keyframes
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec, spec_fields

INV = "a" * 64
MODEL = "f" * 64
N_FRAMES, STEPS = 20, 10  # 3 windows of 8 (the last partial), 10 editing steps

# One changed value per edit field; each must alter what the computation uses when the field applies.
EDIT_CHANGES: dict[str, Any] = {
    "prompt": "a dog",
    "negative_prompt": "",
    "guidance_scale": 3.0,
    "pnp_attn_t": 0.8,  # 5 -> 8 injecting steps of 10
    "pnp_f_t": 0.3,  # 8 -> 3
    "seed": 7,
    "keyframe_interval": 4,
    "chunk_size": 3,
    "method": None,  # changes with the method itself: tested separately
    "sdedit_start": 0.5,  # 1 -> 5 skipped steps
    "keyframe_schedule": "explicit",  # a schedule other than seed 0's draw
    "propagation_weighting": "linear",
    "crf": 30,
    "keyframe_attention": "window:1",
    "keyframe_group_size": 2,  # execution only
    "features": False,  # execution only: the source features change how propagation runs, not its result
}

# Which edit fields determine which artifact, by method (hand-written ground truth).
DETERMINES: dict[tuple[str, str], set[str]] = {
    ("tokenflow", "propagation"): {
        "prompt", "negative_prompt", "guidance_scale", "pnp_attn_t", "pnp_f_t", "seed",
        "keyframe_interval", "keyframe_schedule", "propagation_weighting", "crf", "keyframe_attention",
    },
    ("tokenflow", "keyframes"): {
        "prompt", "negative_prompt", "guidance_scale", "pnp_attn_t", "pnp_f_t", "keyframe_interval",
        "keyframe_attention",
    },
    ("sdedit", "propagation"): {
        "prompt", "negative_prompt", "guidance_scale", "seed", "keyframe_interval", "sdedit_start",
        "keyframe_schedule", "propagation_weighting", "crf", "keyframe_attention",
    },
    ("sdedit", "keyframes"): {
        "prompt", "negative_prompt", "guidance_scale", "keyframe_interval", "sdedit_start",
        "keyframe_attention",
    },
    ("per-frame", "propagation"): {
        "prompt", "negative_prompt", "guidance_scale", "pnp_attn_t", "pnp_f_t", "crf",
    },
    ("reconstruct", "propagation"): {"crf"},
}  # fmt: skip


def _key(kind: str, spec: EditSpec) -> str:
    return edit_key(kind, INV, spec, MODEL, N_FRAMES, STEPS)


def _changed(base: EditSpec, name: str) -> EditSpec:
    value = EDIT_CHANGES[name]
    if name == "keyframe_schedule":
        interval = base.keyframe_interval
        skipped = STEPS - int(STEPS * base.sdedit_start) if base.method == "sdedit" else 0
        drawn = draw_keyframes(N_FRAMES, interval, STEPS - skipped, base.seed)
        other = [[w * interval + (k - w * interval + 1) % min(interval, N_FRAMES - w * interval)
                  for w, k in enumerate(row)] for row in drawn]  # fmt: skip
        value = tuple(tuple(r) for r in other)
    return dataclasses.replace(base, **{name: value})


def test_every_edit_field_has_an_expectation() -> None:
    assert set(EDIT_CHANGES) == {f.name for f in spec_fields(EditSpec)}
    preview = {(m.name, "keyframes") for m in METHODS.values() if m.preview}
    assert set(DETERMINES) == {(m, "propagation") for m in METHODS} | preview


@pytest.mark.parametrize(("method", "kind"), sorted(DETERMINES))
def test_edit_keys_change_exactly_with_the_fields_that_determine_them(method: str, kind: str) -> None:
    base = EditSpec(prompt="a cat", method=method).validate()
    base_key = _key(kind, base)
    for name in EDIT_CHANGES:
        if name == "method":
            continue
        changed = _key(kind, _changed(base, name).validate())
        if name in DETERMINES[(method, kind)]:
            assert changed != base_key, f"{name} determines {method}/{kind} but did not change its key"
        else:
            assert changed == base_key, f"{name} does not determine {method}/{kind} but changed its key"


def test_methods_and_kinds_have_distinct_keys() -> None:
    keys = {(m, k): _key(k, EditSpec(prompt="a cat", method=m)) for m, k in DETERMINES}
    assert len(set(keys.values())) == len(keys)


def test_keys_use_what_the_computation_uses() -> None:
    base = EditSpec(prompt="a cat")
    # int(10 * 0.5) == int(10 * 0.55): the same injecting steps, the same edit.
    assert _key("propagation", base) == _key("propagation", base.replace(pnp_attn_t=0.55))
    # An explicit schedule equal to the seed's draw is the same edit as the draw.
    drawn = draw_keyframes(N_FRAMES, 8, STEPS, 0)
    explicit = base.replace(keyframe_schedule=tuple(tuple(r) for r in drawn))
    assert _key("propagation", explicit) == _key("propagation", base)
    # ... and with an explicit schedule, the seed no longer matters.
    assert _key("propagation", explicit) == _key("propagation", explicit.replace(seed=99))
    # Integral floats and ints are one setting.
    assert _key("propagation", base.replace(guidance_scale=7.0)) == _key(
        "propagation", base.replace(guidance_scale=7)
    )
    # A window covering every keyframe (3 of them: W >= 2) computes `all`, and spellings are one setting.
    assert _key("propagation", base.replace(keyframe_attention="window:2")) == _key("propagation", base)
    assert _key("propagation", base.replace(keyframe_attention="window:50")) == _key("propagation", base)
    assert _key("propagation", base.replace(keyframe_attention=" All ")) == _key("propagation", base)
    assert _key("propagation", base.replace(keyframe_attention="WINDOW:1")) == _key(
        "propagation", base.replace(keyframe_attention="window:1")
    )
    # The inversion and the model always determine an edit.
    assert edit_key("propagation", "b" * 64, base, MODEL, N_FRAMES, STEPS) != _key("propagation", base)
    assert edit_key("propagation", INV, base, "e" * 64, N_FRAMES, STEPS) != _key("propagation", base)


INVERSION_CHANGES: dict[str, Any] = {
    "decode.start": 2,
    "decode.max_frames": 10,
    "decode.stride": 2,
    "decode.width": None,  # with height: tested as a size below
    "decode.height": None,
    "decode.target_area": 128 * 128,
    "inversion.prompt": "a wolf",
    "inversion.steps": 100,
    "inversion.edit_steps": 25,
    "inversion.reconstruct": False,
    "inversion.batch_size": 2,
}
INVERSION_EXECUTION_ONLY = {"inversion.batch_size"}


def test_inversion_keys() -> None:
    assert set(INVERSION_CHANGES) == {f"decode.{f.name}" for f in spec_fields(DecodeSpec)} | {
        f"inversion.{f.name}" for f in spec_fields(InversionSpec)
    }
    decode, spec = DecodeSpec(), InversionSpec()
    base = inversion_key("v" * 64, decode, spec, MODEL)
    for path, value in INVERSION_CHANGES.items():
        if value is None:
            continue
        section, name = path.split(".")
        d = decode.replace(**{name: value}) if section == "decode" else decode
        s = spec.replace(**{name: value}) if section == "inversion" else spec
        changed = inversion_key("v" * 64, d.validate(), s.validate(), MODEL)
        assert (changed == base) == (path in INVERSION_EXECUTION_ONLY), path
    sized = DecodeSpec.sized((128, 64))
    assert inversion_key("v" * 64, sized, spec, MODEL) != base
    # With an exact size the pixel budget of the automatic size is irrelevant.
    assert inversion_key("v" * 64, sized.replace(target_area=64 * 64), spec, MODEL) == inversion_key(
        "v" * 64, sized, spec, MODEL
    )
    assert inversion_key("w" * 64, decode, spec, MODEL) != base
    assert inversion_key("v" * 64, decode, spec, "e" * 64) != base
    assert KEY_SCHEMA >= 2
