"""Hostile "videos", generated: each one reproduces a way an upload can try to exhaust a decoder.

The tests (tests/test_hostile_video.py) and the fuzzers' seed corpus (fuzz/make_corpus.py) both build
their inputs here, so there is one definition of each case. Everything is produced in memory with PyAV
(libx264) plus byte-level edits; nothing is downloaded.
"""

from __future__ import annotations

import io
import re
import struct
from fractions import Fraction

import av
import numpy as np

_X264 = {"preset": "ultrafast", "x264-params": "log-level=error"}


def encode(
    frames: int,
    size: tuple[int, int] = (64, 64),
    fmt: str = "mp4",
    rate: int = 10,
    codec: str = "libx264",
    still: bool = False,
) -> bytes:
    """A real `frames`-frame clip of `size` (W, H) in container `fmt`, frame i filled with grey 37*i.

    `still`: every frame the same, so that each costs the encoder a few bytes (many frames, tiny file).
    """
    width, height = size
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=_X264 if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 0 if still else (37 * i) % 256, np.uint8)
            image[: height // 2, : width // 2, 0] = 255 - (0 if still else (37 * i) % 256)  # some structure
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        if frames == 0:
            out.start_encoding()  # header and an empty track, no samples
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------- H.264 SPS surgery


def _unescape(data: bytes) -> bytes:
    """NAL payload -> RBSP: drop the emulation-prevention 0x03 after two zero bytes."""
    out, zeros = bytearray(), 0
    for byte in data:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _escape(data: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for byte in data:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | ((self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.u(zeros)


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> None:
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]

    def ue(self, value: int) -> None:
        value += 1
        self.u(value.bit_length() - 1, 0)
        self.u(value.bit_length(), value)

    def getvalue(self) -> bytes:
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def resize_sps(nal: bytes, width: int, height: int) -> bytes:
    """The SPS NAL `nal` (header byte included) with its picture size set to `width` x `height`.

    Only the fields before pic_width_in_mbs are parsed (as libx264 writes them: no scaling
    matrices, POC type 0 or 2); cropping is dropped; the VUI and trailing bits are copied verbatim.
    """
    rbsp = _unescape(nal[1:])
    r, w = _BitReader(rbsp), _BitWriter()

    def copy_u(n: int) -> int:
        value = r.u(n)
        w.u(n, value)
        return value

    def copy_ue() -> int:
        value = r.ue()
        w.ue(value)
        return value

    profile = copy_u(8)
    copy_u(8)  # constraint flags
    copy_u(8)  # level
    copy_ue()  # sps id
    if profile in _HIGH_PROFILES:
        if copy_ue() == 3:  # chroma_format_idc
            copy_u(1)
        copy_ue()  # bit depths
        copy_ue()
        copy_u(1)
        if copy_u(1):
            raise ValueError("SPS with scaling matrices: not supported by this test helper")
    copy_ue()  # log2_max_frame_num_minus4
    poc_type = copy_ue()
    if poc_type == 0:
        copy_ue()
    elif poc_type == 1:
        raise ValueError("SPS with POC type 1: not supported by this test helper")
    copy_ue()  # max_num_ref_frames
    copy_u(1)  # gaps allowed
    r.ue()
    r.ue()
    w.ue(width // 16 - 1)
    w.ue(height // 16 - 1)
    if not copy_u(1):  # frame_mbs_only
        copy_u(1)
    copy_u(1)  # direct_8x8_inference
    if r.u(1):  # cropping: dropped
        for _ in range(4):
            r.ue()
    w.u(1, 0)
    while r.pos < len(rbsp) * 8:
        w.u(1, r.u(1))
    return nal[:1] + _escape(w.getvalue())


def annexb_nals(stream: bytes) -> list[bytes]:
    """The NAL units (header byte first) of an Annex-B byte stream."""
    starts = [m.end() for m in re.finditer(b"\x00\x00\x01", stream)]
    ends = [s - 3 for s in starts[1:]] + [len(stream)]
    return [
        stream[s:e].rstrip(b"\x00") if e != len(stream) else stream[s:e]
        for s, e in zip(starts, ends, strict=True)
    ]


def switching_h264(width: int, height: int, small: int = 64) -> bytes:
    """Raw H.264: three `small` x `small` frames, then the same frames under an SPS of `width` x `height`.

    A few kilobytes that make an unguarded decoder allocate (and convert) full-size pictures: the
    slices only cover the first macroblocks and the decoder conceals the rest.
    """
    head = encode(3, (small, small), fmt="h264")
    tail = b"".join(
        b"\x00\x00\x00\x01" + (resize_sps(n, width, height) if n[0] & 0x1F == 7 else n)
        for n in annexb_nals(head)
    )
    return head + tail


def as_mp4(annexb: bytes, header_from: bytes, rate: int = 10) -> bytes:
    """Remux a raw H.264 stream into mp4 whose header (avcC, size) comes from the stream `header_from`.

    With `header_from` = the small first part of `switching_h264`, the container says 64x64 and only
    the decoded frames tell the truth.
    """
    buf = io.BytesIO()
    with av.open(io.BytesIO(header_from), format="h264") as header, av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream_from_template(header.streams.video[0])
        stream.time_base = Fraction(1, rate)
        # Demux only: a size limit keeps FFmpeg's stream probing from decoding the big pictures.
        probe_limit = {"max_pixels": str(64 * 64)}
        with av.open(io.BytesIO(annexb), format="h264", options=probe_limit) as source:
            packets = [p for p in source.demux(source.streams.video[0]) if p.size]
            for i, packet in enumerate(packets):
                packet.pts = packet.dts = i
                packet.time_base = Fraction(1, rate)
                packet.stream = stream
                out.mux(packet)
    return buf.getvalue()


def switching_mp4(width: int, height: int, small: int = 64) -> bytes:
    """`switching_h264` in an mp4 whose header says `small` x `small`."""
    return as_mp4(switching_h264(width, height, small), encode(3, (small, small), fmt="h264"))


# --------------------------------------------------------------------------- other hostile shapes


def y4m(width: int | str, height: int | str, frames: int = 0, payload: bytes = b"") -> bytes:
    """A y4m file: a text header claiming `width` x `height`, then `frames` FRAME markers + `payload`."""
    header = f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\n".encode()
    return header + b"".join(b"FRAME\n" + payload for _ in range(frames))


def claiming_frames(claimed: int, actual: int = 3, rate: int = 10) -> bytes:
    """A Matroska clip of `actual` frames whose Segment Duration claims `claimed` frames."""
    data = encode(actual, (64, 64), fmt="matroska", rate=rate)
    at = data.find(b"\x44\x89\x88")  # Duration element, an 8-byte float in TimecodeScale units (ms)
    if at < 0:
        raise ValueError("no Duration element in the Matroska header")
    return data[: at + 3] + struct.pack(">d", claimed / rate * 1000.0) + data[at + 11 :]


def audio_only(seconds: float = 0.5, fmt: str = "mp4") -> bytes:
    """An AAC tone in an mp4 (an .m4a): a valid media file with no video stream."""
    buf = io.BytesIO()
    rate = 44100
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        t = np.arange(int(seconds * rate), dtype=np.float32) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def bit_flipped(data: bytes, flips: int, seed: int, skip: int = 0) -> bytes:
    """`data` with `flips` random bits flipped (after the first `skip` bytes), reproducibly."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for pos in rng.integers(skip, len(out), size=flips):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)
