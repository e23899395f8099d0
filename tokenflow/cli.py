"""The `tokenflow` command: edit, invert, eval, parity, make-clip, and serve (the gRPC services)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tokenflow.console import ProgressDisplay
from tokenflow.errors import SpecError, TokenFlowError
from tokenflow.methods import method
from tokenflow.progress import JobHooks
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec, spec_fields

S = TypeVar("S")

DEFAULT_STEPS = 50


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return w, h


_FLAG_TYPES: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str}


def _flag_type(annotation: Any) -> Callable[[str], Any]:
    """argparse type of a spec field: int, float or str (optionals by their non-None member)."""
    for t in (int, float, str):
        if annotation is t or annotation == (t | None):
            return _FLAG_TYPES[t]
    raise TypeError(f"no flag type for {annotation!r}")


def add_spec_flags(p: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> None:
    """One flag per declared field of `cls` (tokenflow.specs), named, typed and bounded by its declaration.

    Defaults stay unset (None) on the command line, so the spec's own default applies: one declaration.
    """
    group = p.add_argument_group(f"{cls.__name__} ({cls.section} spec)")
    for f in spec_fields(cls):
        if not f.doc.flags or f.name in skip:
            continue
        default = "" if f.required else f" (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f.doc.help + default}
        if f.doc.choices is not None:
            kwargs["choices"] = f.doc.choices
        elif f.type is bool:  # a switch: the flag sets the opposite of the default (--no-features)
            kwargs.update(action="store_const", const=not f.default)
        else:
            kwargs["type"] = _flag_type(f.type)
        group.add_argument(*f.doc.flags, **kwargs)


def spec_from_args(cls: type[S], a: argparse.Namespace, **overrides: Any) -> S:
    """A validated spec from the flags that were given; the rest take the spec's defaults."""
    values = {f.name: getattr(a, f.name) for f in spec_fields(cls) if getattr(a, f.name, None) is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values).validate()
    except TypeError as e:  # a required field without its flag
        raise SpecError(f"{cls.section}: {e}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="tiny", help="'tiny', 'sd15-arch', 'sd21-arch' or a local diffusers folder"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16"
    )


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    add_spec_flags(p, DecodeSpec)
    p.add_argument("--size", type=_size, default=None, help="exact WxH (same as --width W --height H)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--overwrite", action="store_true", help="overwrite existing outputs without asking")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def _decode_spec(a: argparse.Namespace) -> DecodeSpec:
    size = a.size or (None, None)
    return spec_from_args(DecodeSpec, a, width=size[0], height=size[1])


def _inversion_spec(a: argparse.Namespace, reconstruct: bool) -> InversionSpec:
    edit_steps = a.edit_steps or DEFAULT_STEPS
    return spec_from_args(
        InversionSpec, a, steps=a.steps or edit_steps, edit_steps=edit_steps, reconstruct=reconstruct
    )


def _edit_spec(a: argparse.Namespace) -> EditSpec:
    return spec_from_args(EditSpec, a, prompt=a.prompt or "")


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any compute, an output that cannot be written or would silently replace a file."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise SpecError(f"output {str(out)!r} is a directory; give a file name")
    if not parent.is_dir():
        raise SpecError(f"cannot write {str(out)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"cannot write {str(out)!r}: the directory {str(parent)!r} is not writable")
    if out.exists() and not overwrite:
        raise SpecError(f"output {str(out)!r} already exists; pass -y to overwrite it")
    return out


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """An output directory: created if absent, refused if it holds files and -y was not given."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SpecError(f"cannot save into {str(out)!r}: it is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SpecError(f"directory {str(out)!r} is not empty; pass -y to overwrite what it holds")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not parent.is_dir():
        raise SpecError(f"cannot save into {str(out)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(out if out.exists() else parent, os.W_OK | os.X_OK):
        raise SpecError(f"cannot save into {str(out)!r}: not writable")
    return out


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
    output = check_output_file(a.output, a.overwrite)
    source = a.input
    if source is not None and not Path(source).is_file():
        raise SpecError(f"cannot read {source!r} as a video: no such file")
    inversion = None
    if a.from_inversion:
        inversion = Inversion.load(a.from_inversion)
        saved_steps = len(inversion.edit_timesteps)
        if a.edit_steps is not None and a.edit_steps != saved_steps:
            raise SpecError(
                f"--steps {a.edit_steps}: the saved inversion keeps latents for {saved_steps} editing steps; "
                "invert again with the step count you want"
            )
        if source is None and inversion.extra.get("source_path"):
            source = inversion.extra["source_path"]
            if not Path(source).is_file():
                print(f"note: source video {source} is gone; the edit will have no audio", file=sys.stderr)
                source = None
    else:
        decode, inversion_spec = _decode_spec(a), _inversion_spec(a, a.reconstruct)
    progress = ProgressDisplay(not a.quiet)
    hooks = JobHooks(progress=progress)
    model = _load_model(a)
    seconds: dict[str, float] = {}
    if inversion is None:
        if source is None:
            source = str(Path(tempfile.mkdtemp(prefix="tokenflow-")) / "generated.mp4")
            make_clip(source, frames=24, size=(256, 256), fps=12, audio=True)
            print(f"no INPUT given: generated a test clip at {source}", file=sys.stderr)
            if decode.size is None:  # edit the generated clip at its own size, not upscaled to the area
                decode = decode.replace(width=256, height=256)
        started = time.perf_counter()
        inversion = invert_video(model, source, decode, inversion_spec, hooks)
        seconds["inversion"] = time.perf_counter() - started
    source_hook, features_dir, features_path = None, None, "source_branch"
    if a.from_inversion and spec.features and method(spec.method).keyframes:
        from tokenflow.features import beside_saved_inversion

        source_hook, features_dir = beside_saved_inversion(a.from_inversion, inversion, spec)
    out = render_edit(
        model, inversion, spec, output, audio_source=source, hooks=hooks, source_hook=source_hook
    )
    progress.close()
    if source_hook is not None and features_dir is not None:
        from tokenflow.features import FeaturesRecorder, publish_recorded

        if isinstance(source_hook, FeaturesRecorder):
            recorded = publish_recorded(source_hook, features_dir)
            features_path = "recorded" if recorded is not None else f"not recorded: {source_hook.refused}"
        else:
            features_path = "features"
    return {
        "features": features_path,
        "features_dir": str(features_dir) if features_dir else None,
        "propagation_batches": out.result.propagation_batches,
        "output": str(out.path),
        # wall time per stage (the keyframe pass and propagation summed over the editing steps)
        "seconds": {stage: round(v, 3) for stage, v in {**seconds, **out.result.seconds}.items()},
        "steps": len(inversion.edit_timesteps),
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

    decode, spec = _decode_spec(a), _inversion_spec(a, not a.no_reconstruct)
    save = check_output_dir(a.save, a.overwrite)
    progress = ProgressDisplay(not a.quiet)
    model = _load_model(a)
    inversion = invert_video(model, a.input, decode, spec, JobHooks(progress=progress))
    inversion.extra["source_path"] = str(Path(a.input).resolve())
    inversion.save(save)
    progress.close()
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

    return evaluate_videos(a.source, a.edited, decode=spec_from_args(DecodeSpec, a))


def cmd_parity(a: argparse.Namespace) -> dict[str, Any]:
    from tokenflow.parity import run_parity

    progress = ProgressDisplay(not a.quiet)
    report = run_parity(
        a.fixture, device=a.device or "cpu", hooks=JobHooks(progress=progress), features=a.features
    )
    progress.close()
    return report


def cmd_make_clip(a: argparse.Namespace) -> dict[str, Any]:
    from tokenflow.synthetic import make_clip

    output = check_output_file(a.output, a.overwrite)
    path = make_clip(output, frames=a.frames, size=a.size, fps=a.fps, audio=not a.no_audio, seed=a.seed)
    return {"output": str(path), "frames": a.frames, "size": list(a.size), "fps": a.fps}


def version() -> str:
    """The installed distribution's version (one declaration: pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tokenflow-service")
    except PackageNotFoundError:
        return "unknown (not installed)"


COMMAND_GROUP = "tokenflow.commands"
"""Entry-point group of commands other layers add to `tokenflow` (the services add `serve`): the
library finds them by name at run time and never imports their modules itself."""


def plugin_commands() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def build_parser(plugins: Iterable[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenflow", description="Text-driven video editing with TokenFlow."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    _add_output_args(p)
    _add_model_args(p)
    _add_decode_args(p)
    add_spec_flags(p, InversionSpec)
    add_spec_flags(p, EditSpec)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("invert", help="invert a video once and save it for many edits")
    p.add_argument("input")
    p.add_argument("--save", required=True, help="directory to write the inversion to")
    p.add_argument("--no-reconstruct", action="store_true", help="skip the reconstruction PSNR check")
    _add_output_args(p)
    _add_model_args(p)
    _add_decode_args(p)
    add_spec_flags(p, InversionSpec)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("eval", help="warp error (flow of the source) and PSNR of an edited video")
    p.add_argument("--source", required=True)
    p.add_argument("--edited", required=True)
    add_spec_flags(p, DecodeSpec, skip=("width", "height", "target_area"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("parity", help="compare against the official code's numbers in a parity fixture")
    p.add_argument("fixture")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument(
        "--features",
        action="store_true",
        help="record the source features, then check the edit that replays them (no source branch)",
    )
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("make-clip", help="write a generated test clip (moving shapes, with audio)")
    p.add_argument("output")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", type=_size, default=(256, 256))
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-audio", action="store_true")
    p.add_argument("-y", "--overwrite", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_make_clip)

    for name in plugins:
        p = sub.add_parser(name, help=f"{name} (see `tokenflow {name} --help`)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    global_flags = [a for a in itertools.takewhile(lambda a: a in ("-v", "--verbose"), argv)]
    command = argv[len(global_flags)] if len(argv) > len(global_flags) else None
    if command in plugins:  # a command of another layer: it parses its own flags
        forwarded = argv[len(global_flags) + 1 :]
        if global_flags and "--log-level" not in forwarded:
            forwarded = ["--log-level", "INFO", *forwarded]
        return int(plugins[command].load()(forwarded) or 0)
    parser = build_parser(plugins)
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
