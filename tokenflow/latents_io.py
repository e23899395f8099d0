"""Per-frame latent tensors on disk: streamed in, memory-mapped out, never held whole.

A long clip's inversion is T tensors of [N, 4, h, w] (3.3 MB per frame at 512x512 and 50 steps),
so it lives in files, one per tensor, in the safetensors format (no pickle). Two pieces:

- `RowsWriter` appends rows (frames) batch by batch to one safetensors file without knowing N up
  front: it reserves the header, streams the data and writes the header at the end (the format allows
  the header to be padded with spaces), then renames the file into place (a reader never sees half
  a file).
- `LatentFile` names one tensor in one file (optionally one row of a leading axis, for the older
  single-file layout) and reads only the frames asked for: each read opens the file memory-mapped
  (`safetensors.safe_open`), copies the requested rows out and closes it again, so the process never
  keeps more mapped pages resident than the rows it is using.
"""

from __future__ import annotations

import json
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
        try:
            with safe_open(self.path, framework="pt") as f:
                if self.name not in f.keys():  # noqa: SIM118 - safe_open has keys(), no __contains__
                    raise SpecError(f"{self.path.name} holds no tensor {self.name!r}")
                shape = tuple(f.get_slice(self.name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise SpecError(f"{self.path.name} is not a readable safetensors file: {exc}") from exc
        if self.index is None:
            return shape
        if not shape or not 0 <= self.index < shape[0]:
            raise SpecError(f"{self.path.name}: {self.name} has no row {self.index}")
        return shape[1:]

    def __len__(self) -> int:
        return self.shape()[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Frames start..stop-1, copied out of a memory map that is closed again before returning."""
        try:
            with safe_open(self.path, framework="pt") as f:
                part = f.get_slice(self.name)
                out = part[start:stop] if self.index is None else part[self.index, start:stop]
        except (SafetensorError, OSError) as exc:
            raise SpecError(f"cannot read {self.path.name}: {exc}") from exc
        return out.contiguous()

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
        parts = [self.rows(a, b) for a, b in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
