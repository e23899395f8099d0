"""The client library and `tokenflow-client` against a real in-process server on the tiny model."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from loopback import metric, scrape, tiny_server_config

from clients import ClientError, TokenFlowClient, decode_spec, edit_spec, inversion_spec
from clients.cli import main
from clients.client import kind_name
from tokenflow_pb.v1 import common_pb2

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 6
# Decode and inversion flags shared by the CLI calls: tiny clip, few steps.
FAST = ["--size", "64x64", "--steps", "2", "--inversion-steps", "4", "--no-reconstruct"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from services.server import build_server

    running = build_server(tiny_server_config(tmp_path_factory.mktemp("cache"), job_grace_seconds=5))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def target(server: Any) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenflow.synthetic import make_clip

    return make_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4", frames=FRAMES, size=(64, 64), fps=8, audio=True
    )


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------------
# The command line


def test_cli_edit_with_two_prompts_writes_two_videos(
    capsys: pytest.CaptureFixture[str], target: str, clip: Path, tmp_path: Path
) -> None:
    from tokenflow.video import count_frames

    out_dir = tmp_path / "out"
    code, out, err = run_cli(
        capsys,
        "--target",
        target,
        "--timeout",
        "300",
        "edit",
        str(clip),
        "-p",
        "a watercolor painting",
        "-p",
        "a marble sculpture",
        "--out-dir",
        str(out_dir),
        "--seed",
        "2",
        *FAST,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert [e["prompt"] for e in summary["edits"]] == ["a watercolor painting", "a marble sculpture"]
    assert summary["inversion"]["kind"] == "inversion"
    assert summary["test_model"] is True
    files = [Path(f) for e in summary["edits"] for f in e["files"]]
    assert files == [out_dir / "edit-0.mp4", out_dir / "edit-1.mp4"]
    for path in files:
        assert count_frames(path) == FRAMES
    assert summary["edits"][0]["digest"] != summary["edits"][1]["digest"]
    assert "inversion" in err  # progress bars go to stderr
    assert "Traceback" not in err

    # The same request again is answered from the cache.
    code, out, err = run_cli(
        capsys,
        "--target",
        target,
        "--quiet",
        "edit",
        str(clip),
        "-p",
        "a watercolor painting",
        "--out-dir",
        str(out_dir / "again"),
        "--seed",
        "2",
        *FAST,
    )
    assert code == 0, err
    again = json.loads(out)
    assert again["inversion"]["cache_hit"] and again["edits"][0]["cache_hit"]
    assert again["cache_hits"] == 2
    assert again["edits"][0]["digest"] == summary["edits"][0]["digest"]
    assert err == ""  # --quiet: no bars


def test_cli_invert_then_keyframes_writes_pngs(
    capsys: pytest.CaptureFixture[str], target: str, clip: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli(capsys, "--target", target, "--quiet", "invert", str(clip), *FAST)
    assert code == 0, err
    inverted = json.loads(out)
    assert inverted["kind"] == "inversion"
    assert inverted["inversion"]["frames"] == FRAMES

    code, out, err = run_cli(
        capsys,
        "--target",
        target,
        "--quiet",
        "keyframes",
        inverted["digest"],
        "-p",
        "a cat",
        "--out-dir",
        str(tmp_path),
    )
    assert code == 0, err
    preview = json.loads(out)
    assert preview["kind"] == "keyframes" and preview["files"]
    for name in preview["files"]:
        assert Path(name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_edit_keyframes_only_writes_pngs(
    capsys: pytest.CaptureFixture[str], target: str, clip: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli(
        capsys,
        "--target",
        target,
        "--quiet",
        "edit",
        str(clip),
        "-p",
        "a dog",
        "--keyframes-only",
        "--out-dir",
        str(tmp_path),
        *FAST,
    )
    assert code == 0, err
    (entry,) = json.loads(out)["edits"]
    assert entry["kind"] == "keyframes"
    assert entry["files"] and all(Path(f).name.startswith("edit-0-") for f in entry["files"])
    assert all(f.endswith(".png") and Path(f).is_file() for f in entry["files"])


def test_cli_health(capsys: pytest.CaptureFixture[str], target: str) -> None:
    assert run_cli(capsys, "--target", target, "health") == (0, "SERVING\n", "")
    code, out, _ = run_cli(capsys, "--target", target, "health", "--service", "tokenflow.v1.Editor")
    assert (code, out) == (0, "SERVING\n")


def test_cli_health_of_an_unreachable_server_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--target", "127.0.0.1:1", "--timeout", "5", "health")
    assert code == 1 and out == ""
    assert err.startswith("error: UNAVAILABLE: ")
    assert "Traceback" not in err


def test_cli_fetch_unknown_digest_is_not_found(
    capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path
) -> None:
    code, out, err = run_cli(capsys, "--target", target, "fetch", "0" * 64, "-o", str(tmp_path / "x.mp4"))
    assert code == 1 and out == ""
    assert err.startswith("error: NOT_FOUND: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cli_fetch_returns_the_uploaded_bytes(
    capsys: pytest.CaptureFixture[str], target: str, clip: Path, tmp_path: Path
) -> None:
    with TokenFlowClient(target) as client:
        digest = client.upload(clip)
    code, out, err = run_cli(
        capsys, "--target", target, "--quiet", "fetch", digest, "-o", str(tmp_path / "copy.mp4")
    )
    assert code == 0, err
    assert (tmp_path / "copy.mp4").read_bytes() == clip.read_bytes()
    assert json.loads(out)["path"] == str(tmp_path / "copy.mp4")
    # Into a directory: the server's suggested name (the uploaded file's name).
    code, out, err = run_cli(capsys, "--target", target, "--quiet", "fetch", digest, "-o", str(tmp_path))
    assert code == 0, err
    assert Path(json.loads(out)["path"]) == tmp_path / "clip.mp4"
    code, out, err = run_cli(capsys, "--target", target, "stat", digest)
    assert code == 0, err
    assert json.loads(out)["kind"] == "video"


def test_cli_edit_of_a_non_video_is_invalid_argument(
    capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path
) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_bytes(b"this is not a video, just some text\n" * 100)
    code, out, err = run_cli(
        capsys,
        "--target",
        target,
        "--quiet",
        "edit",
        str(fake),
        "-p",
        "a cat",
        "--out-dir",
        str(tmp_path),
        *FAST,
    )
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["edit", "/no/such/file.mp4", "-p", "a cat", "--out-dir", "{tmp}"],
        ["edit", "{clip}", "-p", "a cat", "--out-dir", "{tmp}", "--size", "big"],
        ["edit", "{clip}", "--out-dir", "{tmp}"],
        ["keyframes", "not-a-digest", "-p", "a cat", "--out-dir", "{tmp}"],
        ["frobnicate"],
    ],
)
def test_cli_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], target: str, clip: Path, tmp_path: Path, argv: list[str]
) -> None:
    argv = [a.format(tmp=tmp_path, clip=clip) for a in argv]
    code, out, err = run_cli(capsys, "--target", target, "--quiet", *argv)
    assert code == 2 and out == ""
    assert "error" in err and "Traceback" not in err


def test_console_script_health(target: str) -> None:
    script = Path(sys.executable).parent / "tokenflow-client"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clients.cli"]
    done = subprocess.run(
        [*command, "--target", target, "health"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, "SERVING\n"), done.stderr


# ----------------------------------------------------------------------------------------------------------
# The library


def test_upload_and_download_bytes_with_progress(target: str, tmp_path: Path) -> None:
    data = os.urandom(2 * (1 << 20) + 12345)  # three chunks
    sent: list[tuple[int, int]] = []
    received: list[tuple[int, int]] = []
    with TokenFlowClient(target, timeout=60) as client:
        ref = client.upload_ref(data, filename="blob.bin", progress=lambda d, t: sent.append((d, t)))
        assert ref.digest == hashlib.sha256(data).hexdigest() and not ref.existed
        assert client.upload(data) == ref.digest
        assert client.upload_ref(data).existed
        path = client.download(ref.digest, tmp_path / "blob", progress=lambda d, t: received.append((d, t)))
        info = client.stat(ref.digest)
    assert path.read_bytes() == data
    assert sent[-1] == (len(data), len(data)) and len(sent) == 3
    assert received[-1] == (len(data), len(data))
    assert info.kind == common_pb2.ARTIFACT_KIND_VIDEO and info.total_size == len(data)
    assert kind_name(info.kind) == "video" and info.create_time.seconds > 0
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]  # no temporary file left


def test_list_and_delete_through_the_client(target: str) -> None:
    with TokenFlowClient(target, timeout=60) as client:
        mine = {client.upload(f"listed {i}".encode()) for i in range(3)}
        listed = [a.digest for a in client.iter_artifacts("video", page_size=2)]
        assert mine <= set(listed) and listed == sorted(listed) and len(set(listed)) == len(listed)
        page = client.list_artifacts("video", page_size=1)
        assert len(page.artifacts) == 1 and page.next_page_token
        gone = sorted(mine)[0]
        client.delete(gone)
        assert gone not in {a.digest for a in client.iter_artifacts("video")}
        with pytest.raises(ClientError) as info:
            client.delete(gone)
        assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.reason == "ARTIFACT_NOT_FOUND"
        with pytest.raises(ClientError) as info:
            client.list_artifacts("video", page_token="not a token")
        assert info.value.field_violations[0][0] == "page_token" and not info.value.retryable


def test_client_errors_carry_code_and_message(target: str, tmp_path: Path) -> None:
    with TokenFlowClient(target, timeout=30) as client:
        with pytest.raises(ClientError) as info:
            client.stat("f" * 64)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert str(info.value) == f"NOT_FOUND: {info.value.message}" and "\n" not in str(info.value)
        with pytest.raises(ClientError) as info:
            client.invert("f" * 64, decode=decode_spec(size=(64, 64)))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError) as info:
            client.upload(b"x", kind="inversion")  # a kind, but not one that can be uploaded
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError, match="unknown kind"):
            client.upload(b"x", kind="pickle")
        with pytest.raises(ClientError) as info:
            client.download("0" * 64, tmp_path)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ValueError, match="unknown stage"):
            client.cancel("painting", "0" * 64)
        response = client.cancel("propagation", "0" * 64)
        assert not response.cancelled
        with pytest.raises(FileNotFoundError):
            client.upload(tmp_path / "missing.mp4")


def test_stage_calls_through_the_library(target: str, clip: Path) -> None:
    events: list[Any] = []
    with TokenFlowClient(target, timeout=300) as client:
        video = client.upload(clip)
        inversion = client.invert(
            video,
            decode=decode_spec(size=(64, 64)),
            inversion=inversion_spec(steps=4, edit_steps=2, reconstruct=False),
            on_event=events.append,
        )
        assert kind_name(inversion.kind) == "inversion" and inversion.inversion.frames == FRAMES
        assert events[-1].result == inversion
        result = client.propagate(inversion.digest, edit_spec("a cat", method="per-frame", seed=5))
        assert kind_name(result.kind) == "propagation" and result.propagation.frames == FRAMES
        (same,) = client.edit(
            video,
            [edit_spec("a cat", method="per-frame", seed=5)],
            decode=decode_spec(size=(64, 64)),
            inversion=inversion_spec(steps=4, edit_steps=2, reconstruct=False),
        )
        assert same.digest == result.digest and same.cache_hit


def serving(client: TokenFlowClient, *services: str) -> bool:
    """Every one of `services` reports SERVING (a health check cut by a connection's age: not yet)."""
    try:
        return all(client.health(service) == "SERVING" for service in services)
    except ClientError:
        return False


def test_an_edit_outlives_the_connections_it_streams_over(tmp_path: Path, caplog: Any) -> None:
    """A server that closes every connection after 0.5 s (GOAWAY, then 0.25 s of grace) cuts an edit's
    stream many times; the client re-sends the same request, which re-attaches to the running jobs, so
    the edit completes and every stage job is computed once (Prometheus: one job per stage, none
    cancelled)."""
    import logging
    import time

    from services.server import build_server
    from tokenflow.synthetic import make_clip

    frames = 12
    video = make_clip(tmp_path / "clip.mp4", frames=frames, size=(64, 64), fps=8, audio=False)
    config = tiny_server_config(
        tmp_path / "cache",
        metrics_port=0,
        job_grace_seconds=60,
        max_connection_age_seconds=0.5,
        max_connection_age_grace_seconds=0.25,
    )
    running = build_server(config)
    try:
        with caplog.at_level(logging.WARNING, logger="clients.client"):
            with TokenFlowClient(f"127.0.0.1:{running.port}", timeout=600) as client:
                deadline = time.monotonic() + 300  # the model loads in the background
                while not serving(client, "tokenflow.v1.Editor", "tokenflow.v1.Propagation"):
                    assert time.monotonic() < deadline, "the server never became SERVING"
                    time.sleep(0.1)
                (result,) = client.edit(
                    video,
                    "a cat",
                    decode=decode_spec(size=(64, 64)),
                    inversion=inversion_spec(steps=8, edit_steps=4, reconstruct=False),
                )
        assert kind_name(result.kind) == "propagation" and result.propagation.frames == frames
        assert any("re-attaching" in r.getMessage() for r in caplog.records), "no stream was ever cut"
        samples = scrape(running.metrics_port or 0)
        for stage in ("inversion", "propagation"):
            computed = metric(samples, "tokenflow_jobs_total", stage=stage)  # every outcome
            assert computed == 1, f"{stage}: {computed} jobs computed (a cut stream restarted the job)"
            assert metric(samples, "tokenflow_jobs_total", stage=stage, outcome="ok") == 1
    finally:
        running.stop(grace=0)


def test_a_download_goes_on_from_the_bytes_it_has_when_its_stream_is_cut(tmp_path: Path, caplog: Any) -> None:
    """A 24 MiB download read slowly (about 2 s) from a server that closes every connection after 0.5 s
    (GOAWAY, then 0.25 s of grace) is cut; the client asks again from the bytes it has (the request's
    offset), so the file arrives whole, matches its sha256, and no part file is left."""
    import logging
    import time

    from services.server import build_server

    data = os.urandom(24 << 20)  # more than HTTP/2's flow-control windows: it cannot all be sent ahead
    config = tiny_server_config(
        tmp_path / "cache",
        services=frozenset({"artifacts"}),
        preload_model=False,
        max_connection_age_seconds=0.5,
        max_connection_age_grace_seconds=0.25,
    )
    running = build_server(config)
    try:
        with TokenFlowClient(f"127.0.0.1:{running.port}", timeout=120) as client:
            deadline = time.monotonic() + 60
            while not serving(client, "tokenflow.v1.Artifacts"):
                assert time.monotonic() < deadline, "the server never became SERVING"
                time.sleep(0.1)
            digest = client.upload(data, filename="big.mp4")
            seen: list[int] = []

            def slowly(done: int, total: int) -> None:
                seen.append(done)
                time.sleep(0.08)  # a slow reader: the download outlives its connection

            with caplog.at_level(logging.WARNING, logger="clients.client"):
                path = client.download(digest, tmp_path / "out.mp4", progress=slowly)
        assert path.read_bytes() == data
        assert any("re-attaching" in r.getMessage() for r in caplog.records), "the stream was never cut"
        assert seen == sorted(seen) and seen[-1] == len(data), "progress went back: it restarted from 0"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out.mp4"], "a part file was left"
    finally:
        running.stop(grace=0)


def test_spec_builders_leave_unset_fields_unset() -> None:
    spec = edit_spec("a cat")
    for name in ("negative_prompt", "guidance_scale", "pnp_attn_t", "pnp_f_t", "keyframe_interval", "crf"):
        assert not spec.HasField(name)
    assert spec.method == common_pb2.EDIT_METHOD_UNSPECIFIED
    spec = edit_spec("a cat", negative_prompt="", guidance=0.0, method="sdedit", keyframe_schedule=[[0, 8]])
    assert spec.HasField("negative_prompt") and spec.negative_prompt == ""
    assert spec.HasField("guidance_scale") and spec.guidance_scale == 0.0
    assert spec.method == common_pb2.EDIT_METHOD_SDEDIT
    assert list(spec.keyframe_schedule[0].frames) == [0, 8]
    with pytest.raises(ValueError, match="unknown method"):
        edit_spec("a cat", method="magic")
    decode = decode_spec(size=(64, 48))
    assert (decode.width, decode.height) == (64, 48) and not decode.HasField("stride")
    inv = inversion_spec(steps=10)
    assert inv.steps == 10 and not inv.HasField("edit_steps") and not inv.HasField("reconstruct")


# ----------------------------------------------------------------------------------------------------------
# The package's dependencies


def test_clients_import_nothing_from_the_server_side() -> None:
    code = (
        "import sys, clients, clients.cli, clients.client\n"
        "server_side = ('tokenflow', 'services', 'torch', 'diffusers')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in server_side)\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""

    allowed = {"grpc", "grpc_health", "grpc_status", "google", "tokenflow_pb", "clients", "tqdm"}
    allowed.add("__future__")
    for path in sorted((ROOT / "clients").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            outside = {r for r in roots if r not in allowed and r not in sys.stdlib_module_names}
            assert not outside, f"{path.name} imports {outside}"
