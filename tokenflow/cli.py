"""The `tokenflow` command: edit, invert, eval, parity, make-clip, and serve (the gRPC services)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenflow.errors import SpecError, TokenFlowError
from tokenflow.progress import JobHooks, ProgressEvent
from tokenflow.specs import DEFAULT_NEGATIVE_PROMPT, METHODS, DecodeSpec, EditSpec, InversionSpec

DEFAULT_STEPS = 50


class ProgressBars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(event.stage)
        if bar is None:
            bar = self._bars[event.stage] = tqdm(
                total=event.total or None,
                desc=event.stage,
                unit="step",
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )
        bar.n = event.step
        bar.refresh()
        if event.total and event.step >= event.total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return w, h


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="tiny", help="'tiny', 'sd15-arch', 'sd21-arch' or a local diffusers folder"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16"
    )


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", type=int, default=0, help="first frame to use")
    p.add_argument("--frames", type=int, default=None, help="number of frames to use (default: all)")
    p.add_argument("--stride", type=int, default=1, help="use every STRIDE-th frame")
    p.add_argument("--size", type=_size, default=None, help="exact WxH (default: aspect kept, ~512x512 area)")
    p.add_argument("--area", type=int, default=512 * 512, help="target pixel area when --size is not given")


def _add_inversion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="editing (denoising) steps T (default 50)")
    p.add_argument(
        "--inversion-steps", type=int, default=None, help="DDIM inversion steps S, a multiple of T"
    )
    p.add_argument("--inversion-prompt", default="", help="prompt used for inversion (empty or a caption)")


def _add_edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", "-p", required=True, help="target prompt")
    p.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT)
    p.add_argument("--method", choices=METHODS, default="tokenflow")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pnp-attn-t", type=float, default=0.5)
    p.add_argument("--pnp-f-t", type=float, default=0.8)
    p.add_argument("--keyframe-interval", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=8, help="frames per UNet batch in propagation (memory)")
    p.add_argument("--sdedit-start", type=float, default=0.9)
    p.add_argument("--weighting", choices=("sigmoid", "linear"), default="sigmoid")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (0 lossless .. 51)")


def _decode_spec(a: argparse.Namespace) -> DecodeSpec:
    return DecodeSpec(
        start=a.start, max_frames=a.frames, stride=a.stride, size=a.size, target_area=a.area
    ).validate()


def _inversion_spec(a: argparse.Namespace, reconstruct: bool) -> InversionSpec:
    return InversionSpec(
        prompt=a.inversion_prompt,
        steps=a.inversion_steps or a.steps or DEFAULT_STEPS,
        edit_steps=a.steps or DEFAULT_STEPS,
        reconstruct=reconstruct,
    ).validate()


def _edit_spec(a: argparse.Namespace) -> EditSpec:
    return EditSpec(
        prompt=a.prompt,
        negative_prompt=a.negative_prompt,
        guidance_scale=a.guidance,
        pnp_attn_t=a.pnp_attn_t,
        pnp_f_t=a.pnp_f_t,
        seed=a.seed,
        keyframe_interval=a.keyframe_interval,
        chunk_size=a.chunk_size,
        method=a.method,
        sdedit_start=a.sdedit_start,
        propagation_weighting=a.weighting,
        crf=a.crf,
    ).validate()


def _load_model(a: argparse.Namespace) -> Any:
    from tokenflow.models import load_model

    model = load_model(a.model, device=a.device, dtype=a.dtype)
    if model.is_test_model:
        print(
            f"note: model {a.model!r} is a test model with random weights; its pictures are noise",
            file=sys.stderr,
        )
    return model


def cmd_edit(a: argparse.Namespace) -> dict[str, Any]:
    from tokenflow.inversion import Inversion
    from tokenflow.pipeline import invert_video, render_edit
    from tokenflow.synthetic import make_clip

    spec = _edit_spec(a)
    source = a.input
    if source is not None and not Path(source).is_file():
        raise SpecError(f"cannot read {source!r} as a video: no such file")
    inversion = None
    if a.from_inversion:
        inversion = Inversion.load(a.from_inversion)
        saved_steps = len(inversion.edit_timesteps)
        if a.steps is not None and a.steps != saved_steps:
            raise SpecError(
                f"--steps {a.steps}: the saved inversion keeps latents for {saved_steps} editing steps; "
                "invert again with the step count you want"
            )
        if source is None and inversion.extra.get("source_path"):
            source = inversion.extra["source_path"]
            if not Path(source).is_file():
                print(f"note: source video {source} is gone; the edit will have no audio", file=sys.stderr)
                source = None
    bars = ProgressBars(not a.quiet)
    hooks = JobHooks(progress=bars)
    model = _load_model(a)
    if inversion is None:
        if source is None:
            source = str(Path(tempfile.mkdtemp(prefix="tokenflow-")) / "generated.mp4")
            make_clip(source, frames=24, size=(256, 256), fps=12, audio=True)
            print(f"no INPUT given: generated a test clip at {source}", file=sys.stderr)
            if a.size is None:  # edit the generated clip at its own size, not upscaled to --area
                a.size = (256, 256)
        inversion = invert_video(model, source, _decode_spec(a), _inversion_spec(a, a.reconstruct), hooks)
    out = render_edit(model, inversion, spec, a.output, audio_source=source, hooks=hooks)
    bars.close()
    return {
        "output": str(out.path),
        "frames": out.frames,
        "fps": float(out.fps),
        "method": spec.method,
        "reconstruction_psnr_db": inversion.reconstruction_psnr,
        "reconstruction_latent_rel_l2": inversion.extra.get("reconstruction_latent_rel_l2"),
        "source": source,
        "test_model": model.is_test_model,
    }


def cmd_invert(a: argparse.Namespace) -> dict[str, Any]:
    from tokenflow.pipeline import invert_video

    bars = ProgressBars(not a.quiet)
    model = _load_model(a)
    inversion = invert_video(
        model, a.input, _decode_spec(a), _inversion_spec(a, not a.no_reconstruct), JobHooks(progress=bars)
    )
    inversion.extra["source_path"] = str(Path(a.input).resolve())
    inversion.save(a.save)
    bars.close()
    return {
        "saved": a.save,
        "frames": inversion.n_frames,
        "width": inversion.width,
        "height": inversion.height,
        "fps": float(inversion.fps),
        "reconstruction_psnr_db": inversion.reconstruction_psnr,
        "reconstruction_latent_rel_l2": inversion.extra.get("reconstruction_latent_rel_l2"),
    }


def cmd_eval(a: argparse.Namespace) -> dict[str, Any]:
    from tokenflow.eval import evaluate_videos

    decode = DecodeSpec(start=a.start, max_frames=a.frames, stride=a.stride).validate()
    return evaluate_videos(a.source, a.edited, decode=decode)


def cmd_parity(a: argparse.Namespace) -> dict[str, Any]:
    from tokenflow.parity import run_parity

    bars = ProgressBars(not a.quiet)
    report = run_parity(a.fixture, device=a.device or "cpu", hooks=JobHooks(progress=bars))
    bars.close()
    return report


def cmd_make_clip(a: argparse.Namespace) -> dict[str, Any]:
    from tokenflow.synthetic import make_clip

    path = make_clip(a.output, frames=a.frames, size=a.size, fps=a.fps, audio=not a.no_audio, seed=a.seed)
    return {"output": str(path), "frames": a.frames, "size": list(a.size), "fps": a.fps}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenflow", description="Text-driven video editing with TokenFlow."
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "edit", help="edit a video under a prompt (inverting it first, or from a saved inversion)"
    )
    p.add_argument("input", nargs="?", default=None, help="source video (omit to generate a test clip)")
    p.add_argument("--output", "-o", required=True, help="edited .mp4 to write")
    p.add_argument("--from-inversion", default=None, help="directory written by `tokenflow invert --save`")
    p.add_argument(
        "--reconstruct", action="store_true", help="also reconstruct and report the inversion's PSNR"
    )
    p.add_argument("--quiet", "-q", action="store_true")
    _add_model_args(p)
    _add_decode_args(p)
    _add_inversion_args(p)
    _add_edit_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("invert", help="invert a video once and save it for many edits")
    p.add_argument("input")
    p.add_argument("--save", required=True, help="directory to write the inversion to")
    p.add_argument("--no-reconstruct", action="store_true", help="skip the reconstruction PSNR check")
    p.add_argument("--quiet", "-q", action="store_true")
    _add_model_args(p)
    _add_decode_args(p)
    _add_inversion_args(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("eval", help="warp error (flow of the source) and PSNR of an edited video")
    p.add_argument("--source", required=True)
    p.add_argument("--edited", required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--stride", type=int, default=1)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("parity", help="compare against the official code's numbers in a parity fixture")
    p.add_argument("fixture")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("make-clip", help="write a generated test clip (moving shapes, with audio)")
    p.add_argument("output")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", type=_size, default=(256, 256))
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-audio", action="store_true")
    p.set_defaults(func=cmd_make_clip)

    p = sub.add_parser("serve", help="run the gRPC services (see `tokenflow serve --help`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The services are a separate layer; the library only forwards to them.
        from services.server import main as serve_main

        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except TokenFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
