"""Temporal-consistency and fidelity metrics that need no learned weights.

Warp error follows the usual definition for video editing (flow computed on the *source*
video, so every method is judged against the same correspondences): an edit that keeps
the source's motion has edited frame t+1, warped back along the source flow, equal to
edited frame t. Flow is classical (OpenCV Farneback), so the metric is reproducible and
cheap. Everything streams over consecutive pairs: only two frames per video are held.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from tokenflow.errors import SpecError, VideoError
from tokenflow.specs import DecodeSpec
from tokenflow.video import fit_frame, iter_frames, probe

# Forward-backward consistency (Sundaram et al. 2010; Ruder et al. 2016):
# |fw + bw'|^2 < _FB_ALPHA * (|fw|^2 + |bw'|^2) + _FB_BETA, in pixels^2.
_FB_ALPHA = 0.01
_FB_BETA = 0.5


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow from grayscale a to b: a(x) ~ b(x + flow(x)); (H, W, 2) float32 in pixels."""
    return cv2.calcOpticalFlowFarneback(
        a,
        b,
        None,
        pyr_scale=0.5,
        levels=4,
        winsize=15,
        iterations=3,
        poly_n=5,
        poly_sigma=1.1,
        flags=cv2.OPTFLOW_FARNEBACK_GAUSSIAN,
    )


def _correspondence(prev_gray: np.ndarray, cur_gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampling maps x + f_fw(x) into frame t+1 and the mask of pixels whose flow is trustworthy."""
    h, w = prev_gray.shape
    fw = _flow(prev_gray, cur_gray)
    bw = _flow(cur_gray, prev_gray)
    grid_y, grid_x = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x, map_y = grid_x + fw[..., 0], grid_y + fw[..., 1]
    bw_at = cv2.remap(bw, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    err = np.sum((fw + bw_at) ** 2, axis=2)
    bound = _FB_ALPHA * (np.sum(fw**2, axis=2) + np.sum(bw_at**2, axis=2)) + _FB_BETA
    return map_x, map_y, inside & (err < bound)


def _unit(frame: np.ndarray) -> np.ndarray:
    return np.asarray(frame, dtype=np.float32) / 255.0


class _WarpErrors:
    """Running warp error of several videos that share one source's flow (flow is the costly part)."""

    def __init__(self, videos: int):
        self._sums = [0.0] * videos
        self._pairs = 0
        self._prev: tuple[np.ndarray, Sequence[np.ndarray]] | None = None

    def add(self, source: np.ndarray, frames: Sequence[np.ndarray]) -> None:
        gray = cv2.cvtColor(np.ascontiguousarray(source), cv2.COLOR_RGB2GRAY)
        if self._prev is not None:
            prev_gray, prev_frames = self._prev
            map_x, map_y, mask = _correspondence(prev_gray, gray)
            if mask.any():
                for k, (before, after) in enumerate(zip(prev_frames, frames, strict=True)):
                    warped = cv2.remap(
                        _unit(after), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
                    )
                    sq = np.mean((warped - _unit(before)) ** 2, axis=2)
                    self._sums[k] += float(sq[mask].mean())
                self._pairs += 1
        self._prev = (gray, frames)

    def result(self) -> list[float]:
        return [s / self._pairs if self._pairs else math.nan for s in self._sums]


def _zip_exact(
    sources: Iterable[np.ndarray], edited: Iterable[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs (source fitted to the edited frame's size, edited); the two must have equal length."""
    src_iter, count = iter(sources), 0
    for frame in edited:
        frame = np.asarray(frame)
        src = next(src_iter, None)
        if src is None:
            raise SpecError(f"the edited video has more frames than the source ({count})")
        src = np.asarray(src)
        if src.shape != frame.shape:
            src = fit_frame(src, (frame.shape[1], frame.shape[0]))
        count += 1
        yield src, frame
    if next(src_iter, None) is not None:
        raise SpecError(f"the source has more frames than the edited video ({count})")


def warp_error(source_frames: Iterable[np.ndarray], edited_frames: Iterable[np.ndarray]) -> float:
    """Mean flow-warping error of an edited video, with flow taken from the source video.

    For each consecutive pair (t, t+1): f_fw = Farneback flow from source t to source t+1
    and f_bw from t+1 to t, on grayscale frames (source resized+cropped to the edited size
    if needed). Edited frame t+1 is warped back to t by bilinear sampling,
    W(x) = E_{t+1}(x + f_fw(x)). A pixel x counts if x + f_fw(x) lies inside the frame and
    the flow is forward-backward consistent:
    |f_fw(x) + f_bw(x + f_fw(x))|^2 < 0.01 (|f_fw|^2 + |f_bw(x + f_fw(x))|^2) + 0.5 (px^2),
    which drops occlusions and unreliable flow. The pair's error is the mean over counted
    pixels of the squared RGB difference (values in [0, 1], averaged over channels)
    between W(x) and E_t(x); the result is the mean over pairs that have any counted
    pixel, or NaN when there is none (e.g. a single frame). Lower is more consistent;
    the same metric on the source itself is the floor to compare against.
    """
    acc = _WarpErrors(1)
    for src, edited in _zip_exact(source_frames, edited_frames):
        acc.add(src, (edited,))
    return acc.result()[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images/videos: 10 log10(255^2 / MSE); +inf when identical."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise SpecError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return _psnr_from_mse(mse)


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def evaluate_videos(
    source_path: str | os.PathLike[str],
    edited_path: str | os.PathLike[str],
    decode: DecodeSpec | None = None,
) -> dict[str, float | int]:
    """Warp error (edited and source floor) and PSNR of an edited video against its source.

    The edited video is read at its own size; the source is resized to cover it and
    centre-cropped, as the pipeline did when it decoded it. `decode` selects which source
    frames the edit corresponds to (its start/stride/max_frames; its size is ignored); the
    selection must have as many frames as the edited video. PSNR is over all frames
    (global MSE). Only consecutive frames are held in memory.
    """
    info = probe(edited_path)
    sources = iter_frames(source_path, decode or DecodeSpec(), native=True)
    edited = iter_frames(edited_path, DecodeSpec(), native=True)
    acc = _WarpErrors(2)
    sse, values, frames = 0.0, 0, 0
    try:
        for src, frame in _zip_exact(sources, edited):
            acc.add(src, (frame, src))
            sse += float(np.sum((frame.astype(np.float64) - src.astype(np.float64)) ** 2))
            values += frame.size
            frames += 1
    except SpecError as exc:
        raise VideoError(f"cannot compare {Path(edited_path).name!r} with its source: {exc}") from exc
    warp_edited, warp_source = acc.result()
    return {
        "warp_error": warp_edited,
        "warp_error_source": warp_source,
        "psnr": _psnr_from_mse(sse / values),
        "frames": frames,
        "fps": float(info.fps),
        "width": info.width,
        "height": info.height,
    }
