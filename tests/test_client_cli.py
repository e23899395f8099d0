"""`tokenflow-client` follows its ecosystem's conventions, checked against the spec declarations and a server.

- Its spec flags are the library's: for every DecodeSpec/InversionSpec/EditSpec field declared with CLI
  flags in tokenflow/specs.py, the client parser has the same flags (canonical first), default, choices
  and range, and the value lands in the proto field of the same name.
- `--version`; output locations checked before any RPC (exit 2, no traceback); no overwriting without
  `-y`; downloads with the mode a new file normally gets; progress on stderr without control characters
  when stderr is not a terminal (and one updating line when it is).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopback import tiny_server_config

import clients
from clients import flags as client_flags
from clients.cli import build_parser, main
from clients.progress import Progress
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec, spec_fields
from tokenflow_pb.v1 import common_pb2

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "decode": (DecodeSpec, client_flags.DECODE_FLAGS, common_pb2.DecodeSpec),
    "inversion": (InversionSpec, client_flags.INVERSION_FLAGS, common_pb2.InversionSpec),
    "edit": (EditSpec, client_flags.EDIT_FLAGS, common_pb2.EditSpec),
}
# The client commands that take each section's flags.
COMMANDS = {"decode": ("edit", "invert"), "inversion": ("edit", "invert"), "edit": ("edit", "keyframes")}
UNREACHABLE = "127.0.0.1:1"  # nothing listens there: reaching the network would fail with exit 1
FAST = ["--size", "64x64", "--steps", "2", "--inversion-steps", "4", "--no-reconstruct"]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _action(parser: argparse.ArgumentParser, option: str) -> argparse.Action:
    matches = [a for a in parser._actions if option in a.option_strings]
    assert len(matches) == 1, f"{parser.prog}: {option} is defined {len(matches)} times"
    return matches[0]


# ----------------------------------------------------------------------------------------------------------
# Flags against the declarations


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_client_flags_match_the_spec_declarations(section: str) -> None:
    spec_cls, declared, message_cls = SECTIONS[section]
    by_field = {f.field: f for f in declared}
    flagged = [f for f in spec_fields(spec_cls) if f.doc.flags]
    assert [f.name for f in flagged] == list(by_field), "client flags and flagged spec fields differ"
    spec_defaults = {f.name: f.default for f in spec_fields(spec_cls)}
    for field in flagged:
        mine = by_field[field.name]
        assert mine.flags == field.doc.flags, field.name
        assert mine.help == field.doc.help, field.name
        assert mine.choices == field.doc.choices, field.name
        assert (mine.minimum, mine.maximum) == (field.doc.minimum, field.doc.maximum), field.name
        assert mine.default == (None if field.required else field.default), field.name
        if mine.same_as:  # "as another field when not given": only sound when the two defaults agree
            assert spec_defaults[mine.same_as] == field.default, field.name
        assert field.name in message_cls.DESCRIPTOR.fields_by_name, f"no proto field {field.name}"
        for command in COMMANDS[section]:
            action = _action(_subparser(command), field.doc.flags[0])
            assert tuple(action.option_strings) == field.doc.flags, (command, field.name)
            assert action.default is None, (command, field.name)  # not given = unset = the spec default
            assert (tuple(action.choices) if action.choices else None) == field.doc.choices, (
                command,
                field.name,
            )
            if field.default is not None and not field.required and not mine.same_as:
                assert f"(default: {field.default})" in (action.help or ""), (command, field.name)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_client_flags_are_the_library_cli_flags(section: str) -> None:
    """Same field, same flag names, parser default and choices in `tokenflow edit` and the client."""
    from tokenflow.cli import build_parser as library_parser

    parser = library_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    library_edit = sub.choices["edit"]
    for flag in SECTIONS[section][1]:
        library = _action(library_edit, flag.flags[0])
        client = _action(_subparser(COMMANDS[section][0]), flag.flags[0])
        assert library.option_strings == client.option_strings, flag.field
        assert (library.default, library.choices) == (client.default, client.choices), flag.field
    for option in ("--size", "-y"):  # flags both CLIs add beside the spec fields
        assert (
            _action(library_edit, option).option_strings == _action(_subparser("edit"), option).option_strings
        )


def test_every_existing_client_flag_still_parses() -> None:
    """The flags of earlier releases are in users' scripts: they keep their meaning."""
    old = [
        "--start", "1", "--frames", "5", "--stride", "2", "--size", "64x64", "--area", "65536",
        "--steps", "4", "--inversion-steps", "8", "--inversion-prompt", "a video", "--no-reconstruct",
        "-p", "a cat", "--prompt", "a dog", "--negative-prompt", "", "--guidance", "5", "--seed", "3",
        "--method", "per-frame", "--pnp-attn-t", "0.25", "--pnp-f-t", "0.5", "--keyframe-interval", "4",
        "--chunk-size", "2", "--crf", "30",
    ]  # fmt: skip
    from clients.cli import _decode, _edits, _inversion

    a = build_parser().parse_args(["edit", "clip.mp4", "--out-dir", "out", *old, "--sdedit-start", "0.7",
                                   "--weighting", "linear", "--inversion-batch-size", "2"])  # fmt: skip
    decode, inversion, edits = _decode(a), _inversion(a), _edits(a)
    assert (decode.start, decode.max_frames, decode.stride, decode.width, decode.height) == (1, 5, 2, 64, 64)
    assert decode.target_area == 65536
    assert (inversion.steps, inversion.edit_steps, inversion.prompt) == (8, 4, "a video")
    assert (inversion.reconstruct, inversion.batch_size) == (False, 2)
    assert [e.prompt for e in edits] == ["a cat", "a dog"]
    e = edits[1]
    assert (e.negative_prompt, e.guidance_scale, e.seed, e.keyframe_interval, e.chunk_size, e.crf) == (
        "", 5.0, 3, 4, 2, 30
    )  # fmt: skip
    assert (e.pnp_attn_t, e.pnp_f_t, e.sdedit_start) == (0.25, 0.5, 0.7)
    assert e.method == common_pb2.EDIT_METHOD_PER_FRAME
    assert e.propagation_weighting == common_pb2.PROPAGATION_WEIGHTING_LINEAR
    # --steps alone: as many inversion steps (always a valid multiple), like the library CLI.
    a = build_parser().parse_args(["invert", "clip.mp4", "--steps", "3"])
    assert (_inversion(a).steps, _inversion(a).edit_steps) == (3, 3)


def test_flags_not_given_leave_the_fields_unset_for_the_servers_defaults() -> None:
    from clients.cli import _decode, _edits, _inversion

    a = build_parser().parse_args(["edit", "clip.mp4", "--out-dir", "out", "-p", "a cat"])
    messages = {"decode": _decode(a), "inversion": _inversion(a), "edit": _edits(a)[0]}
    for section, (_, declared, _) in SECTIONS.items():
        message = messages[section]
        for flag in declared:
            if flag.field == "prompt" and section == "edit":
                continue
            descriptor = message.DESCRIPTOR.fields_by_name[flag.field]
            if descriptor.has_presence:
                assert not message.HasField(flag.field), (section, flag.field)
            else:  # plain proto3 scalars: the zero value is the declared default
                assert getattr(message, flag.field) in (0, ""), (section, flag.field)
                assert flag.default in (0, "", None, "tokenflow", "sigmoid"), (section, flag.field)
    assert messages["edit"].prompt == "a cat"


def test_out_of_range_flag_is_a_usage_error_before_any_rpc(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--target", UNREACHABLE, "keyframes", "a" * 64, "--out-dir", "x", "-p", "a", "--crf", "60"])
    err = capsys.readouterr().err
    assert code == 2 and "--crf" in err and "Traceback" not in err, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tokenflow-client {clients.__version__}"


# ----------------------------------------------------------------------------------------------------------
# Output locations, checked before any RPC (the target is unreachable: an RPC would exit 1)


def _usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["--target", UNREACHABLE, "--timeout", "2", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


def test_unusable_out_dir_fails_before_the_upload(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not uploaded")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out_dir in (a_file, a_file / "sub"):
        err = _usage_error(capsys, "edit", str(clip), "-p", "a cat", "--out-dir", str(out_dir))
        assert str(out_dir) in err, err
    err = _usage_error(capsys, "keyframes", "b" * 64, "-p", "a cat", "--out-dir", str(a_file / "sub"))
    assert "output directory" in err, err
    err = _usage_error(capsys, "edit", str(clip), "-p", "a", "--out-dir", str(tmp_path / "missing" / "out"))
    assert "does not exist" in err and not (tmp_path / "missing").exists(), err
    err = _usage_error(capsys, "fetch", "c" * 64, "-o", str(tmp_path / "missing" / "x.mp4"))
    assert "does not exist" in err, err


def test_existing_output_is_not_overwritten_without_y(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not uploaded")
    out = tmp_path / "out"
    out.mkdir()
    (out / "edit-1.mp4").write_bytes(b"keep me")
    err = _usage_error(capsys, "edit", str(clip), "-p", "a", "-p", "b", "--out-dir", str(out))
    assert "edit-1.mp4 already exists" in err and "-y" in err, err
    (out / "edit-0-keyframe_0000.png").write_bytes(b"keep me")
    err = _usage_error(capsys, "edit", str(clip), "-p", "a", "--keyframes-only", "--out-dir", str(out))
    assert "edit-0-keyframe_0000.png already exists" in err, err
    (out / "video.mp4").write_bytes(b"keep me")
    err = _usage_error(capsys, "fetch", "d" * 64, "-o", str(out / "video.mp4"))
    assert "already exists" in err, err
    assert all(p.read_bytes() == b"keep me" for p in out.iterdir() if p.suffix in (".mp4", ".png"))
    assert sorted(p.name for p in out.iterdir()) == ["edit-0-keyframe_0000.png", "edit-1.mp4", "video.mp4"]
    # With -y (before or after the command) the check passes and the command goes on to the network.
    for argv in (["-y", "fetch", "d" * 64, "-o", str(out / "video.mp4")],
                 ["fetch", "d" * 64, "-o", str(out / "video.mp4"), "--overwrite"]):  # fmt: skip
        assert main(["--target", UNREACHABLE, "--timeout", "2", "--quiet", *argv]) == 1  # past the checks
        assert re.match(r"error: (UNAVAILABLE|DEADLINE_EXCEEDED): ", capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------------
# Progress printer


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress_message(phase: int, step: int, total: int, note: str = "") -> Any:
    return common_pb2.Progress(phase=phase, step=step, total_steps=total, message=note)


def test_progress_for_a_log_is_plain_lines_at_a_modest_rate() -> None:
    stream, clock = io.StringIO(), _Clock()
    progress = Progress(stream, interactive=False, interval=5.0, clock=clock)
    progress.transfer("upload", 0, 4 << 20)
    for i in range(1, 5):
        clock.now += 0.01
        progress.transfer("upload", i << 20, 4 << 20)
    for step in range(1, 201):  # 200 steps in 20 s: a line at the start and about one every 5 s
        clock.now += 0.1
        progress.update("inversion", _progress_message(common_pb2.PHASE_INVERT, step, 200, "note\r\x1b[2K"))
    reconstruct = _progress_message(common_pb2.PHASE_RECONSTRUCT, 1, 10)
    reconstruct.eta.FromSeconds(75)
    progress.update("inversion", reconstruct)
    progress.finish("inversion", common_pb2.Result(cache_hit=True))
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "upload: 0 B/4.0 MiB 0%" and lines[1] == "upload: 4.0 MiB/4.0 MiB 100%"
    invert = [line for line in lines if line.startswith("inversion: invert")]
    assert 4 <= len(invert) <= 6, lines
    assert invert[0] == "inversion: invert 1/200 0% (note)"
    assert lines[-2:] == ["inversion: reconstruct 1/10 10% eta 1m15s", "inversion: cached"]


def test_progress_on_a_terminal_is_one_updating_line_per_task() -> None:
    stream, clock = io.StringIO(), _Clock()
    progress = Progress(stream, interactive=True, clock=clock)
    for step in range(1, 51):
        clock.now += 0.05
        progress.update("edit 0", _progress_message(common_pb2.PHASE_EDIT, step, 50))
    progress.finish("edit 0", common_pb2.Result())
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("edit 0: done\x1b[K\n")
    assert 20 <= text.count("\r") <= 30  # redrawn at most ~10 times a second, not once per event


def test_disabled_progress_prints_nothing() -> None:
    stream = io.StringIO()
    progress = Progress(stream, enabled=False, interactive=False)
    progress.transfer("upload", 1, 2)
    progress.update("x", _progress_message(common_pb2.PHASE_EDIT, 1, 2))
    progress.finish("x", common_pb2.Result())
    progress.close()
    assert stream.getvalue() == ""


# ----------------------------------------------------------------------------------------------------------
# Against a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from services.server import build_server

    running = build_server(tiny_server_config(tmp_path_factory.mktemp("cache"), job_grace_seconds=5))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenflow.synthetic import make_clip

    return make_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4", frames=4, size=(64, 64), fps=8, audio=False
    )


def _console(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script (or `python -m clients.cli`) with stdout and stderr to pipes."""
    script = Path(sys.executable).parent / "tokenflow-client"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clients.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*command, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_edit_with_stderr_to_a_pipe_writes_plain_progress_and_normal_modes(
    server: Any, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{server.port}"
    out = tmp_path / "out"
    old_umask = os.umask(0o027)
    try:
        proc = _console("--target", target, "edit", str(clip), "-p", "a cat", "--out-dir", str(out), *FAST,
                        cwd=tmp_path)  # fmt: skip
    finally:
        os.umask(old_umask)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr, repr(proc.stderr)
    lines = proc.stderr.splitlines()
    assert any(line.startswith("upload:") for line in lines), lines
    assert any(line.startswith("inversion: ") for line in lines), lines
    assert lines[-1] == "edit 0: done", lines
    assert len(lines) < 40, lines  # plain lines at phase changes, not one per step
    video = out / "edit-0.mp4"
    assert stat.S_IMODE(video.stat().st_mode) == 0o640  # 0666 & ~umask, as a new file gets
    assert sorted(p.name for p in out.iterdir()) == ["edit-0.mp4"]  # no temporary files left

    first = video.read_bytes()
    argv = ["--target", target, "--quiet", "edit", str(clip), "-p", "a cat", "--out-dir", str(out), *FAST]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert video.read_bytes() == first
    video.write_bytes(b"replaced by -y")
    assert main(["-y", *argv]) == 0, capsys.readouterr().err
    assert video.read_bytes() == first


def test_fetch_refuses_to_overwrite_and_saves_with_normal_mode(
    server: Any, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients import TokenFlowClient

    target = f"127.0.0.1:{server.port}"
    with TokenFlowClient(target, timeout=60) as client:
        digest = client.upload(clip)
    old_umask = os.umask(0o022)
    try:
        assert main(["--target", target, "--quiet", "fetch", digest, "-o", str(tmp_path)]) == 0
        saved = tmp_path / clip.name
        assert saved.read_bytes() == clip.read_bytes()
        assert stat.S_IMODE(saved.stat().st_mode) == 0o644
        saved.write_bytes(b"mine")
        # The name comes from the server: the check happens when it is known, and still never overwrites.
        assert main(["--target", target, "--quiet", "fetch", digest, "-o", str(tmp_path)]) == 2
        assert "already exists" in capsys.readouterr().err
        assert saved.read_bytes() == b"mine"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert main(["--target", target, "--quiet", "fetch", digest, "-o", str(tmp_path), "-y"]) == 0
        assert saved.read_bytes() == clip.read_bytes()
    finally:
        os.umask(old_umask)


def test_list_and_delete_an_uploaded_video(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from clients import TokenFlowClient

    target = f"127.0.0.1:{server.port}"
    with TokenFlowClient(target, timeout=60) as client:
        digests = sorted(client.upload(bytes([i]) * 100, filename=f"v{i}.mp4") for i in range(3))
    assert main(["--target", target, "list", "video", "--page-size", "1"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "video"
    by_digest = {a["digest"]: a for a in listed["artifacts"]}
    assert set(digests) <= set(by_digest) and all(by_digest[d]["kind"] == "video" for d in digests)
    assert main(["--target", target, "list", "video", "--limit", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["artifacts"]) == 1

    assert main(["--target", target, "delete", digests[0]]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": digests[0]}
    assert main(["--target", target, "stat", digests[0]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NOT_FOUND: ") and err.rstrip().endswith("[ARTIFACT_NOT_FOUND]"), err
    assert main(["--target", target, "list", "video"]) == 0
    remaining = {a["digest"] for a in json.loads(capsys.readouterr().out)["artifacts"]}
    assert digests[0] not in remaining and set(digests[1:]) <= remaining
