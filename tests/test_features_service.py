"""Source features through the embedded server (real gRPC on loopback, a generated clip, parsed metrics).

The first TokenFlow edit of a clip runs the source branch and records its features; the second prompt on
the same clip and seed runs no source branch in its propagation pass (the Prometheus counter of
propagation batches by path proves it); a request with features=false (`--no-features`) and a server
with `--features-budget 0` run the source branch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from loopback import metric, scrape, tiny_server_config
from test_e2e_services import DECODE, INVERSION

from clients import TokenFlowClient, edit_spec
from tokenflow_pb.v1 import common_pb2

BATCHES = "tokenflow_propagation_batches_total"
FEATURES = "tokenflow_features_total"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenflow.synthetic import make_clip

    return make_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4", frames=6, size=(64, 64), fps=8, audio=False
    )


def _server(tmp_path: Path, budget: int) -> Iterator[tuple[TokenFlowClient, int]]:
    from services.server import build_server

    config = tiny_server_config(
        tmp_path / "cache", cache_size_bytes=2 << 30, metrics_port=0, job_grace_seconds=5,
        features_budget=budget,
    )  # fmt: skip
    server = build_server(config)
    try:
        assert server.metrics_port is not None
        with TokenFlowClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            deadline = time.monotonic() + 60
            while client.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.1)
            yield client, server.metrics_port
    finally:
        server.stop(grace=0)


def _edit(client: TokenFlowClient, video: str, prompt: str, features: bool = True, crf: int | None = None):  # noqa: ANN202
    spec = edit_spec(prompt, seed=5, keyframe_interval=2, chunk_size=4)
    if not features:
        spec.features = False
    if crf is not None:  # output encoding is not part of the features' identity (tokenflow/keys.py)
        spec.crf = crf
    events = []
    (result,) = client.edit(
        video, spec, decode=DECODE, inversion=INVERSION, on_event=events.append, timeout=300
    )
    paths = {e.progress.propagation_path for e in events if e.HasField("progress")} - {""}
    return result, paths


def _frames(path: Path) -> np.ndarray:
    """The decoded RGB frames of an mp4, as float32 (frames, height, width, 3)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def _delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def test_the_second_prompt_runs_no_source_branch_in_propagation(tmp_path: Path, clip: Path) -> None:
    for client, port in _server(tmp_path, budget=1 << 30):
        video = client.upload(clip)
        s0 = scrape(port)
        first, paths = _edit(client, video, "a watercolor painting")
        s1 = scrape(port)
        batches = _delta(s1, s0, BATCHES, path="source_branch")
        assert batches > 0 and _delta(s1, s0, BATCHES, path="features") == 0
        assert _delta(s1, s0, FEATURES, outcome="recorded") == 1
        recorded = _delta(s1, s0, "tokenflow_features_bytes_total", action="recorded")
        assert recorded > 0
        assert first.propagation.propagation_path == "source_branch"
        assert first.propagation.features_bytes == recorded
        assert paths == {"source_branch"}
        # The features are an artifact of their own kind, beside the inversion in the store.
        (stored,) = client.iter_artifacts(common_pb2.ARTIFACT_KIND_FEATURES)
        assert stored.kind == common_pb2.ARTIFACT_KIND_FEATURES
        assert sum(f.size for f in stored.files) >= recorded

        second, paths = _edit(client, video, "a marble sculpture")
        s2 = scrape(port)
        assert _delta(s2, s1, BATCHES, path="source_branch") == 0, "the source branch ran in propagation"
        assert _delta(s2, s1, BATCHES, path="features") == batches
        assert _delta(s2, s1, FEATURES, outcome="replayed") == 1
        assert _delta(s2, s1, "tokenflow_features_bytes_total", action="replayed") == recorded
        assert second.propagation.propagation_path == "features" and paths == {"features"}
        assert second.propagation.features_bytes == recorded
        # Every result's metadata holds the keyframe schedule used (the edit is reproducible from it).
        meta = json.loads(client.stat(second.digest).meta_json)
        assert len(meta["keyframe_schedule"]) == 2 and len(meta["keyframe_schedule"][0]) == 3
        assert meta["features"]["path"] == "features"

        third, paths = _edit(client, video, "a bronze statue", features=False)
        s3 = scrape(port)
        assert _delta(s3, s2, BATCHES, path="source_branch") == batches
        assert _delta(s3, s2, BATCHES, path="features") == 0
        assert _delta(s3, s2, FEATURES, outcome="off") == 1
        assert third.propagation.propagation_path == "source_branch" and paths == {"source_branch"}


def test_a_zero_budget_turns_features_off(tmp_path: Path, clip: Path) -> None:
    for client, port in _server(tmp_path, budget=0):
        video = client.upload(clip)
        s0 = scrape(port)
        for prompt in ("a watercolor painting", "a marble sculpture"):
            result, paths = _edit(client, video, prompt)
            assert result.propagation.propagation_path == "source_branch" and paths == {"source_branch"}
        s1 = scrape(port)
        assert _delta(s1, s0, BATCHES, path="features") == 0
        assert _delta(s1, s0, BATCHES, path="source_branch") > 0
        assert _delta(s1, s0, FEATURES, outcome="off") == 2
        assert not list(client.iter_artifacts(common_pb2.ARTIFACT_KIND_FEATURES))


def test_invert_precomputes_the_features_the_first_edit_replays(
    tmp_path: Path, clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """InvertRequest.features_for records the source features ahead of any prompt (source branch only).

    The first edit with the same seed and schedule then replays them, and equals the same edit run
    with its source branch (within the tolerance stated below).
    """
    spec = edit_spec("", seed=5, keyframe_interval=2, chunk_size=4)
    for client, port in _server(tmp_path, budget=1 << 30):
        video = client.upload(clip)
        s0 = scrape(port)
        events: list = []
        inverted = client.invert(
            video, decode=DECODE, inversion=INVERSION, features_for=spec, on_event=events.append
        )
        s1 = scrape(port)
        info = inverted.inversion
        assert info.features_digest and info.features_bytes > 0
        assert _delta(s1, s0, FEATURES, outcome="precomputed") == 1
        assert _delta(s1, s0, "tokenflow_features_bytes_total", action="precomputed") == info.features_bytes
        assert _delta(s1, s0, BATCHES, path="source_branch") == 0  # no edit ran: nothing was propagated
        assert max(e.progress.features_bytes for e in events if e.HasField("progress")) == info.features_bytes
        (stored,) = client.iter_artifacts(common_pb2.ARTIFACT_KIND_FEATURES)
        assert stored.digest == info.features_digest
        # The inversion itself is the ordinary one: an Invert without features_for finds it stored.
        plain = client.invert(video, decode=DECODE, inversion=INVERSION)
        assert plain.cache_hit and plain.digest == inverted.digest and not plain.inversion.features_digest

        # The client CLI asks the same with the edit flags (no prompt needed): they are stored already.
        from clients.cli import main

        flags = ["--size", "64x64", "--inversion-steps", "4", "--steps", "2", "--no-reconstruct"]
        edit_flags = ["--precompute-features", "--seed", "5", "--keyframe-interval", "2"]
        assert main(["-q", "--target", client.target, "invert", video, *flags, *edit_flags]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["features_digest"] == info.features_digest
        assert again["features_bytes"] == info.features_bytes
        assert _delta(scrape(port), s1, FEATURES, outcome="precomputed") == 0, "stored: nothing to do"

        s2 = scrape(port)
        replayed, paths = _edit(client, video, "a watercolor painting", crf=0)
        s3 = scrape(port)
        assert _delta(s3, s2, BATCHES, path="source_branch") == 0, "the source branch ran in propagation"
        assert _delta(s3, s2, BATCHES, path="features") > 0
        assert _delta(s3, s2, FEATURES, outcome="replayed") == 1
        assert replayed.propagation.propagation_path == "features" and paths == {"features"}
        assert replayed.propagation.features_bytes == info.features_bytes

        # The same edit with its source branch (the features flag is not part of the edit's key: delete
        # the stored result so it is computed again), and another prompt's edit as the scale of a change.
        client.download(replayed.digest, tmp_path / "replayed.mp4")
        client.delete(replayed.digest)
        direct, paths = _edit(client, video, "a watercolor painting", features=False, crf=0)
        assert paths == {"source_branch"} and direct.digest == replayed.digest
        client.download(direct.digest, tmp_path / "direct.mp4")
        other, _ = _edit(client, video, "a marble sculpture", crf=0)
        client.download(other.digest, tmp_path / "other.mp4")
        a, b, c = (_frames(tmp_path / f"{n}.mp4") for n in ("replayed", "direct", "other"))
        # Replaying changes only the UNet's batch size (final latents within 1e-5 relative L2, see
        # tests/test_features.py). The three are encoded losslessly (crf 0): at the default crf the
        # encoder turns those float-order differences of the tiny model's noise-like frames into about
        # one level on some CPUs (0.06 on others), against ~10 for another prompt.
        same, changed = float(np.abs(a - b).mean()), float(np.abs(a - c).mean())
        assert same <= 0.5 and changed > 20 * same, (same, changed)


def test_features_for_is_refused_with_stored_only(tmp_path: Path, clip: Path) -> None:
    import grpc

    from tokenflow_pb.v1 import inversion_pb2, inversion_pb2_grpc

    for client, _ in _server(tmp_path, budget=1 << 30):
        video = client.upload(clip)
        request = inversion_pb2.InvertRequest(
            video_digest=video,
            decode=DECODE,
            inversion=INVERSION,
            stored_only=True,
            features_for=edit_spec(""),
        )
        with grpc.insecure_channel(client.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                list(inversion_pb2_grpc.InversionStub(channel).Invert(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
