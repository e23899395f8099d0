"""The stages as a fleet, over real processes on loopback.

Two inversion replicas (`python -m services.server`, on 127.0.0.1 and 127.0.0.2, each with its own
local cache and one shared volume tier) sit behind one target, ``ipv4:127.0.0.1:P1,127.0.0.2:P2``. An
Editor (in this process, hosting keyframes and propagation too) reaches them through that target. The
tests check what an operator relies on: calls are spread over both replicas, a full queue and a replica
killed mid-job fail over to the other replica with the same artifact as a clean run, and health tells
the truth while a model loads or when it cannot load. Tiny preset, 64x64 clip, a few steps.

The full topology (`s3_fleet`) runs every stage as its own processes -- 1 Editor, 2 inversion, 2
propagation and 1 keyframes replica, each with its own local cache, all on one S3 tier served by moto --
and checks the fleet's promises: edits spread over the propagation replicas, a SIGKILLed propagation
replica changes nothing in the result, a fresh replica edits from the shared tier without inverting, and
identical inversions on two replicas compute once, also when the lease holder is killed mid-job.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loopback import Samples, metric, scrape, tiny_server_config
from serve_process import SERVICES_SERVER, ServeProcess

from clients import TokenFlowClient, decode_spec, edit_spec, inversion_spec
from clients import channels as client_channels
from clients.client import operation_metadata
from services import channels as service_channels
from services.model_host import ModelHost
from services.server import RunningServer, build_server
from tokenflow_pb.v1 import inversion_pb2, server_info_pb2, server_info_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DECODE = decode_spec(size=(64, 64))
SMALL = inversion_spec(steps=2, edit_steps=2, reconstruct=False)
EDIT = edit_spec("a watercolor painting", seed=5)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ----------------------------------------------------------------------------------------------------------
# helpers


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def server_info(target: str) -> server_info_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(target) as channel:
        stub = server_info_pb2_grpc.ServerInfoStub(channel)
        return stub.GetServerInfo(server_info_pb2.GetServerInfoRequest(), timeout=10)


class Replica(ServeProcess):
    """`python -m services.server` on one loopback address; its metrics scraped as parsed samples."""

    def __init__(self, name: str, host: str, args: list[str], log_dir: Path) -> None:
        super().__init__(name, args, log_dir, host=host, entry=SERVICES_SERVER)

    def wait_started(self, timeout: float = 120.0) -> Replica:
        self.wait_serving(timeout)
        return self

    def metrics(self) -> Samples:
        return scrape(self.metrics_port or 0, self.host)


def replica_args(cache: Path, shared: Path, *extra: str) -> list[str]:
    return [
        "--metrics-port", "0", "--cache-dir", str(cache), "--cache-size", "1GB",
        "--shared-store", str(shared), "--model", "tiny", "--device", "cpu", "--log-level", "WARNING", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two inversion replicas (queue of 0: a second job is refused) and an in-process Editor over them."""
    root = tmp_path_factory.mktemp("fleet")
    shared = root / "shared"
    replicas = [
        Replica(
            f"inversion-{i}",
            host,
            replica_args(
                root / f"cache-{i}",
                shared,
                "--services",
                "inversion",
                "--max-queue",
                "0",
                "--job-grace-seconds",
                "2",
            ),
            root,
        )  # fmt: skip
        for i, host in enumerate(("127.0.0.1", "127.0.0.2"))
    ]
    editor: RunningServer | None = None
    try:
        for r in replicas:
            r.wait_started()
        target = "ipv4:" + ",".join(r.target for r in replicas)
        host = ModelHost("tiny", device="cpu", dtype="float32")
        editor = build_server(
            tiny_server_config(
                root / "editor-cache",
                services="editor,keyframes,propagation",
                metrics_port=0,
                shared_store=shared,
                inversion_addr=target,
                stage_wait_seconds=60,
            ),
            model_host=host,
        )
        for r in replicas:
            wait_for(lambda r=r: health(r.target) == SERVING, 120, f"{r.name} to serve")
        yield {"replicas": replicas, "target": target, "editor": editor, "host": host, "root": root}
    finally:
        if editor is not None:
            editor.stop(grace=0)
        for r in replicas:
            r.close()


def files_of(result: Any) -> dict[str, str]:
    return {f.name: f.sha256 for f in result.files}


# ----------------------------------------------------------------------------------------------------------
# channels: one policy


def test_comma_lists_become_address_lists_and_names_are_left_to_the_resolver() -> None:
    norm = client_channels.normalize_target
    assert norm("127.0.0.1:5001,127.0.0.2:5002") == "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    assert norm("[::1]:5001, [::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    for unchanged in ("inversion:50051", "dns:///inversion:50051", "ipv4:10.0.0.1:1,10.0.0.2:1", "unix:/s"):
        assert norm(unchanged) == unchanged
    with pytest.raises(ValueError, match="IP addresses only"):
        norm("inversion-0:50051,inversion-1:50051")
    with pytest.raises(ValueError, match="mixes"):
        norm("127.0.0.1:1,[::1]:2")
    assert service_channels.backend_count("127.0.0.1:1,127.0.0.2:2,127.0.0.3:3") == 3
    assert service_channels.backend_count("ipv4:127.0.0.1:1") == 1
    assert service_channels.backend_count("unix:/tmp/s") == 1


def test_stage_channels_and_the_client_share_one_service_config() -> None:
    """services/channels.py builds on clients/channels.py: round robin, UNAVAILABLE retries, health."""
    services, unary = client_channels.unary_methods_of([inversion_pb2.DESCRIPTOR])
    assert services == ["tokenflow.v1.Inversion"] and unary == [("tokenflow.v1.Inversion", "Cancel")]
    config = json.loads(
        client_channels.service_config(services, unary, health_service="tokenflow.v1.Inversion")
    )
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "tokenflow.v1.Inversion"}
    unary_config, streaming_config = config["methodConfig"]
    assert unary_config["waitForReady"] is True and unary_config["timeout"] == "60s"
    for entry in (unary_config, streaming_config):
        assert entry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
        assert entry["retryPolicy"]["maxAttempts"] == client_channels.RETRY.max_attempts
    assert "timeout" not in streaming_config  # jobs run for minutes: the caller's deadline bounds them
    options = dict(
        client_channels.channel_options(
            service_channels.STAGE_CHANNEL_OPTIONS, services, unary, health_service="tokenflow.v1.Inversion"
        )
    )
    assert json.loads(options["grpc.service_config"]) == config
    assert service_channels.server_options(300, 1800) == [
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 1_800_000),
    ]


# ----------------------------------------------------------------------------------------------------------
# the fleet


def test_calls_are_spread_over_both_replicas(fleet: dict[str, Any], clip_path: Path) -> None:
    with TokenFlowClient(fleet["target"], timeout=120) as client:
        video = client.upload(clip_path)
        digests = {client.invert(video, decode=DECODE, inversion=SMALL).digest for _ in range(4)}
    assert len(digests) == 1  # one content address, whichever replica answered
    for replica in fleet["replicas"]:
        m = replica.metrics()
        calls = sum(
            metric(m, "tokenflow_requests_total", service="inversion", method="Invert", outcome=o)
            for o in ("ok",)
        )
        assert calls >= 1, f"{replica.name} got no Invert call: pick_first instead of round_robin?"
    info = server_info(fleet["replicas"][0].target)
    assert [t.name for t in info.store_tiers] == ["local", "volume"]
    assert info.limits.max_queue == 0 and info.model.test_model and info.ready


@pytest.mark.slow  # a long job must hold one replica while two Edits run: minutes on 2 loaded cores
def test_a_full_queue_fails_over_to_the_other_replica(fleet: dict[str, Any], clip_path: Path) -> None:
    a, b = fleet["replicas"]
    editor: RunningServer = fleet["editor"]
    job_ids: list[str] = []
    occupied: list[BaseException] = []
    with TokenFlowClient(a.target, timeout=300) as client_a, TokenFlowClient(editor.target, timeout=300) as c:
        video = client_a.upload(clip_path)

        def occupy() -> None:  # a long job holds A's only worker; its queue (0) refuses the next one
            def on_event(event: Any) -> None:
                if event.WhichOneof("event") == "progress" and event.progress.job_id:
                    job_ids.append(event.progress.job_id)

            try:
                client_a.invert(video, decode=DECODE, inversion=inversion_spec(prompt="occupy", steps=400,
                                edit_steps=2, reconstruct=False), on_event=on_event)  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - cancelled below, as intended
                occupied.append(e)

        thread = threading.Thread(target=occupy, daemon=True)
        thread.start()
        try:
            wait_for(lambda: metric(a.metrics(), "tokenflow_jobs_in_flight", stage="inversion") == 1, 120,
                     "A to run the occupying job")  # fmt: skip
            before = scrape(editor.metrics_port or 0)
            # Round robin alternates, so of two inversions at least one is first sent to the busy A.
            for n in range(2):
                inversion = inversion_spec(prompt=f"queue {n}", steps=2, edit_steps=2, reconstruct=False)
                (result,) = c.edit(video, EDIT, decode=DECODE, inversion=inversion)
                assert result.digest and result.files
        finally:
            wait_for(lambda: job_ids, 30, "the occupying job's id")
            client_a.cancel("inversion", job_ids[0])
            thread.join(60)
    rejected = metric(a.metrics(), "tokenflow_requests_total", service="inversion", method="Invert",
                      outcome="resource_exhausted")  # fmt: skip
    assert rejected >= 1, "A never refused a job: the test did not exercise the full queue"
    after = scrape(editor.metrics_port or 0)
    failovers = metric(after, "tokenflow_stage_failovers_total", stage="inversion", reason="queue_full")
    assert (
        failovers - metric(before, "tokenflow_stage_failovers_total", stage="inversion", reason="queue_full")
        >= 1
    )
    assert (
        metric(b.metrics(), "tokenflow_requests_total", service="inversion", method="Invert", outcome="ok")
        >= 1
    )


@pytest.mark.slow  # two Edits (a clean run, a killed one) on 2 loaded cores
def test_a_replica_killed_mid_job_fails_over_with_the_same_artifact(
    fleet: dict[str, Any], clip_path: Path, tmp_path: Path
) -> None:
    """SIGKILL the replica running the Edit's inversion: the Editor re-submits it to the other replica
    and the Edit completes with the artifact a clean run gives (same content address, same bytes)."""
    inversion = inversion_spec(prompt="killed", steps=4, edit_steps=2, reconstruct=False)
    # The clean run: an embedded server of its own, sharing nothing with the fleet but the model.
    clean_config = tiny_server_config(tmp_path / "clean")
    with build_server(clean_config, model_host=fleet["host"]) as clean:
        with TokenFlowClient(clean.target, timeout=300) as client:
            wait_for(lambda: client.health() == "SERVING", 60, "the clean server")
            (expected,) = client.edit(clip_path, EDIT, decode=DECODE, inversion=inversion)

    editor: RunningServer = fleet["editor"]
    results: list[Any] = []
    errors: list[BaseException] = []
    with TokenFlowClient(editor.target, timeout=300) as client:

        def run() -> None:
            try:
                results.extend(client.edit(clip_path, EDIT, decode=DECODE, inversion=inversion))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def running_replica() -> Replica | None:
            for r in fleet["replicas"]:
                if r.process.poll() is None and metric(
                    r.metrics(), "tokenflow_jobs_in_flight", stage="inversion"
                ):
                    return r
            return None

        victim = wait_for(running_replica, 120, "a replica to run the inversion", interval=0.02)
        victim.kill()
        thread.join(300)
    assert not thread.is_alive() and not errors, errors
    (result,) = results
    assert result.digest == expected.digest
    assert files_of(result) == files_of(expected)
    m = scrape(editor.metrics_port or 0)
    assert (
        sum(
            metric(m, "tokenflow_stage_failovers_total", stage="inversion", reason=reason)
            for reason in ("unavailable", "stream_broken", "stream_ended")
        )
        >= 1
    )


# ----------------------------------------------------------------------------------------------------------
# truthful health


def test_a_model_that_cannot_load_is_not_serving_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replica = Replica(
        "bad-model",
        "127.0.0.1",
        ["--services", "inversion", "--metrics-port", "0", "--cache-dir", str(tmp_path / "c"),
         "--model", "/nonexistent", "--device", "cpu", "--log-level", "WARNING"],
        tmp_path,
    )  # fmt: skip
    try:
        replica.wait_started()
        info = wait_for(
            lambda: (
                (i := server_info(replica.target)).model.state == server_info_pb2.MODEL_STATE_FAILED and i
            ),
            120,
            "the model load to fail",
        )
        assert not info.ready and "/nonexistent" in info.not_ready_reason
        assert "/nonexistent" in info.model.error and info.model.name == "/nonexistent"
        statuses = {s.name: s for s in info.services}
        assert not statuses["tokenflow.v1.Inversion"].serving
        assert "cannot be loaded" in statuses["tokenflow.v1.Inversion"].reason
        assert statuses["tokenflow.v1.Artifacts"].serving
        assert health(replica.target) == NOT_SERVING
        assert health(replica.target, "tokenflow.v1.Inversion") == NOT_SERVING
        assert health(replica.target, "tokenflow.v1.Artifacts") == SERVING
        m = replica.metrics()
        assert metric(m, "tokenflow_model_ready") == 0
        assert metric(m, "tokenflow_model_load_failures_total") >= 1
        assert metric(m, "tokenflow_service_serving", service="tokenflow.v1.Inversion") == 0
        # What an operator types: `tokenflow-client info` prints the same, as JSON.
        from clients import cli

        capsys.readouterr()
        assert cli.main(["--target", replica.target, "info"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["ready"] is False and "/nonexistent" in printed["not_ready_reason"]
        assert printed["model"]["state"] == "MODEL_STATE_FAILED" and printed["limits"]["max_queue"] == 8
    finally:
        replica.close()
    assert "/nonexistent" in replica.log_path.read_text()


def test_a_model_still_loading_is_not_serving_until_it_is_warm(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_loader(name: str, device: str | None = None, dtype: str | None = None) -> Any:
        from tokenflow.models import load_model

        assert release.wait(60), "the test never let the model load"
        return load_model(name, device=device, dtype=dtype)

    config = tiny_server_config(tmp_path / "c", services="inversion,editor,keyframes,propagation")
    host = ModelHost("tiny", device="cpu", dtype="float32", loader=slow_loader)
    with build_server(config, model_host=host) as running:
        target = running.target
        assert health(target) == NOT_SERVING
        assert health(target, "tokenflow.v1.Propagation") == NOT_SERVING
        assert health(target, "tokenflow.v1.Editor") == SERVING  # it needs no model; it waits for stages
        info = server_info(target)
        assert info.model.state == server_info_pb2.MODEL_STATE_LOADING and not info.model.fingerprint
        assert not info.ready and info.not_ready_reason == "loading the model"
        assert info.limits.edit_parallelism == 1  # embedded: one model, one edit at a time
        release.set()
        wait_for(lambda: health(target) == SERVING, 60, "SERVING once the model is warm")
        info = server_info(target)
        assert info.ready and info.model.state == server_info_pb2.MODEL_STATE_READY
        assert info.model.fingerprint and info.model.dtype == "float32" and info.model.device == "cpu"
        assert running.readiness is not None
        running.readiness.drain()  # what stop() does first: NOT_SERVING at once, before jobs wind down
        assert health(target) == NOT_SERVING and health(target, "tokenflow.v1.Editor") == NOT_SERVING
        info = server_info(target)
        assert info.draining and not info.ready and "draining" in info.not_ready_reason


# ----------------------------------------------------------------------------------------------------------
# fan-out


@pytest.mark.slow  # three edits on one tiny model: seconds on an idle machine, minutes on a loaded one
def test_distinct_edits_run_concurrently_and_stream_per_edit(tmp_path: Path, clip_path: Path) -> None:
    """With --edit-parallelism 2 the second edit's stage call starts before the first one's result."""
    config = tiny_server_config(tmp_path / "c", edit_parallelism=2)
    events: list[tuple[int, str]] = []
    with build_server(config) as running, TokenFlowClient(running.target, timeout=300) as client:
        assert server_info(running.target).limits.edit_parallelism == 2
        edits = [edit_spec("a cat", seed=1), edit_spec("a dog", seed=1), edit_spec("a cat", seed=1)]
        results = client.edit(
            clip_path,
            edits,
            decode=DECODE,
            inversion=SMALL,
            on_event=lambda e: events.append((e.edit_index, e.WhichOneof("event"))),
        )
    assert [r.digest for r in results][0] == results[2].digest != results[1].digest
    assert {i for i, _ in events} == {-1, 0, 1, 2}
    assert [i for i, kind in events if kind == "result"].count(0) == 1
    first_result = min(events.index((i, "result")) for i in (0, 1))
    started = {i for i, kind in events[:first_result] if kind == "progress"}
    assert {0, 1} <= started, f"the edits ran one after the other: {events}"


# ----------------------------------------------------------------------------------------------------------
# the full topology: separate processes for every stage, one S3 tier


def s3_args(cache: Path, endpoint: str, bucket: str, services: str, *extra: str) -> list[str]:
    return [
        "--services", services, "--metrics-port", "0", "--cache-dir", str(cache), "--cache-size", "1GB",
        "--s3-bucket", bucket, "--s3-endpoint-url", endpoint, "--model", "tiny", "--device", "cpu",
        "--log-level", "WARNING", "--lease-seconds", "3", "--job-grace-seconds", "30", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def s3_fleet(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[dict[str, Any]]:
    """1 Editor, 2 inversion, 2 propagation and 1 keyframes replica, each a process with its own local
    cache, all sharing one S3 tier on the moto server; replicas on 127.0.0.1 and 127.0.0.2."""
    import boto3

    root = tmp_path_factory.mktemp("s3-fleet")
    bucket = "fleet"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    procs: dict[str, Replica] = {}

    def start(name: str, host: str, services: str, *extra: str) -> Replica:
        replica = Replica(
            name, host, s3_args(root / f"cache-{name}", s3_server, bucket, services, *extra), root
        )
        procs[name] = replica
        return replica

    try:
        for i, host in enumerate(("127.0.0.1", "127.0.0.2")):
            start(f"inversion-{i}", host, "inversion")
            start(f"propagation-{i}", host, "propagation")
        start("keyframes-0", "127.0.0.1", "keyframes")
        for r in procs.values():
            r.wait_started(300)
        targets = {
            stage: "ipv4:" + ",".join(r.target for n, r in procs.items() if n.startswith(stage))
            for stage in ("inversion", "propagation", "keyframes")
        }
        editor = start("editor", "127.0.0.1", "editor", "--inversion-addr", targets["inversion"],
                       "--propagation-addr", targets["propagation"], "--keyframes-addr", targets["keyframes"],
                       "--stage-wait-seconds", "120")  # fmt: skip
        editor.wait_started(300)
        for r in procs.values():
            wait_for(lambda r=r: health(r.target) == SERVING, 300, f"{r.name} to serve")
        yield {"procs": procs, "start": start, "targets": targets, "root": root, "bucket": bucket}
    finally:
        for r in procs.values():
            r.close()


def counter(replica: Replica, name: str, **labels: str) -> float:
    return metric(replica.metrics(), name, **labels)


def ok_jobs(replica: Replica, stage: str) -> float:
    return counter(replica, "tokenflow_jobs_total", stage=stage, outcome="ok")


def fleet_inversions(fleet: dict[str, Any]) -> float:
    return sum(counter(r, "tokenflow_inversions_total") for n, r in fleet["procs"].items()
               if n.startswith("inversion") and r.process.poll() is None)  # fmt: skip


def check_mp4(client: TokenFlowClient, result: Any, dest: Path, frames: int) -> None:
    from tokenflow.video import probe

    path = client.download(result.digest, dest / f"{result.digest[:12]}.mp4")
    info = probe(path)
    assert (info.codec, info.frame_count, info.width, info.height) == ("h264", frames, 64, 64), info


@pytest.mark.slow  # six server processes and a 4-prompt Edit on 2 loaded cores
def test_a_four_prompt_edit_runs_on_both_propagation_replicas(
    s3_fleet: dict[str, Any], clip_path: Path, tmp_path: Path
) -> None:
    procs = s3_fleet["procs"]
    before = {n: ok_jobs(procs[n], "propagation") for n in ("propagation-0", "propagation-1")}
    edits = [edit_spec(f"prompt {i}", seed=i) for i in range(4)]
    with TokenFlowClient(procs["editor"].target, timeout=900) as client:
        results = client.edit(clip_path, edits, decode=DECODE, inversion=SMALL)
        assert len({r.digest for r in results}) == 4 and not any(r.cache_hit for r in results)
        for result in results:
            check_mp4(client, result, tmp_path, frames=10)
    ran = {n: ok_jobs(procs[n], "propagation") - before[n] for n in before}
    assert all(v >= 1 for v in ran.values()) and sum(ran.values()) == 4, ran
    assert counter(procs["editor"], "tokenflow_jobs_total", stage="propagation", outcome="ok") == 0


@pytest.mark.slow  # a clean run and a killed one
def test_sigkill_of_a_propagation_replica_mid_edit_gives_the_clean_result(
    s3_fleet: dict[str, Any], clip_path: Path, tmp_path: Path
) -> None:
    procs = s3_fleet["procs"]
    inversion = inversion_spec(prompt="kill", steps=10, edit_steps=10, reconstruct=False)
    edit = edit_spec("a bronze statue", seed=3)
    clean_config = tiny_server_config(tmp_path / "clean")
    with build_server(clean_config) as clean, TokenFlowClient(clean.target, timeout=900) as client:
        wait_for(lambda: client.health() == "SERVING", 120, "the clean server")
        (expected,) = client.edit(clip_path, edit, decode=DECODE, inversion=inversion)

    results: list[Any] = []
    errors: list[BaseException] = []
    with TokenFlowClient(procs["editor"].target, timeout=900) as client:

        def run() -> None:
            try:
                results.extend(client.edit(clip_path, edit, decode=DECODE, inversion=inversion))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def running() -> Replica | None:
            for name in ("propagation-0", "propagation-1"):
                r = procs[name]
                if r.process.poll() is None and counter(r, "tokenflow_jobs_in_flight", stage="propagation"):
                    return r
            return None

        victim = wait_for(running, 600, "a propagation replica to run the edit", interval=0.02)
        victim.kill()
        thread.join(900)
        assert not thread.is_alive() and not errors, errors
        (result,) = results
        assert result.digest == expected.digest and files_of(result) == files_of(expected)
        check_mp4(client, result, tmp_path, frames=10)
    failovers = sum(
        counter(procs["editor"], "tokenflow_stage_failovers_total", stage="propagation", reason=reason)
        for reason in ("unavailable", "stream_broken", "stream_ended")
    )
    assert failovers >= 1


@pytest.mark.slow  # a fresh replica process
def test_a_replica_that_never_saw_the_clip_edits_from_the_shared_tier(
    s3_fleet: dict[str, Any], clip_path: Path, tmp_path: Path
) -> None:
    with TokenFlowClient(s3_fleet["targets"]["inversion"], timeout=900) as client:
        video = client.upload(clip_path)
        inverted = client.invert(video, decode=DECODE, inversion=SMALL)  # stored by an earlier edit
    inversions_before = fleet_inversions(s3_fleet)
    fresh = s3_fleet["start"]("propagation-fresh", "127.0.0.2", "propagation").wait_started(300)
    wait_for(lambda: health(fresh.target) == SERVING, 300, "the fresh replica")
    with TokenFlowClient(fresh.target, timeout=900) as client:
        result = client.propagate(inverted.digest, edit_spec("a new prompt", seed=11))
        check_mp4(client, result, tmp_path, frames=10)
    m = fresh.metrics()
    assert metric(m, "tokenflow_inversions_total") == 0  # the inversion came from S3: no rebuild
    assert metric(m, "tokenflow_jobs_total", stage="propagation", outcome="ok") == 1
    assert fleet_inversions(s3_fleet) == inversions_before  # and no inversion replica computed one


@pytest.mark.slow  # two concurrent inversions, then a holder killed mid-job
def test_the_same_invert_on_both_inversion_replicas_computes_once(
    s3_fleet: dict[str, Any], clip_path: Path
) -> None:
    procs = s3_fleet["procs"]
    a, b = procs["inversion-0"], procs["inversion-1"]
    spec = inversion_spec(prompt="both at once", steps=20, edit_steps=2, reconstruct=False)
    with TokenFlowClient(a.target, timeout=600) as ca, TokenFlowClient(b.target, timeout=600) as cb:
        video = ca.upload(clip_path)
        before = fleet_inversions(s3_fleet)
        out: dict[str, Any] = {}
        messages: list[str] = []

        def call(name: str, client: TokenFlowClient) -> None:
            out[name] = client.invert(video, decode=DECODE, inversion=spec,
                                      on_event=lambda e: messages.append(e.progress.message))  # fmt: skip

        threads = [threading.Thread(target=call, args=(n, c), daemon=True) for n, c in (("a", ca), ("b", cb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert out["a"].digest == out["b"].digest
        assert fleet_inversions(s3_fleet) - before == 1  # computed once
        assert (
            any(m.startswith("computed by replica") for m in messages)
            or out["a"].cache_hit
            or out["b"].cache_hit
        )


@pytest.mark.slow  # a holder SIGKILLed mid-job, the waiting replica takes over after the lease expires
def test_killing_the_lease_holder_lets_the_waiting_replica_take_over(
    s3_fleet: dict[str, Any], clip_path: Path
) -> None:
    procs = s3_fleet["procs"]
    a, b = procs["inversion-0"], procs["inversion-1"]
    spec = inversion_spec(prompt="take over", steps=40, edit_steps=2, reconstruct=False)
    with TokenFlowClient(a.target, timeout=900) as ca, TokenFlowClient(b.target, timeout=900) as cb:
        video = ca.upload(clip_path)
        first_events: list[Any] = []
        holder_error: list[BaseException] = []

        def hold() -> None:
            try:
                ca.invert(video, decode=DECODE, inversion=spec, on_event=first_events.append)
            except BaseException as e:  # noqa: BLE001 - the holder is killed
                holder_error.append(e)

        threading.Thread(target=hold, daemon=True).start()
        job_id = wait_for(lambda: first_events and first_events[0].progress.job_id, 300, "the job id")
        op = wait_for(lambda: (o := cb.get_operation(job_id)) and operation_metadata(o).holder and o, 300,
                      "the holder's lease")  # fmt: skip
        assert f"port {a.port}" in operation_metadata(op).holder
        waiting: dict[str, Any] = {}
        relayed: list[str] = []

        def wait() -> None:
            waiting["result"] = cb.invert(video, decode=DECODE, inversion=spec,
                                          on_event=lambda e: relayed.append(e.progress.message))  # fmt: skip

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        wait_for(lambda: any(m.startswith("computed by replica") for m in relayed), 120, "b to wait on a")
        a.kill()
        waiter.join(900)
        assert waiting["result"].digest == job_id
        assert counter(b, "tokenflow_inversions_total") >= 1
        assert counter(b, "tokenflow_lease_takeovers_total", stage="inversion") >= 1
        done = cb.get_operation(job_id)
        metadata = operation_metadata(done)
        assert done.done and metadata.attempt == 2 and f"port {b.port}" in metadata.holder
