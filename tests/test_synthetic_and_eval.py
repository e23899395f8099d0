"""Generated test clips and the weight-free metrics (warp error, PSNR), on real encoded files."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tokenflow import video
from tokenflow.errors import SpecError, VideoError
from tokenflow.eval import evaluate_videos, psnr, warp_error
from tokenflow.specs import DecodeSpec
from tokenflow.synthetic import clip_frames, make_clip

SIZE = (128, 96)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=12, size=SIZE, fps=10)


@pytest.fixture(scope="module")
def source(clip: Path) -> np.ndarray:
    frames, _ = video.read_frames(clip, DecodeSpec.sized(SIZE))
    return frames


# --------------------------------------------------------------------------- synthetic clips


def test_make_clip_file(clip: Path) -> None:
    info = video.probe(clip)
    assert (info.width, info.height, info.fps, info.frame_count) == (128, 96, Fraction(10), 12)
    assert info.codec == "h264" and info.has_audio
    with av.open(str(clip)) as c:
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert float(audio.duration * audio.time_base) == pytest.approx(1.2, abs=0.03)
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio)])
    assert 0.1 < np.abs(samples).max() < 0.5  # the tone is audible and not clipped


def test_make_clip_is_deterministic(tmp_path: Path) -> None:
    assert all(
        np.array_equal(x, y) for x, y in zip(clip_frames(5, SIZE, 3), clip_frames(5, SIZE, 3), strict=True)
    )
    # Same bytes too. (libx264 itself varies run to run on tiny frames, <= 96x64, even with one
    # thread; from 128x96 up it has been stable, so this test uses 128x96.)
    a = make_clip(tmp_path / "a.mp4", frames=5, size=SIZE, seed=3)
    b = make_clip(tmp_path / "b.mp4", frames=5, size=SIZE, seed=3)
    c = make_clip(tmp_path / "c.mp4", frames=5, size=SIZE, seed=4, audio=False)
    assert a.read_bytes() == b.read_bytes()
    fa, _ = video.read_frames(a, DecodeSpec.sized(SIZE))
    fc, info_c = video.read_frames(c, DecodeSpec.sized(SIZE))
    assert not np.array_equal(fa, fc)
    assert not info_c.has_audio


def test_make_clip_motion_is_smooth_and_a_few_pixels() -> None:
    """Shapes move 2-3 px per frame, so source flow is meaningful (and not trivially zero)."""
    frames = list(clip_frames(frames=4, size=SIZE, seed=0))
    a, b = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames[1:3])
    flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    magnitude = np.linalg.norm(flow, axis=2)
    moving = magnitude[magnitude > 1.0]
    assert moving.size > 0.05 * magnitude.size
    assert 1.5 < float(np.median(moving)) < 3.5
    assert float(np.median(magnitude)) < 0.5  # the background stays put


def test_make_clip_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        make_clip(tmp_path / "x.mp4", frames=0)
    with pytest.raises(SpecError):
        make_clip(tmp_path / "x.mp4", size=(65, 64))


# --------------------------------------------------------------------------- metrics


def test_psnr() -> None:
    a = np.full((4, 8, 8, 3), 100, np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))  # 28.13 dB
    with pytest.raises(SpecError):
        psnr(a, a[:2])


def test_warp_error_of_source_is_small_and_noise_is_large(source: np.ndarray) -> None:
    own = warp_error(source, source)
    assert 0 <= own < 0.005
    noise = np.random.default_rng(0).integers(0, 256, source.shape, dtype=np.uint8)
    assert warp_error(source, noise) > 20 * own
    assert warp_error(source, noise) > 0.05
    flicker = np.clip(source.astype(int) + np.array([0, 40] * 6)[:, None, None, None], 0, 255).astype(
        np.uint8
    )
    assert warp_error(source, flicker) > 3 * own


def test_warp_error_accepts_iterables_and_resizes_source(source: np.ndarray) -> None:
    direct = warp_error(source, source)
    assert warp_error(iter(source), (f for f in source)) == pytest.approx(direct)
    small = np.stack([cv2.resize(f, (64, 48), interpolation=cv2.INTER_AREA) for f in source])
    assert warp_error(source, small) < 0.005  # source fitted to the edited size
    assert math.isnan(warp_error(source[:1], source[:1]))
    with pytest.raises(SpecError, match="more frames"):
        warp_error(source[:3], source[:4])
    with pytest.raises(SpecError, match="more frames"):
        warp_error(source[:4], source[:3])


def test_evaluate_videos(clip: Path, source: np.ndarray, tmp_path: Path) -> None:
    same = tmp_path / "same.mp4"
    video.write_video(same, iter(source), 10)
    metrics = evaluate_videos(clip, same)
    assert metrics["frames"] == 12 and metrics["fps"] == 10.0
    assert (metrics["width"], metrics["height"]) == SIZE
    assert metrics["psnr"] > 35
    assert metrics["warp_error"] == pytest.approx(metrics["warp_error_source"], rel=0.25)

    noisy = tmp_path / "noisy.mp4"
    rng = np.random.default_rng(1)
    video.write_video(noisy, (rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)), 10)
    bad = evaluate_videos(clip, noisy)  # edited is smaller: the source is fitted to 64x48
    assert (bad["width"], bad["height"]) == (64, 48)
    assert bad["warp_error"] > 10 * bad["warp_error_source"]
    assert bad["psnr"] < 15


def test_evaluate_videos_selection_and_mismatch(clip: Path, source: np.ndarray, tmp_path: Path) -> None:
    part = tmp_path / "part.mp4"
    video.write_video(part, iter(source[2::3]), 10)
    metrics = evaluate_videos(clip, part, DecodeSpec(start=2, stride=3))
    assert metrics["frames"] == 4 and metrics["psnr"] > 35
    with pytest.raises(VideoError, match="more frames"):
        evaluate_videos(clip, part)
