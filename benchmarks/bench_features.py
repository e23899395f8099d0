#!/usr/bin/env python
"""What the source-features cache saves: a warm re-edit with features against one without, side by side.

    python benchmarks/bench_features.py [--frames 16 --size 128x128 --steps 50 --inversion-steps 50]
                                        [--json FILE]

One process, the tiny preset on CPU, one generated clip, one inversion (not timed). Measured:

  * library: a warm re-edit of the saved inversion without features (the source branch runs in every
    propagation batch) and with the features an earlier edit recorded (propagation holds only the
    uncond/cond branches), in the order plain, features, plain, features so that a drift of the machine's
    load hits both alike; the ratio of the medians. The floor is (2 + 3K/N) / (3 + 3K/N) UNet branches
    (about 0.70 at one keyframe per 8 frames) plus what the nearest-neighbour search cost;
  * the same ratio through an embedded server (every service on loopback): a first prompt records the
    features, then prompt B with features and prompt C with features=false (`--no-features`);
  * the features' bytes per frame per step, as stored (index part and conv part);
  * the same bytes computed for the SD 1.5 and SD 2.1 architectures at 512x512, 40 and 240 frames, 50 steps
    (conv injection on 40 of them, fp16), from the UNet configs by the rule the tiny figure is checked
    against, with the expected compute saving there.

Prints the machine (with its load), each measurement and one JSON object (also to --json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench_overhead import log, machine, timed  # noqa: E402  (benchmarks/ is the script's folder)

from clients import TokenFlowClient, decode_spec, edit_spec, inversion_spec  # noqa: E402
from tokenflow.threads import release_openmp_team  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def attention_tokens(unet_config: dict[str, Any], latent_hw: tuple[int, int]) -> list[int]:
    """Tokens of every self-attention (attn1) of a UNet2DConditionModel at this latent size."""
    levels = len(unet_config["block_out_channels"])
    per_block = unet_config["layers_per_block"]
    h, w = latent_hw

    def at(level: int) -> int:
        return -(-h // 2**level) * -(-w // 2**level)

    tokens = []
    for i, kind in enumerate(unet_config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            tokens += [at(i)] * per_block
    tokens.append(at(levels - 1))  # the mid block
    for j, kind in enumerate(unet_config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            tokens += [at(levels - 1 - j)] * (per_block + 1)
    return tokens


def computed_bytes(
    unet_config: dict[str, Any],
    latent_hw: tuple[int, int],
    frames: int,
    steps: int,
    conv_steps: int,
    conv_itemsize: int,
) -> dict[str, int]:
    """Bytes of a features artifact (data, headers aside): int16/int32 indices to two keyframes per
    token of every attn1, and the conv feature of up_blocks[1].resnets[1] on the injecting steps."""
    import torch

    from tokenflow.features import index_dtype

    nn = sum(
        2 * t * torch.tensor([], dtype=index_dtype(t)).element_size()
        for t in attention_tokens(unet_config, latent_hw)
    )
    levels = len(unet_config["block_out_channels"])
    channels = list(reversed(unet_config["block_out_channels"]))[1]
    h, w = latent_hw
    conv = channels * -(-h // 2 ** (levels - 2)) * -(-w // 2 ** (levels - 2)) * conv_itemsize
    return {
        "index_bytes_per_frame_step": nn,
        "conv_bytes_per_frame_step": conv,
        "total_bytes": frames * (steps * nn + conv_steps * conv),
    }


def architectures() -> dict[str, dict[str, Any]]:
    """The UNet configs of the presets (tokenflow.models), without building the models."""
    base = {
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }
    return {
        "tiny": {**base, "block_out_channels": (32, 64, 64, 64)},
        "sd15": {**base, "block_out_channels": (320, 640, 1280, 1280)},
        "sd21": {**base, "block_out_channels": (320, 640, 1280, 1280)},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from services.config import ServerConfig
    from services.convert import decode_spec_from_proto, edit_spec_from_proto, inversion_spec_from_proto
    from services.server import build_server
    from tokenflow.editing import edit
    from tokenflow.features import Features, recorder_for, replayer_for
    from tokenflow.inversion import Inversion
    from tokenflow.keys import features_steps
    from tokenflow.models import load_model
    from tokenflow.pipeline import invert_video
    from tokenflow.synthetic import make_clip

    report: dict[str, Any] = {
        "machine": {**machine(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")},
        "settings": {
            "model": "tiny",
            "frames": args.frames,
            "size": f"{args.size[0]}x{args.size[1]}",
            "steps": args.steps,
            "inversion_steps": args.inversion_steps,
        },
    }
    log(f"machine: {report['machine']}")
    decode = decode_spec(size=args.size)
    inversion = inversion_spec(steps=args.inversion_steps, edit_steps=args.steps, reconstruct=False)
    specs = [edit_spec(p, seed=1) for p in ("a watercolor painting", "a marble sculpture", "a bronze statue")]
    lib = [edit_spec_from_proto(s) for s in specs]

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        work = Path(tmp)
        clip = make_clip(work / "clip.mp4", frames=args.frames, size=args.size, fps=12, audio=False)

        # ---- library
        model = load_model("tiny", device="cpu", dtype="float32")
        log("inverting (not timed)")
        invert_video(
            model,
            clip,
            decode_spec_from_proto(decode),
            inversion_spec_from_proto(inversion),
            directory=work / "inversion",
        )
        inv = Inversion.load(work / "inversion")
        n, steps = inv.n_frames, len(inv.edit_timesteps)
        rec = recorder_for(work / "features", n, steps, lib[0])
        seconds_record, _ = timed(lambda: edit(model, inv, lib[0], source_hook=rec))
        features = rec.finish()
        assert features is not None, rec.refused
        log(f"recording edit {seconds_record:.1f} s, features {features.nbytes:,} bytes")
        plain: list[float] = []
        cached: list[float] = []
        for r in range(args.rounds):
            t, out_plain = timed(lambda: edit(model, inv, lib[1]))
            plain.append(t)
            log(f"round {r}: warm re-edit without features {t:.1f} s (load {os.getloadavg()[0]:.2f})")
            replayer = replayer_for(Features.load(work / "features"), n, steps, lib[1])
            t, out_cached = timed(lambda replayer=replayer: edit(model, inv, lib[1], source_hook=replayer))
            cached.append(t)
            log(f"round {r}: warm re-edit with features    {t:.1f} s (load {os.getloadavg()[0]:.2f})")
        err = float((out_cached.latents - out_plain.latents).norm() / out_plain.latents.norm())
        step_list, conv_list = features_steps(lib[0], steps)
        meta = features.meta
        index_per = sum(
            2 * seq * (2 if dt == "I16" else 4)
            for seq, dt in zip(meta["layers"].values(), meta["index_dtypes"].values(), strict=True)
        )
        conv_per = (
            int(torch.Size(meta["conv"]["shape"]).numel()) * 4 if meta.get("conv") else 0
        )  # fp32 on CPU
        report["library"] = {
            "recording_edit_seconds": round(seconds_record, 2),
            "warm_without_features_seconds": [round(v, 2) for v in plain],
            "warm_with_features_seconds": [round(v, 2) for v in cached],
            "ratio_with_over_without": round(statistics.median(cached) / statistics.median(plain), 3),
            "ratios_per_round": [round(c / p, 3) for c, p in zip(cached, plain, strict=True)],
            "final_latents_rel_l2": err,
            "features_bytes": features.nbytes,
            "bytes_per_frame_per_step": round(features.nbytes / (n * len(step_list)), 1),
            "index_bytes_per_frame_step": index_per,
            "conv_bytes_per_frame_conv_step": conv_per,
            "conv_steps": len(conv_list),
        }
        tiny_rule = computed_bytes(
            architectures()["tiny"], tuple(inv.latent_shape[-2:]), n, len(step_list), len(conv_list), 4
        )
        report["library"]["computed_by_rule_bytes"] = tiny_rule["total_bytes"]

        # ---- the embedded server (the main thread hands its OpenMP team back first: see bench_overhead)
        release_openmp_team()
        config = ServerConfig(
            services="all", host="127.0.0.1", port=0, metrics_port=None,
            cache_dir=work / "cache", cache_size_bytes=20 << 30, model="tiny", job_grace_seconds=30,
        )  # fmt: skip
        server = build_server(config)
        try:
            with TokenFlowClient(f"127.0.0.1:{server.port}", timeout=3600) as client:
                deadline = time.monotonic() + 120
                while client.health() != "SERVING" and time.monotonic() < deadline:
                    time.sleep(0.2)
                video = client.upload(clip)
                t_first, (first,) = timed(
                    lambda: client.edit(video, specs[0], decode=decode, inversion=inversion, timeout=3600)
                )
                path = first.propagation.propagation_path
                log(f"server: cold edit (invert + record) {t_first:.1f} s ({path})")
                t_b, (b,) = timed(lambda: client.edit(video, specs[1], decode=decode, inversion=inversion))
                log(f"server: warm edit with features {t_b:.1f} s ({b.propagation.propagation_path})")
                no_features = edit_spec("a bronze statue", seed=1)
                no_features.features = False
                t_c, (c,) = timed(lambda: client.edit(video, no_features, decode=decode, inversion=inversion))
                log(f"server: warm edit without features {t_c:.1f} s ({c.propagation.propagation_path})")
        finally:
            server.stop(grace=0)
        report["server"] = {
            "cold_edit_seconds": round(t_first, 2),
            "warm_with_features_seconds": round(t_b, 2),
            "warm_without_features_seconds": round(t_c, 2),
            "ratio_with_over_without": round(t_b / t_c, 3),
            "paths": [first.propagation.propagation_path, b.propagation.propagation_path,
                      c.propagation.propagation_path],
        }  # fmt: skip

    # ---- full-size architectures, computed
    k_over_n = 1 / 8
    saving = (2 + 3 * k_over_n) / (3 + 3 * k_over_n)
    full: dict[str, Any] = {}
    for name in ("sd15", "sd21"):
        for frames in (40, 240):
            full[f"{name}_512x512_{frames}f"] = computed_bytes(
                architectures()[name], (64, 64), frames, 50, 40, 2
            )
    report["full_size"] = {
        "assumptions": "512x512 (64x64 latents), 50 steps, conv injection on 40 (pnp_f_t 0.8), fp16 conv "
        "features, int16 indices, one keyframe per 8 frames",
        "bytes": full,
        "expected_unet_work_with_features_over_without": round(saving, 3),
    }
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=_size, default=(128, 128))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inversion-steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
