"""The client CLI's flags for the spec fields, and their conversion into the spec messages.

The spec fields are declared once, in the server's library (tokenflow/specs.py, with their CLI flags in
the field metadata). The client cannot import that library (it must install without torch), so the flags
are declared again here, with the same names, defaults, choices and ranges; tests/test_client_cli.py
checks this table against the library's declarations field by field, so the two cannot drift.

A flag's value goes into the proto field of the same name (proto field names equal spec field names).
String choices become enum values by the API's naming rule (clients.client.enum_number): "per-frame"
in `EditMethod` is EDIT_METHOD_PER_FRAME. A value of None (no default, not given) leaves the field
unset, so the server applies its default: the command line never restates a default.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message

from clients.client import enum_number

__all__ = [
    "DECODE_FLAGS",
    "EDIT_FLAGS",
    "INVERSION_FLAGS",
    "NEGATIVE_PROMPT",
    "SpecFlag",
    "add_spec_flags",
    "check_ranges",
    "fill_message",
    "section_values",
]

NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
METHODS = ("tokenflow", "sdedit", "per-frame", "reconstruct")
WEIGHTINGS = ("sigmoid", "linear")


@dataclass(frozen=True)
class SpecFlag:
    """One spec field's command-line flag: `flags[0]` is canonical, the rest are aliases."""

    section: str  # "decode", "inversion" or "edit": the spec message the field belongs to
    field: str  # the spec (and proto) field name
    flags: tuple[str, ...]
    type: Callable[[str], Any]
    default: Any
    help: str
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: tuple[str, ...] | None = None
    same_as: str | None = None
    """A field of the same section whose value this one takes when not given (the two declared defaults
    are equal): `--inversion-steps` follows `--steps`, so `--steps 4` alone inverts with 4 steps."""

    @property
    def dest(self) -> str:
        """The argparse destination: section-qualified, as `prompt` exists in two sections."""
        return f"{self.section}_{self.field}"


def _f(section: str) -> Callable[..., SpecFlag]:
    return lambda field, flags, type_, default, help_, **kw: SpecFlag(
        section, field, tuple(flags), type_, default, help_, **kw
    )


_decode, _inversion, _edit = _f("decode"), _f("inversion"), _f("edit")

DECODE_FLAGS: tuple[SpecFlag, ...] = (
    _decode(
        "start", ["--start"], int, 0, "first decoded frame to use (before striding)", minimum=0, maximum=10**9
    ),
    _decode(
        "max_frames",
        ["--max-frames", "--frames"],
        int,
        None,
        "number of frames to use after striding (default: all, up to the server's limit)",
        minimum=1,
        maximum=10_000,
    ),
    _decode("stride", ["--stride"], int, 1, "use every STRIDE-th frame", minimum=1, maximum=1000),
    _decode(
        "width",
        ["--width"],
        int,
        0,
        "exact width in pixels, a multiple of 8 (0: automatic)",
        minimum=0,
        maximum=16384,
    ),
    _decode(
        "height",
        ["--height"],
        int,
        0,
        "exact height in pixels, a multiple of 8 (0: automatic)",
        minimum=0,
        maximum=16384,
    ),
    _decode(
        "target_area",
        ["--target-area", "--area"],
        int,
        512 * 512,
        "pixel budget of the automatic size (aspect kept, sides multiples of 64)",
        minimum=64 * 64,
        maximum=2048 * 2048,
    ),
)

INVERSION_FLAGS: tuple[SpecFlag, ...] = (
    _inversion(
        "prompt", ["--inversion-prompt"], str, "", "inversion prompt: empty or a caption of the source video"
    ),
    _inversion(
        "steps",
        ["--inversion-steps"],
        int,
        50,
        "DDIM inversion steps S, a multiple of the editing steps",
        minimum=1,
        maximum=1000,
        same_as="edit_steps",
    ),
    _inversion(
        "edit_steps",
        ["--steps"],
        int,
        50,
        "editing (denoising) steps T whose inverted latents are kept",
        minimum=1,
        maximum=1000,
    ),
    _inversion(
        "batch_size",
        ["--inversion-batch-size"],
        int,
        8,
        "frames per UNet batch during inversion (memory)",
        minimum=1,
        maximum=256,
    ),
)

EDIT_FLAGS: tuple[SpecFlag, ...] = (
    _edit(
        "prompt", ["--prompt", "-p"], str, None, "target prompt (required unless the method is reconstruct)"
    ),
    _edit(
        "negative_prompt",
        ["--negative-prompt"],
        str,
        NEGATIVE_PROMPT,
        "negative prompt of classifier-free guidance",
    ),
    _edit(
        "guidance_scale",
        ["--guidance-scale", "--guidance"],
        float,
        7.5,
        "classifier-free guidance scale",
        minimum=0.0,
        maximum=50.0,
    ),
    _edit(
        "pnp_attn_t",
        ["--pnp-attn-t"],
        float,
        0.5,
        "fraction of the steps with PnP self-attention injection",
        minimum=0.0,
        maximum=1.0,
    ),
    _edit(
        "pnp_f_t",
        ["--pnp-f-t"],
        float,
        0.8,
        "fraction of the steps with PnP conv-feature injection",
        minimum=0.0,
        maximum=1.0,
    ),
    _edit("seed", ["--seed"], int, 0, "seed of the random keyframe draws", minimum=0, maximum=2**63 - 1),
    _edit(
        "keyframe_interval",
        ["--keyframe-interval"],
        int,
        8,
        "frames per keyframe window (one keyframe drawn per window)",
        minimum=1,
        maximum=1024,
    ),
    _edit(
        "chunk_size",
        ["--chunk-size"],
        int,
        8,
        "frames per UNet batch in the propagation pass (memory)",
        minimum=1,
        maximum=1024,
    ),
    _edit("method", ["--method"], str, "tokenflow", "editing method", choices=METHODS),
    _edit(
        "sdedit_start",
        ["--sdedit-start"],
        float,
        0.9,
        "sdedit: fraction of the schedule to noise the source to",
        minimum=0.0,
        maximum=1.0,
    ),
    _edit(
        "propagation_weighting",
        ["--propagation-weighting", "--weighting"],
        str,
        "sigmoid",
        "blend of the two nearest keyframes: sigmoid (public code) or linear",
        choices=WEIGHTINGS,
    ),
    _edit("crf", ["--crf"], int, 18, "H.264 quality of the output (0 lossless .. 51)", minimum=0, maximum=51),
    _edit(
        "keyframe_attention",
        ["--keyframe-attention"],
        str,
        "all",
        "keyframes each keyframe attends to: all (the paper's; cost grows as K squared) or window:W (the "
        "keyframes of W windows on each side; linear in the clip, equals all when W covers it)",
    ),
    _edit(
        "keyframe_group_size",
        ["--keyframe-group-size"],
        int,
        0,
        "keyframes per UNet batch in the keyframe pass (0 = from free GPU memory; one batch on CPU); same "
        "result, bounded activations",
        minimum=0,
        maximum=1048576,
    ),
    _edit(
        "features",
        ["--no-features"],
        bool,
        True,
        "TokenFlow methods: record the clip's prompt-independent source features, or use them when "
        "recorded, so the propagation pass runs no source branch (same result within float tolerance)",
    ),
)

_ALL = DECODE_FLAGS + INVERSION_FLAGS + EDIT_FLAGS


def _help(flag: SpecFlag) -> str:
    if flag.same_as:
        same = next(f for f in _ALL if f.section == flag.section and f.field == flag.same_as)
        return f"{flag.help} (default: {same.flags[0]})"
    if flag.default is None:
        return flag.help
    return f"{flag.help} (default: {flag.default})"


def add_spec_flags(
    group: argparse._ActionsContainer,
    flags: Sequence[SpecFlag],
    repeat: Sequence[str] = (),
    required: Sequence[str] = (),
) -> None:
    """Add each flag to `group`; fields named in `repeat` may be given several times (a list)."""
    for flag in flags:
        # No parser default, as in the library CLI: a flag not given leaves its field unset, and the
        # server applies the spec's default (shown in the help).
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": _help(flag), "default": None}
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
        elif flag.type is bool:  # a switch: the flag sets the opposite of the default (--no-features)
            kwargs.update(action="store_const", const=not flag.default)
        else:
            kwargs["type"] = flag.type
            kwargs["metavar"] = flag.field.upper()
        if flag.field in repeat:
            kwargs["action"] = "append"
            kwargs["help"] += " (repeat for several)"
        if flag.field in required:
            kwargs["required"] = True
        group.add_argument(*flag.flags, **kwargs)


def check_ranges(args: argparse.Namespace, flags: Sequence[SpecFlag]) -> None:
    """Raise ValueError naming the flag when a value is out of its declared range (before any RPC)."""
    for flag in flags:
        values = getattr(args, flag.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if value is None or isinstance(value, str):
                continue
            if (flag.minimum is not None and value < flag.minimum) or (
                flag.maximum is not None and value > flag.maximum
            ):
                raise ValueError(f"{flag.flags[0]} must be in [{flag.minimum}, {flag.maximum}], got {value}")


def fill_message(message: Message, values: dict[str, Any]) -> Message:
    """Set each field of `values` (skipping None) on `message`, choices as enums; returns `message`."""
    for field, value in values.items():
        if value is None:
            continue
        enum = message.DESCRIPTOR.fields_by_name[field].enum_type
        if enum is not None and isinstance(value, str):
            value = enum_number(EnumTypeWrapper(enum), value, field)
        setattr(message, field, value)
    return message


def section_values(args: argparse.Namespace, flags: Sequence[SpecFlag]) -> dict[str, Any]:
    """{field: value} of one section's flags as parsed, with `same_as` defaults resolved."""
    values = {flag.field: getattr(args, flag.dest) for flag in flags}
    for flag in flags:
        if flag.same_as and values[flag.field] is None:
            values[flag.field] = values[flag.same_as]
    return values
