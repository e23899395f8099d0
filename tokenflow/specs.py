"""Typed, validated specs for every stage, each field declared once.

Every field of a spec carries its declaration (help text, CLI flags, range or choices, whether it only
changes *how* a job runs) in its dataclass metadata. Validation, both CLIs' flags, proto conversion and
the content keys (tokenflow.keys) are derived from these declarations or checked against them by a test,
so a field cannot drift between layers. Field names equal the proto's field names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from tokenflow.errors import SpecError
from tokenflow.methods import DEFAULT_METHOD, METHODS, Method, method

DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
MAX_PROMPT_CHARS = 2000
MAX_FRAMES = 10_000
MAX_PIXELS = 2048 * 2048
WEIGHTINGS = ("sigmoid", "linear")

_REQUIRED: Any = dataclasses.MISSING


@dataclass(frozen=True)
class FieldDoc:
    """The declaration of one spec field."""

    help: str
    flags: tuple[str, ...] = ()
    """CLI flags; the first is canonical, the others are accepted aliases. () = no CLI flag."""
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: tuple[str, ...] | None = None
    """A closed set of strings (a proto enum whose values are their UPPER_SNAKE names)."""
    text: bool = False
    """A prompt: at most MAX_PROMPT_CHARS characters, no NUL."""
    execution: bool = False
    """Changes only how a job runs (memory, batching), never what it computes: never part of a key."""
    applies: str | None = None
    """Edit fields: the `Method` property under which the field matters (e.g. "pnp"); None = always."""
    kinds: tuple[str, ...] = ("keyframes", "propagation")
    """Edit fields: the artifact kinds whose result the field determines."""


@dataclass(frozen=True)
class SpecField:
    """One declared field of a spec class: name, Python type, default and its declaration."""

    name: str
    type: Any
    default: Any
    doc: FieldDoc

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def spec_field(default: Any = _REQUIRED, **doc: Any) -> Any:
    """A dataclass field with its declaration (`FieldDoc` keywords)."""
    if default is _REQUIRED:
        return dataclasses.field(metadata={"doc": FieldDoc(**doc)})
    return dataclasses.field(default=default, metadata={"doc": FieldDoc(**doc)})


def spec_fields(cls: type) -> tuple[SpecField, ...]:
    """The declared fields of a spec class, in declaration order."""
    hints = get_type_hints(cls)
    return tuple(
        SpecField(f.name, hints[f.name], f.default, f.metadata["doc"])
        for f in dataclasses.fields(cls)
        if "doc" in f.metadata
    )


S = TypeVar("S", bound="_Spec")


class _Spec:
    """Validation derived from the declarations; subclasses add cross-field rules in `_check`."""

    section: str = ""

    def validate(self: S) -> S:
        for f in spec_fields(type(self)):
            _check_field(self.section, f, getattr(self, f.name))
        self._check()
        return self

    def _check(self) -> None:
        """Rules that involve several fields."""

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Every declared field, JSON-able (tuples become lists): what artifact metadata records.

        Content keys are not this: they take exactly the fields that determine a result (tokenflow.keys).
        """
        return {f.name: _jsonable(getattr(self, f.name)) for f in spec_fields(type(self))}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _check_field(section: str, f: SpecField, value: Any) -> None:
    name = f"{section}.{f.name}"
    doc = f.doc
    if doc.text:
        _check_prompt(value, name)
        return
    if doc.choices is not None:
        if value not in doc.choices:
            raise SpecError(f"{name} must be one of {', '.join(doc.choices)}; got {value!r}", field=name)
        return
    if value is None or isinstance(value, (bool, str, tuple)):
        return
    if isinstance(value, float) and not math.isfinite(value):  # NaN compares false with any bound
        raise SpecError(f"{name} must be a finite number, got {value}", field=name)
    lo, hi = doc.minimum, doc.maximum
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if isinstance(value, float) or isinstance(lo, float):
            bounds = f"[{_num(lo)}, {_num(hi)}]"
        else:
            bounds = f"{_num(lo)}..{_num(hi)}"
        raise SpecError(f"{name} must be in {bounds}, got {value}", field=name)


def _num(v: int | float | None) -> str:
    if v is None:
        return "inf"
    if isinstance(v, int) and v >= 2**32 and (v & (v - 1)) == 0:
        return f"2^{v.bit_length() - 1}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _check_prompt(text: Any, name: str, allow_empty: bool = True) -> None:
    if not isinstance(text, str):
        raise SpecError(f"{name} must be a string", field=name)
    if not allow_empty and not text.strip():
        raise SpecError(f"{name} must not be empty", field=name)
    if len(text) > MAX_PROMPT_CHARS:
        raise SpecError(f"{name} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}", field=name)
    if "\x00" in text:
        raise SpecError(f"{name} contains a NUL character", field=name)


@dataclass(frozen=True)
class DecodeSpec(_Spec):
    """Which frames of a video to use and at what size.

    `width` x `height` forces an exact size; (0, 0) resizes keeping the aspect ratio to about
    `target_area` pixels with both sides multiples of 64 (centre-cropped to fit).
    """

    section = "decode"

    start: int = spec_field(
        0, help="first decoded frame to use (before striding)", flags=("--start",), minimum=0, maximum=10**9
    )
    max_frames: int | None = spec_field(
        None,
        help="number of frames to use after striding (default: all, up to the server's limit)",
        flags=("--max-frames", "--frames"),
        minimum=1,
        maximum=MAX_FRAMES,
    )
    stride: int = spec_field(
        1, help="use every STRIDE-th frame", flags=("--stride",), minimum=1, maximum=1000
    )
    width: int = spec_field(
        0,
        help="exact width in pixels, a multiple of 8 (0: automatic)",
        flags=("--width",),
        minimum=0,
        maximum=16384,
    )
    height: int = spec_field(
        0,
        help="exact height in pixels, a multiple of 8 (0: automatic)",
        flags=("--height",),
        minimum=0,
        maximum=16384,
    )
    target_area: int = spec_field(
        512 * 512,
        help="pixel budget of the automatic size (aspect kept, sides multiples of 64)",
        flags=("--target-area", "--area"),
        minimum=64 * 64,
        maximum=MAX_PIXELS,
    )

    @classmethod
    def sized(cls, size: tuple[int, int] | None, **kwargs: Any) -> DecodeSpec:
        """A spec with an exact (width, height), or automatic for None."""
        w, h = size if size else (0, 0)
        return cls(width=int(w), height=int(h), **kwargs)

    @property
    def size(self) -> tuple[int, int] | None:
        """The exact (width, height), or None for the automatic size."""
        return (self.width, self.height) if self.width else None

    def _check(self) -> None:
        w, h = self.width, self.height
        if (w == 0) != (h == 0):
            raise SpecError(
                f"decode.width and decode.height must be set together (got {w}x{h}); "
                "set both, or neither for an automatic size",
                field="decode.width" if w == 0 else "decode.height",
            )
        if w:
            if w % 8 or h % 8:
                raise SpecError(
                    f"decode.size must be positive multiples of 8 (64 recommended), got {w}x{h}",
                    field="decode.width" if w % 8 else "decode.height",
                )
            if w * h > MAX_PIXELS:
                raise SpecError(
                    f"decode.size {w}x{h} exceeds the limit of {MAX_PIXELS} pixels", field="decode.width"
                )


@dataclass(frozen=True)
class InversionSpec(_Spec):
    """DDIM inversion: prompt, number of inversion steps S, and the T editing steps to keep.

    S must be a multiple of T so that the editing timesteps are a subset of the inversion's.
    """

    section = "inversion"

    prompt: str = spec_field(
        "",
        help="inversion prompt: empty or a caption of the source video",
        flags=("--inversion-prompt",),
        text=True,
    )
    steps: int = spec_field(
        50,
        help="DDIM inversion steps S, a multiple of the editing steps",
        flags=("--inversion-steps",),
        minimum=1,
        maximum=1000,
    )
    edit_steps: int = spec_field(
        50,
        help="editing (denoising) steps T whose inverted latents are kept",
        flags=("--steps",),
        minimum=1,
        maximum=1000,
    )
    reconstruct: bool = spec_field(
        True, help="also reconstruct the video and report its PSNR (a poor one predicts a poor edit)"
    )
    batch_size: int = spec_field(
        8,
        help="frames per UNet batch during inversion (memory)",
        flags=("--inversion-batch-size",),
        minimum=1,
        maximum=256,
        execution=True,
    )

    def _check(self) -> None:
        if self.steps % self.edit_steps:
            raise SpecError(
                f"inversion.steps ({self.steps}) must be a multiple of the editing steps ({self.edit_steps}) "
                f"so that every editing timestep is an inversion timestep; try --inversion-steps "
                f"{self.edit_steps * max(1, round(self.steps / self.edit_steps))}",
                field="inversion.steps",
            )


@dataclass(frozen=True)
class EditSpec(_Spec):
    """Everything that determines an edit of an inverted video, plus how to run it.

    Defaults follow the paper's public code: guidance 7.5, PnP attention injection for the
    first half of the steps, conv injection for the first 80%, keyframe every 8 frames.
    """

    section = "edit"

    prompt: str = spec_field(
        help="target prompt (required unless the method is reconstruct)",
        flags=("--prompt", "-p"),
        text=True,
        applies="uses_prompt",
    )
    negative_prompt: str = spec_field(
        DEFAULT_NEGATIVE_PROMPT,
        help="negative prompt of classifier-free guidance",
        flags=("--negative-prompt",),
        text=True,
        applies="uses_prompt",
    )
    guidance_scale: float = spec_field(
        7.5,
        help="classifier-free guidance scale",
        flags=("--guidance-scale", "--guidance"),
        minimum=0.0,
        maximum=50.0,
        applies="uses_prompt",
    )
    pnp_attn_t: float = spec_field(
        0.5,
        help="fraction of the steps with PnP self-attention injection",
        flags=("--pnp-attn-t",),
        minimum=0.0,
        maximum=1.0,
        applies="pnp",
    )
    pnp_f_t: float = spec_field(
        0.8,
        help="fraction of the steps with PnP conv-feature injection",
        flags=("--pnp-f-t",),
        minimum=0.0,
        maximum=1.0,
        applies="pnp",
    )
    seed: int = spec_field(
        0,
        help="seed of the random keyframe draws",
        flags=("--seed",),
        minimum=0,
        maximum=2**63 - 1,
        applies="keyframes",
        kinds=("propagation",),
    )
    keyframe_interval: int = spec_field(
        8,
        help="frames per keyframe window (one keyframe drawn per window)",
        flags=("--keyframe-interval",),
        minimum=1,
        maximum=1024,
        applies="keyframes",
    )
    chunk_size: int = spec_field(
        8,
        help="frames per UNet batch in the propagation pass (memory)",
        flags=("--chunk-size",),
        minimum=1,
        maximum=1024,
        execution=True,
    )
    method: str = spec_field(
        DEFAULT_METHOD, help="editing method", flags=("--method",), choices=tuple(METHODS)
    )
    sdedit_start: float = spec_field(
        0.9,
        help="sdedit: fraction of the schedule to noise the source to",
        flags=("--sdedit-start",),
        minimum=0.0,
        maximum=1.0,
        applies="sdedit_start",
    )
    keyframe_schedule: tuple[tuple[int, ...], ...] | None = spec_field(
        None,
        help="explicit keyframes per denoising step instead of seeded draws",
        applies="keyframes",
        kinds=("propagation",),
    )
    propagation_weighting: str = spec_field(
        "sigmoid",
        help="blend of the two nearest keyframes: sigmoid (public code) or linear",
        flags=("--propagation-weighting", "--weighting"),
        choices=WEIGHTINGS,
        applies="keyframes",
        kinds=("propagation",),
    )
    crf: int = spec_field(
        18,
        help="H.264 quality of the output (0 lossless .. 51)",
        flags=("--crf",),
        minimum=0,
        maximum=51,
        kinds=("propagation",),
    )
    keyframe_attention: str = spec_field(
        "all",
        help="keyframes each keyframe attends to: all (the paper's; cost grows as K squared) or window:W "
        "(the keyframes of W windows on each side; linear in the clip, equals all when W covers it)",
        flags=("--keyframe-attention",),
        applies="keyframes",
    )
    keyframe_group_size: int = spec_field(
        0,
        help="keyframes per UNet batch in the keyframe pass (0 = from free GPU memory; one batch on CPU); "
        "same result, bounded activations",
        flags=("--keyframe-group-size",),
        minimum=0,
        maximum=1 << 20,
        execution=True,
    )
    features: bool = spec_field(
        True,
        help="TokenFlow methods: record the clip's prompt-independent source features, or use them when "
        "recorded, so the propagation pass runs no source branch (same result within float tolerance)",
        flags=("--no-features",),
        execution=True,
    )

    @property
    def method_info(self) -> Method:
        return method(self.method)

    def _check(self) -> None:
        if method(self.method).uses_prompt:
            _check_prompt(self.prompt, "edit.prompt", allow_empty=False)
        if self.keyframe_schedule is not None:
            _check_schedule_shape(self.keyframe_schedule)
        parse_keyframe_attention(self.keyframe_attention)


KEYFRAME_ATTENTION_ALL = "all"


def parse_keyframe_attention(value: str) -> int | None:
    """``all`` -> None; ``window:W`` (W >= 1) -> W; SpecError otherwise (at validation, not mid-edit)."""
    text = str(value).strip().lower()
    if text == KEYFRAME_ATTENTION_ALL:
        return None
    if text.startswith("window:"):
        try:
            w = int(text.removeprefix("window:"))
        except ValueError:
            w = 0
        if 1 <= w <= MAX_FRAMES:
            return w
    raise SpecError(
        f"keyframe_attention must be 'all' or 'window:W' with 1 <= W <= {MAX_FRAMES}, got {value!r}",
        field="edit.keyframe_attention",
    )


def keyframe_attention_identity(value: str, n_frames: int, interval: int) -> str:
    """The canonical spelling of what `value` computes on a clip of `n_frames`: a window that covers
    every keyframe (W >= K-1) computes exactly ``all``, so it is ``all``; otherwise ``window:W``."""
    window = parse_keyframe_attention(value)
    keyframes = -(-n_frames // interval)
    if window is None or window >= keyframes - 1:
        return KEYFRAME_ATTENTION_ALL
    return f"window:{window}"


MAX_SCHEDULE_ENTRIES = 1000 * 1024
"""An explicit schedule has at most 1000 rows (steps) and this many entries in all: a request cannot
make the server store or iterate over more than a real edit needs."""


def _check_schedule_shape(schedule: Any) -> None:
    """Structure only (ints, bounded size); the fit to the clip is checked once the inversion is known."""
    name = "edit.keyframe_schedule"
    if not isinstance(schedule, tuple) or not all(isinstance(r, tuple) for r in schedule):
        raise SpecError(f"{name} must be a sequence of rows of frame indices", field=name)
    if len(schedule) > 1000:
        raise SpecError(f"{name} has {len(schedule)} rows; at most 1000 (one per denoising step)", field=name)
    entries = sum(len(r) for r in schedule)
    if entries > MAX_SCHEDULE_ENTRIES:
        raise SpecError(f"{name} has {entries} entries; the limit is {MAX_SCHEDULE_ENTRIES}", field=name)
    for row in schedule:
        for k in row:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < MAX_FRAMES:
                raise SpecError(
                    f"{name} entries must be frame indices in 0..{MAX_FRAMES - 1}, got {k!r}", field=name
                )
