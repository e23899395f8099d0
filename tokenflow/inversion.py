"""DDIM inversion of a video: the prompt-independent, expensive half of every edit.

The result keeps the inverted latent of every frame at each of the T editing timesteps
(the source branch of PnP/TokenFlow runs on them), the clean latents (the edit starts from
them, noised with the inversion's own noise) and the most-noised latent.

An inversion is a folder of files, not a tensor in memory: ``inversion.json`` (metadata) and one
safetensors file per [N, 4, h, w] tensor (``latents_clean``, ``noisiest`` and ``source_000`` ...
one per editing step). Inverting writes each step's file as soon as the step is done; editing reads
one step's rows at a time, read at their file offsets. Host memory therefore grows with N (the latents
being worked on), never with N x T. The older single-file layout (format 1) is still read, in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenflow.encoding import batched, encode_frames, encode_prompt, iter_decoded
from tokenflow.errors import SpecError, VideoError
from tokenflow.latents_io import LatentFile, RowsWriter, write_rows
from tokenflow.models import Model
from tokenflow.progress import NO_HOOKS, JobHooks
from tokenflow.schedule import check_inversion_steps, make_scheduler
from tokenflow.specs import InversionSpec

FORMAT_VERSION = 2
META_FILE = "inversion.json"
CLEAN_FILE = "latents_clean.safetensors"
NOISIEST_FILE = "noisiest.safetensors"
LEGACY_TENSORS_FILE = "inversion.safetensors"  # format 1: every tensor in one file
TENSOR_NAME = "latents"
READ_BATCH = 64  # frames read or written at once when a whole [N, ...] tensor is streamed

FrameSource = Callable[[], Iterable[np.ndarray]]
"""A callable returning a fresh iterable of uint8 [H,W,3] frames each time it is called."""


def source_file(step: int) -> str:
    """File of the inverted latents at the step-th editing timestep (in the editor's order)."""
    return f"source_{step:03d}.safetensors"


@dataclass(frozen=True)
class TensorRef:
    """Where one [N, 4, h, w] tensor of an inversion lives: a file of the artifact, a tensor name in it,
    and (older single-file layout only) the row of a leading timestep axis."""

    file: str
    name: str = TENSOR_NAME
    index: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "name": self.name, "index": self.index}

    @classmethod
    def from_json(cls, d: Any) -> TensorRef:
        index = d.get("index")
        return cls(str(d["file"]), str(d["name"]), None if index is None else int(index))


@dataclass
class Inversion:
    """A video's inversion, held as files and read lazily: memory never grows with frames x steps.

    `paths` maps the artifact's file names to where they are on disk (a saved folder, a store's blobs, or
    a scratch folder this object owns and deletes when it is garbage collected).
    """

    edit_timesteps: list[int]  # descending, as the editor walks them
    noisiest_timestep: int
    prompt: str
    steps: int
    width: int
    height: int
    latent_shape: tuple[int, ...]  # [N, 4, h, w]
    clean_ref: TensorRef
    noisiest_ref: TensorRef
    source_refs: list[TensorRef]  # one per edit timestep, in the same order
    paths: dict[str, Path]
    fps: Fraction = Fraction(10)
    model_fingerprint: str = ""
    test_model: bool = False
    reconstruction_psnr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    scratch: Any = field(default=None, repr=False, compare=False)  # keeps a scratch folder alive

    @property
    def n_frames(self) -> int:
        return int(self.latent_shape[0])

    def _file(self, ref: TensorRef) -> LatentFile:
        return LatentFile(self.paths[ref.file], ref.name, ref.index)

    # ---- lazy accessors: the editing loop reads what it needs, step by step and frame by frame

    def source_latents_at(self, step: int) -> LatentFile:
        """The inverted latents at the step-th editing timestep; index it with frames to read them."""
        return self._file(self.source_refs[step])

    def clean_rows(self, start: int, stop: int) -> torch.Tensor:
        return self._file(self.clean_ref).rows(start, stop)

    def noisiest_rows(self, start: int, stop: int) -> torch.Tensor:
        return self._file(self.noisiest_ref).rows(start, stop)

    @property
    def latents_clean(self) -> torch.Tensor:
        """All clean latents [N,4,h,w] (reads the whole file: prefer `clean_rows` in loops over frames)."""
        return self._file(self.clean_ref).full()

    @property
    def noisiest(self) -> torch.Tensor:
        """All most-noised latents [N,4,h,w] (reads the whole file)."""
        return self._file(self.noisiest_ref).full()

    def latents_at(self, t: int) -> torch.Tensor:
        """All frames' inverted latents at timestep t (one step, read whole)."""
        try:
            step = self.edit_timesteps.index(int(t))
        except ValueError:
            raise SpecError(
                f"timestep {t} was not kept by this inversion ({len(self.edit_timesteps)} steps)"
            ) from None
        return self.source_latents_at(step).full()

    # ---- serialisation: safetensors + JSON only, never pickle

    def to_meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "edit_timesteps": self.edit_timesteps,
            "noisiest_timestep": self.noisiest_timestep,
            "prompt": self.prompt,
            "steps": self.steps,
            "width": self.width,
            "height": self.height,
            "fps": [self.fps.numerator, self.fps.denominator],
            "frames": self.n_frames,
            "latent_shape": list(self.latent_shape),
            "tensors": {
                "latents_clean": self.clean_ref.to_json(),
                "noisiest": self.noisiest_ref.to_json(),
                "source": [r.to_json() for r in self.source_refs],
            },
            "model_fingerprint": self.model_fingerprint,
            "test_model": self.test_model,
            "reconstruction_psnr": _finite_or_none(self.reconstruction_psnr),
            "extra": self.extra,
        }

    def meta_bytes(self) -> bytes:
        return json.dumps(self.to_meta(), indent=1).encode()

    def files(self) -> dict[str, bytes | Path]:
        """The artifact's files for a store: the metadata as bytes, every tensor file as a path (streamed)."""
        return {META_FILE: self.meta_bytes(), **{name: self.paths[name] for name in self.tensor_files()}}

    def tensor_files(self) -> list[str]:
        names = [self.clean_ref.file, self.noisiest_ref.file, *(r.file for r in self.source_refs)]
        return list(dict.fromkeys(names))

    @classmethod
    def from_paths(cls, paths: dict[str, str | os.PathLike[str]], scratch: Any = None) -> Inversion:
        """An inversion over existing files (nothing is loaded): `paths` maps artifact file names to paths.

        Reads the metadata and every tensor file's header, and checks that their shapes agree.
        Format 1 (all tensors in one ``inversion.safetensors``) is read in place, row by row, too.
        """
        paths = {name: Path(p) for name, p in paths.items()}
        if META_FILE not in paths:
            raise SpecError(f"not a valid inversion artifact: it has no {META_FILE}")
        try:
            meta = json.loads(paths[META_FILE].read_bytes())
        except (OSError, ValueError) as exc:
            raise SpecError(f"not a valid inversion artifact: {exc}") from exc
        if not isinstance(meta, dict):
            raise SpecError("not a valid inversion artifact: its metadata is not a JSON object")
        if meta.get("format") not in (1, FORMAT_VERSION):
            raise SpecError(
                f"inversion format {meta.get('format')} is not supported (expected {FORMAT_VERSION})"
            )
        try:
            inv = cls._from_meta(meta, paths, scratch)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpecError(f"not a valid inversion artifact: missing or malformed {exc}") from exc
        inv._check_files()
        return inv

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], paths: dict[str, Path], scratch: Any) -> Inversion:
        timesteps = [int(t) for t in meta["edit_timesteps"]]
        if meta["format"] == 1:
            clean = TensorRef(LEGACY_TENSORS_FILE, "latents_clean")
            noisiest = TensorRef(LEGACY_TENSORS_FILE, "noisiest")
            sources = [TensorRef(LEGACY_TENSORS_FILE, "source_latents", i) for i in range(len(timesteps))]
            shape = None
        else:
            tensors = meta["tensors"]
            clean = TensorRef.from_json(tensors["latents_clean"])
            noisiest = TensorRef.from_json(tensors["noisiest"])
            sources = [TensorRef.from_json(r) for r in tensors["source"]]
            shape = tuple(int(v) for v in meta["latent_shape"])
        missing = sorted({r.file for r in (clean, noisiest, *sources)} - set(paths))
        if missing:
            raise SpecError(f"not a valid inversion artifact: files {missing} are missing")
        if shape is None:
            shape = LatentFile(paths[clean.file], clean.name, clean.index).shape()
        return cls(
            edit_timesteps=timesteps,
            noisiest_timestep=int(meta["noisiest_timestep"]),
            prompt=str(meta["prompt"]),
            steps=int(meta["steps"]),
            width=int(meta["width"]),
            height=int(meta["height"]),
            latent_shape=shape,
            clean_ref=clean,
            noisiest_ref=noisiest,
            source_refs=sources,
            paths=paths,
            fps=Fraction(*meta["fps"]),
            model_fingerprint=str(meta["model_fingerprint"]),
            test_model=bool(meta["test_model"]),
            reconstruction_psnr=meta.get("reconstruction_psnr"),
            extra=dict(meta.get("extra", {})),
            scratch=scratch,
        )

    def _check_files(self) -> None:
        if len(self.latent_shape) != 4 or len(self.source_refs) != len(self.edit_timesteps):
            raise SpecError("inversion artifact is inconsistent: latents do not match its timesteps/frames")
        for ref in (self.clean_ref, self.noisiest_ref, *self.source_refs):
            if self._file(ref).shape() != tuple(self.latent_shape):
                raise SpecError(
                    f"inversion artifact is inconsistent: {ref.file} does not hold "
                    f"{list(self.latent_shape)} latents"
                )

    def save(self, directory: str | Path) -> Path:
        """Write the artifact into a folder (tensor files hard-linked when possible, else copied)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name in self.tensor_files():
            src, dest = self.paths[name], d / name
            if dest.exists() and os.path.samefile(src, dest):
                continue
            tmp = d / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            tmp.replace(dest)
        tmp = d / f".{META_FILE}.tmp"
        tmp.write_bytes(self.meta_bytes())
        tmp.replace(d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Inversion:
        d = Path(directory)
        if not (d / META_FILE).is_file():
            raise SpecError(
                f"{d} holds no saved inversion (missing {META_FILE}); create one with `tokenflow invert`"
            )
        return cls.from_paths({p.name: p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")})


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def split_prediction(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted x0, predicted noise) for any of diffusers' prediction types."""
    mu, sigma = alpha**0.5, (1 - alpha) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        return (sample - sigma * eps) / mu, eps
    if prediction_type == "v_prediction":
        return mu * sample - sigma * model_output, mu * model_output + sigma * sample
    if prediction_type == "sample":
        return model_output, (sample - mu * model_output) / sigma
    raise SpecError(f"unsupported prediction type {prediction_type!r}")


def ddim_move(
    model: Model,
    x: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    alpha_from: torch.Tensor,
    alpha_to: torch.Tensor,
    batch_size: int,
    done: Callable[[int], None] | None = None,
) -> None:
    """One deterministic DDIM move of every latent, in place, from noise level `alpha_from` to `alpha_to`.

    Inversion (to a noisier level) and sampling (to a cleaner one) are the same update. `done(frames)`
    is told after each batch (progress inside a long step).
    """
    for b in range(0, x.shape[0], batch_size):
        xb = x[b : b + batch_size]
        embeds = cond.expand(xb.shape[0], -1, -1)
        out = model.unet(xb.to(model.device, model.dtype), t, encoder_hidden_states=embeds).sample
        pred_x0, eps = split_prediction(out.float().cpu(), xb, alpha_from, model.prediction_type)
        x[b : b + batch_size] = alpha_to**0.5 * pred_x0 + (1 - alpha_to) ** 0.5 * eps
        if done is not None:
            done(min(b + batch_size, x.shape[0]))


@torch.no_grad()
def encode_video(
    model: Model, frames: Iterable[np.ndarray], hooks: JobHooks = NO_HOOKS, batch_size: int = 8
) -> torch.Tensor:
    """Stream frames through the VAE in batches; only latents are kept."""
    latents = []
    done = 0
    for batch in batched(frames, batch_size):
        latents.append(encode_frames(model, batch).cpu())
        done += len(batch)
        hooks.report("encode", done, 0, frames_done=done)
    if not latents:
        raise VideoError("the video has no frames to encode")
    return torch.cat(latents)


def _encode_to_file(
    model: Model, frames: Iterable[np.ndarray], path: Path, hooks: JobHooks, batch_size: int
) -> None:
    """Stream frames through the VAE straight into a latents file: no [N, ...] tensor is built."""
    with RowsWriter(path, TENSOR_NAME) as writer:
        for batch in batched(frames, batch_size):
            writer.write(encode_frames(model, batch).float())
            hooks.report("encode", writer.rows, 0, frames_done=writer.rows)
        if writer.rows == 0:
            raise VideoError("the video has no frames to encode")


def _output_folder(directory: str | Path | None, scratch_parent: str | Path | None) -> tuple[Path, Any]:
    """The folder the inversion's files go to, and the scratch handle that owns it (None if the caller's)."""
    if directory is not None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        return d, None
    scratch = tempfile.TemporaryDirectory(prefix="tokenflow-inversion-", dir=scratch_parent)
    return Path(scratch.name), scratch


@torch.no_grad()
def invert(
    model: Model,
    frames: FrameSource,
    spec: InversionSpec,
    fps: Fraction | float = Fraction(10),
    hooks: JobHooks = NO_HOOKS,
    latents_clean: torch.Tensor | None = None,
    directory: str | Path | None = None,
    scratch_parent: str | Path | None = None,
) -> Inversion:
    """Encode, DDIM-invert with the inversion prompt (guidance 1) and optionally reconstruct.

    Every kept step's latents go to their own file as soon as the step is done, so the process holds
    one [N, 4, h, w] tensor (the latents being inverted), never all T steps. The files are written to
    `directory` (kept), or else to a scratch folder (under `scratch_parent`) that the returned
    `Inversion` owns and deletes when it is garbage collected.
    """
    spec.validate()
    check_inversion_steps(model, spec.steps, spec.edit_steps)
    scheduler = make_scheduler(model, spec.steps)
    edit_timesteps = [int(t) for t in make_scheduler(model, spec.edit_steps).timesteps]
    inv_timesteps = [int(t) for t in scheduler.timesteps.flip(0)]  # ascending
    folder, scratch = _output_folder(directory, scratch_parent)
    clean = LatentFile(folder / CLEAN_FILE, TENSOR_NAME)
    bs = spec.batch_size
    if latents_clean is None:
        _encode_to_file(model, frames(), clean.path, hooks, bs)
    else:
        write_rows(clean.path, TENSOR_NAME, latents_clean.float(), READ_BATCH)
    # The latents are inverted in place, starting from the file's copy: the same contiguous layout and
    # numbers as any later reader of the artifact sees.
    x = clean.full()
    n = x.shape[0]
    alphas = scheduler.alphas_cumprod
    cond = encode_prompt(model, spec.prompt)
    step_of = {t: i for i, t in enumerate(edit_timesteps)}
    hooks.start("invert")
    for i, t in enumerate(inv_timesteps):
        alpha_t = alphas[t]
        alpha_prev = alphas[inv_timesteps[i - 1]] if i > 0 else scheduler.final_alpha_cumprod
        # The noise is predicted at the next timestep from the current latent (the public code's inversion).
        ddim_move(
            model,
            x,
            t,
            cond,
            alpha_prev,
            alpha_t,
            bs,
            done=lambda f, i=i: hooks.report_within("invert", i, len(inv_timesteps), f, n),
        )
        if t in step_of:
            write_rows(folder / source_file(step_of[t]), TENSOR_NAME, x, READ_BATCH)
        hooks.report("invert", i + 1, len(inv_timesteps), frames_done=n, frames_total=n)
    write_rows(folder / NOISIEST_FILE, TENSOR_NAME, x, READ_BATCH)
    del x
    names = [CLEAN_FILE, NOISIEST_FILE, *(source_file(i) for i in range(len(edit_timesteps)))]
    inversion = Inversion(
        edit_timesteps=edit_timesteps,
        noisiest_timestep=inv_timesteps[-1],
        prompt=spec.prompt,
        steps=spec.steps,
        width=int(clean.shape()[-1] * model.vae_scale),
        height=int(clean.shape()[-2] * model.vae_scale),
        latent_shape=clean.shape(),
        clean_ref=TensorRef(CLEAN_FILE),
        noisiest_ref=TensorRef(NOISIEST_FILE),
        source_refs=[TensorRef(source_file(i)) for i in range(len(edit_timesteps))],
        paths={name: folder / name for name in names},
        fps=Fraction(fps).limit_denominator(1_000_000),
        model_fingerprint=model.fingerprint,
        test_model=model.is_test_model,
        scratch=scratch,
    )
    if spec.reconstruct:
        recon = reconstruct(model, inversion, spec.steps, hooks, batch_size=bs)
        inversion.reconstruction_psnr = reconstruction_psnr(model, recon, frames(), hooks.check)
        # In latent space too: pixel PSNR also carries the VAE's own round-trip loss.
        inversion.extra["reconstruction_latent_rel_l2"] = _rel_l2_to_clean(inversion, recon)
    if directory is not None:
        (folder / META_FILE).write_bytes(inversion.meta_bytes())
    return inversion


def _rel_l2_to_clean(inversion: Inversion, latents: torch.Tensor) -> float:
    """||latents - clean|| / ||clean||, reading the clean latents in batches."""
    err = ref = torch.zeros((), dtype=torch.float64)
    for b in range(0, inversion.n_frames, READ_BATCH):
        clean = inversion.clean_rows(b, b + READ_BATCH).double()
        err = err + (latents[b : b + READ_BATCH].double() - clean).square().sum()
        ref = ref + clean.square().sum()
    return float(err.sqrt() / ref.sqrt().clamp_min(1e-12))


@torch.no_grad()
def reconstruct(
    model: Model, inversion: Inversion, steps: int, hooks: JobHooks = NO_HOOKS, batch_size: int = 8
) -> torch.Tensor:
    """DDIM sampling back from the most-noised latents with the inversion prompt (guidance 1)."""
    scheduler = make_scheduler(model, steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    alphas = scheduler.alphas_cumprod
    cond = encode_prompt(model, inversion.prompt)
    x = inversion.noisiest
    hooks.start("reconstruct")
    for i, t in enumerate(timesteps):
        alpha_t = alphas[t]
        alpha_next = alphas[timesteps[i + 1]] if i < len(timesteps) - 1 else scheduler.final_alpha_cumprod
        ddim_move(
            model,
            x,
            t,
            cond,
            alpha_t,
            alpha_next,
            batch_size,
            # cancellation is checked after every UNet batch, not only after each whole-clip step
            done=lambda f, i=i: hooks.report_within("reconstruct", i, len(timesteps), f, x.shape[0]),
        )
        hooks.report("reconstruct", i + 1, len(timesteps))
    return x


def reconstruction_psnr(
    model: Model,
    latents: torch.Tensor,
    source: Iterable[np.ndarray],
    check_cancelled: Callable[[], None] | None = None,
) -> float:
    """PSNR (dB) of decoded latents against the source frames, over the whole clip."""
    se, count = 0.0, 0
    decoded_frames = iter_decoded(model, latents, check_cancelled=check_cancelled)
    for decoded, original in zip(decoded_frames, source, strict=False):
        diff = decoded.astype(np.float64) - original.astype(np.float64)
        se += float(np.square(diff).sum())
        count += diff.size
    if count == 0:
        return float("nan")
    mse = se / count
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def frames_from_array(frames: np.ndarray) -> FrameSource:
    return lambda: iter(frames)
