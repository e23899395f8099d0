"""The editing loops: TokenFlow + PnP, SDEdit-TokenFlow, per-frame PnP and reconstruction.

Per denoising step t (TokenFlow, DESIGN.md §2): draw keyframes; run the UNet on the keyframes
with extended attention and record every self-attention output (the latents it would produce
are discarded); run it on all frames in chunks with self-attention replaced by nearest-
neighbour propagation of the recorded outputs; classifier-free guidance and one DDIM step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenflow.attention import TokenFlowState, tokenflow_unet
from tokenflow.encoding import decode_latents, encode_prompt
from tokenflow.errors import SpecError
from tokenflow.inversion import Inversion
from tokenflow.models import Model
from tokenflow.progress import NO_HOOKS, JobHooks
from tokenflow.schedule import draw_keyframes, make_scheduler, validate_schedule, window_centres
from tokenflow.specs import EditSpec


@dataclass
class EditResult:
    latents: torch.Tensor  # [N,4,h,w] final latents (float32, cpu)
    keyframes: list[list[int]] = field(default_factory=list)  # keyframe indices used at each step
    trajectory: list[torch.Tensor] | None = None  # latents after every step, when asked for


@dataclass
class _Prepared:
    scheduler: object
    timesteps: list[int]
    step_offset: int  # index of timesteps[0] in the inversion's edit timesteps
    x: torch.Tensor
    embeds_source: torch.Tensor
    embeds_uncond: torch.Tensor
    embeds_cond: torch.Tensor


def _prepare(model: Model, inversion: Inversion, spec: EditSpec) -> _Prepared:
    spec.validate()
    if inversion.model_fingerprint and inversion.model_fingerprint != model.fingerprint:
        raise SpecError("this inversion was made with a different model; invert again with the current model")
    steps = len(inversion.edit_timesteps)
    scheduler = make_scheduler(model, steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    if timesteps != inversion.edit_timesteps:
        raise SpecError("the inversion's timesteps do not match this model's scheduler")
    alphas = scheduler.alphas_cumprod
    alpha_T = alphas[inversion.noisiest_timestep]
    # The public code's noise: the one that maps the clean latents onto the most-noised inversion latent.
    eps = (inversion.noisiest - alpha_T**0.5 * inversion.latents_clean) / (1 - alpha_T) ** 0.5
    offset = 0
    if spec.method == "sdedit":
        offset = steps - int(steps * spec.sdedit_start)
        if offset >= steps:
            raise SpecError("edit.sdedit_start is too small: no denoising step would run")
    start = torch.tensor([timesteps[offset]])
    x = scheduler.add_noise(inversion.latents_clean, eps, start)
    if spec.method == "reconstruct":
        uncond = cond = encode_prompt(model, inversion.prompt)
    else:
        uncond, cond = encode_prompt(model, spec.negative_prompt), encode_prompt(model, spec.prompt)
    return _Prepared(
        scheduler, timesteps[offset:], offset, x, encode_prompt(model, inversion.prompt), uncond, cond
    )


def _unet_branches(
    model: Model, prep: _Prepared, source: torch.Tensor, x: torch.Tensor, t: int
) -> torch.Tensor:
    """UNet on [source; x; x] with [inversion prompt; negative; prompt]: returns guided-ready [3n,...]."""
    n = x.shape[0]
    latents = torch.cat([source, x, x]).to(model.device, model.dtype)
    embeds = torch.cat(
        [
            prep.embeds_source.expand(n, -1, -1),
            prep.embeds_uncond.expand(n, -1, -1),
            prep.embeds_cond.expand(n, -1, -1),
        ]
    )
    return model.unet(latents, t, encoder_hidden_states=embeds).sample.float().cpu()


def _guided_step(
    prep: _Prepared, noise: torch.Tensor, t: int, x: torch.Tensor, guidance: float
) -> torch.Tensor:
    _, uncond, cond = noise.chunk(3)
    guided = uncond + guidance * (cond - uncond)
    return prep.scheduler.step(guided, t, x).prev_sample


def _pnp_flags(spec: EditSpec, step_index: int, all_steps: int) -> tuple[bool, bool]:
    """(inject attention, inject conv) at this step: the first int(T * pnp_attn_t) / int(T * pnp_f_t) steps.

    Thresholds count from the first of all T steps, as the public code's `timesteps[:int(T * f)]`.
    """
    use_pnp = spec.method in ("tokenflow", "per-frame")
    return (
        use_pnp and step_index < int(all_steps * spec.pnp_attn_t),
        use_pnp and step_index < int(all_steps * spec.pnp_f_t),
    )


def _reconstruct_step(model: Model, prep: _Prepared, x: torch.Tensor, t: int) -> torch.Tensor:
    """No edit: one DDIM step conditioned on the inversion prompt (guidance 1, a single branch)."""
    embeds = prep.embeds_source.expand(x.shape[0], -1, -1)
    noise = model.unet(x.to(model.device, model.dtype), t, encoder_hidden_states=embeds).sample.float().cpu()
    return prep.scheduler.step(noise, t, x).prev_sample


def keyframe_schedule(spec: EditSpec, n_frames: int, steps: int) -> list[list[int]]:
    if spec.keyframe_schedule is not None:
        return validate_schedule(spec.keyframe_schedule, n_frames, spec.keyframe_interval, steps)
    return draw_keyframes(n_frames, spec.keyframe_interval, steps, spec.seed)


@torch.no_grad()
def edit(
    model: Model,
    inversion: Inversion,
    spec: EditSpec,
    hooks: JobHooks = NO_HOOKS,
    keep_trajectory: bool = False,
) -> EditResult:
    """Edit every frame with the spec's method; returns the final latents (decode them lazily)."""
    prep = _prepare(model, inversion, spec)
    n = inversion.n_frames
    total = len(prep.timesteps)
    all_steps = len(inversion.edit_timesteps)
    schedule = keyframe_schedule(spec, n, total) if spec.method in ("tokenflow", "sdedit") else []
    state = TokenFlowState(keyframe_interval=spec.keyframe_interval, weighting=spec.propagation_weighting)
    x = prep.x
    trajectory: list[torch.Tensor] | None = [] if keep_trajectory else None
    with tokenflow_unet(model.unet, state) if spec.method != "reconstruct" else contextlib.nullcontext():
        for i, t in enumerate(prep.timesteps):
            step_index = prep.step_offset + i
            source = inversion.source_latents[step_index]
            state.pnp_attn, state.pnp_conv = _pnp_flags(spec, step_index, all_steps)
            if schedule:
                kf = schedule[i]
                state.mode, state.frame_indices = "keyframes", kf
                _unet_branches(model, prep, source[kf], x[kf], t)  # records attention outputs
                state.mode = "propagate"
            else:
                state.mode = "per-frame"
            out = []
            for b in range(0, n, spec.chunk_size):
                chunk = list(range(b, min(b + spec.chunk_size, n)))
                state.frame_indices = chunk
                if spec.method == "reconstruct":
                    out.append(_reconstruct_step(model, prep, x[chunk], t))
                else:
                    noise = _unet_branches(model, prep, source[chunk], x[chunk], t)
                    out.append(_guided_step(prep, noise, t, x[chunk], spec.guidance_scale))
                hooks.check()
            x = torch.cat(out)
            state.clear()
            if trajectory is not None:
                trajectory.append(x.clone())
            hooks.report("edit", i + 1, total, frames_done=n, frames_total=n)
    return EditResult(latents=x, keyframes=schedule, trajectory=trajectory)


@torch.no_grad()
def edit_keyframes(
    model: Model,
    inversion: Inversion,
    spec: EditSpec,
    hooks: JobHooks = NO_HOOKS,
    indices: list[int] | None = None,
) -> tuple[list[int], np.ndarray]:
    """A fast preview: jointly edit one fixed keyframe per window (extended attention, PnP), no propagation.

    Costs K/N of a full edit. Returns the keyframe indices and their decoded uint8 frames.
    """
    if spec.method not in ("tokenflow", "sdedit"):
        raise SpecError("keyframe previews exist for the tokenflow and sdedit methods")
    prep = _prepare(model, inversion, spec)
    kf = indices if indices is not None else window_centres(inversion.n_frames, spec.keyframe_interval)
    if any(not 0 <= k < inversion.n_frames for k in kf):
        raise SpecError(f"keyframe indices must be in 0..{inversion.n_frames - 1}")
    all_steps = len(inversion.edit_timesteps)
    state = TokenFlowState(mode="keyframes", frame_indices=list(kf), keyframe_interval=spec.keyframe_interval)
    x = prep.x[kf]
    with tokenflow_unet(model.unet, state):
        for i, t in enumerate(prep.timesteps):
            step_index = prep.step_offset + i
            state.pnp_attn, state.pnp_conv = _pnp_flags(spec, step_index, all_steps)
            noise = _unet_branches(model, prep, inversion.source_latents[step_index][kf], x, t)
            x = _guided_step(prep, noise, t, x, spec.guidance_scale)
            state.clear()
            hooks.report("keyframes", i + 1, len(prep.timesteps), frames_done=len(kf), frames_total=len(kf))
    return list(kf), decode_latents(model, x)
