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
from tokenflow.specs import MAX_PIXELS, DecodeSpec

# Errors PyAV raises for unreadable input: its own FFmpegError tree (InvalidDataError, ...) and
# plain OSErrors (missing file, directory, permissions).
_AV_ERRORS = (av.FFmpegError, OSError)
# Sample rates the native AAC encoder accepts; anything else is resampled to 48 kHz.
_AAC_RATES = frozenset(
    {96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350}
)

PathLike = str | os.PathLike[str]


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


def _open_input(path: PathLike) -> av.container.InputContainer:
    """Open for reading; a missing, empty or non-media file becomes a VideoError."""
    try:
        return av.open(os.fspath(path), "r")
    except _AV_ERRORS as exc:
        raise VideoError(f"cannot read {Path(path).name!r} as a video: {_reason(exc)}") from exc


@contextlib.contextmanager
def _open(path: PathLike) -> Iterator[av.container.InputContainer]:
    """Open for reading, turning every PyAV/OS failure (at open or while decoding) into VideoError."""
    with _open_input(path) as container:
        try:
            yield container
        except _AV_ERRORS as exc:
            raise VideoError(f"cannot decode {Path(path).name!r}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    text = getattr(exc, "strerror", None) or str(exc)
    return text or type(exc).__name__


def _video_stream(container: av.container.InputContainer, path: PathLike) -> av.VideoStream:
    if container.format.name == "tty":  # FFmpeg renders text files (.txt, .nfo, ...) as ANSI-art "video"
        raise VideoError(f"{Path(path).name!r} is a text file, not a video")
    if not container.streams.video:
        raise VideoError(f"{Path(path).name!r} has no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > MAX_PIXELS * 4:
        raise TooLargeError(f"{Path(path).name!r} is {w}x{h}; the limit is {MAX_PIXELS * 4} pixels per frame")
    stream.thread_type = "AUTO"  # frame + slice threads: decoding is often the bottleneck on CPU
    return stream


def _decoded(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """Frames in presentation order; the index in this sequence is the frame number.

    Counting decoded frames (rather than dividing pts by a nominal rate) is what makes
    start/stride selection correct for variable-frame-rate clips.
    """
    yield from container.decode(stream)


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation, snapped to a multiple of 90 and normalised to [0, 360).

    PyAV >= 14 reads the display matrix that FFmpeg attaches to every decoded frame (it is
    copied from the stream's coded side data, which is where mp4 'tkhd' matrices and the
    legacy 'rotate' tag end up), so no stream-level parsing is needed.
    """
    return (round(frame.rotation / 90) * 90) % 360


def _frame_rate(stream: av.VideoStream, path: PathLike) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    raise VideoError(f"{Path(path).name!r}: the frame rate is unknown")


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def probe(path: PathLike) -> VideoInfo:
    """Describe a video cheaply: demux the header and decode one frame.

    The first frame is decoded because the display rotation lives in frame side data in
    PyAV, and because a file that opens but cannot decode is not a usable video.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        first = next(_decoded(container, stream), None)
        if first is None:
            raise VideoError(f"{Path(path).name!r} has no decodable video frames")
        rotation = _rotation(first)
        width, height = (first.height, first.width) if rotation % 180 else (first.width, first.height)
        fps = _frame_rate(stream, path)
        duration = _duration(container, stream)
        count = stream.frames or (round(duration * fps) if duration else 0)
        return VideoInfo(
            width=width,
            height=height,
            fps=fps,
            frame_count=int(count),
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


def _to_rgb(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    image = frame.to_ndarray(format="rgb24")
    if rotation:
        image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))  # np.rot90 is counter-clockwise
    return image


def iter_frames(path: PathLike, spec: DecodeSpec | None = None, native: bool = False) -> Iterator[np.ndarray]:
    """Yield the selected frames as uint8 RGB (H, W, 3), upright and fitted to `output_size`.

    With `native=True` the frames keep their display size (spec.size/target_area are
    ignored): evaluation compares an edited video at its own size.

    Frame i (0-based, presentation order) is taken when i >= start and (i - start) is a
    multiple of stride, up to max_frames; decoding stops as soon as enough frames are out.
    Skipped frames are decoded (codecs need their references) but never converted to RGB.
    """
    spec = (spec or DecodeSpec()).validate()
    produced = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        size: tuple[int, int] | None = None
        rotation = 0
        for index, frame in enumerate(_decoded(container, stream)):
            if size is None:
                rotation = _rotation(frame)
                w, h = (frame.height, frame.width) if rotation % 180 else (frame.width, frame.height)
                size = (w, h) if native else output_size(w, h, spec)
            if index < spec.start or (index - spec.start) % spec.stride:
                continue
            yield fit_frame(_to_rgb(frame, rotation), size)
            produced += 1
            if spec.max_frames is not None and produced >= spec.max_frames:
                return
    if produced == 0:
        raise VideoError(
            f"{Path(path).name!r} has no frames in the requested range "
            f"(start={spec.start}, stride={spec.stride}); is the video empty or shorter than that?"
        )


def read_frames(path: PathLike, spec: DecodeSpec | None = None) -> tuple[np.ndarray, VideoInfo]:
    """All selected frames as one (N, H, W, 3) uint8 array, with the source's VideoInfo."""
    info = probe(path)
    return np.stack(list(iter_frames(path, spec))), info


def count_frames(path: PathLike) -> int:
    """Exact number of frames, by decoding (container counts are absent in mkv/webm and can lie)."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        return sum(1 for _ in _decoded(container, stream))


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
