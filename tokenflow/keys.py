"""Content addresses: each artifact kind's key is made from exactly what determines it.

A key is the sha256 of a canonical JSON encoding of an *identity*: the input digests, the model
fingerprint and the spec fields that change the result. What decides membership is declared once, on
the fields (tokenflow.specs.FieldDoc: `execution`, `applies`, `kinds`) and the methods
(tokenflow.methods); this module only applies it, and normalises values to what the computation
actually uses:

- PnP fractions enter as the number of injecting steps, int(T * fraction), and `sdedit_start` as the
  number of skipped steps, so 0.5 and 0.51 of 50 steps are one key;
- the keyframe schedule enters as the schedule actually used (drawn from `seed`, or given explicitly),
  so an explicit schedule equal to a seed's draw is the same edit;
- a keyframe preview uses fixed keyframes (window centres): seed, schedule, propagation weighting and
  the video encoding do not enter its key;
- fields that only change how a job runs (`chunk_size`, inversion `batch_size`) never enter a key: they
  change at most the float summation order, so results agree within float tolerance, and the stored
  result serves every setting.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from tokenflow.methods import method
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec, keyframe_attention_identity, spec_fields

KEY_SCHEMA = 2
"""Bumped whenever an identity's encoding changes, so old entries are never mistaken for new ones.
2: exact identities (this module); 1: every spec field."""

EDIT_KINDS = ("keyframes", "propagation")


def canonical_json(obj: Any) -> bytes:
    """Canonical UTF-8 JSON: sorted keys, no whitespace, no NaN/inf, tuples as lists.

    Floats are written with Python's shortest round-trip repr (stable across platforms and runs), and a
    float with an integral value is written as the integer (``7.0`` and ``7`` mean the same setting, so
    they must name the same artifact).
    """
    return json.dumps(
        _normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _normalise(obj: Any) -> Any:
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"cannot put a non-finite float ({obj}) in an artifact key")
        return int(obj) if obj.is_integer() and abs(obj) < 2**53 else obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"artifact key dicts need str keys, got {k!r}")
            out[k] = _normalise(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    raise TypeError(f"cannot put a {type(obj).__name__} in an artifact key")


def artifact_key(kind: str, identity: Mapping[str, Any]) -> str:
    """Content address of an artifact: sha256 hex of ``{"kind", "v": KEY_SCHEMA, **identity}``."""
    if "kind" in identity or "v" in identity:
        raise ValueError("an identity must not contain the reserved fields 'kind' or 'v'")
    return hashlib.sha256(canonical_json({"kind": kind, "v": KEY_SCHEMA, **identity})).hexdigest()


def _determining(spec: Any) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in spec_fields(type(spec)) if not f.doc.execution}


def decode_identity(decode: DecodeSpec) -> dict[str, Any]:
    d = _determining(decode)
    if decode.size is not None:
        d.pop("target_area")  # an exact size makes the pixel budget irrelevant
    return d


def inversion_identity(
    video_digest: str, decode: DecodeSpec, inversion: InversionSpec, model_fingerprint: str
) -> dict[str, Any]:
    return {
        "video": video_digest,
        "model": model_fingerprint,
        "decode": decode_identity(decode),
        "inversion": _determining(inversion),
    }


def inversion_key(
    video_digest: str, decode: DecodeSpec, inversion: InversionSpec, model_fingerprint: str
) -> str:
    return artifact_key("inversion", inversion_identity(video_digest, decode, inversion, model_fingerprint))


def run_steps(spec: EditSpec, edit_steps: int) -> tuple[int, int]:
    """(skipped steps, denoising steps run) of an edit of an inversion with `edit_steps` timesteps."""
    skipped = edit_steps - int(edit_steps * spec.sdedit_start) if method(spec.method).sdedit_start else 0
    return skipped, edit_steps - skipped


def edit_identity(
    kind: str,
    inversion_digest: str,
    spec: EditSpec,
    model_fingerprint: str,
    n_frames: int,
    edit_steps: int,
) -> dict[str, Any]:
    """The identity of an edit result of kind "keyframes" (preview) or "propagation" (the video).

    `n_frames` and `edit_steps` are the inversion's: they resolve fractions into step counts and the
    seed into the keyframe schedule actually used.
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit artifact kind {kind!r}")
    m = method(spec.method)
    fields: dict[str, Any] = {}
    for f in spec_fields(EditSpec):
        doc = f.doc
        if doc.execution or kind not in doc.kinds or (doc.applies and not getattr(m, doc.applies)):
            continue
        fields[f.name] = getattr(spec, f.name)
    if "pnp_attn_t" in fields:
        fields["pnp_attn_t"] = int(edit_steps * spec.pnp_attn_t)
        fields["pnp_f_t"] = int(edit_steps * spec.pnp_f_t)
    if "keyframe_attention" in fields:
        fields["keyframe_attention"] = keyframe_attention_identity(
            spec.keyframe_attention, n_frames, spec.keyframe_interval
        )
    skipped, steps = run_steps(spec, edit_steps)
    if "sdedit_start" in fields:
        fields["sdedit_start"] = skipped
    if "seed" in fields:
        from tokenflow.schedule import resolve_schedule

        fields.pop("seed")
        fields["keyframe_schedule"] = resolve_schedule(spec, n_frames, steps)
    return {
        "inversion": inversion_digest,
        "model": model_fingerprint,
        "edit": fields,
    }


def edit_key(
    kind: str,
    inversion_digest: str,
    spec: EditSpec,
    model_fingerprint: str,
    n_frames: int,
    edit_steps: int,
) -> str:
    identity = edit_identity(kind, inversion_digest, spec, model_fingerprint, n_frames, edit_steps)
    return artifact_key(kind, identity)


FEATURES_KIND = "features"


def features_steps(spec: EditSpec, edit_steps: int) -> tuple[list[int], list[int]]:
    """(steps, conv-injection steps) the source features of an edit cover, as indices among all T steps.

    An SDEdit start skips the first steps; conv injection runs on the first int(T * pnp_f_t) of all T
    steps for PnP methods (tokenflow.editing), none otherwise.
    """
    skipped, _ = run_steps(spec, edit_steps)
    steps = list(range(skipped, edit_steps))
    conv = int(edit_steps * spec.pnp_f_t) if method(spec.method).pnp else 0
    return steps, [s for s in steps if s < conv]


def features_identity(
    inversion_digest: str, spec: EditSpec, n_frames: int, edit_steps: int
) -> dict[str, Any]:
    """The identity of an edit's source features (TokenFlow methods only): exactly what determines them.

    The inversion (model, clip, inversion prompt and steps), the keyframe schedule actually used (drawn
    from the seed or explicit), the keyframe interval, the propagation weighting (it blends the source
    branch's tokens too, so it changes the later layers' correspondences), the steps covered and the
    conv-injection steps held. Nothing else: the target and negative prompts, guidance, PnP attention
    steps and output encoding never reach the source branch, and execution fields only reorder floats.
    """
    if not method(spec.method).keyframes:
        raise ValueError(f"method {spec.method!r} has no propagation pass: it has no source features")
    from tokenflow.schedule import resolve_schedule

    steps, conv_steps = features_steps(spec, edit_steps)
    return {
        "inversion": inversion_digest,
        "keyframe_schedule": resolve_schedule(spec, n_frames, len(steps)),
        "keyframe_interval": spec.keyframe_interval,
        "propagation_weighting": spec.propagation_weighting,
        "first_step": steps[0],
        "steps": len(steps),
        "conv_steps": len(conv_steps),
    }


def features_key(inversion_digest: str, spec: EditSpec, n_frames: int, edit_steps: int) -> str:
    return artifact_key(FEATURES_KIND, features_identity(inversion_digest, spec, n_frames, edit_steps))
