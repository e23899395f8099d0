"""Per-frame latent tensors on disk: streamed in, read back by row ranges, never held whole.

A long clip's inversion is T tensors of [N, 4, h, w] (3.3 MB per frame at 512x512 and 50 steps),
so it lives in files, one per tensor, in the safetensors format (no pickle). Two pieces:

- `RowsWriter` appends rows (frames) batch by batch to one safetensors file without knowing N up
  front: it reserves the header, streams the data and writes the header at the end (the format allows
  the header to be padded with spaces), then renames the file into place (a reader never sees half
  a file).
- `LatentFile` names one tensor in one file (optionally one row of a leading axis, for the older
  single-file layout) and reads only the frames asked for: safetensors validates the file's header
  (`safe_open`, memory-mapped), then the requested rows are read at their offsets straight into a new
  tensor (``os.preadv``), so a read costs the rows it returns and nothing stays mapped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tokenflow.errors import SpecError

HEADER_RESERVE = 1024  # bytes kept for the JSON header; a multiple of 8 keeps the data aligned
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


@dataclass(frozen=True)
class _Layout:
    """Where one tensor's rows lie in its file: offset of row 0, bytes per row, rows, row shape, dtype."""

    start: int
    row_bytes: int
    rows: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype


class RowsWriter:
    """Streams a [N, *row_shape] tensor into a safetensors file, rows in order, N unknown until `close`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        row_shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype}")
        self.path = Path(path)
        self.name = name
        self.dtype = dtype
        self.row_shape = tuple(row_shape) if row_shape is not None else None
        self.metadata = dict(metadata or {})
        self.rows = 0
        self._tmp = self.path.with_name(f".{self.path.name}.part")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._f.write(b"\0" * (8 + HEADER_RESERVE))

    def write(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        if self.row_shape is None:
            self.row_shape = tuple(rows.shape[1:])
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} in a file of {self.row_shape} rows")
        if rows.shape[0]:
            self._f.write(rows.view(torch.uint8).numpy().data)  # the tensor's own bytes, no copy
        self.rows += int(rows.shape[0])

    def close(self) -> Path:
        """Write the header and publish the file atomically; returns its path."""
        if self.row_shape is None:
            raise ValueError("no rows were written")
        nbytes = self._f.tell() - 8 - HEADER_RESERVE
        header: dict[str, object] = {
            self.name: {
                "dtype": _DTYPES[self.dtype],
                "shape": [self.rows, *self.row_shape],
                "data_offsets": [0, nbytes],
            }
        }
        if self.metadata:
            header["__metadata__"] = self.metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > HEADER_RESERVE:
            self.abort()
            raise ValueError("safetensors header too long for the reserved space")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", HEADER_RESERVE) + text + b" " * (HEADER_RESERVE - len(text)))
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> RowsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._f.closed:
            self.close()


def write_rows(path: str | os.PathLike[str], name: str, tensor: torch.Tensor, batch: int = 64) -> Path:
    """A whole tensor to a file, written in row batches (no serialised copy of it in memory)."""
    with RowsWriter(path, name, tensor.shape[1:], dtype=tensor.dtype) as w:
        for b in range(0, tensor.shape[0], batch):
            w.write(tensor[b : b + batch])
    return Path(path)


@dataclass(frozen=True)
class LatentFile:
    """One [N, ...] tensor in a safetensors file (or row `index` of a [T, N, ...] one), read lazily."""

    path: Path
    name: str
    index: int | None = None

    def shape(self) -> tuple[int, ...]:
        """The tensor's shape from the header alone (no data is read)."""
        layout = self._layout()
        return (layout.rows, *layout.row_shape)

    def __len__(self) -> int:
        return self.shape()[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Frames start..stop-1 (clamped to the tensor, like a slice), read into a new tensor."""
        return self._read([(start, stop)])

    def _layout(self) -> _Layout:
        """Where the rows are (and the shape): safetensors validates the header against the file, then
        its offsets are read; the one place a latents file's header is checked."""
        try:
            with safe_open(self.path, framework="pt") as f:
                if self.name not in f.keys():  # noqa: SIM118 - safe_open has keys(), no __contains__
                    raise SpecError(f"{self.path.name} holds no tensor {self.name!r}")
                part = f.get_slice(self.name)
                shape, dtype_name = tuple(part.get_shape()), part.get_dtype()
            with open(self.path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                begin = int(json.loads(fh.read(header_len))[self.name]["data_offsets"][0])
        except (SafetensorError, OSError, ValueError, KeyError, struct.error) as exc:
            raise SpecError(f"{self.path.name} is not a readable safetensors file: {exc}") from exc
        dtype = _TORCH_DTYPES.get(dtype_name)
        if dtype is None or not shape:
            raise SpecError(f"{self.path.name}: {self.name} is a {dtype_name} tensor of shape {list(shape)}")
        start = 8 + header_len + begin
        if self.index is not None:
            if len(shape) < 2 or not 0 <= self.index < shape[0]:
                raise SpecError(f"{self.path.name}: {self.name} has no row {self.index}")
            shape = shape[1:]
            start += self.index * math.prod(shape) * dtype.itemsize
        row_shape = tuple(int(v) for v in shape[1:])
        return _Layout(start, math.prod(row_shape) * dtype.itemsize, int(shape[0]), row_shape, dtype)

    def _read(self, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """These row ranges, in order, read straight into one new tensor at their file offsets.

        Exactly the asked-for bytes are read (``os.preadv`` into the tensor's memory). Not a memory
        map: reading a clip's keyframes (every 8th row) through one pulled the whole file in by
        read-ahead, and safetensors' slices are views that keep their map resident, which at thousands
        of frames made a transient of several times the file's size, growing with the clip.
        """
        layout = self._layout()
        runs = [(min(max(a, 0), layout.rows), min(max(b, 0), layout.rows)) for a, b in runs]
        runs = [(a, max(a, b)) for a, b in runs]
        out = torch.empty((sum(b - a for a, b in runs), *layout.row_shape), dtype=layout.dtype)
        buffer = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        pos = 0
        with open(self.path, "rb", buffering=0) as fh:
            for a, b in runs:
                want, offset = (b - a) * layout.row_bytes, layout.start + a * layout.row_bytes
                end = pos + want
                while pos < end:
                    got = os.preadv(fh.fileno(), [buffer[pos:end]], offset)
                    if got <= 0:
                        raise SpecError(f"cannot read {self.path.name}: the file ends before its data does")
                    pos, offset = pos + got, offset + got
        return out

    def full(self) -> torch.Tensor:
        return self.rows(0, len(self))

    def __getitem__(self, frames: Sequence[int] | slice) -> torch.Tensor:
        """The rows of these frames, in this order; consecutive runs are read as one slice."""
        if isinstance(frames, slice):
            start, stop, step = frames.indices(len(self))
            if step != 1:
                raise ValueError("only contiguous slices are supported")
            return self.rows(start, stop)
        frames = [int(i) for i in frames]
        if not frames:
            raise ValueError("no frames asked for")
        runs: list[tuple[int, int]] = []
        for i in frames:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return self._read(runs)
