"""Fuzz video probing and decoding: arbitrary bytes are either a video or a VideoError/TooLargeError.

Run (new inputs go to the first folder; the kept corpus is only read):

    mkdir -p /tmp/video-work
    .venv/bin/python -m fuzz.run video /tmp/video-work fuzz/corpus/video -max_total_time=60 \
        -rss_limit_mb=1024 -timeout=20 -max_len=20000

`check_video` is the harness; the tests replay the kept corpus through it without atheris. A finding is
any other exception (an av.* error or a bug escaping), an invalid frame, a message that names a
server directory, or (through libFuzzer's -rss_limit_mb / -timeout) a decode that blows up memory or
hangs. Coverage is of the Python side (tokenflow.video); FFmpeg itself is not instrumented.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tokenflow import video
from tokenflow.errors import TooLargeError, VideoError
from tokenflow.limits import DecodeLimits
from tokenflow.specs import DecodeSpec

# Tight limits keep each input cheap (the fuzzer runs thousands per minute); the limits are also what
# the harness checks: no frame above them comes out, and a refusal names one of them.
LIMITS = DecodeLimits(max_pixels_per_frame=1024 * 1024, max_decoded_frames=48, decoder_threads=1)
SPECS = (
    DecodeSpec(width=64, height=64, max_frames=3),
    DecodeSpec(start=2, stride=3, max_frames=2, width=64, height=64),
)
LIMIT_NAMES = {"max_pixels_per_frame", "max_decoded_frames"}


def _check_refusal(exc: VideoError | TooLargeError, scratch: Path) -> None:
    text = str(exc)
    assert text, f"{type(exc).__name__} without a message"
    assert str(scratch) not in text, f"the message names the scratch directory: {text}"
    if isinstance(exc, TooLargeError):
        assert exc.limit_name in LIMIT_NAMES and exc.limit is not None, (exc.limit_name, exc.limit)


def check_video(data: bytes, scratch: Path) -> None:
    """probe, count_frames and iter_frames of `data` written as a file in `scratch`."""
    path = scratch / "upload"
    path.write_bytes(data)
    try:
        info = video.probe(path, SPECS[0], LIMITS)
    except (VideoError, TooLargeError) as exc:
        _check_refusal(exc, scratch)
        return
    assert info.width > 0 and info.height > 0 and info.width * info.height <= LIMITS.max_pixels_per_frame
    assert info.fps > 0 and info.rotation in (0, 90, 180, 270), info
    try:
        assert 0 < video.count_frames(path, limits=LIMITS) <= LIMITS.max_decoded_frames
    except (VideoError, TooLargeError) as exc:
        _check_refusal(exc, scratch)
    for spec in SPECS:
        try:
            for frame in video.iter_frames(path, spec, limits=LIMITS):
                assert frame.dtype == np.uint8 and frame.shape == (64, 64, 3), frame.shape
        except (VideoError, TooLargeError) as exc:
            _check_refusal(exc, scratch)


def fuzz_target() -> Callable[[bytes], None]:
    """The one-argument target for libFuzzer (fuzz.run), decoding in a scratch folder.

    Each input is written to <scratch>/upload before it is decoded: after a hang or a kill, that file
    is the input that caused it. TOKENFLOW_FUZZ_SCRATCH picks the folder (the slow test reads it).
    """
    given = os.environ.get("TOKENFLOW_FUZZ_SCRATCH")
    scratch = Path(given) if given else Path(tempfile.mkdtemp(prefix="fuzz_video."))
    scratch.mkdir(parents=True, exist_ok=True)
    return lambda data: check_video(data, scratch)
