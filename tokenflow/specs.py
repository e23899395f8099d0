"""Typed, validated specs for every stage.

Each spec is a frozen dataclass with a `canonical()` dict: the exact set of fields that
determine an artifact, used for content addresses. Validation raises `SpecError` with a
message a person can act on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenflow.errors import SpecError

METHODS = ("tokenflow", "sdedit", "per-frame", "reconstruct")
DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
MAX_PROMPT_CHARS = 2000
MAX_FRAMES = 10_000
MAX_PIXELS = 2048 * 2048


@dataclass(frozen=True)
class DecodeSpec:
    """Which frames of a video to use and at what size.

    `size` forces an exact (width, height); otherwise the frame is resized keeping its aspect
    ratio to about `target_area` pixels with both sides multiples of 64 (centre-cropped to fit).
    """

    start: int = 0
    max_frames: int | None = None
    stride: int = 1
    size: tuple[int, int] | None = None
    target_area: int = 512 * 512

    def validate(self) -> DecodeSpec:
        if self.start < 0:
            raise SpecError(f"decode.start must be >= 0, got {self.start}")
        if self.max_frames is not None and not 1 <= self.max_frames <= MAX_FRAMES:
            raise SpecError(f"decode.max_frames must be in 1..{MAX_FRAMES}, got {self.max_frames}")
        if not 1 <= self.stride <= 1000:
            raise SpecError(f"decode.stride must be in 1..1000, got {self.stride}")
        if self.size is not None:
            w, h = self.size
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                raise SpecError(f"decode.size must be positive multiples of 8 (64 recommended), got {w}x{h}")
            if w * h > MAX_PIXELS:
                raise SpecError(f"decode.size {w}x{h} exceeds the limit of {MAX_PIXELS} pixels")
        if not 64 * 64 <= self.target_area <= MAX_PIXELS:
            raise SpecError(f"decode.target_area must be in {64 * 64}..{MAX_PIXELS}, got {self.target_area}")
        return self

    def canonical(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"] = list(self.size) if self.size else None
        return d


@dataclass(frozen=True)
class InversionSpec:
    """DDIM inversion: prompt, number of inversion steps S, and the T editing steps to keep.

    S must be a multiple of T so that the editing timesteps are a subset of the inversion's.
    """

    prompt: str = ""
    steps: int = 50
    edit_steps: int = 50
    reconstruct: bool = True
    batch_size: int = 8

    def validate(self) -> InversionSpec:
        _check_prompt(self.prompt, "inversion.prompt")
        if not 1 <= self.edit_steps <= 1000:
            raise SpecError(f"inversion.edit_steps must be in 1..1000, got {self.edit_steps}")
        if not 1 <= self.steps <= 1000:
            raise SpecError(f"inversion.steps must be in 1..1000, got {self.steps}")
        if self.steps % self.edit_steps:
            raise SpecError(
                f"inversion.steps ({self.steps}) must be a multiple of the editing steps ({self.edit_steps}) "
                f"so that every editing timestep is an inversion timestep; try --inversion-steps "
                f"{self.edit_steps * max(1, round(self.steps / self.edit_steps))}"
            )
        if not 1 <= self.batch_size <= 256:
            raise SpecError(f"inversion.batch_size must be in 1..256, got {self.batch_size}")
        return self

    def canonical(self) -> dict[str, Any]:
        # batch_size only changes float summation order, not the method: still part of the key,
        # because bit-identical reproducibility is what a cache promises.
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EditSpec:
    """Everything that determines an edit of an inverted video.

    Defaults follow the paper's public code: guidance 7.5, PnP attention injection for the
    first half of the steps, conv injection for the first 80%, keyframe every 8 frames.
    """

    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    guidance_scale: float = 7.5
    pnp_attn_t: float = 0.5
    pnp_f_t: float = 0.8
    seed: int = 0
    keyframe_interval: int = 8
    chunk_size: int = 8
    method: str = "tokenflow"
    sdedit_start: float = 0.9
    keyframe_schedule: tuple[tuple[int, ...], ...] | None = None
    propagation_weighting: str = "sigmoid"
    crf: int = 18
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def validate(self) -> EditSpec:
        if self.method not in METHODS:
            raise SpecError(f"edit.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.method != "reconstruct":
            _check_prompt(self.prompt, "edit.prompt", allow_empty=False)
        _check_prompt(self.negative_prompt, "edit.negative_prompt")
        if not 0.0 <= self.guidance_scale <= 50.0:
            raise SpecError(f"edit.guidance_scale must be in [0, 50], got {self.guidance_scale}")
        for name in ("pnp_attn_t", "pnp_f_t", "sdedit_start"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise SpecError(f"edit.{name} must be in [0, 1], got {v}")
        if not 0 <= self.seed < 2**63:
            raise SpecError(f"edit.seed must be in [0, 2^63), got {self.seed}")
        if not 1 <= self.keyframe_interval <= 1024:
            raise SpecError(f"edit.keyframe_interval must be in 1..1024, got {self.keyframe_interval}")
        if not 1 <= self.chunk_size <= 1024:
            raise SpecError(f"edit.chunk_size must be in 1..1024, got {self.chunk_size}")
        if self.propagation_weighting not in ("sigmoid", "linear"):
            raise SpecError("edit.propagation_weighting must be 'sigmoid' (public code) or 'linear'")
        if not 0 <= self.crf <= 51:
            raise SpecError(f"edit.crf must be in 0..51, got {self.crf}")
        return self

    def canonical(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["keyframe_schedule"] = [list(r) for r in self.keyframe_schedule] if self.keyframe_schedule else None
        return d


def _check_prompt(text: str, name: str, allow_empty: bool = True) -> None:
    if not isinstance(text, str):
        raise SpecError(f"{name} must be a string")
    if not allow_empty and not text.strip():
        raise SpecError(f"{name} must not be empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise SpecError(f"{name} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if "\x00" in text:
        raise SpecError(f"{name} contains a NUL character")
