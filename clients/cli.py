"""`tokenflow-client`: the TokenFlow services from a shell.

    tokenflow-client --target HOST:PORT [--timeout S] [-y] COMMAND ...

Commands: edit, invert, keyframes, fetch, stat, list, delete, cancel, health. Results are JSON on stdout;
progress and errors go to stderr (one updating line on a terminal, plain lines at a modest rate anywhere
else).
Exit codes: 0 success, 1 the server (or the connection) failed the request, 2 a problem on our side (bad
arguments, unreadable input, an output that exists or cannot be written), 130 interrupted. `health` exits
0 only when the server reports SERVING, which is what a container HEALTHCHECK needs.

Like ffmpeg, an existing output file is never overwritten unless `-y`/`--overwrite` is given; output
locations are checked before anything is uploaded or computed. Spec flags have the library CLI's names
(clients/flags.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from clients import __version__
from clients.client import STAGES, TOKEN_ENV, ClientError, TokenFlowClient, is_digest, kind_name
from clients.flags import (
    DECODE_FLAGS,
    EDIT_FLAGS,
    INVERSION_FLAGS,
    add_spec_flags,
    check_ranges,
    fill_message,
    section_values,
)
from clients.progress import Progress
from tokenflow_pb.v1 import common_pb2, server_info_pb2, server_info_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
HEALTH_TIMEOUT = 5.0


class UsageError(Exception):
    """A problem with the command line or local files (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------
# Specs from the command line


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return w, h


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frames")
    add_spec_flags(g, DECODE_FLAGS)
    g.add_argument("--size", type=_size, default=None, help="exact WxH: --width W --height H in one flag")


def _add_inversion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inversion")
    add_spec_flags(g, INVERSION_FLAGS)
    g.add_argument("--no-reconstruct", action="store_true", help="skip the reconstruction PSNR check")


def _add_edit_args(p: argparse.ArgumentParser, many: bool, prompt_required: bool = True) -> None:
    g = p.add_argument_group("edit")
    required = ("prompt",) if prompt_required else ()
    add_spec_flags(g, EDIT_FLAGS, repeat=("prompt",) if many else (), required=required)


def _decode(a: argparse.Namespace) -> common_pb2.DecodeSpec:
    values = section_values(a, DECODE_FLAGS)
    if a.size is not None:
        if values["width"] or values["height"]:
            raise UsageError("give either --size WxH or --width/--height, not both")
        values["width"], values["height"] = a.size
    return fill_message(common_pb2.DecodeSpec(), values)


def _inversion(a: argparse.Namespace) -> common_pb2.InversionSpec:
    values = section_values(a, INVERSION_FLAGS)
    if a.no_reconstruct:
        values["reconstruct"] = False
    return fill_message(common_pb2.InversionSpec(), values)


def _edits(a: argparse.Namespace) -> list[common_pb2.EditSpec]:
    values = section_values(a, EDIT_FLAGS)
    prompts = values.pop("prompt")
    return [
        fill_message(common_pb2.EditSpec(), {"prompt": prompt, **values})
        for prompt in (prompts if isinstance(prompts, list) else [prompts])
    ]


def _check_spec_args(a: argparse.Namespace) -> None:
    """Ranges of the spec flags this command has, before anything is sent."""
    for flags in (DECODE_FLAGS, INVERSION_FLAGS, EDIT_FLAGS):
        if any(hasattr(a, f.dest) for f in flags):
            check_ranges(a, flags)


# ----------------------------------------------------------------------------------------------------------
# Output files: checked up front, written without overwriting unless -y


class Outputs:
    """The files a command will write into one directory.

    `prepare` (before any upload or RPC) makes sure the directory exists (it is created when its parent
    exists) and takes files, and that none of the planned names exists unless overwriting is allowed.
    `save` downloads into a hidden temporary directory beside the destination and then publishes the
    file: with a hard link, which fails if the name appeared meanwhile (so even a race cannot overwrite),
    or with a rename under `-y`.
    """

    def __init__(self, directory: Path, overwrite: bool) -> None:
        self.directory = directory
        self.overwrite = overwrite

    def prepare(self, names: Sequence[str] = (), patterns: Sequence[str] = ()) -> None:
        out = self.directory
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} exists and is not a directory")
        parent = out.parent if str(out.parent) else Path(".")
        if not out.exists() and not parent.is_dir():  # like the library CLI: create one level, not a path
            raise UsageError(f"cannot create the output directory {out}: {parent} does not exist")
        try:
            out.mkdir(exist_ok=True)
            with tempfile.TemporaryFile(dir=out, prefix=".tokenflow-client-probe-"):
                pass
        except OSError as e:
            raise UsageError(f"cannot write to the output directory {out}: {e.strerror or e}") from None
        if self.overwrite:
            return
        existing = [out / n for n in names if (out / n).exists()]
        existing += sorted(p for pattern in patterns for p in out.glob(pattern))
        if existing:
            shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise UsageError(f"{shown} already exists; not overwriting (use -y to overwrite)")

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        tmp = Path(tempfile.mkdtemp(dir=self.directory, prefix=".tokenflow-client-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save(
        self,
        client: TokenFlowClient,
        digest: str,
        name: str,
        filename: str | None,
        progress: Progress | None = None,
    ) -> Path:
        """Download file `name` of artifact `digest` as `filename` (None: the server's file name)."""
        with self._staging() as tmp:
            report = (
                None if progress is None else lambda done, total: progress.transfer("download", done, total)
            )
            got = client.download(digest, tmp / filename if filename else tmp, name=name, progress=report)
            return self.publish(got, self.directory / got.name)

    def publish(self, source: Path, dest: Path) -> Path:
        if self.overwrite:
            os.replace(source, dest)
            return dest
        try:
            os.link(source, dest)
        except FileExistsError:
            raise UsageError(f"{dest} already exists; not overwriting (use -y to overwrite)") from None
        except OSError:  # a file system without hard links: check, then rename
            if dest.exists():
                raise UsageError(f"{dest} already exists; not overwriting (use -y to overwrite)") from None
            os.replace(source, dest)
        return dest


def _video_digest(client: TokenFlowClient, source: str, progress: Progress) -> str:
    """INPUT is a local video file (uploaded now) or the digest of one uploaded before."""
    if is_digest(source) and not os.path.exists(source):
        return source
    return client.upload(source, progress=lambda done, total: progress.transfer("upload", done, total))


def _check_input(source: str) -> None:
    if is_digest(source) and not os.path.exists(source):
        return
    if not os.path.isfile(source):
        raise UsageError(f"no such file: {source} (give a video file or the digest of an uploaded one)")
    try:
        with open(source, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror or e}") from None


def _on_event(progress: Progress, label: str) -> Any:
    """A job stream's callback: each response's `progress` or `result` goes to the printer."""

    def on_event(event: Any) -> None:
        which = event.WhichOneof("event")
        if which == "progress":
            progress.update(label, event.progress)
        elif which == "result":
            progress.finish(label, event.result)

    return on_event


def _result_summary(result: common_pb2.Result) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "digest": result.digest,
        "kind": kind_name(result.kind),
        "cache_hit": result.cache_hit,
    }
    info = result.WhichOneof("info")
    if info is not None:
        summary[info] = json_format.MessageToDict(getattr(result, info), preserving_proto_field_name=True)
    if result.warnings:
        summary["warnings"] = list(result.warnings)
    return summary


def _result_files(client: TokenFlowClient, result: common_pb2.Result, out: Outputs, stem: str) -> list[str]:
    """Save a full edit's video as <stem>.mp4, or a keyframe preview's images as <stem>-<name>."""
    if result.WhichOneof("info") == "keyframes":
        names = list(result.keyframes.image_files)
        return [str(out.save(client, result.digest, name, f"{stem}-{name}")) for name in names]
    video = result.propagation.video_file if result.HasField("propagation") else ""
    return [str(out.save(client, result.digest, video, f"{stem}.mp4"))]


# ----------------------------------------------------------------------------------------------------------
# Commands


def cmd_edit(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    edits = _edits(a)
    decode, inversion = _decode(a), _inversion(a)
    _check_input(a.input)
    out = Outputs(Path(a.out_dir), a.overwrite)
    if a.keyframes_only:
        out.prepare(patterns=[f"edit-{i}-*" for i in range(len(edits))])
    else:
        out.prepare(names=[f"edit-{i}.mp4" for i in range(len(edits))])
    video = _video_digest(client, a.input, progress)
    inversion_result: list[common_pb2.Result] = []

    def on_event(event: Any) -> None:
        label = "inversion" if event.edit_index < 0 else f"edit {event.edit_index}"
        _on_event(progress, label)(event)
        if event.edit_index < 0 and event.WhichOneof("event") == "result":
            inversion_result.append(event.result)

    results = client.edit(
        video, edits, decode=decode, inversion=inversion, keyframes_only=a.keyframes_only, on_event=on_event
    )
    progress.close()
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


def cmd_invert(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    decode, inversion = _decode(a), _inversion(a)
    _check_input(a.input)
    video = _video_digest(client, a.input, progress)
    features_for = _edits(a)[0] if a.precompute_features else None
    result = client.invert(
        video,
        decode=decode,
        inversion=inversion,
        on_event=_on_event(progress, "inversion"),
        features_for=features_for,
    )
    summary = {"video_digest": video, **_result_summary(result), "test_model": result.test_model}
    if features_for is not None:
        summary["features_digest"] = result.inversion.features_digest
        summary["features_bytes"] = result.inversion.features_bytes
    return summary


def cmd_keyframes(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    if not is_digest(a.inversion_digest):
        raise UsageError(f"{a.inversion_digest!r} is not a digest (64 lowercase hex characters)")
    (edit,) = _edits(a)
    out = Outputs(Path(a.out_dir), a.overwrite)
    out.prepare(patterns=["keyframes-*"])
    result = client.keyframes(a.inversion_digest, edit, on_event=_on_event(progress, "keyframes"))
    progress.close()
    files = _result_files(client, result, out, "keyframes")
    return {"prompt": edit.prompt, **_result_summary(result), "files": files, "test_model": result.test_model}


def cmd_fetch(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    dest = Path(a.output)
    if dest.is_dir():
        out, filename = Outputs(dest, a.overwrite), None
        out.prepare()
    else:
        out, filename = Outputs(dest.parent, a.overwrite), dest.name
        if not dest.parent.is_dir():
            raise UsageError(f"the directory of {dest} does not exist")
        out.prepare(names=[dest.name])
    path = out.save(client, a.digest, a.name, filename, progress=progress)
    return {"digest": a.digest, "path": str(path), "size": path.stat().st_size}


def cmd_stat(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    return _artifact_summary(client.stat(a.digest))


def _artifact_summary(artifact: Any) -> dict[str, Any]:
    summary = json_format.MessageToDict(artifact, preserving_proto_field_name=True)
    summary["kind"] = kind_name(artifact.kind)
    summary["meta"] = json.loads(summary.pop("meta_json", "{}") or "{}")
    return summary


def cmd_list(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    artifacts = []
    for artifact in client.iter_artifacts(a.kind, page_size=a.page_size):
        if a.limit and len(artifacts) >= a.limit:
            break
        artifacts.append(_artifact_summary(artifact))
    return {"kind": a.kind, "artifacts": artifacts}


def cmd_delete(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    client.delete(a.digest)
    return {"deleted": a.digest}


def cmd_cancel(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    response = client.cancel(a.stage, a.job_id)
    return {"cancelled": response.cancelled, "message": response.message}


def cmd_operation(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """google.longrunning operations: any replica answers for any job."""
    if a.action == "list":
        ops = list(client.list_operations(filter=a.filter))
        return {"operations": [json_format.MessageToDict(op) for op in ops]}
    if not a.name:
        raise SystemExit(f"tokenflow-client operation {a.action}: give the operation name or job id")
    if a.action == "cancel":
        client.cancel_operation(a.name)
        return {"cancelled": a.name}
    op = client.wait_operation(a.name, wait=a.wait) if a.action == "wait" else client.get_operation(a.name)
    return json_format.MessageToDict(op)


def cmd_info(client: TokenFlowClient, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """ServerInfo: version, services and readiness (with the reason), model, limits, store tiers."""
    stub = server_info_pb2_grpc.ServerInfoStub(client.channel)
    try:
        response = stub.GetServerInfo(server_info_pb2.GetServerInfoRequest(), timeout=a.timeout or 30)
    except grpc.RpcError as e:
        raise ClientError.from_rpc_error(e) from None
    return json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _add_overwrite(p: argparse.ArgumentParser, top: bool) -> None:
    # On the top level and on each writing command, so `-y` works in either place (like ffmpeg's).
    # The commands' default is SUPPRESS, so they never reset a top-level -y.
    p.add_argument(
        "-y",
        "--overwrite",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="overwrite existing output files (default: refuse, and stop before any work)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenflow-client", description="Client of the TokenFlow video editing services."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--target",
        default=os.environ.get("TOKENFLOW_TARGET", DEFAULT_TARGET),
        help=f"server address HOST:PORT (default: $TOKENFLOW_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    g = parser.add_argument_group("access control")
    g.add_argument(
        "--token",
        default=None,
        help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable: command lines are visible to all)",
    )
    g.add_argument(
        "--tls-ca",
        default=os.environ.get("TOKENFLOW_TLS_CA"),
        help="connect with TLS, trusting this PEM CA bundle (default: $TOKENFLOW_TLS_CA; none = plaintext)",
    )
    g.add_argument(
        "--tls-cert",
        default=os.environ.get("TOKENFLOW_TLS_CERT"),
        help="client certificate (PEM) for mutual TLS (default: $TOKENFLOW_TLS_CERT)",
    )
    g.add_argument(
        "--tls-key",
        default=os.environ.get("TOKENFLOW_TLS_KEY"),
        help="key of --tls-cert (default: $TOKENFLOW_TLS_KEY)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    _add_overwrite(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="upload a video and edit it under one or more prompts")
    p.add_argument("input", help="video file (or the digest of an uploaded video)")
    p.add_argument("--out-dir", required=True, help="directory for edit-<i>.mp4 (or keyframe PNGs)")
    p.add_argument("--keyframes-only", action="store_true", help="only a keyframe preview of each edit")
    _add_overwrite(p, top=False)
    _add_edit_args(p, many=True)
    _add_decode_args(p)
    _add_inversion_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("invert", help="upload and invert a video; prints the inversion digest")
    p.add_argument("input", help="video file (or the digest of an uploaded video)")
    _add_decode_args(p)
    _add_inversion_args(p)
    p.add_argument(
        "--precompute-features",
        action="store_true",
        help="also precompute the source features of TokenFlow edits with the edit flags given (the "
        "prompt is not needed), so the first edit already skips the source branch in propagation",
    )
    _add_edit_args(p, many=False, prompt_required=False)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("keyframes", help="keyframe preview of an edit of an inverted video")
    p.add_argument("inversion_digest", metavar="INVERSION_DIGEST")
    p.add_argument("--out-dir", required=True, help="directory for the keyframe PNGs")
    _add_overwrite(p, top=False)
    _add_edit_args(p, many=False)
    p.set_defaults(func=cmd_keyframes)

    p = sub.add_parser("fetch", help="download a file of an artifact")
    p.add_argument("digest", metavar="DIGEST")
    p.add_argument("--name", default="", help="file inside the artifact (default: its primary file)")
    p.add_argument("-o", "--output", default=".", help="file or directory to write to (default: .)")
    _add_overwrite(p, top=False)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("stat", help="describe an artifact")
    p.add_argument("digest", metavar="DIGEST")
    p.set_defaults(func=cmd_stat)

    kinds = [kind_name(v.number) for v in common_pb2.ArtifactKind.DESCRIPTOR.values if v.number]
    p = sub.add_parser("list", help="list the stored artifacts of one kind (JSON, in digest order)")
    p.add_argument("kind", choices=kinds)
    p.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    p.add_argument("--page-size", type=int, default=0, help="artifacts per request (default: the server's)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("delete", help="delete an artifact (refused while a running job uses it)")
    p.add_argument("digest", metavar="DIGEST")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("cancel", help="cancel a running or queued job")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("operation", help="get, wait for, list or cancel jobs on any replica (operations)")
    p.add_argument("action", choices=("get", "wait", "list", "cancel"))
    p.add_argument("name", nargs="?", default="", help="operations/DIGEST or the job id (not for list)")
    p.add_argument("--wait", type=float, default=60.0, help="wait: seconds to wait at most (default 60)")
    p.add_argument("--filter", default="", help='list: "done = true" or "done = false" (default: all)')
    p.set_defaults(func=cmd_operation)

    p = sub.add_parser(
        "info", help="describe the server: version, readiness and why not, model, limits, store"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("health", help="print the server's health; exit 0 only when SERVING")
    p.add_argument("--service", default="", help="service name, e.g. tokenflow.v1.Editor (default: server)")
    p.set_defaults(func=None)
    return parser


def _error_note(e: ClientError) -> str:
    """The status details a script or a person acts on: the stable reason and whether to retry."""
    notes = [e.reason] if e.reason else []
    if e.retry_delay is not None:
        notes.append(f"retry in {e.retry_delay:g} s")
    return f" [{'; '.join(notes)}]" if notes else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse printed the usage and the problem (or --help / --version)
        return int(e.code) if isinstance(e.code, int) else 2
    progress = Progress(sys.stderr, enabled=not a.quiet)
    try:
        _check_spec_args(a)
        with TokenFlowClient(
            a.target,
            timeout=a.timeout,
            token=a.token,
            tls_ca=a.tls_ca,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
        ) as client:
            if a.command == "health":
                timeout = a.timeout if a.timeout is not None else HEALTH_TIMEOUT
                status = client.health(a.service, timeout=timeout)
                print(status)
                return 0 if status == "SERVING" else 1
            summary = a.func(client, a, progress)
    except ClientError as e:
        progress.close()
        print(f"error: {e}{_error_note(e)}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, OSError) as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.close()
        print("interrupted", file=sys.stderr)
        return 130
    progress.close()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
