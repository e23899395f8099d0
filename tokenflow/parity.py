"""Parity with the official TokenFlow code on a recorded fixture (see shared/parity/README.md).

Loads FIXTURE/model, takes the fixture's input frames as they are, encodes and inverts them
with the fixture's inversion prompt and steps, edits with its parameters and keyframe schedule,
and compares every stage against the official numbers.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from tokenflow.editing import edit
from tokenflow.encoding import decode_latents
from tokenflow.errors import SpecError
from tokenflow.features import recorder_for, replayer_for
from tokenflow.inversion import encode_video, frames_from_array, invert
from tokenflow.models import load_model
from tokenflow.progress import NO_HOOKS, JobHooks
from tokenflow.schedule import draw_keyframes
from tokenflow.specs import EditSpec, InversionSpec

TRAJECTORY_THRESHOLD = 1e-3


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_parity(
    fixture_dir: str | Path, device: str = "cpu", hooks: JobHooks = NO_HOOKS, features: bool = False
) -> dict[str, Any]:
    """The parity report. With `features`, the edit is run twice: once recording the source features
    (tokenflow.features), then replaying them (no source branch in propagation); the report is the
    replayed edit's, with how far it is from the recording one."""
    fixture = Path(fixture_dir)
    if not (fixture / "reference.json").is_file():
        raise SpecError(f"{fixture} is not a parity fixture (no reference.json)")
    ref = json.loads((fixture / "reference.json").read_text())
    tensors = load_file(str(fixture / "reference.safetensors"))
    model = load_model(str(fixture / "model"), device=device, dtype="float32")
    inv_cfg, edit_cfg = ref["inversion"], ref["edit"]
    frames = tensors["input_frames"].numpy()
    n = frames.shape[0]
    steps = int(edit_cfg["n_timesteps"])
    interval = int(edit_cfg["batch_size"])
    started = time.perf_counter()

    latents_clean = encode_video(model, iter(frames), batch_size=10)
    inv_spec = InversionSpec(
        prompt=inv_cfg["prompt"], steps=int(inv_cfg["steps"]), edit_steps=steps, reconstruct=False
    )
    inversion = invert(model, frames_from_array(frames), inv_spec, hooks=hooks, latents_clean=latents_clean)

    schedule = (
        [list(map(int, row)) for row in tensors["keyframes"].tolist()]
        if "keyframes" in tensors
        else ref.get("keyframe_schedule")
    )
    spec = EditSpec(
        prompt=edit_cfg["prompt"],
        negative_prompt=edit_cfg["negative_prompt"],
        guidance_scale=float(edit_cfg["guidance_scale"]),
        pnp_attn_t=float(edit_cfg["pnp_attn_t"]),
        pnp_f_t=float(edit_cfg["pnp_f_t"]),
        seed=int(edit_cfg["seed"]),
        keyframe_interval=interval,
        chunk_size=interval,
        keyframe_schedule=tuple(tuple(r) for r in schedule) if schedule else None,
    )
    has_trajectory = "trajectory" in tensors
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tokenflow-parity-features-") as scratch:
        if features:
            rec = recorder_for(scratch, n, steps, spec)
            recorded = edit(model, inversion, spec, hooks=hooks, source_hook=rec)
            stored = rec.finish()
            if stored is None:
                raise SpecError(f"parity: the features were not recorded: {rec.refused}")
            replayer = replayer_for(stored, n, steps, spec)
            result = edit(
                model, inversion, spec, hooks=hooks, keep_trajectory=has_trajectory, source_hook=replayer
            )
            extra = {
                "features_bytes": stored.nbytes,
                "features_vs_source_branch_rel_l2": rel_l2(result.latents, recorded.latents),
            }
        else:
            result = edit(model, inversion, spec, hooks=hooks, keep_trajectory=has_trajectory)
    extra["propagation_batches"] = result.propagation_batches
    edited = decode_latents(model, result.latents)
    elapsed = time.perf_counter() - started

    report: dict[str, Any] = {
        "fixture": str(fixture),
        "frames": n,
        "latents_clean_rel_l2": rel_l2(latents_clean, tensors["latents_clean"]),
        "inversion_rel_l2": None,
        "final_latents_rel_l2": rel_l2(result.latents, tensors["final_latents"]),
        "frames_psnr_db": psnr_uint8(edited, tensors["edited_frames"].numpy()),
        "keyframes_match": schedule is not None and draw_keyframes(n, interval, steps, spec.seed) == schedule,
        "seconds": round(elapsed, 2),
        "features": features,
        **extra,
    }
    if "inversion_latents" in tensors:
        inv_ts = [int(t) for t in tensors["inversion_timesteps"].tolist()]
        if set(inv_ts) <= set(inversion.edit_timesteps):
            ours = [inversion.latents_at(t) for t in inv_ts]
        else:
            ours = _inversion_trajectory(model, latents_clean, inv_spec, inv_ts)
        report["inversion_rel_l2"] = max(
            rel_l2(ours[i], tensors["inversion_latents"][i]) for i in range(len(inv_ts))
        )
    if "x_T" in tensors:
        alpha = _alpha(model, inversion.noisiest_timestep, steps)
        eps = (inversion.noisiest - alpha**0.5 * inversion.latents_clean) / (1 - alpha) ** 0.5
        report["eps_rel_l2"] = rel_l2(eps, tensors["eps"])
    if has_trajectory and result.trajectory is not None:
        ref_traj = tensors["trajectory"]
        errors = [
            rel_l2(result.trajectory[i], ref_traj[i])
            for i in range(min(len(result.trajectory), len(ref_traj)))
        ]
        over = [i for i, e in enumerate(errors) if e > TRAJECTORY_THRESHOLD]
        report["first_step_over"] = over[0] if over else None
        report["trajectory_max_rel_l2"] = max(errors) if errors else None
    for key in ("frames_psnr_db",):
        if math.isinf(report[key]):
            report[key] = 999.0
    return report


def _alpha(model: Any, t: int, steps: int) -> torch.Tensor:
    from tokenflow.schedule import make_scheduler

    return make_scheduler(model, steps).alphas_cumprod[t]


def _inversion_trajectory(
    model: Any, latents_clean: torch.Tensor, spec: InversionSpec, timesteps: list[int]
) -> list[torch.Tensor]:
    """Our inverted latents at each of the fixture's inversion timesteps (re-inverting with S = T)."""
    keep = InversionSpec(
        prompt=spec.prompt,
        steps=spec.steps,
        edit_steps=spec.steps,
        reconstruct=False,
        batch_size=spec.batch_size,
    )
    inv = invert(model, lambda: iter(()), keep, latents_clean=latents_clean)
    return [inv.latents_at(t) for t in timesteps]
