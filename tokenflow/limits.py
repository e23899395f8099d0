"""Resource limits of decoding a video someone else supplied.

An uploaded "video" is untrusted: its header may lie about its size and length, and a few hundred
kilobytes can ask the decoder for gigabytes (an H.264 stream may switch to a 16000x16000 SPS after a
64x64 one) or for hours of CPU (millions of tiny frames). These limits are checked on what is actually
decoded, frame by frame, and the pixel limit is also handed to FFmpeg so that the decoder refuses to
allocate an oversized picture before Python ever sees it. Each limit has a name that the errors carry
(`TooLargeError.limit_name`), so a service can report which limit was hit and its value.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenflow.errors import SpecError
from tokenflow.specs import MAX_FRAMES, MAX_PIXELS

MAX_PIXELS_PER_FRAME = MAX_PIXELS * 4
"""Default largest decoded picture (4096x4096): 4x the largest working size, so a source can be
downscaled, while one decoded frame stays around 25 MB (yuv420p) / 50 MB (rgb24)."""

MAX_DECODED_FRAMES = MAX_FRAMES
"""Default most frames decoded per call, counting the frames skipped by start/stride (decoding them
costs the same CPU as decoding the ones that are used)."""

DECODER_THREADS = 2
"""Default decoder threads. Each frame thread keeps its own decoder state, which FFmpeg sizes by the
stream's latest SPS before it allocates (and refuses) a picture: about 80 MB per thread for a
16000x16000 SPS. Decoding is never the bottleneck of an edit (the UNet is), so two threads are
plenty and bound what a hostile stream can make the decoder allocate."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode call may cost; the defaults are safe for a service, callers may tighten them.

    `max_pixels_per_frame` bounds every decoded picture (width x height), checked on each frame and
    passed to FFmpeg's decoder as ``max_pixels``. `max_decoded_frames` bounds the frames decoded in
    one call, and a container that claims more frames than the selection may decode is refused before
    decoding starts. `decoder_threads` bounds FFmpeg's decoder threads (see DECODER_THREADS).
    """

    max_pixels_per_frame: int = MAX_PIXELS_PER_FRAME
    max_decoded_frames: int = MAX_DECODED_FRAMES
    decoder_threads: int = DECODER_THREADS

    def __post_init__(self) -> None:
        for name in ("max_pixels_per_frame", "max_decoded_frames", "decoder_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{name} must be a positive integer, got {value!r}", field=name)


DEFAULT_LIMITS = DecodeLimits()
