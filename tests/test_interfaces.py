"""One declaration per concept: the method table and the spec fields against the proto and the library
CLI; the library's boundary; the CLI's manners (no overwrite without -y, outputs checked before any
compute, progress that suits a log); serve flags from the environment; JSON logs with job ids.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor

from services import config
from services.logging_setup import JobIdFilter, JsonFormatter, job_context
from tokenflow import cli
from tokenflow.console import ProgressDisplay
from tokenflow.editing import edit
from tokenflow.methods import METHODS
from tokenflow.progress import ProgressEvent
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec, spec_fields
from tokenflow_pb.v1 import common_pb2

REPO = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n
SPECS = [(DecodeSpec, common_pb2.DecodeSpec), (InversionSpec, common_pb2.InversionSpec),
         (EditSpec, common_pb2.EditSpec)]  # fmt: skip


def _tokenflow(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("tokenflow")
    return subprocess.run(
        [str(script), *map(str, args)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


# -- the method table and the spec declarations against the proto ----------------------------------------


def test_method_table_is_the_proto_enum() -> None:
    enum = common_pb2.EditMethod.DESCRIPTOR
    values = [v.name for v in enum.values if v.number != 0]
    assert values == [m.proto_name for m in METHODS.values()]
    assert enum.values_by_number[0].name == "EDIT_METHOD_UNSPECIFIED"


def _enum_prefix(enum_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper() + "_"


@pytest.mark.parametrize(("cls", "message"), SPECS, ids=lambda x: getattr(x, "__name__", ""))
def test_spec_fields_are_the_proto_fields(cls: type, message: type) -> None:
    proto = message.DESCRIPTOR.fields_by_name
    declared = {f.name: f for f in spec_fields(cls)}
    assert set(declared) == set(proto), "proto field names must equal the spec's field names"
    for name, f in declared.items():
        p = proto[name]
        if f.doc.choices is not None:
            assert p.type == FieldDescriptor.TYPE_ENUM, name
            prefix = _enum_prefix(p.enum_type.name)
            assert [v.name for v in p.enum_type.values if v.number] == [
                prefix + c.upper().replace("-", "_") for c in f.doc.choices
            ], name
            continue
        if name == "keyframe_schedule":
            assert p.is_repeated
            continue
        kind = {bool: "bool", int: "int", float: "float", str: "str"}[
            next(t for t in (bool, int, float, str) if f.type in (t, t | None))
        ]
        expected_types = {
            "bool": {FieldDescriptor.TYPE_BOOL},
            "int": {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64},
            "float": {FieldDescriptor.TYPE_DOUBLE},
            "str": {FieldDescriptor.TYPE_STRING},
        }[kind]
        assert p.type in expected_types, name
        # A field whose default is not the proto zero value must be `optional`, so unset means default.
        zero = {"bool": False, "int": 0, "float": 0.0, "str": ""}[kind]
        if not f.required and f.default not in (zero, None):
            assert p.has_presence, f"{message.DESCRIPTOR.full_name}.{name} must be optional"
        if f.doc.maximum is not None and p.type == FieldDescriptor.TYPE_INT32:
            assert f.doc.maximum < 2**31, name


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("command", ["edit", "invert"])
def test_library_cli_flags_follow_the_declarations(command: str) -> None:
    parser = _subparser(cli.build_parser(), command)
    by_flag = {o: a for a in parser._actions for o in a.option_strings}
    classes = (DecodeSpec, InversionSpec, EditSpec) if command == "edit" else (DecodeSpec, InversionSpec)
    for cls in classes:
        for f in spec_fields(cls):
            for flag in f.doc.flags:
                action = by_flag[flag]
                assert action.dest == f.name, flag
                assert action.default is None  # the spec's own default applies
                assert tuple(action.choices or ()) == tuple(f.doc.choices or ()), flag
    # The flags earlier scripts use still work.
    for old in ("--guidance", "--weighting", "--frames", "--area", "--size", "--steps", "--inversion-steps"):
        assert old in by_flag or command == "invert" and old in ("--guidance", "--weighting")


def test_execution_fields_change_only_float_order(tiny_model, small_inversion) -> None:  # noqa: ANN001
    """chunk_size is `execution`: outside every key, because the edit is the same within float rounding."""
    spec = EditSpec(prompt="a red fox", keyframe_interval=4, chunk_size=8)
    a = edit(tiny_model, small_inversion, spec).latents
    b = edit(tiny_model, small_inversion, spec.replace(chunk_size=3)).latents
    assert (torch.linalg.norm(a - b) / torch.linalg.norm(a)).item() < 1e-5


# -- the library's boundary -------------------------------------------------------------------------------


def test_the_library_never_imports_the_services_or_grpc() -> None:
    for path in (REPO / "tokenflow").glob("*.py"):
        source = path.read_text()
        imports = re.search(r"^\s*(from|import)\s+(services|clients|grpc|tokenflow_pb)\b", source, re.M)
        assert not imports, path
    code = (
        "import sys, tokenflow.cli, tokenflow.pipeline, tokenflow.editing, tokenflow.keys\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('services', 'clients', 'grpc'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


def test_serve_works_with_global_flags_and_version() -> None:
    proc = _tokenflow("-v", "serve", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "TOKENFLOW_CACHE_SIZE" in proc.stdout and "--log-format" in proc.stdout
    proc = _tokenflow("--version")
    assert proc.returncode == 0 and re.fullmatch(r"tokenflow \d+\.\d+\.\d+\S*\n", proc.stdout), proc.stdout


# -- outputs: checked before compute, never overwritten silently, normal permissions ----------------------


def test_make_clip_refuses_to_overwrite_without_y(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clip.mp4"
    assert cli.main(["make-clip", str(out), "--frames", "2", "--size", "64x64", "--no-audio"]) == 0
    first = out.stat().st_mtime_ns
    assert cli.main(["make-clip", str(out), "--frames", "2", "--size", "64x64", "--no-audio"]) == 2
    assert "already exists; pass -y to overwrite it" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == first
    assert cli.main(["make-clip", str(out), "--frames", "3", "--size", "64x64", "--no-audio", "-y"]) == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{dir}/missing/out.mp4", "does not exist"),
        ("{dir}/exists.mp4", "already exists; pass -y"),
        ("{dir}", "is a directory"),
    ],
)
def test_edit_checks_its_output_before_any_compute(
    output: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "exists.mp4").write_bytes(b"keep me")
    # The model does not exist: had the CLI loaded it (or decoded anything) first, this error would be
    # a model error. The output is refused first.
    argv = ["edit", "-p", "a fox", "-o", output.format(dir=tmp_path), "--model", str(tmp_path / "no-model")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "preset" not in err, err
    assert (tmp_path / "exists.mp4").read_bytes() == b"keep me"


def test_invert_refuses_a_non_empty_save_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save = tmp_path / "inv"
    save.mkdir()
    (save / "other.txt").write_text("x")
    argv = ["invert", str(tmp_path / "clip.mp4"), "--save", str(save), "--model", str(tmp_path / "no-model")]
    assert cli.main(argv) == 2
    assert "is not empty; pass -y" in capsys.readouterr().err


# -- progress for terminals and for logs ------------------------------------------------------------------


def _events(display: ProgressDisplay, clock: list[float]) -> None:
    for stage, total in (("invert", 50), ("edit", 50)):
        for step in range(1, total + 1):
            clock[0] += 1.0
            display(ProgressEvent(stage, step, total, frames_done=16, frames_total=16))
    display.close()


def test_progress_in_a_log_is_plain_lines_at_a_modest_rate() -> None:
    stream, clock = io.StringIO(), [0.0]
    display = ProgressDisplay(stream=stream, tty=False, interval=10.0, clock=lambda: clock[0])
    _events(display, clock)
    text = stream.getvalue()
    assert not CONTROL.search(text), repr(text[:200])
    lines = text.splitlines()
    # 100 events over 100 s: a line when each phase starts, one per 10 s, one at each end.
    assert 10 <= len(lines) <= 14, lines
    assert lines[-1].startswith("edit: 50/50 (100%)") and "eta" not in lines[-1]
    assert any("eta 00:" in line for line in lines)


def test_progress_on_a_terminal_rewrites_one_line_per_phase() -> None:
    stream, clock = io.StringIO(), [0.0]
    _events(ProgressDisplay(stream=stream, tty=True, clock=lambda: clock[0]), clock)
    text = stream.getvalue()
    assert "\x1b" not in text  # no cursor movement, only carriage returns
    assert text.count("\n") == 2 and text.count("\r") == 100


def test_the_cli_writes_no_control_characters_into_a_log(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    assert _tokenflow("make-clip", clip, "--frames", "4", "--size", "64x64").returncode == 0
    proc = _tokenflow("invert", clip, "--save", tmp_path / "inv", "--size", "64x64", "--steps", "2",
                      "--no-reconstruct")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "invert:" in proc.stderr and not CONTROL.search(proc.stderr), repr(proc.stderr)


# -- serve flags from the environment, JSON logs ----------------------------------------------------------


def test_every_serve_flag_reads_its_environment_variable() -> None:
    parser = config.build_parser()
    samples = {int: "7", float: "2.5", None: "x"}
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest == "help":
            continue
        raw = list(action.choices)[-1] if action.choices else samples.get(action.type, "x")
        args = config.parse_args([], environ={config.env_name(flags[0]): str(raw)})
        expected = action.type(raw) if callable(action.type) else raw
        assert getattr(args, action.dest) == expected, flags[0]


def test_flags_win_over_the_environment_and_bad_values_name_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"TOKENFLOW_MAX_QUEUE": "3", "TOKENFLOW_CACHE_SIZE": "1GB"}
    args = config.parse_args(["--max-queue", "5"], environ=env)
    assert args.max_queue == 5 and config.config_from_args(args).cache_size_bytes == 10**9
    with pytest.raises(SystemExit):
        config.parse_args([], environ={"TOKENFLOW_PORT": "eighty"})
    assert "TOKENFLOW_PORT='eighty'" in capsys.readouterr().err


def test_serve_flags_default_to_the_config_defaults() -> None:
    """`tokenflow serve` with no flags is ServerConfig() (the flags read their defaults from it)."""
    assert config.config_from_args(config.parse_args([], environ={})) == config.ServerConfig()
    for size in (20 * 10**9, 8 << 30, 2 << 30, 1000, 1023, 0):
        assert config.parse_size(config.format_size(size)) == size


def test_json_logs_carry_the_job_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tokenflow.test.json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with job_context("ab" * 32):
            log.info("step %d of %d", 3, 50, extra={"stage": "propagation"})
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "step 3 of 50" and first["job_id"] == "ab" * 32
    assert first["stage"] == "propagation" and first["level"] == "INFO" and first["time"].endswith("+00:00")
    assert second["job_id"] is None


# -- metrics: every known series from the start -----------------------------------------------------------


def test_every_known_series_exists_at_start(tmp_path: Path) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from services.config import ServerConfig
    from services.model_host import ModelHost
    from services.server import build_server

    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, cache_dir=tmp_path / "cache",
                       preload_model=False)  # fmt: skip
    with build_server(cfg, model_host=ModelHost("tiny", device="cpu")) as running:
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    series = {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    # Nothing has happened yet, and still the series alerts use are there, at zero.
    assert ("tokenflow_cache_corrupt_total", (("kind", "inversion"),)) in series
    assert ("tokenflow_jobs_total", (("outcome", "internal"), ("stage", "propagation"))) in series
    upload = (("method", "Upload"), ("outcome", "resource_exhausted"), ("service", "artifacts"))
    assert ("tokenflow_requests_total", upload) in series
    handled = [s for s in series if s[0] == "grpc_server_handled_total" and ("grpc_method", "Invert") in s[1]]
    assert handled, "grpc_server_handled_total for Inversion.Invert"


def test_lines_logged_inside_a_job_carry_its_id() -> None:
    from services.jobs import JobManager

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tokenflow.test.jobs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    manager = JobManager("inversion", max_queue=1, workers=1, grace_seconds=1.0)
    try:
        job = manager.submit("cd" * 32, lambda ctx: log.info("inverting") or "done")
        assert job.wait(30) == "done"
    finally:
        manager.shutdown(0)
        log.removeHandler(handler)
    (line,) = (json.loads(x) for x in stream.getvalue().splitlines())
    assert line["message"] == "inverting" and line["job_id"] == "cd" * 32
