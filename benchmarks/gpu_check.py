"""One command for a machine with a CUDA GPU: is the method right and fast there? Needs no weights.

    .venv/bin/python benchmarks/gpu_check.py            # on a CUDA machine: one JSON on stdout
    .venv/bin/python benchmarks/gpu_check.py --smoke    # the same code path on CPU, tiny sizes (tests)

What it checks (each part's figures go into the JSON; `ok` is the conjunction of the checks):

1. CPU-vs-GPU agreement on the ``tiny`` preset in float32: the same inversion and edit on both
   devices. Tolerance: relative L2 of the final latents <= 1e-3 (the parity bound against the official
   code; different kernels and summation orders stay far below it) and the decoded frames >= 40 dB.
2. The ``sd15-arch`` and ``sd21-arch`` presets (full-size architectures with random weights) at
   512x512 in float16 on 40 and 240 generated frames, a few steps: seconds per step of the inversion,
   the keyframe pass and the propagation, peak CUDA memory, and that no decoded frame is NaN or
   infinite (the fp16 VAE decode included).
3. ``keyframe_attention=window:W`` at 240 frames on each preset, timed the same way.

Budget: well under 8 minutes on one H100-class GPU with the defaults (2 steps); `--steps` raises it.
Random weights make the pictures noise, but the compute, memory and numerics are the real ones.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenflow.editing import edit  # noqa: E402
from tokenflow.encoding import decode_latents  # noqa: E402
from tokenflow.errors import ModelError  # noqa: E402
from tokenflow.inversion import invert  # noqa: E402
from tokenflow.models import Model, load_model  # noqa: E402
from tokenflow.progress import JobHooks, ProgressEvent  # noqa: E402
from tokenflow.specs import EditSpec, InversionSpec  # noqa: E402
from tokenflow.synthetic import clip_frames  # noqa: E402

AGREEMENT_REL_L2 = 1e-3
AGREEMENT_PSNR_DB = 40.0


def _frames(n: int, size: tuple[int, int]):  # noqa: ANN202 - a FrameSource
    return lambda: clip_frames(frames=n, size=size, seed=1)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 999.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _decoded_batches(model: Model, latents: torch.Tensor, batch: int = 8) -> Iterator[np.ndarray | None]:
    """Decoded uint8 batches, or None for a batch with a non-finite pixel (decode_latents refuses those)."""
    for b in range(0, latents.shape[0], batch):
        try:
            yield decode_latents(model, latents[b : b + batch])
        except ModelError:
            yield None


def _timed_hooks() -> tuple[JobHooks, dict[str, list[float]]]:
    """Hooks recording the wall time of each completed step per stage."""
    marks: dict[str, list[float]] = {}

    def sink(event: ProgressEvent) -> None:
        step_done = event.total and event.frames_done == event.frames_total
        if step_done or event.stage == "encode":
            marks.setdefault(event.stage, []).append(time.perf_counter())

    return JobHooks(progress=sink), marks


def _per_step(marks: list[float], started: float) -> float | None:
    if not marks:
        return None
    return round((marks[-1] - started) / len(marks), 4)


def agreement(device: str, size: int, frames: int, steps: int) -> dict[str, Any]:
    """The tiny preset in float32 on CPU and on `device`: same inversion and edit, compared."""
    spec_inv = InversionSpec(steps=steps, edit_steps=steps, reconstruct=False)
    spec = EditSpec(prompt="a red fox", keyframe_interval=4, seed=3)
    out: dict[str, Any] = {}
    results = {}
    for dev in dict.fromkeys(("cpu", device)):  # once when the device is the CPU (--smoke)
        model = load_model("tiny", device=dev, dtype="float32")
        inv = invert(model, _frames(frames, (size, size)), spec_inv)
        latents = edit(model, inv, spec).latents
        results[dev] = (latents, decode_latents(model, latents))
    (cpu_lat, cpu_frames), (dev_lat, dev_frames) = results["cpu"], results[device]
    out["final_latents_rel_l2"] = _rel_l2(dev_lat, cpu_lat)
    out["frames_psnr_db"] = round(_psnr(dev_frames, cpu_frames), 2)
    out["tolerance"] = {"final_latents_rel_l2": AGREEMENT_REL_L2, "frames_psnr_db": AGREEMENT_PSNR_DB}
    out["ok"] = out["final_latents_rel_l2"] <= AGREEMENT_REL_L2 and out["frames_psnr_db"] >= AGREEMENT_PSNR_DB
    return out


def run_case(
    model: Model, frames: int, size: int, steps: int, attention: str, interval: int
) -> dict[str, Any]:
    """Invert and edit `frames` generated frames; seconds per step of each pass, peak memory, NaN check."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(model.device)
    hooks, marks = _timed_hooks()
    started = time.perf_counter()
    inv = invert(
        model, _frames(frames, (size, size)), InversionSpec(steps=steps, edit_steps=steps, reconstruct=False),
        hooks=hooks,
    )  # fmt: skip
    encode_done = marks.get("encode", [started])[-1]
    invert_s = _per_step(marks.get("invert", []), encode_done)
    spec = EditSpec(prompt="a marble sculpture", keyframe_interval=interval, keyframe_attention=attention)
    result = edit(model, inv, spec)
    n_steps = len(result.keyframes) or steps
    decoded_started = time.perf_counter()
    bad_frames = 0
    for batch, b in zip(_decoded_batches(model, result.latents), range(0, frames, 8), strict=True):
        bad_frames += min(8, frames - b) if batch is None else 0
    decode_s = time.perf_counter() - decoded_started
    finite_latents = bool(torch.isfinite(result.latents).all())
    case: dict[str, Any] = {
        "frames": frames,
        "keyframes": frames // interval + (1 if frames % interval else 0),
        "keyframe_attention": attention,
        "steps": steps,
        "seconds_per_step": {
            "inversion": invert_s,
            "keyframe_pass": round(result.seconds["keyframes"] / n_steps, 4),
            "propagation": round(result.seconds["propagation"] / n_steps, 4),
        },
        "decode_seconds": round(decode_s, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "nan_frames": bad_frames,
        "finite_latents": finite_latents,
        "warnings": result.warnings,
    }
    if cuda:
        case["peak_cuda_memory_mib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**20, 1)
    case["ok"] = bad_frames == 0 and finite_latents
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset and sizes: the code path only")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument(
        "--steps", type=int, default=None, help="inversion and edit steps (2; 1 with --smoke)"
    )
    parser.add_argument("--window", type=int, default=None, help="W of the window:W run (2; 1 with --smoke)")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device; run with --smoke for the CPU code path"}))
        return 2
    steps = args.steps or (1 if args.smoke else 2)
    window = args.window or (1 if args.smoke else 2)  # smoke: 3 keyframes, so W=1 is a real window
    if args.smoke:
        presets, dtype, size, lengths, interval = ("tiny",), "float32", 32, (5, 9), 4
        agree = {"frames": 3, "size": 32}
    else:
        presets, dtype, size, lengths, interval = ("sd15-arch", "sd21-arch"), "float16", 512, (40, 240), 8
        agree = {"frames": 8, "size": 64}
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "size": [size, size],
        "dtype": dtype,
    }
    report["agreement"] = agreement(device, agree["size"], agree["frames"], steps)
    report["presets"] = {}
    for name in presets:
        model = load_model(name, device=device, dtype=dtype)
        cases = [run_case(model, n, size, steps, "all", interval) for n in lengths]
        cases.append(run_case(model, lengths[-1], size, steps, f"window:{window}", interval))
        report["presets"][name] = cases
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = report["agreement"]["ok"] and all(c["ok"] for cs in report["presets"].values() for c in cs)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
