"""DDIM inversion of a video: the prompt-independent, expensive half of every edit.

The result keeps the inverted latent of every frame at each of the T editing timesteps
(the source branch of PnP/TokenFlow runs on them), the clean latents (the edit starts from
them, noised with the inversion's own noise) and the most-noised latent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tokenflow.encoding import batched, encode_frames, encode_prompt, iter_decoded
from tokenflow.errors import SpecError, VideoError
from tokenflow.models import Model
from tokenflow.progress import NO_HOOKS, JobHooks
from tokenflow.schedule import check_inversion_steps, make_scheduler
from tokenflow.specs import InversionSpec

FORMAT_VERSION = 1
TENSORS_FILE = "inversion.safetensors"
META_FILE = "inversion.json"

FrameSource = Callable[[], Iterable[np.ndarray]]
"""A callable returning a fresh iterable of uint8 [H,W,3] frames each time it is called."""


@dataclass
class Inversion:
    latents_clean: torch.Tensor  # [N,4,h,w] float32
    edit_timesteps: list[int]  # descending, as the editor walks them
    source_latents: torch.Tensor  # [T,N,4,h,w]; row i is the inverted latent at edit_timesteps[i]
    noisiest: torch.Tensor  # [N,4,h,w] latent after the last inversion step
    noisiest_timestep: int
    prompt: str
    steps: int
    width: int
    height: int
    fps: Fraction = Fraction(10)
    model_fingerprint: str = ""
    test_model: bool = False
    reconstruction_psnr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.latents_clean.shape[0])

    def latents_at(self, t: int) -> torch.Tensor:
        try:
            return self.source_latents[self.edit_timesteps.index(int(t))]
        except ValueError:
            raise SpecError(
                f"timestep {t} was not kept by this inversion ({len(self.edit_timesteps)} steps)"
            ) from None

    # ---- serialisation: safetensors + JSON only, never pickle

    def to_files(self) -> dict[str, bytes]:
        tensors = {
            "latents_clean": self.latents_clean.contiguous().cpu(),
            "source_latents": self.source_latents.contiguous().cpu(),
            "noisiest": self.noisiest.contiguous().cpu(),
        }
        meta = {
            "format": FORMAT_VERSION,
            "edit_timesteps": self.edit_timesteps,
            "noisiest_timestep": self.noisiest_timestep,
            "prompt": self.prompt,
            "steps": self.steps,
            "width": self.width,
            "height": self.height,
            "fps": [self.fps.numerator, self.fps.denominator],
            "frames": self.n_frames,
            "model_fingerprint": self.model_fingerprint,
            "test_model": self.test_model,
            "reconstruction_psnr": _finite_or_none(self.reconstruction_psnr),
            "extra": self.extra,
        }
        return {TENSORS_FILE: st_save(tensors), META_FILE: json.dumps(meta, indent=1).encode()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Inversion:
        try:
            meta = json.loads(files[META_FILE])
            tensors = st_load(files[TENSORS_FILE])
        except (KeyError, ValueError, SafetensorError) as exc:
            raise SpecError(f"not a valid inversion artifact: {exc}") from exc
        if not isinstance(meta, dict):
            raise SpecError("not a valid inversion artifact: its metadata is not a JSON object")
        if meta.get("format") != FORMAT_VERSION:
            raise SpecError(
                f"inversion format {meta.get('format')} is not supported (expected {FORMAT_VERSION})"
            )
        try:
            inv = cls._from_parts(meta, tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"not a valid inversion artifact: missing or malformed {exc}") from exc
        frame_shape = tuple(inv.latents_clean.shape)
        if (
            inv.latents_clean.ndim != 4
            or tuple(inv.source_latents.shape) != (len(inv.edit_timesteps), *frame_shape)
            or tuple(inv.noisiest.shape) != frame_shape
        ):
            raise SpecError("inversion artifact is inconsistent: latents do not match its timesteps/frames")
        return inv

    @classmethod
    def _from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Inversion:
        return cls(
            latents_clean=tensors["latents_clean"],
            edit_timesteps=[int(t) for t in meta["edit_timesteps"]],
            source_latents=tensors["source_latents"],
            noisiest=tensors["noisiest"],
            noisiest_timestep=int(meta["noisiest_timestep"]),
            prompt=meta["prompt"],
            steps=int(meta["steps"]),
            width=int(meta["width"]),
            height=int(meta["height"]),
            fps=Fraction(*meta["fps"]),
            model_fingerprint=meta["model_fingerprint"],
            test_model=bool(meta["test_model"]),
            reconstruction_psnr=meta.get("reconstruction_psnr"),
            extra=meta.get("extra", {}),
        )

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            tmp = d / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(d / name)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Inversion:
        d = Path(directory)
        if not (d / META_FILE).is_file():
            raise SpecError(
                f"{d} holds no saved inversion (missing {META_FILE}); create one with `tokenflow invert`"
            )
        return cls.from_files({name: (d / name).read_bytes() for name in (TENSORS_FILE, META_FILE)})


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
) -> None:
    """One deterministic DDIM move of every latent, in place, from noise level `alpha_from` to `alpha_to`.

    Inversion (to a noisier level) and sampling (to a cleaner one) are the same update.
    """
    for b in range(0, x.shape[0], batch_size):
        xb = x[b : b + batch_size]
        embeds = cond.expand(xb.shape[0], -1, -1)
        out = model.unet(xb.to(model.device, model.dtype), t, encoder_hidden_states=embeds).sample
        pred_x0, eps = split_prediction(out.float().cpu(), xb, alpha_from, model.prediction_type)
        x[b : b + batch_size] = alpha_to**0.5 * pred_x0 + (1 - alpha_to) ** 0.5 * eps


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


@torch.no_grad()
def invert(
    model: Model,
    frames: FrameSource,
    spec: InversionSpec,
    fps: Fraction | float = Fraction(10),
    hooks: JobHooks = NO_HOOKS,
    latents_clean: torch.Tensor | None = None,
) -> Inversion:
    """Encode, DDIM-invert with the inversion prompt (guidance 1) and optionally reconstruct."""
    spec.validate()
    check_inversion_steps(model, spec.steps, spec.edit_steps)
    scheduler = make_scheduler(model, spec.steps)
    edit_timesteps = [int(t) for t in make_scheduler(model, spec.edit_steps).timesteps]
    inv_timesteps = [int(t) for t in scheduler.timesteps.flip(0)]  # ascending
    if latents_clean is None:
        latents_clean = encode_video(model, frames(), hooks, batch_size=spec.batch_size)
    latents_clean = latents_clean.float().contiguous()  # same layout as a loaded artifact: same numbers
    n = latents_clean.shape[0]
    alphas = scheduler.alphas_cumprod
    cond = encode_prompt(model, spec.prompt)
    x = latents_clean.clone()
    kept: dict[int, torch.Tensor] = {}
    keep = set(edit_timesteps)
    bs = spec.batch_size
    for i, t in enumerate(inv_timesteps):
        alpha_t = alphas[t]
        alpha_prev = alphas[inv_timesteps[i - 1]] if i > 0 else scheduler.final_alpha_cumprod
        # The noise is predicted at the next timestep from the current latent (the public code's inversion).
        ddim_move(model, x, t, cond, alpha_prev, alpha_t, bs)
        if t in keep:
            kept[t] = x.clone()
        hooks.report("invert", i + 1, len(inv_timesteps), frames_done=n, frames_total=n)
    inversion = Inversion(
        latents_clean=latents_clean,
        edit_timesteps=edit_timesteps,
        source_latents=torch.stack([kept[t] for t in edit_timesteps]),
        noisiest=x.clone(),
        noisiest_timestep=inv_timesteps[-1],
        prompt=spec.prompt,
        steps=spec.steps,
        width=int(latents_clean.shape[-1] * model.vae_scale),
        height=int(latents_clean.shape[-2] * model.vae_scale),
        fps=Fraction(fps).limit_denominator(1_000_000),
        model_fingerprint=model.fingerprint,
        test_model=model.is_test_model,
    )
    if spec.reconstruct:
        recon = reconstruct(model, inversion, spec.steps, hooks, batch_size=bs)
        inversion.reconstruction_psnr = reconstruction_psnr(model, recon, frames())
        # In latent space too: pixel PSNR also carries the VAE's own round-trip loss.
        error = (recon - latents_clean).norm() / latents_clean.norm().clamp_min(1e-12)
        inversion.extra["reconstruction_latent_rel_l2"] = float(error)
    return inversion


@torch.no_grad()
def reconstruct(
    model: Model, inversion: Inversion, steps: int, hooks: JobHooks = NO_HOOKS, batch_size: int = 8
) -> torch.Tensor:
    """DDIM sampling back from the most-noised latents with the inversion prompt (guidance 1)."""
    scheduler = make_scheduler(model, steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    alphas = scheduler.alphas_cumprod
    cond = encode_prompt(model, inversion.prompt)
    x = inversion.noisiest.clone()
    for i, t in enumerate(timesteps):
        alpha_t = alphas[t]
        alpha_next = alphas[timesteps[i + 1]] if i < len(timesteps) - 1 else scheduler.final_alpha_cumprod
        ddim_move(model, x, t, cond, alpha_t, alpha_next, batch_size)
        hooks.report("reconstruct", i + 1, len(timesteps))
    return x


def reconstruction_psnr(model: Model, latents: torch.Tensor, source: Iterable[np.ndarray]) -> float:
    """PSNR (dB) of decoded latents against the source frames, over the whole clip."""
    se, count = 0.0, 0
    for decoded, original in zip(iter_decoded(model, latents), source, strict=False):
        diff = decoded.astype(np.float64) - original.astype(np.float64)
        se += float(np.square(diff).sum())
        count += diff.size
    if count == 0:
        return float("nan")
    mse = se / count
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def frames_from_array(frames: np.ndarray) -> FrameSource:
    return lambda: iter(frames)
