"""Text and image encoding: prompts to CLIP states, frames to VAE latents and back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from tokenflow.errors import ModelError
from tokenflow.models import Model

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_prompt(model: Model, prompt: str) -> torch.Tensor:
    """CLIP last hidden state [1, 77, D], padded to max length as the public code does."""
    tok = model.tokenizer
    ids = tok(
        prompt, padding="max_length", max_length=tok.model_max_length, truncation=False, return_tensors="pt"
    ).input_ids
    if ids.shape[-1] > tok.model_max_length:
        log.warning("prompt truncated to %d tokens: %r", tok.model_max_length, prompt)
        ids = torch.cat([ids[:, : tok.model_max_length - 1], ids[:, -1:]], dim=1)
    return model.text_encoder(ids.to(model.device))[0].to(model.dtype)


def _vae_dtype(model: Model) -> torch.dtype:
    # The SD VAE overflows in fp16; diffusers marks such VAEs with force_upcast.
    if model.dtype == torch.float16 and getattr(model.vae.config, "force_upcast", False):
        return torch.float32
    return model.dtype


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [0,1] (torchvision's ToTensor arithmetic)."""
    t = torch.as_tensor(frames)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [N,H,W,3], got {tuple(t.shape)} {t.dtype}")
    return t.permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def encode_frames(model: Model, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """VAE posterior mean times the VAE's scaling factor, float32 [N,4,H/8,W/8]."""
    vae_dtype = _vae_dtype(model)
    vae = model.vae.to(dtype=vae_dtype)
    try:
        x = frames_to_tensor(frames).to(model.device, vae_dtype)
        latents = vae.encode(2 * x - 1).latent_dist.mean * vae.config.scaling_factor
    finally:
        vae.to(dtype=model.dtype)
    # The VAE hands back a channels-last view; a contiguous copy makes in-memory latents compute exactly like
    # latents loaded from an artifact (the UNet's conv kernels depend on the memory layout).
    latents = latents.float().contiguous()
    if not torch.isfinite(latents).all():
        raise ModelError("the VAE produced non-finite latents; try --dtype float32")
    return latents


@torch.no_grad()
def decode_latents(model: Model, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 [N,H,W,3]; truncating like torchvision's ToPILImage, as the public code saves."""
    vae_dtype = _vae_dtype(model)
    vae = model.vae.to(dtype=vae_dtype)
    try:
        z = latents.to(model.device, vae_dtype) / vae.config.scaling_factor
        images = vae.decode(z).sample.float()
    finally:
        vae.to(dtype=model.dtype)
    if not torch.isfinite(images).all():
        raise ModelError("the VAE decoded non-finite pixels (fp16 overflow?); refusing to write black frames")
    images = (images / 2 + 0.5).clamp(0, 1)
    return images.mul(255).byte().permute(0, 2, 3, 1).cpu().numpy()


def iter_decoded(
    model: Model,
    latents: torch.Tensor,
    batch_size: int = 8,
    check_cancelled: Callable[[], None] | None = None,
) -> Iterator[np.ndarray]:
    """Decode in batches and yield frames one by one, so a whole video never sits in memory.

    `check_cancelled` (e.g. ``JobHooks.check``) runs before every batch: the decode of a long clip takes
    minutes, and a cancelled job must not spend them.
    """
    for b in range(0, latents.shape[0], batch_size):
        if check_cancelled is not None:
            check_cancelled()
        yield from decode_latents(model, latents[b : b + batch_size])


def batched(frames: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
