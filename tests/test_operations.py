"""Long-running operations any replica answers, and compute-once across replicas, in-process.

Two inversion servers (A and B) on loopback with their own local caches share one volume tier; they are
two replicas of the same stage. An Invert sent to both computes once (B waits on A's lease and relays
its progress); B answers GetOperation / WaitOperation / ListOperations / CancelOperation for A's job
through google.longrunning.Operations and the client library. (tests/test_fleet.py runs the same over
real processes and S3, with SIGKILLed holders.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2
from loopback import tiny_server_config

from clients import TokenFlowClient, decode_spec, edit_spec, inversion_spec
from clients.client import ClientError, operation_metadata, operation_result
from services.convert import decode_spec_from_proto, inversion_spec_from_proto
from services.inversion import InversionRecipe
from services.model_host import ModelHost
from services.server import RunningServer, build_server
from tokenflow.inversion import Inversion
from tokenflow.pipeline import invert_video
from tokenflow.shards import relative_l2

SHARD_TOLERANCE = 1e-4
"""Relative L2 of a merged inversion against an unsharded one (tokenflow/shards.py says why not 0)."""

DECODE = decode_spec(size=(64, 64))
ROOTS: list[Path] = []


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return value


def inversions(server: RunningServer) -> float:
    return server.metrics.registry.get_sample_value("tokenflow_inversions_total") or 0.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, RunningServer]]:
    root = tmp_path_factory.mktemp("ops")
    ROOTS.append(root)
    host = ModelHost("tiny", device="cpu", dtype="float32")
    servers = []
    try:
        for name, address in (("a", "127.0.0.1"), ("b", "127.0.0.2")):
            config = tiny_server_config(
                root / f"cache-{name}",
                services="inversion",
                host=address,
                shared_store=root / "shared",
                lease_seconds=5,
            )
            servers.append(build_server(config, model_host=host))
        a, b = servers
        with TokenFlowClient(a.target, timeout=60) as client:
            wait_for(lambda: client.health() == "SERVING", 60, "the model")
        yield a, b
    finally:
        for s in servers:
            s.stop(grace=0)


class Invert(threading.Thread):
    """One Invert call on a thread, keeping its events and its outcome."""

    def __init__(self, target: str, video: str, spec: Any) -> None:
        super().__init__(daemon=True)
        self.target, self.video, self.spec = target, video, spec
        self.events: list[Any] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def job_id(self) -> str:
        if self.error is not None:
            raise AssertionError(f"the Invert call failed: {self.error}")
        return self.events[0].progress.job_id if self.events else ""

    def run(self) -> None:
        try:
            with TokenFlowClient(self.target, timeout=180) as client:
                self.result = client.invert(self.video, DECODE, self.spec, on_event=self.events.append)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.error = e


def test_one_invert_on_two_replicas_computes_once_and_either_answers_for_it(
    replicas: tuple[RunningServer, RunningServer], clip_path: Path
) -> None:
    a, b = replicas
    spec = inversion_spec(prompt="shared", steps=20, edit_steps=2, reconstruct=False)
    with TokenFlowClient(a.target, timeout=60) as ca, TokenFlowClient(b.target, timeout=60) as cb:
        video = ca.upload(clip_path)
        first = Invert(a.target, video, spec)
        job_id = wait_for(lambda: first.job_id(), 60, "A's job id")
        running = wait_for(
            lambda: (op := cb.get_operation(job_id)) and operation_metadata(op).holder and op, 60, "A's lease"
        )
        assert not running.done and running.name == f"operations/{job_id}"
        metadata = operation_metadata(running)
        assert f"port {a.port}" in metadata.holder and metadata.attempt == 1
        second = Invert(b.target, video, spec)  # the same request on the other replica
        first.join(180)
        second.join(180)
        assert first.error is None and second.error is None, (first.error, second.error)
        assert first.result.digest == second.result.digest == job_id
        assert (inversions(a), inversions(b)) == (1, 0)  # computed once, on A
        waits = b.metrics.registry.get_sample_value("tokenflow_lease_waits_total", {"stage": "inversion"})
        assert waits == 1  # B waited on A's lease
        relayed = [e.progress.message for e in second.events if e.WhichOneof("event") == "progress"]
        assert any(f"computed by replica {metadata.holder}" in m for m in relayed), relayed

        done = cb.wait_operation(job_id, wait=30)
        assert done.done and operation_result(done).digest == job_id  # type: ignore[union-attr]
        assert operation_result(done).inversion.frames == 10  # type: ignore[union-attr]
        listed = {op.name: op for op in cb.list_operations()}
        assert listed[f"operations/{job_id}"].done
        assert f"operations/{job_id}" in {op.name for op in ca.list_operations(filter="done = true")}
        assert f"operations/{job_id}" not in {op.name for op in ca.list_operations(filter="done=false")}


def test_cancel_through_another_replica_and_unknown_names(
    replicas: tuple[RunningServer, RunningServer], clip_path: Path
) -> None:
    a, b = replicas
    spec = inversion_spec(prompt="cancel me", steps=400, edit_steps=2, reconstruct=False)
    with TokenFlowClient(a.target, timeout=60) as ca, TokenFlowClient(b.target, timeout=60) as cb:
        video = ca.upload(clip_path)
        job = Invert(a.target, video, spec)
        job_id = wait_for(lambda: job.job_id(), 60, "the job id")
        wait_for(lambda: operation_metadata(cb.get_operation(job_id)).holder, 60, "A's lease")
        assert not cb.wait_operation(job_id, wait=0.2).done  # returns at its timeout while the job runs
        cb.cancel_operation(job_id)  # B has no such job: the request goes through the lease
        job.join(60)
        assert isinstance(job.error, ClientError) and job.error.code == grpc.StatusCode.CANCELLED
        op = wait_for(lambda: (o := cb.get_operation(job_id)).done and o, 30, "the cancelled operation")
        assert op.error.code == code_pb2.CANCELLED and "CancelOperation" in op.error.message
        with pytest.raises(ClientError) as missing:
            cb.get_operation("0" * 64)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError) as malformed:
            cb.get_operation("operations/not-a-digest")
        assert malformed.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ClientError) as bad_filter:
            list(cb.list_operations(filter="stage = inversion"))
        assert bad_filter.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_sharded_inversion_has_the_unsharded_address_and_tensors(
    replicas: tuple[RunningServer, RunningServer], clip_path: Path
) -> None:
    """An Editor with --inversion-shards 2 sends one frame range to each inversion replica and merges them
    on one: the merged inversion is published under the unsharded run's content address and matches an
    unsharded inversion within tokenflow/shards.py's tolerance."""
    a, b = replicas
    before = (inversions(a), inversions(b))
    target = f"ipv4:{a.target},{b.target}"
    config = tiny_server_config(
        ROOTS[0] / "cache-editor",
        services="editor,keyframes,propagation",
        shared_store=ROOTS[0] / "shared",
        inversion_addr=target,
        inversion_shards=2,
    )
    spec = inversion_spec(prompt="sharded", steps=2, edit_steps=2, reconstruct=False)
    events: list[Any] = []
    with build_server(config, model_host=a.model_host) as editor:
        with TokenFlowClient(editor.target, timeout=300) as client:
            (edited,) = client.edit(clip_path, edit_spec("a fox", seed=1), decode=DECODE, inversion=spec,
                                    on_event=events.append)  # fmt: skip
    assert edited.digest and edited.propagation.frames == 10
    (merged_result,) = [e.result for e in events if e.edit_index == -1 and e.WhichOneof("event") == "result"]
    # Each replica inverted one frame range (round robin), and one of them merged.
    assert (inversions(a) - before[0], inversions(b) - before[1]) == (1, 1)
    assert merged_result.inversion.frames == 10
    video = merged_result.inversion.video_digest
    recipe = InversionRecipe(video, decode_spec_from_proto(DECODE), inversion_spec_from_proto(spec))
    assert merged_result.digest == recipe.key(a.model_host.fingerprint)  # the unsharded content address
    merged_art = a.store.get(merged_result.digest, kind="inversion")
    assert merged_art is not None and len(merged_art.manifest.meta["shards"]) == 2
    merged = Inversion.from_paths({n: merged_art.path(n) for n in merged_art.names()})
    with a.store.pin(video):
        source = a.store.get(video, kind="video")
        assert source is not None
        whole = invert_video(a.model_host.get(), source.path(source.manifest.primary or source.names()[0]),
                             recipe.decode, recipe.spec)  # fmt: skip
    errors = [
        relative_l2(merged.latents_clean, whole.latents_clean),
        relative_l2(merged.noisiest, whole.noisiest),
    ]
    errors += [relative_l2(merged.latents_at(t), whole.latents_at(t)) for t in whole.edit_timesteps]
    assert max(errors) <= SHARD_TOLERANCE, errors
