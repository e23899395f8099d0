"""DDIM timesteps and TokenFlow's per-step keyframe draws."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler

from tokenflow.errors import SpecError
from tokenflow.models import Model
from tokenflow.specs import EditSpec


def make_scheduler(model: Model, steps: int) -> DDIMScheduler:
    """A DDIM scheduler from the model's own config (whatever scheduler the folder ships)."""
    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def check_inversion_steps(model: Model, steps: int, edit_steps: int) -> None:
    """Refuse step counts whose editing timesteps the inversion would not visit, suggesting ones that work.

    The editor needs the inverted latent at every editing timestep. Divisibility is not enough:
    with 1000 training steps and "leading" spacing, S=6 visits 1, 167, ..., 831, which lacks T=2's 501.
    """
    edit_timesteps = {int(t) for t in make_scheduler(model, edit_steps).timesteps}
    missing = sorted(edit_timesteps - {int(t) for t in make_scheduler(model, steps).timesteps})
    if missing:
        shown = f"{missing[:5]}{'...' if len(missing) > 5 else ''}"
        good = ", ".join(map(str, compatible_steps(model, edit_steps)))
        raise SpecError(
            f"inversion.steps={steps} does not visit the editing timesteps {shown} of "
            f"inversion.edit_steps={edit_steps} on this model's schedule; step counts that work: {good}"
        )


def compatible_steps(model: Model, edit_steps: int, limit: int = 6) -> list[int]:
    """Inversion step counts whose timesteps include all `edit_steps` editing timesteps."""
    wanted = {int(t) for t in make_scheduler(model, edit_steps).timesteps}
    found = []
    for steps in range(edit_steps, 1001, edit_steps):
        if wanted <= {int(t) for t in make_scheduler(model, steps).timesteps}:
            found.append(steps)
            if len(found) == limit:
                break
    return found


def window_count(n_frames: int, interval: int) -> int:
    return -(-n_frames // interval)


def draw_keyframes(n_frames: int, interval: int, steps: int, seed: int) -> list[list[int]]:
    """One keyframe drawn uniformly in each window of `interval` frames, afresh at every step.

    For a frame count that is a multiple of the interval this is the public code's draw
    exactly: after `torch.manual_seed(seed)`, per step
    `torch.randint(interval, (N // interval,)) + torch.arange(0, N, interval)`. A last, partial
    window (which the public code cannot handle) gets one more draw inside its own range.
    """
    g = torch.Generator().manual_seed(seed)
    full = n_frames // interval
    rest = n_frames - full * interval
    rows = []
    for _ in range(steps):
        row = (
            torch.randint(interval, (full,), generator=g) + torch.arange(0, full * interval, interval)
        ).tolist()
        if rest:
            row.append(full * interval + int(torch.randint(rest, (1,), generator=g)))
        rows.append(row)
    return rows


def validate_schedule(
    schedule: Sequence[Sequence[int]], n_frames: int, interval: int, steps: int
) -> list[list[int]]:
    """An explicit schedule must have one row per step and one keyframe inside each window."""
    rows = [list(map(int, r)) for r in schedule]
    windows = window_count(n_frames, interval)
    if len(rows) != steps:
        raise SpecError(f"keyframe schedule has {len(rows)} rows; expected one per step ({steps})")
    for i, row in enumerate(rows):
        if len(row) != windows:
            raise SpecError(f"keyframe schedule row {i} has {len(row)} entries; expected {windows} windows")
        for w, k in enumerate(row):
            if not (w * interval <= k < min((w + 1) * interval, n_frames)):
                raise SpecError(f"keyframe schedule row {i}: frame {k} is not inside window {w}")
    return rows


def window_centres(n_frames: int, interval: int) -> list[int]:
    """A fixed keyframe per window (its middle frame): the keyframe preview uses these."""
    return [
        w * interval + (min(interval, n_frames - w * interval)) // 2
        for w in range(window_count(n_frames, interval))
    ]


def resolve_schedule(spec: EditSpec, n_frames: int, steps: int) -> list[list[int]]:
    """The keyframes an edit uses at each of its `steps` steps: the explicit schedule, or the seed's draw."""
    if spec.keyframe_schedule is not None:
        return validate_schedule(spec.keyframe_schedule, n_frames, spec.keyframe_interval, steps)
    return draw_keyframes(n_frames, spec.keyframe_interval, steps, spec.seed)
