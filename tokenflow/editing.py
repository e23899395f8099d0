"""The editing loops: TokenFlow + PnP, SDEdit-TokenFlow, per-frame PnP and reconstruction.

Per denoising step t (docs/ARCHITECTURE.md): draw keyframes; run the UNet on the keyframes
with extended attention and record every self-attention output (the latents it would produce
are discarded); run it on all frames in chunks with self-attention replaced by nearest-
neighbour propagation of the recorded outputs; classifier-free guidance and one DDIM step.

Memory: the loop holds the current latents [N,4,h,w] (updated in place, chunk by chunk) and reads
the inversion's latents of the current step from disk only for the frames it is working on. The
keyframe pass is scoped and batched by `tokenflow.keyframe_pass` (``keyframe_attention``,
``keyframe_group_size``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenflow.attention import TokenFlowState, tokenflow_unet
from tokenflow.branches import COND, EDITED_ONLY, SOURCE, UNCOND, WITH_SOURCE, BranchLayout, SourceHook
from tokenflow.encoding import decode_latents, encode_prompt
from tokenflow.errors import SpecError
from tokenflow.inversion import READ_BATCH, Inversion
from tokenflow.keyframe_pass import (
    KeyframePass,
    auto_group_size,
    parse_keyframe_attention,
    propagation_windows,
    warn_if_slow,
)
from tokenflow.keys import run_steps
from tokenflow.methods import method, preview_methods
from tokenflow.models import Model
from tokenflow.progress import NO_HOOKS, JobHooks
from tokenflow.schedule import make_scheduler, resolve_schedule, window_centres
from tokenflow.specs import EditSpec


@dataclass
class EditResult:
    latents: torch.Tensor  # [N,4,h,w] final latents (float32, cpu)
    keyframes: list[list[int]] = field(default_factory=list)  # keyframe indices used at each step
    trajectory: list[torch.Tensor] | None = None  # latents after every step, when asked for
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of the keyframe and other passes
    propagation_batches: dict[str, int] = field(default_factory=dict)
    """Propagation-pass UNet batches by path: PATH_SOURCE_BRANCH (the source branch ran) or PATH_FEATURES."""


SOURCE_HOOK = "source_features"
"""The name under which `edit` registers its `source_hook`."""
PATH_SOURCE_BRANCH = "source_branch"
PATH_FEATURES = "features"


@dataclass
class _Prepared:
    scheduler: object
    timesteps: list[int]
    step_offset: int  # index of timesteps[0] in the inversion's edit timesteps
    x: torch.Tensor
    embeds_source: torch.Tensor
    embeds_uncond: torch.Tensor
    embeds_cond: torch.Tensor


def _prepare(
    model: Model, inversion: Inversion, spec: EditSpec, frames: Sequence[int] | None = None
) -> _Prepared:
    """Schedule, prompts and the starting latents of `frames` (default: all)."""
    spec.validate()
    if inversion.model_fingerprint and inversion.model_fingerprint != model.fingerprint:
        raise SpecError("this inversion was made with a different model; invert again with the current model")
    steps = len(inversion.edit_timesteps)
    scheduler = make_scheduler(model, steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    if timesteps != inversion.edit_timesteps:
        raise SpecError("the inversion's timesteps do not match this model's scheduler")
    offset, run = run_steps(spec, steps)
    if run < 1:
        raise SpecError(
            "edit.sdedit_start is too small: no denoising step would run", field="edit.sdedit_start"
        )
    x = start_latents(inversion, scheduler, timesteps[offset], frames or range(inversion.n_frames))
    if not method(spec.method).uses_prompt:
        uncond = cond = encode_prompt(model, inversion.prompt)
    else:
        uncond, cond = encode_prompt(model, spec.negative_prompt), encode_prompt(model, spec.prompt)
    return _Prepared(
        scheduler, timesteps[offset:], offset, x, encode_prompt(model, inversion.prompt), uncond, cond
    )


def start_latents(inversion: Inversion, scheduler: Any, timestep: int, frames: Sequence[int]) -> torch.Tensor:
    """The edit's starting latents of these frames: the clean latents noised to `timestep` with the noise
    that maps them onto the most-noised inversion latent (the public code's), read in batches."""
    alpha_T = scheduler.alphas_cumprod[inversion.noisiest_timestep]
    start = torch.tensor([timestep])
    frames = list(frames)
    out = torch.empty((len(frames), *inversion.latent_shape[1:]), dtype=torch.float32)
    clean_file = inversion._file(inversion.clean_ref)
    noisiest_file = inversion._file(inversion.noisiest_ref)
    for b in range(0, len(frames), READ_BATCH):
        rows = frames[b : b + READ_BATCH]
        clean = clean_file[rows]
        eps = (noisiest_file[rows] - alpha_T**0.5 * clean) / (1 - alpha_T) ** 0.5
        out[b : b + len(rows)] = scheduler.add_noise(clean, eps, start)
    return out


def _unet_branches(
    model: Model,
    prep: _Prepared,
    layout: BranchLayout,
    source: Callable[[], torch.Tensor],
    x: torch.Tensor,
    t: int,
) -> torch.Tensor:
    """UNet on the layout's branches stacked (source: the inverted latents with the inversion prompt;
    uncond / cond: `x` with the negative / target prompt). `source` is read only if the layout holds it."""
    n = x.shape[0]
    latents = {SOURCE: source if layout.has(SOURCE) else None, UNCOND: x, COND: x}
    embeds = {SOURCE: prep.embeds_source, UNCOND: prep.embeds_uncond, COND: prep.embeds_cond}
    stacked = torch.cat(
        [latents[b]() if b == SOURCE else latents[b] for b in layout.names]  # type: ignore[operator]
    ).to(model.device, model.dtype)
    states = torch.cat([embeds[b].expand(n, -1, -1) for b in layout.names])
    return model.unet(stacked, t, encoder_hidden_states=states).sample.float().cpu()


def _guided_step(
    prep: _Prepared, layout: BranchLayout, noise: torch.Tensor, t: int, x: torch.Tensor, guidance: float
) -> torch.Tensor:
    uncond, cond = layout.part(noise, UNCOND), layout.part(noise, COND)
    guided = uncond + guidance * (cond - uncond)
    return prep.scheduler.step(guided, t, x).prev_sample


def _pnp_flags(spec: EditSpec, step_index: int, all_steps: int) -> tuple[bool, bool]:
    """(inject attention, inject conv) at this step: the first int(T * pnp_attn_t) / int(T * pnp_f_t) steps.

    Thresholds count from the first of all T steps, as the public code's `timesteps[:int(T * f)]`.
    """
    use_pnp = method(spec.method).pnp
    return (
        use_pnp and step_index < int(all_steps * spec.pnp_attn_t),
        use_pnp and step_index < int(all_steps * spec.pnp_f_t),
    )


def _reconstruct_step(model: Model, prep: _Prepared, x: torch.Tensor, t: int) -> torch.Tensor:
    """No edit: one DDIM step conditioned on the inversion prompt (guidance 1, a single branch)."""
    embeds = prep.embeds_source.expand(x.shape[0], -1, -1)
    noise = model.unet(x.to(model.device, model.dtype), t, encoder_hidden_states=embeds).sample.float().cpu()
    return prep.scheduler.step(noise, t, x).prev_sample


def _pass_options(model: Model, inversion: Inversion, spec: EditSpec) -> tuple[int | None, int | None]:
    """(window or None for all, keyframes per UNet batch or None for one batch) of this edit."""
    window = parse_keyframe_attention(spec.keyframe_attention)
    group = spec.keyframe_group_size or None
    if group is None:
        h, w = inversion.latent_shape[-2:]
        channels = int(model.unet.config.block_out_channels[0])
        group = auto_group_size(model.device, (h, w), channels, model.dtype)
    return window, group


def _keyframe_pass(
    model: Model,
    prep: _Prepared,
    state: TokenFlowState,
    keyframes: list[int],
    source: torch.Tensor,
    x: torch.Tensor,
    t: int,
    options: tuple[int | None, int | None],
    keep_noise: bool = False,
) -> KeyframePass:
    """The step's keyframe pass over `keyframes`, whose source/current latents are `source` and `x`."""

    def run(positions: list[int]) -> torch.Tensor:
        state.mode = "keyframes"
        state.layout = WITH_SOURCE  # the keyframe pass always runs the source branch (K of N frames)
        state.frame_indices = [keyframes[p] for p in positions]
        return _unet_branches(model, prep, WITH_SOURCE, lambda: source[positions], x[positions], t)

    window, group = options
    return KeyframePass(state, run, len(keyframes), window, group, keep_noise=keep_noise)


@torch.no_grad()
def edit(
    model: Model,
    inversion: Inversion,
    spec: EditSpec,
    hooks: JobHooks = NO_HOOKS,
    keep_trajectory: bool = False,
    source_hook: SourceHook | None = None,
) -> EditResult:
    """Edit every frame with the spec's method; returns the final latents (decode them lazily).

    `source_hook` (TokenFlow methods only) sees, or supplies, what the propagation pass takes from the
    source branch (tokenflow.features: a recorder or a replayer); when it supplies all of it, the
    propagation batches hold only the unconditional and conditional branches. The keyframe pass always
    runs its source branch.
    """
    prep = _prepare(model, inversion, spec)
    options = _pass_options(model, inversion, spec)
    n = inversion.n_frames
    total = len(prep.timesteps)
    all_steps = len(inversion.edit_timesteps)
    info = method(spec.method)
    schedule = resolve_schedule(spec, n, total) if info.keyframes else []
    state = TokenFlowState(keyframe_interval=spec.keyframe_interval, weighting=spec.propagation_weighting)
    if source_hook is not None and schedule:
        state.hooks.register_hook(source_hook, SOURCE_HOOK)
    propagation_layout = EDITED_ONLY if state.hooks.supplies_source else WITH_SOURCE
    path = PATH_FEATURES if propagation_layout is EDITED_ONLY else PATH_SOURCE_BRANCH
    batches = 0
    x = prep.x
    trajectory: list[torch.Tensor] | None = [] if keep_trajectory else None
    warnings = []
    seconds = {"keyframes": 0.0, "propagation": 0.0}
    if schedule:
        message = warn_if_slow(len(schedule[0]), options[0], int(x.shape[-2] * x.shape[-1]))
        if message:
            warnings.append(message)
            hooks.report("edit", 0, total, frames_done=0, frames_total=n, message=message)
    hooks.start("edit")
    hooked = info.pnp or info.keyframes  # the attention processor and conv hook are needed
    with tokenflow_unet(model.unet, state) if hooked else contextlib.nullcontext():
        for i, t in enumerate(prep.timesteps):
            step_index = prep.step_offset + i
            step_started = time.perf_counter()
            source = inversion.source_latents_at(step_index)  # read lazily, frames as needed
            state.pnp_attn, state.pnp_conv = _pnp_flags(spec, step_index, all_steps)
            state.hooks.begin_step(step_index)
            kpass = None
            if schedule:
                kf = schedule[i]
                # The keyframes' latents before this step: x is updated in place below.
                kpass = _keyframe_pass(model, prep, state, kf, source[kf], x[kf], t, options)
                if kpass.joint:
                    kpass.run_all()  # records every keyframe's attention outputs
            else:
                state.mode = "per-frame"
            for b in range(0, n, spec.chunk_size):
                chunk = list(range(b, min(b + spec.chunk_size, n)))
                if kpass is not None:
                    lo, hi = propagation_windows(chunk, spec.keyframe_interval)
                    if not kpass.joint:  # window:W: compute keyframes as they are needed, drop the rest
                        state.forget_before(lo)
                        kpass.ensure(lo, hi)
                    state.mode = "propagate"
                state.layout = propagation_layout
                state.frame_indices = chunk
                rows = x[b : b + len(chunk)]
                if not info.uses_prompt:
                    new = _reconstruct_step(model, prep, rows, t)
                else:
                    layout = state.layout
                    noise = _unet_branches(model, prep, layout, lambda s=source, c=chunk: s[c], rows, t)
                    new = _guided_step(prep, layout, noise, t, rows, spec.guidance_scale)
                    batches += 1
                x[b : b + len(chunk)] = new
                hooks.report_within("edit", i, total, frames_done=b + len(chunk), frames_total=n)
            state.hooks.end_step(step_index)
            state.clear()
            keyframe_seconds = kpass.seconds if kpass is not None else 0.0
            seconds["keyframes"] += keyframe_seconds
            seconds["propagation"] += time.perf_counter() - step_started - keyframe_seconds
            if trajectory is not None:
                trajectory.append(x.clone())
            hooks.report("edit", i + 1, total, frames_done=n, frames_total=n)
    return EditResult(
        latents=x,
        keyframes=schedule,
        trajectory=trajectory,
        warnings=warnings,
        seconds=seconds,
        propagation_batches={path: batches} if batches else {},
    )


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
    if not method(spec.method).preview:
        raise SpecError(
            f"keyframe previews exist for the {' and '.join(preview_methods())} methods", field="edit.method"
        )
    spec.validate()
    kf = list(indices) if indices is not None else window_centres(inversion.n_frames, spec.keyframe_interval)
    if not kf or any(not 0 <= k < inversion.n_frames for k in kf):
        raise SpecError(f"keyframe indices must be in 0..{inversion.n_frames - 1}")
    prep = _prepare(model, inversion, spec, frames=kf)
    options = _pass_options(model, inversion, spec)
    all_steps = len(inversion.edit_timesteps)
    state = TokenFlowState(mode="keyframes", frame_indices=list(kf), keyframe_interval=spec.keyframe_interval)
    x = prep.x
    with tokenflow_unet(model.unet, state):
        for i, t in enumerate(prep.timesteps):
            step_index = prep.step_offset + i
            state.pnp_attn, state.pnp_conv = _pnp_flags(spec, step_index, all_steps)
            source = inversion.source_latents_at(step_index)[kf]
            kpass = _keyframe_pass(model, prep, state, kf, source, x, t, options, keep_noise=True)
            kpass.run_all()
            noise = torch.stack([kpass.noise[p] for p in range(len(kf))], dim=1)
            noise = noise.reshape(-1, *noise.shape[2:])
            x = _guided_step(prep, state.keyframe_layout, noise, t, x, spec.guidance_scale)
            state.clear()
            hooks.report("keyframes", i + 1, len(prep.timesteps), frames_done=len(kf), frames_total=len(kf))
    return list(kf), decode_latents(model, x)


SOURCE_ONLY = BranchLayout((SOURCE,))
"""Batches of `record_source_features`: the source branch alone."""


@torch.no_grad()
def record_source_features(
    model: Model, inversion: Inversion, spec: EditSpec, recorder: SourceHook, hooks: JobHooks = NO_HOOKS
) -> None:
    """Run only the source branch of an edit with `spec` (keyframe and propagation passes), for `recorder`.

    The source branch never depends on the edited latents, so this records the same features as the
    first edit would, ahead of any prompt (for a tool that knows it will iterate), at a third of an
    edit's UNet work: no uncond/cond branch and no denoising update. The prompt of `spec` is unused.
    """
    info = method(spec.method)
    if not info.keyframes:
        raise SpecError(f"method {spec.method!r} has no propagation pass: no source features to record")
    prep = _prepare(model, inversion, spec)
    window, group = _pass_options(model, inversion, spec)
    n, total, all_steps = inversion.n_frames, len(prep.timesteps), len(inversion.edit_timesteps)
    schedule = resolve_schedule(spec, n, total)
    state = TokenFlowState(
        keyframe_interval=spec.keyframe_interval,
        weighting=spec.propagation_weighting,
        layout=SOURCE_ONLY,
        keyframe_layout=SOURCE_ONLY,
    )
    state.hooks.register_hook(recorder, SOURCE_HOOK)
    hooks.start("edit")
    with tokenflow_unet(model.unet, state):
        for i, t in enumerate(prep.timesteps):
            step_index = prep.step_offset + i
            source = inversion.source_latents_at(step_index)
            state.pnp_attn, state.pnp_conv = _pnp_flags(spec, step_index, all_steps)
            state.hooks.begin_step(step_index)
            kf = schedule[i]
            kf_source = source[kf]

            def run(
                positions: list[int], kf: list[int] = kf, kf_source: torch.Tensor = kf_source, t: int = t
            ) -> torch.Tensor:
                state.mode, state.layout = "keyframes", SOURCE_ONLY
                state.frame_indices = [kf[p] for p in positions]
                rows = kf_source[positions]
                return _unet_branches(model, prep, SOURCE_ONLY, lambda: rows, rows, t)

            kpass = KeyframePass(state, run, len(kf), window, group)
            if kpass.joint:
                kpass.run_all()
            for b in range(0, n, spec.chunk_size):
                chunk = list(range(b, min(b + spec.chunk_size, n)))
                lo, hi = propagation_windows(chunk, spec.keyframe_interval)
                if not kpass.joint:
                    state.forget_before(lo)
                    kpass.ensure(lo, hi)
                state.mode, state.layout, state.frame_indices = "propagate", SOURCE_ONLY, chunk
                rows = source[chunk]
                _unet_branches(model, prep, SOURCE_ONLY, lambda rows=rows: rows, rows, t)
                hooks.report_within("edit", i, total, frames_done=b + len(chunk), frames_total=n)
            state.hooks.end_step(step_index)
            state.clear()
            hooks.report("edit", i + 1, total, frames_done=n, frames_total=n)
