"""Deterministic generated test clips.

Tests, the README demo and benchmarks need a real encoded video without shipping one.
The clip has what the method and the metrics need: a textured static background (so
optical flow is defined almost everywhere), and a few smooth-edged, textured shapes
moving at 2-3 px per frame (so the flow is meaningful, and warp error discriminates a
consistent video from a flickering one), plus an optional sine-tone AAC track (so audio
pass-through can be checked).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from tokenflow.errors import SpecError
from tokenflow.video import write_video_with_audio_frames

_TONE_HZ = 440.0
_SAMPLE_RATE = 44100


@dataclass(frozen=True)
class _Shape:
    kind: str  # "disc" or "box"
    radius: float
    colour: np.ndarray  # float32 RGB in [0, 1]
    start: tuple[float, float]
    velocity: tuple[float, float]  # px per frame
    stripes: float  # stripe frequency of the shape's own texture (cycles per px)


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise plus a gentle gradient: textured but not aliased, float32 in [0, 1]."""
    coarse = rng.random((max(2, height // 8), max(2, width // 8), 3), dtype=np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.random((height, width, 3), dtype=np.float32), (0, 0), 1.0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = (0.5 * (x / max(1, width - 1)) + 0.5 * (y / max(1, height - 1)))[..., None]
    image = 0.25 + 0.35 * smooth + 0.15 * fine + 0.15 * gradient
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _shapes(width: int, height: int, rng: np.random.Generator) -> list[_Shape]:
    side = min(width, height)
    palette = [(0.9, 0.2, 0.15), (0.15, 0.45, 0.95), (0.95, 0.85, 0.1)]
    shapes = []
    for i, colour in enumerate(palette):
        angle = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(2.0, 3.0)
        shapes.append(
            _Shape(
                kind="box" if i == 1 else "disc",
                radius=side * rng.uniform(0.10, 0.16),
                colour=np.array(colour, np.float32),
                start=(
                    ((i + 0.5) / len(palette) + rng.uniform(-0.05, 0.05)) * width,
                    rng.uniform(0.25, 0.75) * height,
                ),
                velocity=(speed * math.cos(angle), speed * math.sin(angle)),
                stripes=rng.uniform(0.08, 0.15),
            )
        )
    return shapes


def _bounce(p: float, lo: float, hi: float) -> float:
    """Position after reflecting off the walls [lo, hi] (a triangle wave): stays in frame forever."""
    span = hi - lo
    if span <= 0:
        return lo
    q = (p - lo) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


def _render(background: np.ndarray, shapes: list[_Shape], t: int) -> np.ndarray:
    height, width = background.shape[:2]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = background.copy()
    for s in shapes:
        cx = _bounce(s.start[0] + s.velocity[0] * t, s.radius, width - s.radius)
        cy = _bounce(s.start[1] + s.velocity[1] * t, s.radius, height - s.radius)
        dx, dy = x - cx, y - cy
        if s.kind == "disc":
            dist = np.sqrt(dx * dx + dy * dy) - s.radius
        else:  # rounded square: signed distance to a box of half-side 0.8 r, corner radius 0.2 r
            qx, qy = np.abs(dx) - 0.8 * s.radius, np.abs(dy) - 0.8 * s.radius
            outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
            dist = outside + np.minimum(np.maximum(qx, qy), 0) - 0.2 * s.radius
        alpha = np.clip(0.5 - dist / 1.5, 0.0, 1.0)[..., None]  # ~1.5 px anti-aliased edge
        texture = 0.75 + 0.25 * np.sin(2 * math.pi * s.stripes * (dx + 0.6 * dy))[..., None]
        image = image * (1 - alpha) + (s.colour * texture) * alpha
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def clip_frames(frames: int = 16, size: tuple[int, int] = (128, 128), seed: int = 0) -> Iterator[np.ndarray]:
    """The clip's frames as uint8 RGB (H, W, 3), generated one at a time."""
    width, height = size
    rng = np.random.default_rng(seed)
    background = _background(width, height, rng)
    shapes = _shapes(width, height, rng)
    for t in range(frames):
        yield _render(background, shapes, t)


def _tone(seconds: float, rate: int = _SAMPLE_RATE, chunk: int = 1024) -> Iterator[av.AudioFrame]:
    """A 440 Hz mono sine at -12 dBFS, slightly longer than needed (the writer trims it)."""
    total = math.ceil(seconds * rate) + chunk
    for start in range(0, total, chunk):
        n = np.arange(start, start + chunk, dtype=np.float64)
        samples = (0.25 * np.sin(2 * math.pi * _TONE_HZ * n / rate)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        yield frame


def make_clip(
    path: str | os.PathLike[str],
    frames: int = 16,
    size: tuple[int, int] = (128, 128),
    fps: int | Fraction = 10,
    audio: bool = True,
    seed: int = 0,
) -> Path:
    """Write a deterministic H.264 mp4 test clip of `frames` frames at `size` (W, H); returns its path.

    The same arguments give the same frames, and with the same FFmpeg build the same bytes
    from 128x96 up (libx264 is not byte-stable on tiny frames; the decoded frames still match
    closely).
    """
    width, height = size
    if frames < 1 or width < 16 or height < 16 or width % 2 or height % 2:
        raise SpecError(
            f"make_clip needs frames >= 1 and even sizes >= 16, got {frames} frames {width}x{height}"
        )
    rate = Fraction(fps)
    tone = _tone(frames / rate) if audio else []
    path = Path(path)
    write_video_with_audio_frames(path, clip_frames(frames, size, seed), rate, tone)
    return path
