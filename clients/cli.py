"""`tokenflow-client`: the TokenFlow services from a shell.

    tokenflow-client --target HOST:PORT [--timeout S] COMMAND ...

Commands: edit, invert, keyframes, fetch, stat, health, cancel. Results are JSON on stdout; progress bars
and errors go to stderr. Exit codes: 0 success, 1 the server (or the connection) failed the request,
2 a problem on our side (bad arguments, unreadable input file), 130 interrupted. `health` exits 0 only
when the server reports SERVING, which is what a container HEALTHCHECK needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from clients.client import (
    STAGES,
    ClientError,
    TokenFlowClient,
    decode_spec,
    edit_spec,
    inversion_spec,
    is_digest,
)
from tokenflow_pb.v1 import common_pb2, editor_pb2

DEFAULT_TARGET = "localhost:50051"
HEALTH_TIMEOUT = 5.0
METHODS = ("tokenflow", "sdedit", "per-frame", "reconstruct")


class UsageError(Exception):
    """A problem with the command line or local files (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------
# Progress bars


class ProgressBars:
    """One tqdm bar per label ("upload", "inversion", "edit 0", ...) on stderr; silent when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars: dict[str, Any] = {}

    def _bar(self, label: str, total: int | None, unit: str = "step") -> Any:
        bar = self._bars.get(label)
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
            if unit == "B":
                bar.unit_scale = True
                bar.unit_divisor = 1024
            self._bars[label] = bar
        return bar

    def bytes(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self._bar(label, total or None, unit="B")
        bar.n = done
        bar.refresh()

    def job_event(self, label: str, event: common_pb2.JobEvent) -> None:
        if not self.enabled:
            return
        if event.WhichOneof("event") == "progress":
            p = event.progress
            total = p.total_steps or None
            bar = self._bar(label, total)
            if bar.total != total:
                bar.reset(total=total)
            bar.set_description_str(f"{label}: {p.phase}" if p.phase else label, refresh=False)
            bar.n = p.step
            bar.refresh()
        else:
            result = event.result
            bar = self._bar(label, None)
            bar.set_description_str(f"{label}: {'cached' if result.cache_hit else 'done'}", refresh=False)
            if bar.total:
                bar.n = bar.total
            bar.refresh()
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


# ----------------------------------------------------------------------------------------------------------
# Argument helpers


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return w, h


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frames")
    g.add_argument("--start", type=int, default=0, help="first frame to use")
    g.add_argument("--frames", type=int, default=0, help="number of frames to use (default: all)")
    g.add_argument("--stride", type=int, default=None, help="use every STRIDE-th frame (default 1)")
    g.add_argument("--size", type=_size, default=None, help="exact WxH (default: aspect kept, ~512x512)")
    g.add_argument("--area", type=int, default=None, help="target pixel area when --size is not given")


def _add_inversion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inversion")
    g.add_argument("--steps", type=int, default=None, help="editing (denoising) steps T (server default 50)")
    g.add_argument(
        "--inversion-steps",
        type=int,
        default=None,
        help="DDIM inversion steps S, a multiple of T (default: T when --steps is given, else 50)",
    )
    g.add_argument("--inversion-prompt", default="", help="inversion prompt: empty or a caption")
    g.add_argument("--no-reconstruct", action="store_true", help="skip the reconstruction PSNR check")


def _add_edit_args(p: argparse.ArgumentParser, many: bool) -> None:
    g = p.add_argument_group("edit")
    if many:
        g.add_argument(
            "--prompt", "-p", action="append", required=True, help="target prompt (repeat for several edits)"
        )
    else:
        g.add_argument("--prompt", "-p", required=True, help="target prompt")
    g.add_argument("--negative-prompt", default=None, help='negative prompt ("" for none)')
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (7.5)")
    g.add_argument("--seed", type=int, default=None, help="seed of the keyframe draws (0)")
    g.add_argument("--method", choices=METHODS, default=None, help="editing method (tokenflow)")
    g.add_argument("--pnp-attn-t", type=float, default=None, help="PnP attention injection fraction (0.5)")
    g.add_argument("--pnp-f-t", type=float, default=None, help="PnP conv injection fraction (0.8)")
    g.add_argument("--keyframe-interval", type=int, default=None, help="frames per keyframe window (8)")
    g.add_argument("--chunk-size", type=int, default=None, help="frames per UNet batch in propagation (8)")
    g.add_argument("--crf", type=int, default=None, help="H.264 quality of the output, 0..51 (18)")


def _decode(a: argparse.Namespace) -> common_pb2.DecodeSpec:
    if a.frames < 0 or a.start < 0:
        raise UsageError("--frames and --start must be >= 0")
    return decode_spec(start=a.start, max_frames=a.frames, stride=a.stride, size=a.size, target_area=a.area)


def _inversion(a: argparse.Namespace) -> common_pb2.InversionSpec:
    # Like `tokenflow edit`: with only --steps given, invert with as many steps (always a valid multiple).
    steps = a.inversion_steps if a.inversion_steps is not None else a.steps
    return inversion_spec(
        prompt=a.inversion_prompt,
        steps=steps,
        edit_steps=a.steps,
        reconstruct=False if a.no_reconstruct else None,
    )


def _edits(a: argparse.Namespace) -> list[common_pb2.EditSpec]:
    prompts = a.prompt if isinstance(a.prompt, list) else [a.prompt]
    return [
        edit_spec(
            prompt,
            negative_prompt=a.negative_prompt,
            guidance=a.guidance,
            seed=a.seed,
            method=a.method,
            pnp_attn_t=a.pnp_attn_t,
            pnp_f_t=a.pnp_f_t,
            keyframe_interval=a.keyframe_interval,
            chunk_size=a.chunk_size,
            crf=a.crf,
        )
        for prompt in prompts
    ]


def _out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    return out


def _video_digest(client: TokenFlowClient, source: str, bars: ProgressBars) -> str:
    """INPUT is a local video file (uploaded now) or the digest of one uploaded before."""
    if is_digest(source) and not os.path.exists(source):
        return source
    if not os.path.isfile(source):
        raise UsageError(f"no such file: {source} (give a video file or the digest of an uploaded one)")
    try:
        return client.upload(source, progress=lambda done, total: bars.bytes("upload", done, total))
    finally:
        bars.close()


def _result_summary(result: common_pb2.Result) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "digest": result.digest,
        "kind": result.kind,
        "cache_hit": result.cache_hit,
    }
    info = result.WhichOneof("info")
    if info is not None:
        summary[info] = json_format.MessageToDict(getattr(result, info), preserving_proto_field_name=True)
    if result.warnings:
        summary["warnings"] = list(result.warnings)
    return summary


def _result_files(client: TokenFlowClient, result: common_pb2.Result, out: Path, stem: str) -> list[str]:
    """Download a propagation's video as <stem>.mp4, or a keyframe preview's images as <stem>-<name>."""
    if result.WhichOneof("info") == "keyframes":
        names = list(result.keyframes.image_files)
        return [str(client.download(result.digest, out / f"{stem}-{name}", name=name)) for name in names]
    video = result.propagation.video_file if result.HasField("propagation") else ""
    return [str(client.download(result.digest, out / f"{stem}.mp4", name=video))]


# ----------------------------------------------------------------------------------------------------------
# Commands


def cmd_edit(client: TokenFlowClient, a: argparse.Namespace, bars: ProgressBars) -> dict[str, Any]:
    out = _out_dir(a.out_dir)
    edits = _edits(a)
    decode, inversion = _decode(a), _inversion(a)
    video = _video_digest(client, a.input, bars)
    inversion_result: list[common_pb2.Result] = []

    def on_event(event: editor_pb2.EditorEvent) -> None:
        label = "inversion" if event.edit_index < 0 else f"edit {event.edit_index}"
        bars.job_event(label, event.event)
        if event.edit_index < 0 and event.event.WhichOneof("event") == "result":
            inversion_result.append(event.event.result)

    try:
        results = client.edit(
            video,
            edits,
            decode=decode,
            inversion=inversion,
            keyframes_only=a.keyframes_only,
            on_event=on_event,
        )
    finally:
        bars.close()
    summary: dict[str, Any] = {"video_digest": video}
    if inversion_result:
        summary["inversion"] = _result_summary(inversion_result[0])
    summary["edits"] = []
    for index, (spec, result) in enumerate(zip(edits, results, strict=True)):
        entry = {"index": index, "prompt": spec.prompt, **_result_summary(result)}
        entry["files"] = _result_files(client, result, out, f"edit-{index}")
        summary["edits"].append(entry)
    summary["test_model"] = any(r.test_model for r in results)
    summary["cache_hits"] = sum(r.cache_hit for r in [*inversion_result, *results])
    return summary


def cmd_invert(client: TokenFlowClient, a: argparse.Namespace, bars: ProgressBars) -> dict[str, Any]:
    decode, inversion = _decode(a), _inversion(a)
    video = _video_digest(client, a.input, bars)
    try:
        result = client.invert(
            video, decode=decode, inversion=inversion, on_event=lambda e: bars.job_event("inversion", e)
        )
    finally:
        bars.close()
    return {"video_digest": video, **_result_summary(result), "test_model": result.test_model}


def cmd_keyframes(client: TokenFlowClient, a: argparse.Namespace, bars: ProgressBars) -> dict[str, Any]:
    if not is_digest(a.inversion_digest):
        raise UsageError(f"{a.inversion_digest!r} is not a digest (64 lowercase hex characters)")
    out = _out_dir(a.out_dir)
    (edit,) = _edits(a)
    try:
        result = client.keyframes(a.inversion_digest, edit, on_event=lambda e: bars.job_event("keyframes", e))
    finally:
        bars.close()
    files = _result_files(client, result, out, "keyframes")
    return {"prompt": edit.prompt, **_result_summary(result), "files": files, "test_model": result.test_model}


def cmd_fetch(client: TokenFlowClient, a: argparse.Namespace, bars: ProgressBars) -> dict[str, Any]:
    dest = Path(a.output)
    if not dest.is_dir() and not dest.parent.is_dir():
        raise UsageError(f"the directory of {dest} does not exist")
    try:
        path = client.download(
            a.digest, dest, name=a.name, progress=lambda done, total: bars.bytes("download", done, total)
        )
    finally:
        bars.close()
    return {"digest": a.digest, "path": str(path), "size": path.stat().st_size}


def cmd_stat(client: TokenFlowClient, a: argparse.Namespace, bars: ProgressBars) -> dict[str, Any]:
    info = client.stat(a.digest)
    summary = json_format.MessageToDict(info, preserving_proto_field_name=True)
    summary["meta"] = json.loads(summary.pop("meta_json", "{}") or "{}")
    return summary


def cmd_cancel(client: TokenFlowClient, a: argparse.Namespace, bars: ProgressBars) -> dict[str, Any]:
    response = client.cancel(a.stage, a.job_id)
    return {"cancelled": response.cancelled, "message": response.message}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenflow-client", description="Client of the TokenFlow video editing services."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("TOKENFLOW_TARGET", DEFAULT_TARGET),
        help=f"server address HOST:PORT (default: $TOKENFLOW_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="upload a video and edit it under one or more prompts")
    p.add_argument("input", help="video file (or the digest of an uploaded video)")
    p.add_argument("--out-dir", required=True, help="directory for edit-<i>.mp4 (or keyframe PNGs)")
    p.add_argument("--keyframes-only", action="store_true", help="only a keyframe preview of each edit")
    _add_edit_args(p, many=True)
    _add_decode_args(p)
    _add_inversion_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("invert", help="upload and invert a video; prints the inversion digest")
    p.add_argument("input", help="video file (or the digest of an uploaded video)")
    _add_decode_args(p)
    _add_inversion_args(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("keyframes", help="keyframe preview of an edit of an inverted video")
    p.add_argument("inversion_digest", metavar="INVERSION_DIGEST")
    p.add_argument("--out-dir", required=True, help="directory for the keyframe PNGs")
    _add_edit_args(p, many=False)
    p.set_defaults(func=cmd_keyframes)

    p = sub.add_parser("fetch", help="download a file of an artifact")
    p.add_argument("digest", metavar="DIGEST")
    p.add_argument("--name", default="", help="file inside the artifact (default: its primary file)")
    p.add_argument("-o", "--output", default=".", help="file or directory to write to (default: .)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("stat", help="describe an artifact")
    p.add_argument("digest", metavar="DIGEST")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("cancel", help="cancel a running or queued job")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("health", help="print the server's health; exit 0 only when SERVING")
    p.add_argument("--service", default="", help="service name, e.g. tokenflow.v1.Editor (default: server)")
    p.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse printed the usage and the problem
        return int(e.code) if isinstance(e.code, int) else 2
    bars = ProgressBars(enabled=not a.quiet)
    try:
        with TokenFlowClient(a.target, timeout=a.timeout) as client:
            if a.command == "health":
                timeout = a.timeout if a.timeout is not None else HEALTH_TIMEOUT
                status = client.health(a.service, timeout=timeout)
                print(status)
                return 0 if status == "SERVING" else 1
            summary = a.func(client, a, bars)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bars.close()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
