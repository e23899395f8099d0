#!/usr/bin/env python
"""Library benchmarks: speed, consistency and memory of TokenFlow, measured in ONE run on this machine.

Prints the machine, then:

1. cold edit (encode + invert + save + edit + decode + write) vs warm edit from the saved inversion;
2. TokenFlow edit time vs the per-frame PnP baseline (same inversion, model, seed, prompt);
3. TokenFlow warp error vs the per-frame baseline's (flow of the source frames, tokenflow.eval.warp_error);
4. the parity fixture's configuration (16 frames at 128x128, 50 inversion + 50 edit steps, on the fixture's
   frames and model when ../shared exists, else a generated clip and the tiny preset): cold end-to-end time
   (encode + invert + edit + decode) and peak RSS (VmHWM) in a fresh process, against the official code's
   figures on this machine type (48.6 s: preprocess 21.3 s, about half of it a reconstruction pass the edit
   does not need, and edit 27.3 s);
5. peak RSS of the whole file pipeline (invert_video + render_edit, streaming decode and encode) at 16 vs
   120 frames, each in a fresh process.

Ends with a human-readable table and one JSON blob. Usage:

    python benchmarks/bench_library.py            # the full run (about 4 minutes on 2 CPU cores)
    python benchmarks/bench_library.py --quick    # small sizes and few steps (under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenflow.editing import edit
from tokenflow.encoding import decode_latents, iter_decoded
from tokenflow.eval import warp_error
from tokenflow.inversion import Inversion, encode_video, frames_from_array, invert
from tokenflow.models import load_model
from tokenflow.pipeline import invert_video, render_edit
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec
from tokenflow.synthetic import clip_frames, make_clip
from tokenflow.video import read_frames

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "wolf16"
OFFICIAL = {
    "wall_s": 48.6,
    "preprocess_s": 21.3,
    "edit_s": 27.3,
}  # official code, config (4), this machine type
PROMPT = "a red fox running in the snow"
INVERSION_PROMPT = "a wolf running in the snow"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's RSS high-water mark.

    On Linux this is VmHWM of /proc/self/status, not getrusage's ru_maxrss: the kernel carries the
    *parent's* high-water mark over into ru_maxrss when a forked child calls exec (measured here: a child
    of a 600 MB parent reports ru_maxrss 611 MB and VmHWM 11 MB), so ru_maxrss in a fresh subprocess
    would report the benchmark parent's peak instead of the measurement's. Elsewhere: ru_maxrss (KiB on
    Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def machine() -> dict[str, Any]:
    import diffusers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- child processes


def child_fixture(opts: dict[str, Any]) -> dict[str, Any]:
    """Config (4): encode + invert + edit + decode of 16 frames at 128x128, timed stage by stage."""
    steps, inv_steps = int(opts["steps"]), int(opts["inversion_steps"])
    use_fixture = bool(opts["use_fixture"])
    started = time.perf_counter()
    model = load_model(str(FIXTURE / "model") if use_fixture else "tiny", device="cpu", dtype="float32")
    if use_fixture:
        from safetensors.torch import load_file

        ref = json.loads((FIXTURE / "reference.json").read_text())
        frames = load_file(str(FIXTURE / "reference.safetensors"))["input_frames"].numpy()
        inv_prompt, prompt = ref["inversion"]["prompt"], ref["edit"]["prompt"]
        negative, seed = ref["edit"]["negative_prompt"], int(ref["edit"]["seed"])
    else:
        frames = np.stack(list(clip_frames(16, (128, 128))))
        inv_prompt, prompt, negative, seed = INVERSION_PROMPT, PROMPT, EditSpec(prompt="x").negative_prompt, 1
    load_s = time.perf_counter() - started
    base = rss_mb()
    t0 = time.perf_counter()
    latents = encode_video(model, iter(frames))
    t1 = time.perf_counter()
    spec = InversionSpec(prompt=inv_prompt, steps=inv_steps, edit_steps=steps, reconstruct=False)
    inversion = invert(model, frames_from_array(frames), spec, latents_clean=latents)
    t2 = time.perf_counter()
    result = edit(model, inversion, EditSpec(prompt=prompt, negative_prompt=negative, seed=seed))
    t3 = time.perf_counter()
    decoded = sum(1 for _ in iter_decoded(model, result.latents))
    t4 = time.perf_counter()
    return {
        "source": "parity fixture frames + model" if use_fixture else "generated clip + tiny preset",
        "frames": int(frames.shape[0]),
        "size": list(frames.shape[1:3]),
        "decoded": decoded,
        "steps": steps,
        "inversion_steps": inv_steps,
        "model_load_s": load_s,
        "encode_s": t1 - t0,
        "invert_s": t2 - t1,
        "edit_s": t3 - t2,
        "decode_s": t4 - t3,
        "wall_s": t4 - t0,
        "rss_before_mb": base,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_pipeline(opts: dict[str, Any]) -> dict[str, Any]:
    """Config (5): the file pipeline on a generated clip of N frames, in this fresh process."""
    n, size, steps = int(opts["frames"]), int(opts["size"]), int(opts["steps"])
    with tempfile.TemporaryDirectory(prefix="tokenflow-bench-") as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", frames=n, size=(size, size), fps=12, audio=True)
        model = load_model("tiny", device="cpu", dtype="float32")
        base = rss_mb()
        t0 = time.perf_counter()
        inversion = invert_video(
            model,
            clip,
            DecodeSpec.sized((size, size)),
            InversionSpec(prompt=INVERSION_PROMPT, steps=steps, edit_steps=steps, reconstruct=False),
        )
        out = render_edit(
            model, inversion, EditSpec(prompt=PROMPT, seed=0), Path(tmp) / "out.mp4", audio_source=clip
        )
        wall = time.perf_counter() - t0
    return {
        "frames": n,
        "written": out.frames,
        "size": size,
        "steps": steps,
        "wall_s": wall,
        "rss_before_mb": base,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_child(kind: str, **opts: Any) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(opts)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} {opts} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the in-process measurements


@dataclass
class Config:
    frames: int
    size: int
    steps: int
    inversion_steps: int
    fixture_steps: int
    peak_frames: tuple[int, int]
    peak_size: int
    peak_steps: int


FULL = Config(
    frames=24,
    size=128,
    steps=50,
    inversion_steps=50,
    fixture_steps=50,
    peak_frames=(16, 120),
    peak_size=128,
    peak_steps=5,
)
QUICK = Config(
    frames=16,
    size=64,
    steps=5,
    inversion_steps=5,
    fixture_steps=5,
    peak_frames=(16, 48),
    peak_size=64,
    peak_steps=2,
)


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def bench_edits(cfg: Config, tmp: Path, model_name: str, device: str) -> dict[str, Any]:
    """(1) cold vs warm, (2) TokenFlow vs per-frame time, (3) warp errors, on one generated clip."""
    dtype = "float32" if device == "cpu" else None
    model, load_s = timed(lambda: load_model(model_name, device=device, dtype=dtype))
    clip = make_clip(tmp / "clip.mp4", frames=cfg.frames, size=(cfg.size, cfg.size), fps=12, audio=True)
    decode = DecodeSpec.sized((cfg.size, cfg.size))
    inv_spec = InversionSpec(
        prompt=INVERSION_PROMPT, steps=cfg.inversion_steps, edit_steps=cfg.steps, reconstruct=False
    )
    tokenflow_spec = EditSpec(prompt=PROMPT, seed=0)
    per_frame_spec = EditSpec(prompt=PROMPT, seed=0, method="per-frame")

    log(f"(1) cold edit: {cfg.frames} frames {cfg.size}x{cfg.size}, {cfg.inversion_steps}/{cfg.steps} steps")
    t0 = time.perf_counter()
    inversion = invert_video(model, clip, decode, inv_spec)
    inversion.save(tmp / "inversion")
    invert_s = time.perf_counter() - t0
    cold, cold_edit_s = timed(
        lambda: render_edit(model, inversion, tokenflow_spec, tmp / "cold.mp4", audio_source=clip)
    )
    cold_s = invert_s + cold_edit_s

    log("(1) warm edit from the saved inversion")
    t0 = time.perf_counter()
    saved = Inversion.load(tmp / "inversion")
    warm = render_edit(model, saved, tokenflow_spec, tmp / "warm.mp4", audio_source=clip)
    warm_s = time.perf_counter() - t0

    log("(2) per-frame PnP baseline from the saved inversion")
    t0 = time.perf_counter()
    per_frame = render_edit(
        model, Inversion.load(tmp / "inversion"), per_frame_spec, tmp / "per_frame.mp4", audio_source=clip
    )
    per_frame_s = time.perf_counter() - t0

    log("(3) warp errors (Farneback flow of the source frames)")
    source, _ = read_frames(clip, decode)
    tokenflow_frames = decode_latents(model, warm.result.latents)
    per_frame_frames = decode_latents(model, per_frame.result.latents)
    warp = {
        "tokenflow": warp_error(source, tokenflow_frames),
        "per_frame": warp_error(source, per_frame_frames),
        "source_floor": warp_error(source, source),
        "vae_round_trip": warp_error(source, decode_latents(model, saved.latents_clean)),
    }
    return {
        "config": {
            "frames": cfg.frames,
            "size": cfg.size,
            "inversion_steps": cfg.inversion_steps,
            "steps": cfg.steps,
            "model": model_name,
            "prompt": PROMPT,
            "seed": 0,
        },
        "model_load_s": load_s,
        "cold_s": cold_s,
        "cold_invert_s": invert_s,
        "cold_edit_s": cold_edit_s,
        "warm_s": warm_s,
        "cold_over_warm": cold_s / warm_s,
        "warm_equals_cold": bool(torch.equal(cold.result.latents, warm.result.latents)),
        "tokenflow_edit_s": warm_s,
        "per_frame_edit_s": per_frame_s,
        "tokenflow_over_per_frame_time": warm_s / per_frame_s,
        "warp_error": warp,
        "tokenflow_over_per_frame_warp": warp["tokenflow"] / warp["per_frame"],
        "frames_written": [cold.frames, warm.frames, per_frame.frames],
        "fps": float(Fraction(cold.fps)),
    }


def table(report: dict[str, Any]) -> str:
    e, f, p = report["edits"], report["fixture_config"], report["peak_memory"]
    w = e["warp_error"]
    rows = [
        (
            "machine",
            f"{report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, "
            f"torch {report['machine']['torch']} x{report['machine']['torch_threads']} threads",
        ),
        (
            "(1) clip",
            f"{e['config']['frames']} frames {e['config']['size']}x{e['config']['size']}, "
            f"{e['config']['inversion_steps']} inversion / {e['config']['steps']} edit steps, "
            f"model {e['config']['model']}",
        ),
        (
            "(1) cold edit",
            f"{e['cold_s']:.1f} s (invert {e['cold_invert_s']:.1f} s + edit {e['cold_edit_s']:.1f} s)",
        ),
        (
            "(1) warm edit",
            f"{e['warm_s']:.1f} s  -> cold/warm = {e['cold_over_warm']:.2f}x"
            f"{' (same latents)' if e['warm_equals_cold'] else ' (LATENTS DIFFER)'}",
        ),
        (
            "(2) TokenFlow / per-frame",
            f"{e['tokenflow_edit_s']:.1f} s / {e['per_frame_edit_s']:.1f} s = "
            f"{e['tokenflow_over_per_frame_time']:.2f}x",
        ),
        (
            "(3) warp error",
            f"TokenFlow {w['tokenflow']:.5f} / per-frame {w['per_frame']:.5f} = "
            f"{e['tokenflow_over_per_frame_warp']:.3f}x (source {w['source_floor']:.5f}, "
            f"VAE round trip {w['vae_round_trip']:.5f})",
        ),
        (
            "(4) fixture config",
            f"{f['frames']} frames {f['size'][0]}x{f['size'][1]}, {f['inversion_steps']}/"
            f"{f['steps']} steps, {f['source']}",
        ),
        (
            "(4) cold end-to-end",
            f"{f['wall_s']:.1f} s (encode {f['encode_s']:.1f}, invert {f['invert_s']:.1f}, "
            f"edit {f['edit_s']:.1f}, decode {f['decode_s']:.1f}); model load {f['model_load_s']:.1f} s",
        ),
        (
            "(4) official code",
            f"{OFFICIAL['wall_s']} s (preprocess {OFFICIAL['preprocess_s']}, edit "
            f"{OFFICIAL['edit_s']}) -> official/ours = {report['official_over_ours']:.2f}x"
            + (
                ""
                if f["steps"] == f["inversion_steps"] == 50
                else f" (NOT comparable: {f['steps']} steps, not 50)"
            ),
        ),
        ("(4) peak RSS", f"{f['peak_rss_mb']:.0f} MB (process after loading: {f['rss_before_mb']:.0f} MB)"),
    ]
    for r in p["runs"]:
        rows.append(
            (
                f"(5) {r['frames']} frames",
                f"peak RSS {r['peak_rss_mb']:.0f} MB (after loading "
                f"{r['rss_before_mb']:.0f} MB), {r['wall_s']:.1f} s",
            )
        )
    rows.append(
        (
            "(5) peak ratio",
            f"{p['peak_ratio']:.3f}x peak, {p['growth_ratio']:.2f}x growth over the "
            f"loaded process, for {p['frames_ratio']:.1f}x the frames",
        )
    )
    ratio = e["tokenflow_over_per_frame_warp"]
    verdict = "clearly lower" if ratio < 0.9 else "NOT clearly lower" if ratio < 1 else "NOT lower"
    rows.insert(
        6,
        ("(3) verdict", f"TokenFlow's warp error is {verdict} than per-frame's ({(ratio - 1) * 100:+.1f}%)"),
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (a smoke run)")
    parser.add_argument("--frames", type=int, help="frames of the clip for (1)-(3)")
    parser.add_argument("--size", type=int, help="square size of the clip for (1)-(3)")
    parser.add_argument("--steps", type=int, help="editing steps for (1)-(3)")
    parser.add_argument("--inversion-steps", type=int, help="inversion steps for (1)-(3)")
    parser.add_argument(
        "--fixture-steps", type=int, help="inversion and editing steps for (4) (50 = the official)"
    )
    parser.add_argument("--peak-frames", type=str, help="two frame counts for (5), e.g. 16,120")
    parser.add_argument("--no-fixture", action="store_true", help="ignore ../shared even when present")
    parser.add_argument(
        "--model", default="tiny", help="model for (1)-(3): a preset or a local diffusers folder"
    )
    parser.add_argument("--device", default="cpu", help="device for (1)-(3)")
    parser.add_argument("--json", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "OPTIONS"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        kind, opts = a.child[0], json.loads(a.child[1])
        result = child_fixture(opts) if kind == "fixture" else child_pipeline(opts)
        print(json.dumps(result))
        return 0

    base = QUICK if a.quick else FULL
    cfg = Config(
        frames=a.frames or base.frames,
        size=a.size or base.size,
        steps=a.steps or base.steps,
        inversion_steps=a.inversion_steps or a.steps or base.inversion_steps,
        fixture_steps=a.fixture_steps or base.fixture_steps,
        peak_frames=tuple(int(x) for x in a.peak_frames.split(",")) if a.peak_frames else base.peak_frames,  # type: ignore[arg-type]
        peak_size=base.peak_size,
        peak_steps=base.peak_steps,
    )
    report: dict[str, Any] = {"machine": machine(), "quick": a.quick}
    print("machine: " + json.dumps(report["machine"]), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenflow-bench-") as tmp:
        report["edits"] = bench_edits(cfg, Path(tmp), a.model, a.device)

    use_fixture = (FIXTURE / "reference.json").is_file() and not a.no_fixture
    log(f"(4) fixture configuration, {cfg.fixture_steps}/{cfg.fixture_steps} steps, fresh process")
    report["fixture_config"] = run_child(
        "fixture", steps=cfg.fixture_steps, inversion_steps=cfg.fixture_steps, use_fixture=use_fixture
    )
    report["official"] = OFFICIAL
    report["official_over_ours"] = OFFICIAL["wall_s"] / report["fixture_config"]["wall_s"]

    runs = []
    for n in cfg.peak_frames:
        log(f"(5) pipeline peak memory at {n} frames {cfg.peak_size}x{cfg.peak_size}, fresh process")
        runs.append(run_child("pipeline", frames=n, size=cfg.peak_size, steps=cfg.peak_steps))
    small, large = runs
    report["peak_memory"] = {
        "runs": runs,
        "frames_ratio": large["frames"] / small["frames"],
        "peak_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
        "growth_ratio": (large["peak_rss_mb"] - large["rss_before_mb"])
        / max(1e-9, small["peak_rss_mb"] - small["rss_before_mb"]),
    }
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = time.perf_counter() - started
    print()
    print(table(report))
    print()
    print(json.dumps(report, indent=1, default=float))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
