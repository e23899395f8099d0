"""Prompt-independent source features: recorded once, replayed so a re-edit runs no source branch.

In the propagation pass the source branch (the inverted latents through the UNet with the inversion
prompt) gives the edit two things, neither of which depends on the target prompt:

- for every step, self-attention layer and frame, the nearest-neighbour (cosine) token indices into
  the frame's two keyframes (its window's and the previous window's);
- for the steps that inject it, the PnP conv feature of every frame.

`FeaturesRecorder` is a `SourceHook` (tokenflow.branches) that observes them while the source branch
runs; `FeaturesReplayer` supplies them, so the propagation batches hold only the unconditional and
conditional branches (the keyframe pass keeps its source branch: K of N frames). Given the same
inversion, keyframe schedule, interval, weighting, steps and conv-injection steps (the identity in
tokenflow.keys.features_identity) the replayed edit computes the same numbers as the recording one:
the indices are exact integers and the conv feature is stored in the UNet's own dtype, so only the
batch size of the uncond/cond UNet work changes (2n instead of 3n rows), which changes the kernels'
blocking and so their summation order: measured on CPU in fp32 with the tiny preset, the final latents
are bit-identical in chunks of 8 frames (the parity fixture, the benchmark) and differ by 2e-6 to 4e-6
relative L2 in the tests' chunks of 3 to 5 (the tests allow 1e-5). The recording edit itself is
bit-identical to an edit without features.

On disk (safetensors, never pickle): ``features.json`` and one ``features_SSS.safetensors`` per step S,
holding ``nn.<layer>`` [N, 2, seq] (row 1 unused in window 0) and, on injecting steps, ``conv``
[N, C, h, w]. The index dtype is chosen per layer so it cannot overflow: int16 when the layer has at
most 32767 tokens (SD at 512x512 has 4096 at its finest level; int16 covers latents up to 181x181
tokens, i.e. images of about 1448x1448), int32 beyond. A step's file is read through a memory map, only
the rows of the frames being propagated; it is written frame range by frame range into one
pre-sized part file per tensor, then assembled, so memory never holds a step's features for the clip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from tokenflow.branches import SourceHook
from tokenflow.errors import SpecError
from tokenflow.inversion import META_FILE as INVERSION_META
from tokenflow.inversion import Inversion
from tokenflow.keys import features_key, features_steps
from tokenflow.specs import EditSpec

FORMAT_VERSION = 1
META_FILE = "features.json"
CONV = "conv"
INT16_MAX_TOKENS = 32767
_ST_DTYPES = {
    torch.int16: "I16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


def step_file(step: int) -> str:
    """File of the features of the step-th editing step (its index among all T steps)."""
    return f"features_{step:03d}.safetensors"


def nn_name(layer: str) -> str:
    return f"nn.{layer}"


def index_dtype(tokens: int) -> torch.dtype:
    """The smallest index type that holds every token index of a layer with `tokens` tokens."""
    return torch.int16 if tokens <= INT16_MAX_TOKENS else torch.int32


def _runs(frames: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(first frame, end frame, position in `frames`) of each run of consecutive frames."""
    start = 0
    for i in range(1, len(frames) + 1):
        if i == len(frames) or frames[i] != frames[i - 1] + 1:
            yield int(frames[start]), int(frames[i - 1]) + 1, start
            start = i


class _PartFile:
    """One [N, *row] tensor of a step being recorded: a pre-sized file written at row offsets."""

    def __init__(self, path: Path, n_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.shape = (n_rows, *row_shape)
        self.row_bytes = torch.tensor([], dtype=dtype).element_size() * int(torch.Size(row_shape).numel())
        self.nbytes = self.row_bytes * n_rows
        self.rows_written = 0
        self._f: BinaryIO = open(path, "w+b")  # noqa: SIM115 - closed in close()
        self._f.truncate(self.nbytes)

    def write(self, first: int, rows: torch.Tensor) -> None:
        if tuple(rows.shape[1:]) != self.shape[1:]:
            raise RuntimeError(f"features rows of shape {tuple(rows.shape[1:])}, expected {self.shape[1:]}")
        data = rows.detach().to("cpu", self.dtype).contiguous()
        self._f.seek(first * self.row_bytes)
        self._f.write(data.view(torch.uint8).numpy().data)
        self.rows_written += int(rows.shape[0])

    def close(self) -> None:
        self._f.close()


def _assemble(path: Path, parts: dict[str, _PartFile], metadata: dict[str, str]) -> int:
    """Write one safetensors file from the part files (in name order) atomically; returns its size."""
    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(parts):
        part = parts[name]
        header[name] = {
            "dtype": _ST_DTYPES[part.dtype],
            "shape": list(part.shape),
            "data_offsets": [offset, offset + part.nbytes],
        }
        offset += part.nbytes
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(parts):
            with open(parts[name].path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, path)
    return 8 + len(text) + offset


@dataclass
class Features:
    """A features artifact held as files (a folder, or a store's blobs) and read lazily."""

    meta: dict[str, Any]
    paths: dict[str, Path]

    @property
    def frames(self) -> int:
        return int(self.meta["frames"])

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self.meta["steps"]]

    @property
    def conv_steps(self) -> list[int]:
        return [int(s) for s in self.meta["conv_steps"]]

    @property
    def nbytes(self) -> int:
        return int(self.meta["bytes"])

    def files(self) -> dict[str, bytes | Path]:
        """The artifact's files for a store: the metadata as bytes, every step's file as a path."""
        return {
            META_FILE: json.dumps(self.meta, indent=1).encode(),
            **{step_file(s): self.paths[step_file(s)] for s in self.steps},
        }

    @classmethod
    def from_paths(cls, paths: dict[str, str | os.PathLike[str]]) -> Features:
        paths = {name: Path(p) for name, p in paths.items()}
        try:
            meta = json.loads(paths[META_FILE].read_bytes())
            if meta.get("format") != FORMAT_VERSION:
                raise SpecError(f"features format {meta.get('format')} is not supported")
            missing = [step_file(int(s)) for s in meta["steps"] if step_file(int(s)) not in paths]
        except (KeyError, OSError, ValueError, TypeError, AttributeError) as exc:
            raise SpecError(f"not a valid features artifact: {exc}") from exc
        if missing:
            raise SpecError(f"not a valid features artifact: files {missing[:3]} are missing")
        return cls(meta, paths)

    @classmethod
    def load(cls, directory: str | Path) -> Features:
        d = Path(directory)
        return cls.from_paths({p.name: p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")})

    def check_fits(self, n_frames: int, steps: Sequence[int], conv_steps: Sequence[int]) -> None:
        """SpecError unless they cover an edit of `n_frames` over `steps`, injecting on `conv_steps`."""
        if self.frames != n_frames or self.steps != list(steps) or self.conv_steps != list(conv_steps):
            raise SpecError(
                f"these features cover {self.frames} frames, steps {self.steps[:3]}... and conv steps "
                f"{self.conv_steps[:3]}...; the edit needs {n_frames} frames, steps {list(steps)[:3]}... "
                f"and conv steps {list(conv_steps)[:3]}..."
            )


class FeaturesRecorder(SourceHook):
    """Records the source features of an edit into `directory` while its source branch runs.

    `budget` (bytes; None = no limit): as soon as the projected size of the whole artifact is over it
    (known after the first step), recording stops, its files are deleted and `refused` says why; the
    edit itself goes on unchanged.
    """

    def __init__(
        self,
        directory: str | Path,
        n_frames: int,
        steps: Sequence[int],
        conv_steps: Sequence[int],
        budget: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n_frames = n_frames
        self.steps = [int(s) for s in steps]
        self.conv_steps = [int(s) for s in conv_steps]
        self.budget = budget
        self.extra_meta = dict(meta or {})
        self.refused: str | None = None
        self.written = 0
        self.layers: dict[str, int] = {}
        self.conv_shape: list[int] | None = None
        self.conv_dtype: str | None = None
        self._step: int | None = None
        self._parts: dict[str, _PartFile] = {}
        self._done: list[int] = []
        self._step_bytes: dict[str, int] = {}  # "nn" / "conv" -> bytes of one step's files

    @property
    def active(self) -> bool:
        return self.refused is None

    def begin_step(self, step: int) -> None:
        if self.active:
            self._step = step
            self._parts = {}

    def post_correspondence(self, layer: str, frames: Sequence[int], indices: torch.Tensor) -> None:
        if not self.active or self._step is None:
            return
        seq = int(indices.shape[-1])
        self.layers.setdefault(layer, seq)
        self._write(nn_name(layer), frames, indices, index_dtype(seq))

    def post_conv(self, frames: Sequence[int], feature: torch.Tensor) -> None:
        if not self.active or self._step is None:
            return
        if self._step not in self.conv_steps:
            raise RuntimeError(f"conv injection on step {self._step}, which the features do not cover")
        self.conv_shape = list(feature.shape[1:])
        self.conv_dtype = _ST_DTYPES[feature.dtype]
        self._write(CONV, frames, feature, feature.dtype)

    def _write(self, name: str, frames: Sequence[int], rows: torch.Tensor, dtype: torch.dtype) -> None:
        part = self._parts.get(name)
        if part is None:
            path = self.directory / f".{self._step:03d}.{name}.part"
            part = self._parts[name] = _PartFile(path, self.n_frames, tuple(rows.shape[1:]), dtype)
        for first, end, pos in _runs(frames):
            part.write(first, rows[pos : pos + end - first])

    def end_step(self, step: int) -> None:
        if not self.active or self._step is None:
            return
        parts, self._parts, self._step = self._parts, {}, None
        try:
            for part in parts.values():
                part.close()
            incomplete = [n for n, p in parts.items() if p.rows_written != self.n_frames]
            if not parts or incomplete:
                raise RuntimeError(f"step {step}: features of {incomplete or 'no layer'} were not recorded")
            nn_bytes = sum(p.nbytes for n, p in parts.items() if n != CONV)
            conv_bytes = sum(p.nbytes for n, p in parts.items() if n == CONV)
            self._step_bytes["nn"] = nn_bytes
            if conv_bytes:
                self._step_bytes["conv"] = conv_bytes
            if self._projected(step) > (self.budget if self.budget is not None else float("inf")):
                self._refuse()
                return
            self.written += _assemble(self.directory / step_file(step), parts, {"step": str(step)})
            self._done.append(step)
        finally:
            for part in parts.values():
                part.path.unlink(missing_ok=True)

    def _projected(self, step: int) -> int:
        """Bytes of the whole artifact, from the sizes of the steps seen so far (headers aside)."""
        later = [s for s in self.steps if s >= step]
        conv_later = [s for s in self.conv_steps if s >= step]
        return (
            self.written
            + len(later) * self._step_bytes.get("nn", 0)
            + len(conv_later) * self._step_bytes.get("conv", 0)
        )

    def projected_bytes(self) -> int:
        """The artifact's projected size (exact for the data once the first injecting step is recorded)."""
        return self._projected(self._done[-1] + 1 if self._done else 0) if self._step_bytes else 0

    def _refuse(self) -> None:
        projected = self._projected(self.steps[0])
        self.refused = (
            f"the source features would take {projected:,} bytes, over the budget of {self.budget:,}: "
            "not recorded (later edits of this clip run the source branch)"
        )
        for s in self._done:
            (self.directory / step_file(s)).unlink(missing_ok=True)
        self._done = []

    def finish(self) -> Features | None:
        """The recorded artifact (its metadata written), or None if refused or incomplete."""
        if not self.active or self._done != self.steps:
            if self.active:
                self.refused = f"the edit recorded steps {self._done[:3]}... of {self.steps[:3]}..."
            return None
        meta = {
            "format": FORMAT_VERSION,
            "frames": self.n_frames,
            "steps": self.steps,
            "conv_steps": self.conv_steps,
            "layers": self.layers,
            "index_dtypes": {layer: _ST_DTYPES[index_dtype(seq)] for layer, seq in self.layers.items()},
            "conv": {"shape": self.conv_shape, "dtype": self.conv_dtype} if self.conv_shape else None,
            "bytes": self.written,
            **self.extra_meta,
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=1))
        return Features.load(self.directory)


@dataclass
class FeaturesReplayer(SourceHook):
    """Supplies recorded source features, so the propagation pass needs no source branch."""

    features: Features
    reads: int = 0
    read_bytes: int = 0
    _stack: contextlib.ExitStack | None = field(default=None, repr=False)
    _file: Any = field(default=None, repr=False)
    _step: int | None = None

    supplies_source = True

    def begin_step(self, step: int) -> None:
        name = step_file(step)
        if name not in self.features.paths or step not in self.features.steps:
            raise SpecError(f"the features hold no step {step}")
        self._stack = contextlib.ExitStack()
        try:  # one memory map per step, released at its end; only the rows asked for are read
            self._file = self._stack.enter_context(safe_open(self.features.paths[name], framework="pt"))
        except (SafetensorError, OSError) as exc:
            raise SpecError(f"cannot read the features of step {step}: {exc}") from exc
        self._step = step

    def end_step(self, step: int) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._file, self._step = None, None, None

    def _rows(self, name: str, frames: Sequence[int]) -> torch.Tensor:
        if self._file is None:
            raise RuntimeError("features read outside a step")
        try:
            part = self._file.get_slice(name)
        except SafetensorError as exc:
            raise SpecError(f"the features of step {self._step} hold no {name!r}") from exc
        pieces = [part[first:end] for first, end, _ in _runs(frames)]
        rows = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        self.reads += 1
        self.read_bytes += rows.numel() * rows.element_size()
        return rows

    def pre_correspondence(self, layer: str, frames: Sequence[int]) -> torch.Tensor | None:
        return self._rows(nn_name(layer), frames)

    def pre_conv(self, frames: Sequence[int]) -> torch.Tensor | None:
        return self._rows(CONV, frames)


def recorder_for(
    directory: str | Path,
    n_frames: int,
    edit_steps: int,
    spec: EditSpec,
    budget: int | None = None,
    meta: dict[str, Any] | None = None,
) -> FeaturesRecorder:
    """A recorder of the features an edit with `spec` of an inversion (N frames, T steps) produces."""
    steps, conv_steps = features_steps(spec, edit_steps)
    return FeaturesRecorder(directory, n_frames, steps, conv_steps, budget, meta)


def replayer_for(features: Features, n_frames: int, edit_steps: int, spec: EditSpec) -> FeaturesReplayer:
    """A replayer of `features` for an edit with `spec`; SpecError if they do not fit it."""
    steps, conv_steps = features_steps(spec, edit_steps)
    features.check_fits(n_frames, steps, conv_steps)
    return FeaturesReplayer(features)


FOLDER = "features"
"""Where `beside_saved_inversion` keeps features: a sub-folder of the saved inversion's folder."""


def beside_saved_inversion(
    folder: str | Path, inversion: Inversion, spec: EditSpec, budget: int | None = None
) -> tuple[SourceHook, Path]:
    """The library's features cache for an edit of a saved inversion (``tokenflow edit --from-inversion``).

    Features live in ``FOLDER/<features key>/`` inside the inversion's folder: a replayer if they are
    there, else a recorder that writes them aside and publishes them there with `publish_recorded`.
    """
    names = [INVERSION_META, inversion.clean_ref.file, inversion.noisiest_ref.file]
    digest = inversion_fingerprint(inversion.paths, names)
    n, steps = inversion.n_frames, len(inversion.edit_timesteps)
    final = Path(folder) / FOLDER / features_key(digest, spec, n, steps)
    if (final / META_FILE).is_file():
        return replayer_for(Features.load(final), n, steps, spec), final
    scratch = final.with_name(f".{final.name}.{os.getpid()}.part")
    shutil.rmtree(scratch, ignore_errors=True)
    return recorder_for(scratch, n, steps, spec, budget), final


def publish_recorded(recorder: FeaturesRecorder, final: Path) -> Features | None:
    """Finish a recording and move its folder to `final` (atomically); None if it was refused."""
    features = recorder.finish()
    if features is None:
        shutil.rmtree(recorder.directory, ignore_errors=True)
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(recorder.directory, final)
    except OSError:  # another edit published the same features first: theirs serve as well
        shutil.rmtree(recorder.directory, ignore_errors=True)
    return Features.load(final)


def inversion_fingerprint(paths: dict[str, Path], names: Sequence[str]) -> str:
    """sha256 over the named files of a saved inversion (for a library-side features key: a saved
    folder has no store digest). The inversion's metadata and its clean and most-noised latents
    determine every source latent, so these few files are enough."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        with open(paths[name], "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
