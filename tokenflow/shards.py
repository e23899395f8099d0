"""Sharded inversion: invert frame ranges separately and merge them into the whole clip's inversion.

DDIM inversion treats every frame on its own: the VAE encodes each frame, and the inversion runs the UNet
with the inversion prompt at guidance 1 with per-frame self-attention (no extended attention, no
correspondences), so frame i's latents at every timestep depend on frame i alone. The inversion of frames
[0, N) is therefore the frame-wise concatenation of the inversions of [0, a), [a, b), ..., [z, N), and a
fleet can split a long clip across inversion replicas.

How close the merged tensors are to an unsharded run: not bit-identical in general, because the frames
reach the kernels in different batches (a shard's last batch is smaller than the unsharded run's batch at
the same frames), and convolution and matmul kernels pick their algorithm, blocking and reduction order by
shape, so the same frame's arithmetic is summed in another order. The differences are float rounding: on
CPU in float32 the merged latents agree with an unsharded run to about 1e-6 relative L2 per timestep
(tests/test_shards.py bounds it at 1e-4, the bound the parity check uses for inversions); in float16 on a
GPU expect about 1e-3. Shards whose sizes are multiples of the inversion batch size see the same batches
as the unsharded run and typically agree bit for bit.

The reconstruction PSNR and latent error of a merged inversion are combined exactly from the shards' (all
frames have the same number of pixels): squared errors add up over frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenflow.errors import SpecError
from tokenflow.inversion import (
    CLEAN_FILE,
    META_FILE,
    NOISIEST_FILE,
    READ_BATCH,
    TENSOR_NAME,
    Inversion,
    TensorRef,
    source_file,
)
from tokenflow.latents_io import LatentFile, RowsWriter

_PEAK = 255.0


def shard_ranges(frames: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous, nearly equal frame ranges [start, stop) covering [0, frames)."""
    if frames < 1 or shards < 1:
        raise ValueError("need at least one frame and one shard")
    shards = min(shards, frames)
    bounds = [round(i * frames / shards) for i in range(shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(shards)]


def _check_compatible(parts: Sequence[Inversion]) -> None:
    first = parts[0]
    for i, part in enumerate(parts[1:], 1):
        for name in ("edit_timesteps", "noisiest_timestep", "prompt", "steps", "width", "height",
                     "model_fingerprint", "fps"):  # fmt: skip
            if getattr(part, name) != getattr(first, name):
                raise SpecError(f"inversion shard {i} differs from shard 0 in {name}: they cannot be merged")
        if tuple(part.latent_shape[1:]) != tuple(first.latent_shape[1:]):
            raise SpecError(f"inversion shard {i} has latents of another size: they cannot be merged")


def _concat(parts: Sequence[Inversion], refs: Sequence[TensorRef], dest: Path) -> Path:
    """One [N, ...] file from the parts' tensors, in order, streamed in row batches."""
    with RowsWriter(dest, TENSOR_NAME) as writer:
        for part, ref in zip(parts, refs, strict=True):
            latents = LatentFile(part.paths[ref.file], ref.name, ref.index)
            for b in range(0, part.n_frames, READ_BATCH):
                writer.write(latents.rows(b, min(b + READ_BATCH, part.n_frames)))
    return dest


def _merged_psnr(parts: Sequence[Inversion]) -> float | None:
    """The whole clip's reconstruction PSNR from the shards' (mean squared error weighted by frames)."""
    values = [p.reconstruction_psnr for p in parts]
    if any(v is None for v in values):
        return None
    total = sum(p.n_frames for p in parts)
    se = 0.0
    for part, psnr in zip(parts, values, strict=True):
        assert psnr is not None
        mse = 0.0 if math.isinf(psnr) else _PEAK**2 / 10 ** (psnr / 10)
        se += mse * part.n_frames
    mse = se / total
    return float("inf") if mse == 0 else 10 * math.log10(_PEAK**2 / mse)


def _clean_sq_norm(part: Inversion) -> float:
    total = 0.0
    for b in range(0, part.n_frames, READ_BATCH):
        total += float(part.clean_rows(b, b + READ_BATCH).double().square().sum())
    return total


def _merged_latent_error(parts: Sequence[Inversion]) -> float | None:
    key = "reconstruction_latent_rel_l2"
    if any(key not in p.extra for p in parts):
        return None
    err = ref = 0.0
    for part in parts:
        norm = _clean_sq_norm(part)
        err += (float(part.extra[key]) ** 2) * norm
        ref += norm
    return math.sqrt(err) / max(math.sqrt(ref), 1e-12)


def merge_inversions(parts: Sequence[Inversion], directory: str | Path, extra: dict[str, Any]) -> Inversion:
    """The inversion of the concatenated frame ranges of `parts` (in order), written into `directory`.

    `extra` is the whole clip's (decode settings, audio offset, ...), as an unsharded run records it.
    """
    if not parts:
        raise SpecError("no inversion shards to merge")
    _check_compatible(parts)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    first = parts[0]
    _concat(parts, [p.clean_ref for p in parts], d / CLEAN_FILE)
    _concat(parts, [p.noisiest_ref for p in parts], d / NOISIEST_FILE)
    for step in range(len(first.edit_timesteps)):
        _concat(parts, [p.source_refs[step] for p in parts], d / source_file(step))
    frames = sum(p.n_frames for p in parts)
    names = [CLEAN_FILE, NOISIEST_FILE, *(source_file(i) for i in range(len(first.edit_timesteps)))]
    merged = Inversion(
        edit_timesteps=list(first.edit_timesteps),
        noisiest_timestep=first.noisiest_timestep,
        prompt=first.prompt,
        steps=first.steps,
        width=first.width,
        height=first.height,
        latent_shape=(frames, *first.latent_shape[1:]),
        clean_ref=TensorRef(CLEAN_FILE),
        noisiest_ref=TensorRef(NOISIEST_FILE),
        source_refs=[TensorRef(source_file(i)) for i in range(len(first.edit_timesteps))],
        paths={name: d / name for name in names},
        fps=first.fps,
        model_fingerprint=first.model_fingerprint,
        test_model=first.test_model,
        reconstruction_psnr=_merged_psnr(parts),
        extra=dict(extra),
    )
    latent_error = _merged_latent_error(parts)
    if latent_error is not None:
        merged.extra["reconstruction_latent_rel_l2"] = latent_error
    merged._check_files()
    (d / META_FILE).write_bytes(merged.meta_bytes())
    return merged


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (how the tolerance of a merge is stated)."""
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-12))
