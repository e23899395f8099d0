"""Reading and writing videos with PyAV.

Decoding is streamed (a generator over frames) so that a long clip never has to sit in
memory as raw frames; frames come out upright (display-matrix rotation applied), resized
to cover the working size and centre-cropped, so the aspect ratio is kept without
distortion. Writing produces H.264/yuv420p mp4 at an exact rational frame rate, carries
the source's audio over when asked, and is atomic (temp file + ``os.replace``) so that a
cache never sees half a video.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from tokenflow.errors import SpecError, TooLargeError, VideoError
from tokenflow.limits import DEFAULT_LIMITS, DecodeLimits
from tokenflow.specs import DecodeSpec

# Errors PyAV raises for unreadable input: its own FFmpegError tree (InvalidDataError, ...) and
# plain OSErrors (missing file, directory, permissions).
_AV_ERRORS = (av.FFmpegError, OSError)
# Sample rates the native AAC encoder accepts; anything else is resampled to 48 kHz.
_AAC_RATES = frozenset(
    {96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350}
)

PathLike = str | os.PathLike[str]
# A y4m header line is at most a few dozen bytes; this is plenty for the fields read from it.
_Y4M_HEADER_BYTES = 512


@dataclass(frozen=True)
class VideoInfo:
    """What a caller needs to know about a video before decoding it.

    `width`/`height` are the display size (after rotation); `rotation` is the
    counter-clockwise angle in degrees (0, 90, 180 or 270) that the display matrix asks
    for, as PyAV's ``VideoFrame.rotation`` reports it. `fps` is the average frame rate
    (for variable-frame-rate clips, frames / duration). `frame_count` is the container's
    count when it stores one (mp4/mov), else an estimate from duration × fps; use
    `count_frames` for an exact number.
    """

    width: int
    height: int
    fps: Fraction
    frame_count: int
    duration: float | None
    rotation: int
    has_audio: bool
    codec: str


# --------------------------------------------------------------------------- reading


def _name(path: PathLike) -> str:
    """The file's own name, never its directory: messages go to clients, and the path is internal."""
    return repr(Path(os.fspath(path)).name)


def _open_input(path: PathLike, limits: DecodeLimits = DEFAULT_LIMITS) -> av.container.InputContainer:
    """Open for reading; a missing, empty or non-media file becomes a VideoError.

    `max_pixels` reaches the decoders FFmpeg runs while probing the streams (find_stream_info), so
    even the probe cannot allocate a picture larger than the limit.
    """
    _sniff_header(path, limits)
    try:
        return av.open(
            os.fspath(path),
            "r",
            options={"max_pixels": str(limits.max_pixels_per_frame)},
            metadata_errors="replace",  # tags in any bytes (a fuzzer found invalid UTF-8 crashing open)
        )
    except _AV_ERRORS as exc:
        raise VideoError(f"cannot read {_name(path)} as a video: {_reason(exc)}") from exc


def _sniff_header(path: PathLike, limits: DecodeLimits) -> None:
    """Refuse, from the plain-text header, a y4m whose picture size exceeds the limit.

    FFmpeg's y4m demuxer fails on absurd sizes with an errno (EBUSY, "Device or resource busy") that
    says nothing about the cause; reading the header first gives the caller the real reason.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_Y4M_HEADER_BYTES)
    except OSError:
        return  # av.open reports it (missing file, directory, permissions)
    if not head.startswith(b"YUV4MPEG2"):
        return
    tokens = head.split(b"\n", 1)[0].split()[1:]
    fields = {t[:1]: t[1:] for t in tokens if t}
    try:
        width, height = int(fields[b"W"]), int(fields[b"H"])
    except (KeyError, ValueError):
        raise VideoError(f"{_name(path)} is a y4m file without a valid W/H header") from None
    if width <= 0 or height <= 0:
        raise VideoError(f"{_name(path)} is a y4m file with an invalid size {width}x{height}")
    _check_pixels(width, height, limits, path, "its y4m header says")


@contextlib.contextmanager
def _open(path: PathLike, limits: DecodeLimits = DEFAULT_LIMITS) -> Iterator[av.container.InputContainer]:
    """Open for reading, turning every PyAV/OS failure (at open or while decoding) into VideoError."""
    with _open_input(path, limits) as container:
        try:
            yield container
        except _AV_ERRORS as exc:
            raise VideoError(f"cannot decode {_name(path)}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The cause in words, without the path FFmpeg puts in its messages."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, av.error.InvalidDataError):
        return "Invalid data (corrupt, or not a format FFmpeg can read)"
    if isinstance(exc, av.error.EOFError):
        return "the file ends too early (truncated?)"
    text = getattr(exc, "strerror", None) or type(exc).__name__
    return str(text)


def _check_pixels(width: int, height: int, limits: DecodeLimits, path: PathLike, where: str) -> None:
    """TooLargeError if a `width` x `height` picture exceeds `max_pixels_per_frame`."""
    limit = limits.max_pixels_per_frame
    if width * height > limit:
        raise TooLargeError(
            f"{_name(path)}: {where} {width}x{height} = {width * height} pixels; the limit is {limit} "
            "pixels per frame (max_pixels_per_frame): downscale the video before uploading it",
            limit_name="max_pixels_per_frame",
            limit=limit,
        )


def _video_stream(
    container: av.container.InputContainer, path: PathLike, limits: DecodeLimits = DEFAULT_LIMITS
) -> av.VideoStream:
    if container.format.name == "tty":  # FFmpeg renders text files (.txt, .nfo, ...) as ANSI-art "video"
        raise VideoError(f"{_name(path)} is a text file, not a video")
    if not container.streams.video:
        kinds = "an audio-only file" if container.streams.audio else "no video, or an empty one"
        raise VideoError(f"{_name(path)} has no video stream ({kinds}): upload a video")
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None:
        raise VideoError(f"{_name(path)}: no decoder is available for its video codec")
    _check_pixels(context.width, context.height, limits, path, "the stream header says")
    # The decoder allocates each picture before we see it: FFmpeg refuses larger ones itself.
    context.options = {**(context.options or {}), "max_pixels": str(limits.max_pixels_per_frame)}
    # Frame + slice threads, but few: each frame thread holds its own decoder tables, sized by the
    # stream's latest (possibly hostile) SPS before any picture is allocated.
    stream.thread_type = "AUTO"
    context.thread_count = limits.decoder_threads
    return stream


def _decoded(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    path: PathLike,
    limits: DecodeLimits = DEFAULT_LIMITS,
    check_cancelled: Callable[[], None] | None = None,
) -> Iterator[av.VideoFrame]:
    """Frames in presentation order; the index in this sequence is the frame number.

    Counting decoded frames (rather than dividing pts by a nominal rate) is what makes
    start/stride selection correct for variable-frame-rate clips. Every decoded frame counts
    against `max_decoded_frames` and has its size checked before anyone converts it, whatever the
    header said; `check_cancelled` runs once per decoded frame (a frame costs far more than the
    check), so a cancelled job stops decoding within one frame's time.
    """
    frames = container.decode(stream)
    index = 0
    while True:
        if check_cancelled is not None:
            check_cancelled()
        try:
            frame = next(frames)
        except StopIteration:
            return
        except _AV_ERRORS as exc:
            context = stream.codec_context  # FFmpeg keeps the size it refused to allocate
            _check_pixels(context.width, context.height, limits, path, f"frame {index} is")
            raise VideoError(f"cannot decode {_name(path)} at frame {index}: {_reason(exc)}") from exc
        if index >= limits.max_decoded_frames:
            raise TooLargeError(
                f"{_name(path)} has more than {limits.max_decoded_frames} frames; the limit is "
                f"{limits.max_decoded_frames} decoded frames per call (max_decoded_frames, counting frames "
                "skipped by start/stride): select fewer with max_frames, or cut the video",
                limit_name="max_decoded_frames",
                limit=limits.max_decoded_frames,
            )
        _check_pixels(frame.width, frame.height, limits, path, f"frame {index} is")
        # With frame threads, a refused picture is dropped silently, but the size the decoder switched
        # to (for a frame still in flight) is already on the context.
        context = stream.codec_context
        _check_pixels(context.width, context.height, limits, path, f"frame {index + 1} is")
        yield frame
        index += 1


def _check_selection(
    claimed: int, spec: DecodeSpec, limits: DecodeLimits, path: PathLike, counted: bool = False
) -> None:
    """Refuse before decoding when the container claims more frames than the selection may decode.

    The frames a selection needs are start + (max_frames - 1) * stride + 1, or all of them without
    max_frames; a long clip with a short selection is fine (decoding stops early). The claim may be
    false either way: the count of decoded frames in `_decoded` is what enforces the limit.
    """
    limit = limits.max_decoded_frames
    needed = claimed
    if spec.max_frames is not None:
        needed = min(claimed, spec.start + (spec.max_frames - 1) * spec.stride + 1)
    if needed > limit:
        raise TooLargeError(
            f"{_name(path)} {'has at least' if counted else 'claims'} {claimed} frames and the selection "
            f"(start={spec.start}, "
            f"stride={spec.stride}, max_frames={spec.max_frames}) would decode {needed}; the limit is "
            f"{limit} decoded frames per call (max_decoded_frames): set max_frames, or cut the video",
            limit_name="max_decoded_frames",
            limit=limit,
        )


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation, snapped to a multiple of 90 and normalised to [0, 360).

    PyAV >= 14 reads the display matrix that FFmpeg attaches to every decoded frame (it is
    copied from the stream's coded side data, which is where mp4 'tkhd' matrices and the
    legacy 'rotate' tag end up), so no stream-level parsing is needed. A degenerate matrix
    (NaN angle) counts as upright.
    """
    angle = frame.rotation
    return (round(angle / 90) * 90) % 360 if math.isfinite(angle) else 0


def _frame_rate(stream: av.VideoStream, path: PathLike) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate)
    raise VideoError(f"{_name(path)}: the frame rate is unknown")


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _claimed_frames(stream: av.VideoStream, duration: float | None, fps: Fraction | None) -> int:
    """The container's frame count, else duration x fps; 0 when neither is known. Only a claim."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if duration and fps:
        estimate = duration * float(fps)
        return int(min(estimate, 2.0**62)) if math.isfinite(estimate) else 0
    return 0


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream, cap: int) -> int:
    """Video packets from the current position on (at least 1: the frame already decoded), up to `cap`."""
    count = 1
    try:
        for packet in container.demux(stream):
            if packet.size:
                count += 1
                if count >= cap:
                    break
    except _AV_ERRORS:
        pass  # a broken tail: the decode's own count is what enforces the limit
    return count


def probe(path: PathLike, spec: DecodeSpec | None = None, limits: DecodeLimits = DEFAULT_LIMITS) -> VideoInfo:
    """Describe a video cheaply: demux the header and decode one frame.

    The first frame is decoded because the display rotation lives in frame side data in
    PyAV, and because a file that opens but cannot decode is not a usable video. With a
    `spec`, a container that claims more frames than that selection may decode is refused
    here (TooLargeError), before any job is queued.
    """
    with _open(path, limits) as container:
        stream = _video_stream(container, path, limits)
        first = next(_decoded(container, stream, path, limits), None)
        if first is None:
            raise VideoError(f"{_name(path)} has no decodable video frames (an empty or broken video stream)")
        rotation = _rotation(first)
        width, height = (first.height, first.width) if rotation % 180 else (first.width, first.height)
        fps = _frame_rate(stream, path)
        duration = _duration(container, stream)
        count = _claimed_frames(stream, duration, fps)
        if spec is not None:
            # No claim (raw streams, mkv without a duration): count packets, which costs a demux and no
            # decoding, so that a long clip is refused here rather than after minutes of a job.
            known = count or _count_packets(container, stream, limits.max_decoded_frames + 1)
            _check_selection(known, spec.validate(), limits, path, counted=not count)
        return VideoInfo(
            width=width,
            height=height,
            fps=fps,
            frame_count=count,
            duration=duration,
            rotation=rotation,
            has_audio=bool(container.streams.audio),
            codec=stream.codec_context.name,
        )


def output_size(width: int, height: int, spec: DecodeSpec) -> tuple[int, int]:
    """Working (W, H) for a display size: `spec.size`, or ~`target_area` pixels in multiples of 64.

    Multiples of 64 keep the VAE latents (/8) divisible by the UNet's down-sampling (/8);
    the frame is later resized to *cover* this size and centre-cropped, so a slight aspect
    mismatch from rounding costs a thin crop instead of a distortion.
    """
    if spec.size:
        return int(spec.size[0]), int(spec.size[1])
    if width <= 0 or height <= 0:
        raise VideoError(f"invalid video size {width}x{height}")
    scale = math.sqrt(spec.target_area / (width * height))
    return max(64, round(width * scale / 64) * 64), max(64, round(height * scale / 64) * 64)


def fit_frame(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to cover `size` (W, H) keeping the aspect ratio, then centre-crop (no distortion).

    Area interpolation when shrinking (no aliasing), cubic when enlarging.
    """
    out_w, out_h = size
    h, w = image.shape[:2]
    if (w, h) == (out_w, out_h):
        return image
    scale = max(out_w / w, out_h / h)
    new_w, new_h = max(out_w, math.ceil(w * scale - 1e-6)), max(out_h, math.ceil(h * scale - 1e-6))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    x0, y0 = (new_w - out_w) // 2, (new_h - out_h) // 2
    return np.ascontiguousarray(resized[y0 : y0 + out_h, x0 : x0 + out_w])


def _to_rgb(frame: av.VideoFrame, rotation: int, path: PathLike) -> np.ndarray:
    try:
        image = frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError) as exc:  # a pixel format swscale cannot convert
        raise VideoError(
            f"cannot convert {_name(path)} from pixel format {frame.format.name} to RGB: {_reason(exc)}"
        ) from exc
    if rotation:
        image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))  # np.rot90 is counter-clockwise
    return image


def iter_frames(
    path: PathLike,
    spec: DecodeSpec | None = None,
    native: bool = False,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    check_cancelled: Callable[[], None] | None = None,
) -> Iterator[np.ndarray]:
    """Yield the selected frames as uint8 RGB (H, W, 3), upright and fitted to `output_size`.

    With `native=True` the frames keep their display size (spec.size/target_area are
    ignored): evaluation compares an edited video at its own size.

    Frame i (0-based, presentation order) is taken when i >= start and (i - start) is a
    multiple of stride, up to max_frames; decoding stops as soon as enough frames are out.
    Skipped frames are decoded (codecs need their references) but never converted to RGB.
    `limits` bound the pixels of every decoded frame and the frames decoded (TooLargeError);
    `check_cancelled` (e.g. ``JobHooks.check``) runs on every decoded frame.
    """
    spec = (spec or DecodeSpec()).validate()
    produced = 0
    with _open(path, limits) as container:
        stream = _video_stream(container, path, limits)
        fps = next((r for r in (stream.average_rate, stream.guessed_rate) if r and r > 0), None)
        _check_selection(_claimed_frames(stream, _duration(container, stream), fps), spec, limits, path)
        size: tuple[int, int] | None = None
        rotation = 0
        for index, frame in enumerate(_decoded(container, stream, path, limits, check_cancelled)):
            if size is None:
                rotation = _rotation(frame)
                w, h = (frame.height, frame.width) if rotation % 180 else (frame.width, frame.height)
                size = (w, h) if native else output_size(w, h, spec)
            if index < spec.start or (index - spec.start) % spec.stride:
                continue
            yield fit_frame(_to_rgb(frame, rotation, path), size)
            produced += 1
            if spec.max_frames is not None and produced >= spec.max_frames:
                return
    if produced == 0:
        raise VideoError(
            f"{_name(path)} has no frames in the requested range "
            f"(start={spec.start}, stride={spec.stride}); is the video empty or shorter than that?"
        )


def read_frames(
    path: PathLike,
    spec: DecodeSpec | None = None,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    check_cancelled: Callable[[], None] | None = None,
) -> tuple[np.ndarray, VideoInfo]:
    """All selected frames as one (N, H, W, 3) uint8 array, with the source's VideoInfo."""
    info = probe(path, spec, limits)
    frames = iter_frames(path, spec, limits=limits, check_cancelled=check_cancelled)
    return np.stack(list(frames)), info


def count_frames(
    path: PathLike,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    check_cancelled: Callable[[], None] | None = None,
) -> int:
    """Exact number of frames, by decoding (container counts are absent in mkv/webm and can lie).

    More than `limits.max_decoded_frames` frames is a TooLargeError, not a count.
    """
    with _open(path, limits) as container:
        stream = _video_stream(container, path, limits)
        return sum(1 for _ in _decoded(container, stream, path, limits, check_cancelled))


# --------------------------------------------------------------------------- writing


def _as_fraction(fps: Fraction | float | int) -> Fraction:
    """An exact rational rate: floats like 29.97 become 2997/100; Fractions are kept as they are."""
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if rate <= 0 or rate > 1000:
        raise SpecError(f"fps must be in (0, 1000], got {fps}")
    return rate


def _check_crf(crf: int) -> None:
    if not 0 <= crf <= 51:
        raise SpecError(f"crf must be in 0..51 (lower is better quality), got {crf}")


def _check_frame(frame: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise SpecError(f"frames must be uint8 (H, W, 3) arrays, got {arr.dtype} {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise SpecError(f"all frames must have the same size; got {arr.shape} after {shape}")
    if arr.shape[0] % 2 or arr.shape[1] % 2:
        raise SpecError(f"H.264 yuv420p needs even sizes, got {arr.shape[1]}x{arr.shape[0]}")
    return np.ascontiguousarray(arr)


class _AudioPump:
    """Re-encodes an audio frame stream to AAC, interleaved with the video and trimmed to it.

    Samples are counted, not timestamped from the source, so the audio starts at 0 with the
    video and ends exactly where the video ends (to the sample), whatever the source's pts.
    """

    def __init__(self, frames: Iterator[av.AudioFrame], first: av.AudioFrame, skip_seconds: float = 0.0):
        self.rate = first.sample_rate if first.sample_rate in _AAC_RATES else 48000
        self.layout = first.layout.name if first.layout.nb_channels <= 2 else "stereo"
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self._source: Iterator[av.AudioFrame | None] = _chain_first(first, frames)
        self._pending: deque[np.ndarray] = deque()
        self._skip = round(max(0.0, skip_seconds) * self.rate)
        self.written = 0
        self.stream: av.AudioStream | None = None

    def add_stream(self, out: av.container.OutputContainer) -> None:
        self.stream = out.add_stream("aac", rate=self.rate, layout=self.layout)

    def _refill(self) -> bool:
        """Decode more source audio into `_pending`; False once the source is exhausted."""
        while not self._pending:
            try:
                frame = next(self._source)
            except StopIteration:
                return False
            for out in self._resampler.resample(frame):
                data = out.to_ndarray()
                if self._skip:
                    cut = min(self._skip, data.shape[1])
                    self._skip -= cut
                    data = data[:, cut:]
                if data.shape[1]:
                    self._pending.append(data)
        return True

    def pump(self, out: av.container.OutputContainer, until: float) -> None:
        """Encode source audio up to `until` seconds of output."""
        limit = round(until * self.rate)
        while self.written < limit and self._refill():
            chunk = self._pending.popleft()
            take = min(chunk.shape[1], limit - self.written)
            if take < chunk.shape[1]:
                self._pending.appendleft(chunk[:, take:])
            self._encode(out, chunk[:, :take])

    def _encode(self, out: av.container.OutputContainer, data: np.ndarray | None) -> None:
        assert self.stream is not None
        frame = None
        if data is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="fltp", layout=self.layout)
            frame.sample_rate = self.rate
            frame.pts = self.written
            frame.time_base = Fraction(1, self.rate)
            self.written += data.shape[1]
        for packet in self.stream.encode(frame):
            out.mux(packet)

    def finish(self, out: av.container.OutputContainer, until: float) -> None:
        self.pump(out, until)
        self._encode(out, None)


def _chain_first(first: av.AudioFrame, rest: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame | None]:
    yield first
    yield from rest
    yield None  # flushes the resampler


def _encode_mp4(
    target: str,
    frames: Iterable[np.ndarray],
    rate: Fraction,
    audio: _AudioPump | None,
    crf: int,
    comment: str | None,
) -> int:
    """Stream frames into an H.264 mp4 at `target`; returns the number of frames written."""
    time_base = 1 / rate
    with av.open(target, "w", format="mp4") as out:
        if comment:
            out.metadata["comment"] = comment
        stream: av.VideoStream | None = None
        shape: tuple[int, ...] | None = None
        count = 0
        for frame in frames:
            arr = _check_frame(frame, shape)
            if stream is None:
                shape = arr.shape
                stream = out.add_stream("libx264", rate=rate, options={"crf": str(int(crf))})
                stream.width, stream.height, stream.pix_fmt = arr.shape[1], arr.shape[0], "yuv420p"
                stream.codec_context.time_base = time_base
                if audio is not None:
                    audio.add_stream(out)
            # Same bytes for the same frames is what a content-addressed cache wants. Observed
            # with this FFmpeg build: from 128x96 up the output is byte-stable run to run; on
            # tiny frames (<= 96x64) libx264 varies whatever we do, a bit less often with the
            # conversion done here rather than inside the encoder.
            video_frame = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")
            video_frame.pts, video_frame.time_base = count, time_base
            for packet in stream.encode(video_frame):
                out.mux(packet)
            count += 1
            if audio is not None:
                audio.pump(out, float(count * time_base))
        if stream is None:
            raise SpecError("no frames to write")
        for packet in stream.encode(None):
            out.mux(packet)
        if audio is not None:
            audio.finish(out, float(count * time_base))
    return count


def _atomic_write(path: PathLike, write: Callable[[str], int]) -> int:
    """Run `write(temp_path)` then move the result into place; the temp file never survives an error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.mp4", dir=path.parent)
    os.close(fd)
    try:
        result = write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a written video is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return result


def write_video(
    path: PathLike,
    frames: Iterable[np.ndarray],
    fps: Fraction | float,
    audio_source: PathLike | None = None,
    crf: int = 18,
    comment: str | None = None,
    audio_start: float = 0.0,
) -> int:
    """Write uint8 RGB frames as H.264/yuv420p mp4 at exactly `fps`; returns the frame count.

    Frames are consumed one at a time. If `audio_source` has an audio stream it is
    re-encoded to AAC from `audio_start` seconds on and trimmed to the video's duration
    (re-encoding always works, whatever the source codec, and makes trimming sample-exact).
    `comment` is stored as the container's ``comment`` tag.
    """
    rate = _as_fraction(fps)
    _check_crf(crf)
    with contextlib.ExitStack() as stack:
        audio = None
        if audio_source is not None:
            source = stack.enter_context(_open_input(audio_source))
            if source.streams.audio:
                decoded = source.decode(source.streams.audio[0])
                first = next(decoded, None)
                if first is not None:
                    audio = _AudioPump(decoded, first, audio_start)
        return _atomic_write(path, lambda tmp: _encode_mp4(tmp, frames, rate, audio, crf, comment))


def write_video_with_audio_frames(
    path: PathLike,
    frames: Iterable[np.ndarray],
    fps: Fraction | float,
    audio_frames: Iterable[av.AudioFrame],
    crf: int = 18,
    comment: str | None = None,
) -> int:
    """Like `write_video`, with audio from in-memory frames (e.g. a generated tone) instead of a file."""
    rate = _as_fraction(fps)
    _check_crf(crf)
    iterator = iter(audio_frames)
    first = next(iterator, None)
    audio = _AudioPump(iterator, first) if first is not None else None
    return _atomic_write(path, lambda tmp: _encode_mp4(tmp, frames, rate, audio, crf, comment))
