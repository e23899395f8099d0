"""Video I/O on real files encoded and decoded with PyAV (no mocks)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tokenflow import video
from tokenflow.errors import SpecError, TooLargeError, VideoError
from tokenflow.specs import DecodeSpec
from tokenflow.synthetic import make_clip

WOLF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wolf.mp4"


def write_frames_as(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: int | Fraction = 10,
    codec: str = "libx264",
    rotation: int | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
) -> Path:
    """Encode frames with any codec/container (by suffix), optional display rotation and explicit pts."""
    options = {
        "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0"},
        "libx265": {"x265-params": "log-level=error"},
        "libx264": {"preset": "ultrafast"},
    }.get(codec, {})
    with av.open(str(path), "w") as out:
        stream = None
        for i, frame in enumerate(frames):
            if stream is None:
                stream = out.add_stream(codec, rate=fps, options=options)
                stream.width, stream.height, stream.pix_fmt = frame.shape[1], frame.shape[0], "yuv420p"
                if time_base is not None:
                    stream.codec_context.time_base = time_base
                if rotation is not None:
                    stream.set_display_rotation(rotation)
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], time_base
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def indexed_frames(n: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """Solid frames whose colour encodes the frame index (red = 8 i, green = 255 - 8 i)."""
    w, h = size
    frames = []
    for i in range(n):
        f = np.empty((h, w, 3), np.uint8)
        f[...] = (8 * i, 255 - 8 * i, 128)
        frames.append(f)
    return frames


def index_of(frame: np.ndarray) -> int:
    return round(float(frame[..., 0].mean()) / 8)


# --------------------------------------------------------------------------- round trips


def test_make_clip_probe_and_read(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "clip.mp4", frames=12, size=(96, 64), fps=12)
    info = video.probe(path)
    assert (info.width, info.height, info.fps, info.frame_count) == (96, 64, Fraction(12), 12)
    assert info.has_audio and info.codec == "h264" and info.rotation == 0
    assert info.duration == pytest.approx(1.0, abs=0.01)
    frames, info2 = video.read_frames(path, DecodeSpec.sized((96, 64)))
    assert frames.shape == (12, 64, 96, 3) and frames.dtype == np.uint8
    assert info2 == info
    default, _ = video.read_frames(path)
    assert default.shape[1:] == (448, 640, 3)  # 96x64 scaled to ~512*512, multiples of 64
    assert video.count_frames(path) == 12


def test_iter_frames_is_lazy(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "clip.mp4", frames=6, audio=False)
    frames = video.iter_frames(path, DecodeSpec.sized((64, 64)))
    assert inspect.isgenerator(frames)
    assert next(frames).shape == (64, 64, 3)
    frames.close()


def test_write_video_keeps_audio_exact_count_and_rate(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "src.mp4", frames=20, size=(64, 64), fps=10)
    frames, _ = video.read_frames(source, DecodeSpec.sized((96, 64), max_frames=13))
    out = tmp_path / "out.mp4"
    rate = Fraction(30000, 1001)
    n = video.write_video(
        out, iter(frames), rate, audio_source=source, comment="made with the tiny test model"
    )
    assert n == 13
    info = video.probe(out)
    assert info.fps == rate and info.frame_count == 13 and video.count_frames(out) == 13
    assert info.has_audio and (info.width, info.height) == (96, 64)
    with av.open(str(out)) as c:
        assert c.metadata.get("comment") == "made with the tiny test model"
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert float(audio.duration * audio.time_base) == pytest.approx(13 / float(rate), abs=0.03)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "src.mp4"]  # no temp file left


def test_write_video_audio_source_without_audio(tmp_path: Path) -> None:
    silent = make_clip(tmp_path / "silent.mp4", frames=4, size=(64, 64), audio=False)
    out = tmp_path / "out.mp4"
    assert video.write_video(out, indexed_frames(5), 10, audio_source=silent) == 5
    info = video.probe(out)
    assert not info.has_audio and info.frame_count == 5


def test_write_video_is_atomic_on_error(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"

    def failing():
        yield from indexed_frames(3)
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        video.write_video(out, failing(), 10)
    with pytest.raises(SpecError, match="uint8"):
        video.write_video(out, [np.zeros((48, 64, 3), np.float32)], 10)
    with pytest.raises(SpecError, match="same size"):
        video.write_video(out, [np.zeros((48, 64, 3), np.uint8), np.zeros((48, 80, 3), np.uint8)], 10)
    with pytest.raises(SpecError, match="no frames"):
        video.write_video(out, [], 10)
    assert list(tmp_path.iterdir()) == []


def test_write_video_replaces_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    video.write_video(out, indexed_frames(3), 10)
    assert video.count_frames(out) == 3


@pytest.mark.parametrize("n", [1, 7])
def test_odd_frame_counts_and_non_square(tmp_path: Path, n: int) -> None:
    out = tmp_path / "odd.mp4"
    video.write_video(out, indexed_frames(n, size=(160, 96)), 7)
    frames, info = video.read_frames(out, DecodeSpec.sized((160, 96)))
    assert frames.shape == (n, 96, 160, 3)
    assert (info.width, info.height, info.fps, info.frame_count) == (160, 96, Fraction(7), n)
    assert [index_of(f) for f in frames] == list(range(n))


# --------------------------------------------------------------------------- sizes and selection


def test_output_size_rounding() -> None:
    w, h = video.output_size(854, 480, DecodeSpec())
    assert (w, h) == (704, 384)
    assert w % 64 == 0 and h % 64 == 0
    assert abs(w * h / (512 * 512) - 1) < 0.1
    assert abs((w / h) / (854 / 480) - 1) < 0.05
    assert video.output_size(480, 854, DecodeSpec()) == (384, 704)
    assert video.output_size(512, 512, DecodeSpec()) == (512, 512)
    assert video.output_size(10, 10, DecodeSpec(target_area=64 * 64)) == (64, 64)
    assert video.output_size(4000, 100, DecodeSpec())[1] == 64  # never below 64
    assert video.output_size(1920, 1080, DecodeSpec.sized((320, 192))) == (320, 192)


def test_fit_frame_covers_and_centre_crops() -> None:
    image = np.zeros((128, 256, 3), np.uint8)
    image[:, :96] = (255, 0, 0)
    image[:, 96:160] = (0, 255, 0)
    image[:, 160:] = (0, 0, 255)
    out = video.fit_frame(image, (64, 64))
    assert out.shape == (64, 64, 3)
    # scale 0.5 then crop the middle 64 columns: red 0..16, green 16..48, blue 48..64
    assert tuple(out[32, 4]) == (255, 0, 0)
    assert tuple(out[32, 32]) == (0, 255, 0)
    assert tuple(out[32, 60]) == (0, 0, 255)
    up = video.fit_frame(image, (512, 512))
    assert up.shape == (512, 512, 3) and tuple(up[256, 256]) == (0, 255, 0)


def test_start_stride_max_frames_selection(tmp_path: Path) -> None:
    path = write_frames_as(tmp_path / "idx.mp4", indexed_frames(30))
    picked = list(video.iter_frames(path, DecodeSpec.sized((64, 48), start=3, stride=4, max_frames=5)))
    assert [index_of(f) for f in picked] == [3, 7, 11, 15, 19]
    tail = list(video.iter_frames(path, DecodeSpec.sized((64, 48), start=25, stride=2)))
    assert [index_of(f) for f in tail] == [25, 27, 29]
    last = list(video.iter_frames(path, DecodeSpec.sized((64, 48), start=29)))
    assert [index_of(f) for f in last] == [29]


def test_start_beyond_end(tmp_path: Path) -> None:
    path = write_frames_as(tmp_path / "idx.mp4", indexed_frames(5))
    with pytest.raises(VideoError, match="no frames in the requested range"):
        video.read_frames(path, DecodeSpec(start=5))


# --------------------------------------------------------------------------- rotation, codecs, VFR


@pytest.mark.parametrize(("degrees", "strip_at"), [(90, "bottom"), (-90, "top"), (180, "right")])
def test_rotation_metadata_is_honoured(tmp_path: Path, degrees: int, strip_at: str) -> None:
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :16] = 255  # a white strip on the left of the stored (landscape) image
    path = write_frames_as(tmp_path / "rot.mp4", [frame] * 3, rotation=degrees)
    info = video.probe(path)
    assert info.rotation == degrees % 360
    frames = list(video.iter_frames(path, native=True))
    expected = (64, 32) if degrees == 180 else (32, 64)  # display (width, height)
    assert (info.width, info.height) == expected and frames[0].shape == (expected[1], expected[0], 3)
    f = frames[0].astype(float).mean(axis=2)
    regions = {"bottom": f[-8:], "top": f[:8], "right": f[:, -8:]}
    assert regions[strip_at].mean() > 200 and f.mean() < 100
    resized = next(video.iter_frames(path, DecodeSpec(target_area=64 * 128)))
    assert resized.shape[0] > resized.shape[1] or degrees == 180


@pytest.mark.parametrize(
    ("suffix", "codec", "name"),
    [(".mov", "libx264", "h264"), (".webm", "libvpx-vp9", "vp9"), (".mkv", "libx265", "hevc")],
)
def test_other_containers_and_codecs(tmp_path: Path, suffix: str, codec: str, name: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"encoder {codec} is not in this FFmpeg build")
    path = write_frames_as(tmp_path / f"clip{suffix}", indexed_frames(10), fps=10, codec=codec)
    info = video.probe(path)
    assert info.codec == name and (info.width, info.height) == (64, 48)
    assert info.fps == 10 and info.frame_count == 10
    assert video.count_frames(path) == 10
    frames, _ = video.read_frames(path, DecodeSpec.sized((64, 48)))
    assert [index_of(f) for f in frames] == list(range(10))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate(tmp_path: Path, suffix: str) -> None:
    pts = [0, 40, 50, 130, 300, 310, 320, 500, 540, 700, 710]  # milliseconds, irregular
    path = write_frames_as(
        tmp_path / f"vfr{suffix}", indexed_frames(len(pts)), fps=25, pts=pts, time_base=Fraction(1, 1000)
    )
    assert video.count_frames(path) == len(pts)
    frames = list(video.iter_frames(path, DecodeSpec.sized((64, 48), start=1, stride=2)))
    assert [index_of(f) for f in frames] == [1, 3, 5, 7, 9]
    info = video.probe(path)
    assert 0 < info.fps < 100


@pytest.mark.skipif(not WOLF.exists(), reason="shared evaluation clips are not present")
def test_real_clip_probe() -> None:
    info = video.probe(WOLF)
    assert (info.width, info.height) == (512, 512) and info.frame_count == 40


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(np.random.default_rng(0).bytes(20000), id="random-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(b"this is a text file, not a video\n" * 20, id="text"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError):
        video.probe(path)
    with pytest.raises(VideoError):
        video.read_frames(path)
    with pytest.raises(VideoError):
        video.count_frames(path)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no such file"):
        video.probe(tmp_path / "nope.mp4")
    with pytest.raises(VideoError):
        list(video.iter_frames(tmp_path / "nope.mp4"))
    with pytest.raises(VideoError):
        video.probe(tmp_path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 44100
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(VideoError, match="no video stream"):
        video.probe(path)


def test_too_large(tmp_path: Path) -> None:
    path = tmp_path / "huge.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=1, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 4160, 4096, "yuv420p"
        for packet in [*stream.encode(av.VideoFrame(4160, 4096, "yuv420p")), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(TooLargeError):
        video.probe(path)
    with pytest.raises(TooLargeError):
        next(video.iter_frames(path))


def test_write_video_audio_start_offset(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "src.mp4", frames=20, size=(128, 96), fps=10)
    out = tmp_path / "out.mp4"
    video.write_video(out, indexed_frames(5), 10, audio_source=source, audio_start=0.5)
    with av.open(str(out)) as c:
        audio = c.streams.audio[0]
        assert float(audio.duration * audio.time_base) == pytest.approx(0.5, abs=0.03)
    video.write_video(out, indexed_frames(5), 10, audio_source=source, audio_start=100.0)
    assert not video.probe(out).has_audio  # nothing left after the offset: no audio stream
    with pytest.raises(SpecError, match="crf"):
        video.write_video(out, indexed_frames(2), 10, crf=60)
