"""Hostile uploads against the decoder: each is refused with the right error, in bounded memory and CPU.

Every input is generated here (fuzz.hostile_inputs: PyAV/libx264 encodes plus byte-level edits). Memory
is measured in a fresh child interpreter (VmHWM of /proc/self/status before and after the call), so the
figure is the decode's own peak, not this test process's history.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fuzz import hostile_inputs as hostile
from tokenflow import video
from tokenflow.errors import Cancelled, TooLargeError, VideoError
from tokenflow.limits import DecodeLimits
from tokenflow.specs import DecodeSpec

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

_CHILD = textwrap.dedent(
    """
    import json, sys
    from tokenflow import video
    from tokenflow.limits import DecodeLimits
    from tokenflow.specs import DecodeSpec

    def peak_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    path, threads = sys.argv[1], int(sys.argv[2])
    limits = DecodeLimits(decoder_threads=threads)
    before = peak_kb()
    result = {"error": None, "message": "", "limit_name": None}
    try:
        video.probe(path, DecodeSpec(), limits)
        for _ in video.iter_frames(path, DecodeSpec(), limits=limits):
            pass
    except Exception as exc:
        result.update(error=type(exc).__name__, message=str(exc), limit_name=getattr(exc, "limit_name", None))
    result["growth_mb"] = (peak_kb() - before) / 1024
    print(json.dumps(result))
    """
)


def decode_in_child(path: Path, threads: int = 2) -> dict:
    """probe + iter_frames of `path` in a fresh interpreter: the outcome and the peak-memory growth."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_clean_message(exc: BaseException, tmp_path: Path) -> None:
    """A message for a client: names the file only, never a directory of the server."""
    text = str(exc)
    assert str(tmp_path) not in text and "/" not in text.replace("start/stride", ""), text


# --------------------------------------------------------------------------- pixels per frame


@pytest.mark.parametrize("container", ["mp4", "h264"])
def test_sps_switch_to_16000x16000_is_refused_in_bounded_memory(tmp_path: Path, container: str) -> None:
    """A header (and first frames) of 64x64, then an SPS of 16000x16000: +1.2 GB unguarded."""
    data = hostile.switching_mp4(16000, 16000) if container == "mp4" else hostile.switching_h264(16000, 16000)
    assert len(data) < 20_000  # a few kilobytes of upload
    path = write(tmp_path, f"switch.{container}", data)
    with pytest.raises(TooLargeError, match="16000x16000") as caught:
        list(video.iter_frames(path))
    assert caught.value.limit_name == "max_pixels_per_frame"
    assert caught.value.limit == DecodeLimits().max_pixels_per_frame
    assert_clean_message(caught.value, tmp_path)
    for threads in (1, 2):
        result = decode_in_child(path, threads)
        assert (result["error"], result["limit_name"]) == ("TooLargeError", "max_pixels_per_frame")
        assert result["growth_mb"] < 300, result


def test_mp4_header_says_64x64_first_frames_are_delivered(tmp_path: Path) -> None:
    """The refusal comes from the decoded frames, not the header: the small frames decode first."""
    path = write(tmp_path, "switch.mp4", hostile.switching_mp4(8192, 8192))
    info = video.probe(path)
    assert (info.width, info.height) == (64, 64)
    frames = video.iter_frames(path, DecodeSpec(width=64, height=64), native=True)
    assert next(frames).shape == (64, 64, 3)
    with pytest.raises(TooLargeError, match="8192x8192"):
        list(frames)


def test_pixel_limit_is_the_callers(tmp_path: Path) -> None:
    path = write(tmp_path, "switch.mp4", hostile.switching_mp4(256, 256))
    assert len(list(video.iter_frames(path, native=True))) == 6  # under the default limit: decodes
    small = DecodeLimits(max_pixels_per_frame=128 * 128)
    with pytest.raises(TooLargeError, match="256x256") as caught:
        list(video.iter_frames(path, limits=small, native=True))
    assert caught.value.limit == 128 * 128


def test_y4m_claiming_20000x20000(tmp_path: Path) -> None:
    """FFmpeg itself says "Device or resource busy" for this header; the caller learns the real cause."""
    path = write(tmp_path, "huge.y4m", hostile.y4m(20000, 20000, frames=1, payload=bytes(4096)))
    for call in (video.probe, video.count_frames, lambda p: next(video.iter_frames(p))):
        with pytest.raises(TooLargeError, match="y4m header says 20000x20000") as caught:
            call(path)
        assert caught.value.limit_name == "max_pixels_per_frame"
        assert "busy" not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (hostile.y4m(0, 64), "invalid size 0x64"),
        (hostile.y4m("abc", 64), "without a valid W/H"),
        (b"YUV4MPEG2 F25:1\n", "without a valid W/H"),
    ],
)
def test_y4m_broken_headers(tmp_path: Path, header: bytes, fragment: str) -> None:
    path = write(tmp_path, "bad.y4m", header)
    with pytest.raises(VideoError, match=fragment):
        video.probe(path)


# --------------------------------------------------------------------------- frame counts


def test_header_claiming_ten_million_frames_is_refused_up_front(tmp_path: Path) -> None:
    path = write(tmp_path, "claim.mkv", hostile.claiming_frames(10**7))
    assert video.probe(path).frame_count == 10**7  # probing describes it; selecting it all is refused
    for call in (
        lambda: video.probe(path, DecodeSpec()),
        lambda: next(video.iter_frames(path)),
        lambda: video.read_frames(path),
    ):
        with pytest.raises(TooLargeError, match="claims 10000000 frames") as caught:
            call()
        assert caught.value.limit_name == "max_decoded_frames"
    # A short selection of a long clip is fine: decoding stops early.
    assert len(list(video.iter_frames(path, DecodeSpec(max_frames=2), native=True))) == 2


def test_selection_needing_too_many_decoded_frames(tmp_path: Path) -> None:
    path = write(tmp_path, "claim.mkv", hostile.claiming_frames(50_000))
    with pytest.raises(TooLargeError, match="would decode 10001"):
        next(video.iter_frames(path, DecodeSpec(start=9_000, stride=10, max_frames=101)))
    assert len(list(video.iter_frames(path, DecodeSpec(start=1, max_frames=1), native=True))) == 1


@pytest.fixture(scope="module")
def thousand_frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 frames of 16x16 in raw H.264: about 17 KB, and no frame count anywhere."""
    path = tmp_path_factory.mktemp("thousand") / "thousand.h264"
    path.write_bytes(hostile.encode(1000, (16, 16), fmt="h264", still=True))
    return path


def test_thousand_tiny_frames_without_a_count_are_bounded(thousand_frames: Path) -> None:
    assert thousand_frames.stat().st_size < 20_000
    assert video.probe(thousand_frames).frame_count == 0  # the container does not say
    limits = DecodeLimits(max_decoded_frames=400)
    with pytest.raises(TooLargeError, match="more than 400 frames") as caught:
        list(video.iter_frames(thousand_frames, DecodeSpec(width=64, height=64), limits=limits))
    assert (caught.value.limit_name, caught.value.limit) == ("max_decoded_frames", 400)
    with pytest.raises(TooLargeError):
        video.count_frames(thousand_frames, limits=limits)
    # Frames skipped by start/stride count: decoding them costs the same CPU.
    with pytest.raises(TooLargeError, match="more than 400 frames"):
        list(video.iter_frames(thousand_frames, DecodeSpec(start=500, max_frames=3), limits=limits))
    # Under the default limit it decodes, one frame at a time.
    assert video.count_frames(thousand_frames) == 1000


def test_cancellation_inside_decoding(thousand_frames: Path) -> None:
    """The check runs on every decoded frame (skipped ones too): a cancelled job stops at once."""
    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls > 100:
            raise Cancelled("cancelled by the caller")

    with pytest.raises(Cancelled):
        list(video.iter_frames(thousand_frames, DecodeSpec(start=900, max_frames=5), check_cancelled=check))
    assert calls == 101  # no frame decoded after the cancellation
    calls = 0
    with pytest.raises(Cancelled):
        video.count_frames(thousand_frames, check_cancelled=check)
    assert calls == 101


# --------------------------------------------------------------------------- unreadable inputs


@pytest.fixture(scope="module")
def real_mp4() -> bytes:
    return hostile.encode(12, (64, 48), fmt="mp4")


def test_random_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, "upload.mp4", hostile.random_bytes(20_000))
    for call in (video.probe, video.count_frames, lambda p: list(video.iter_frames(p))):
        with pytest.raises(VideoError, match="cannot read 'upload.mp4' as a video: Invalid data") as c:
            call(path)
        assert_clean_message(c.value, tmp_path)


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.6, 0.95])
def test_truncated_mp4(tmp_path: Path, real_mp4: bytes, fraction: float) -> None:
    """The moov box is at the end (no faststart): any truncation loses the sample tables."""
    path = write(tmp_path, "cut.mp4", hostile.truncated(real_mp4, fraction))
    with pytest.raises(VideoError, match="cannot read 'cut.mp4' as a video") as caught:
        list(video.iter_frames(path))
    assert_clean_message(caught.value, tmp_path)


def test_truncated_raw_stream_decodes_what_is_there(tmp_path: Path) -> None:
    data = hostile.encode(12, (64, 48), fmt="h264")
    path = write(tmp_path, "cut.h264", hostile.truncated(data, 0.5))
    frames = list(video.iter_frames(path, native=True))
    assert 0 < len(frames) < 12 and frames[0].shape == (48, 64, 3)


def test_bit_flipped_mp4_header(tmp_path: Path, real_mp4: bytes) -> None:
    broken = real_mp4.replace(b"moov", b"mopv", 1)
    path = write(tmp_path, "flipped.mp4", broken)
    with pytest.raises(VideoError, match="Invalid data"):
        video.probe(path)


@pytest.mark.parametrize("seed", range(24))
def test_bit_flipped_mp4(tmp_path: Path, real_mp4: bytes, seed: int) -> None:
    """Flips anywhere: frames that still decode are valid images; everything else is a VideoError."""
    path = write(tmp_path, "flipped.mp4", hostile.bit_flipped(real_mp4, flips=1 + seed % 8, seed=seed))
    try:
        frames = list(video.iter_frames(path, DecodeSpec(width=64, height=64)))
    except (VideoError, TooLargeError) as exc:
        assert str(exc) and "flipped.mp4" in str(exc)
        assert_clean_message(exc, tmp_path)
    else:
        assert frames and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)


def test_audio_only(tmp_path: Path) -> None:
    path = write(tmp_path, "tone.m4a", hostile.audio_only())
    for call in (video.probe, video.count_frames, lambda p: list(video.iter_frames(p))):
        with pytest.raises(VideoError, match="no video stream \\(an audio-only file\\)"):
            call(path)


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("zero.y4m", hostile.y4m(64, 64), "no decodable video frames"),
        ("zero.mp4", hostile.encode(0, fmt="mp4"), "no video stream"),
        ("zero.mkv", hostile.encode(0, fmt="matroska"), "cannot read 'zero.mkv'"),
        ("zero.h264", b"", "no decodable video frames"),
    ],
)
def test_zero_video_frames(tmp_path: Path, name: str, data: bytes, fragment: str) -> None:
    path = write(tmp_path, name, data)
    with pytest.raises(VideoError, match=fragment):
        video.probe(path)
    with pytest.raises(VideoError):
        list(video.iter_frames(path))


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("notes.txt", b"plain text, not a video\n" * 40, "is a text file, not a video"),
        ("archive.zip", b"PK\x03\x04" + bytes(200), "cannot read 'archive.zip' as a video"),
        ("box.mp4", b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", "cannot read 'box.mp4' as a video"),
        ("riff.avi", b"RIFF\x24\x00\x00\x00AVI LIST" + bytes(64), "cannot read 'riff.avi' as a video"),
        ("ebml.webm", b"\x1a\x45\xdf\xa3" + bytes(64), "cannot read 'ebml.webm' as a video"),
    ],
)
def test_unknown_and_odd_containers(tmp_path: Path, name: str, data: bytes, fragment: str) -> None:
    path = write(tmp_path, name, data)
    with pytest.raises(VideoError, match=fragment) as caught:
        list(video.iter_frames(path))
    assert_clean_message(caught.value, tmp_path)


def test_no_av_exception_escapes_any_hostile_input(tmp_path: Path, real_mp4: bytes) -> None:
    """Whatever the input, the library raises its own errors (VideoError, TooLargeError) only."""
    inputs = [
        hostile.random_bytes(3000, seed=1),
        hostile.truncated(real_mp4, 0.5),
        hostile.bit_flipped(real_mp4, 40, seed=7, skip=32),
        hostile.audio_only(),
        hostile.y4m(20000, 20000),
        hostile.y4m(64, 64, frames=2, payload=bytes(100)),  # frames shorter than the header says
        b"\x00\x00\x00\x01\x67" + hostile.random_bytes(500, seed=2),  # an "SPS" of noise
    ]
    for i, data in enumerate(inputs):
        path = write(tmp_path, f"input{i}.bin", data)
        for call in (video.probe, video.count_frames, lambda p: list(video.iter_frames(p))):
            try:
                call(path)
            except (VideoError, TooLargeError):
                pass


# --------------------------------------------------------------------------- slow: real encodes


@pytest.mark.slow
@pytest.mark.parametrize("side", [8192, 16000])
def test_real_encoded_switch_in_bounded_memory(tmp_path: Path, side: int) -> None:
    """The issue's own shape: a 64x64 stream followed by a real libx264 encode at side x side."""
    big = hostile.encode(1, (side, side), fmt="h264")
    small = hostile.encode(3, (64, 64), fmt="h264")
    path = write(tmp_path, "real.mp4", hostile.as_mp4(small + big, small))
    result = decode_in_child(path)
    assert (result["error"], result["limit_name"]) == ("TooLargeError", "max_pixels_per_frame")
    assert result["growth_mb"] < 300, result


def test_a_long_clip_without_a_frame_count_is_refused_by_probe(tmp_path: Path) -> None:
    """Raw H.264 has no frame count and no duration: probe counts packets (no decoding) against the cap."""
    path = write(tmp_path, "long.h264", hostile.encode(1000, (64, 64), fmt="h264", still=True))
    limits = DecodeLimits(max_decoded_frames=500)
    with pytest.raises(TooLargeError) as info:
        video.probe(path, DecodeSpec(), limits)
    assert info.value.limit_name == "max_decoded_frames" and "at least 501 frames" in str(info.value)
    assert video.probe(path, DecodeSpec(max_frames=100), limits).width == 64  # a short selection is fine
    assert_clean_message(info.value, tmp_path)
