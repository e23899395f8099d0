"""The S3 tier against a real S3-compatible server (moto's standalone server, started by `s3_server`).

No mocks of the S3 API: every call goes over HTTP on loopback to the server, through boto3 with the
standard credential chain (the fixture points it at dummy credentials).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import botocore.exceptions
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.store import ArtifactStore, CorruptArtifact, Manifest, TierUnavailable, artifact_key
from services.store.s3 import S3Tier
from services.store.tier import SharedTier, Tier, prune_lru
from tokenflow.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent


def key_of(label: str) -> str:
    return artifact_key("test", {"label": label})


def make_metrics() -> SimpleNamespace:
    r = CollectorRegistry()
    names = [
        "cache_hits_total",
        "cache_misses_total",
        "cache_written_bytes_total",
        "cache_read_bytes_total",
        "cache_evictions_total",
        "cache_corrupt_total",
    ]
    ns = SimpleNamespace(**{n: Counter(n, n, ["kind"], registry=r) for n in names})
    ns.cache_bytes = Gauge("cache_bytes", "cache_bytes", registry=r)
    ns.registry = r
    return ns


def value(m: SimpleNamespace, name: str, kind: str) -> float:
    return m.registry.get_sample_value(name, {"kind": kind}) or 0.0


@pytest.fixture
def s3(s3_server: str) -> Any:
    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"tf-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def node(tmp_path: Path, name: str, s3_server: str, bucket: str, **tier_args: Any) -> ArtifactStore:
    tier = S3Tier(bucket, prefix="fleet/", endpoint_url=s3_server, **tier_args)
    return ArtifactStore(tmp_path / name, size_limit=10**8, shared=tier, metrics=make_metrics())


@pytest.fixture
def nodes(tmp_path: Path, s3_server: str, bucket: str) -> Iterator[tuple[ArtifactStore, ArtifactStore]]:
    a, b = node(tmp_path, "n1", s3_server, bucket), node(tmp_path, "n2", s3_server, bucket)
    yield a, b
    a.close()
    b.close()


def objects(s3: Any, bucket: str) -> dict[str, int]:
    resp = s3.list_objects_v2(Bucket=bucket)
    return {o["Key"]: o["Size"] for o in resp.get("Contents", [])}


def test_s3_tier_implements_the_tier_interface(s3_server: str, bucket: str) -> None:
    tier = S3Tier(bucket, endpoint_url=s3_server)
    assert isinstance(tier, Tier) and isinstance(tier, SharedTier)


def test_two_nodes_share_one_bucket(nodes: tuple[ArtifactStore, ArtifactStore], s3: Any, bucket: str) -> None:
    n1, n2 = nodes
    key = key_of("shared")
    data = os.urandom(100_000)
    m = n1.put("inversion", key, {"latents.safetensors": data, "meta.json": b'{"a":1}'}, meta={"fps": 8})
    # Synchronous upload: the moment put returns, another node finds it.
    assert n2.contains(key) and n2.stat(key) == m
    art = n2.get(key, kind="inversion")
    assert art is not None and art.read("latents.safetensors") == data and art.meta == {"fps": 8}
    assert n2.local.contains(key)  # copied into node 2's local tier
    assert value(n2.metrics, "cache_hits_total", "inversion") == 1
    # The layout: blobs by digest, manifest by key, an access record under the kind.
    sha = hashlib.sha256(data).hexdigest()
    objs = objects(s3, bucket)
    assert objs[f"fleet/blobs/sha256/{sha}"] == len(data)
    assert f"fleet/manifests/{key}.json" in objs and objs[f"fleet/index/inversion/{key}"] == 0
    body = s3.get_object(Bucket=bucket, Key=f"fleet/manifests/{key}.json")["Body"].read()
    assert Manifest.from_json(body, key) == m
    assert s3.head_object(Bucket=bucket, Key=f"fleet/blobs/sha256/{sha}")["Metadata"]["sha256"] == sha
    # Node 2 writes, node 1 reads; a blob both artifacts share is stored once.
    key2 = key_of("from-node2")
    n2.put("video", key2, {"source.mp4": data})
    art = n1.get(key2)
    assert art is not None and art.read("source.mp4") == data
    assert sum(1 for k in objects(s3, bucket) if k.startswith("fleet/blobs/")) == 2


def test_manifest_publish_is_a_conditional_create(s3_server: str, bucket: str, s3: Any) -> None:
    tier = S3Tier(bucket, endpoint_url=s3_server)
    key = key_of("race")
    blob = b"same bytes"
    entry = {"a.bin": [len(blob), hashlib.sha256(blob).hexdigest(), "application/octet-stream"]}

    def manifest(created: float) -> Manifest:
        return Manifest.from_dict(
            {"kind": "test", "key": key, "created": created, "meta": {}, "files": entry}, key
        )

    first = tier.put(manifest(1.0), lambda name: io.BytesIO(blob))
    assert first.created == 1.0 and tier.conditional_writes
    # A second writer that missed the first (it looked before the first published) loses the create.
    assert tier._publish(manifest(2.0)).created == 1.0
    assert tier.stat(key) is not None and tier.stat(key).created == 1.0  # type: ignore[union-attr]
    # The server itself refuses the overwrite: it is its If-None-Match, not our check.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.put_object(Bucket=bucket, Key=tier.manifest_name(key), Body=b"{}", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"


def test_corrupt_or_missing_blobs_are_misses(tmp_path: Path, s3_server: str, bucket: str, s3: Any) -> None:
    n1 = node(tmp_path, "n1", s3_server, bucket)
    data = os.urandom(20_000)
    key = key_of("bad")
    m = n1.put("inversion", key, {"latents.safetensors": data})
    blob = f"fleet/blobs/sha256/{m.files['latents.safetensors'].sha256}"
    s3.put_object(Bucket=bucket, Key=blob, Body=os.urandom(len(data)))  # same size, other bytes
    n3 = node(tmp_path, "n3", s3_server, bucket)
    assert n3.get(key) is None
    assert value(n3.metrics, "cache_corrupt_total", "inversion") == 1
    assert not n3.local.contains(key) and not n3.contains(key)  # gone from the bucket too
    assert blob not in objects(s3, bucket)  # the bad blob was removed
    art = n1.get(key)  # node 1's local copy was never corrupt
    assert art is not None and art.read("latents.safetensors") == data
    # A blob that vanished (pruned under a reader, lifecycle rule) is a miss as well.
    key2 = key_of("gone")
    m2 = n1.put("test", key2, {"a.bin": b"x" * 1000})
    s3.delete_object(Bucket=bucket, Key=f"fleet/blobs/sha256/{m2.files['a.bin'].sha256}")
    n4 = node(tmp_path, "n4", s3_server, bucket)
    assert n4.get(key2) is None and not n4.contains(key2)
    # A tampered manifest, too.
    key3 = key_of("tampered")
    n1.put("test", key3, {"a.bin": b"y" * 10})
    s3.put_object(Bucket=bucket, Key=f"fleet/manifests/{key3}.json", Body=b"{not json")
    assert n4.get(key3) is None and f"fleet/manifests/{key3}.json" not in objects(s3, bucket)
    for n in (n1, n3, n4):
        n.close()


def test_multipart_upload_is_verified(tmp_path: Path, s3_server: str, bucket: str, s3: Any) -> None:
    n1 = node(tmp_path, "n1", s3_server, bucket, multipart_threshold=5 << 20)
    n2 = node(tmp_path, "n2", s3_server, bucket)
    src = tmp_path / "big.mp4"
    data = os.urandom((11 << 20) + 123)  # three parts
    src.write_bytes(data)
    key = key_of("big")
    m = n1.put("video", key, {"source.mp4": src})
    head = s3.head_object(Bucket=bucket, Key=f"fleet/blobs/sha256/{m.files['source.mp4'].sha256}")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")  # multipart
    art = n2.get(key, verify=True)
    assert art is not None and art.path("source.mp4").read_bytes() == data
    n1.close()
    n2.close()


def test_a_failed_upload_is_retried_and_the_local_copy_kept(tmp_path: Path, s3_server: str, s3: Any) -> None:
    name = f"tf-{uuid.uuid4().hex[:12]}"  # not created yet: every request fails
    n1 = node(tmp_path, "n1", s3_server, name)
    key = key_of("later")
    with pytest.raises(TierUnavailable):
        n1.put("test", key, {"a.bin": b"payload"})
    assert n1.local.contains(key)
    assert n1.get(key) is not None  # still served locally (the refresh fails, logged, not raised)
    s3.create_bucket(Bucket=name)
    art = n1.get(key)  # the shared tier never confirmed it: this get uploads it
    assert art is not None
    n2 = node(tmp_path, "n2", s3_server, name)
    got = n2.get(key)
    assert got is not None and got.read("a.bin") == b"payload"
    n1.close()
    n2.close()


def test_unreachable_server_is_a_miss_not_an_error(tmp_path: Path) -> None:
    tier = S3Tier("nobody", endpoint_url="http://127.0.0.1:9")  # discard port: connection refused
    tier._client.meta.config.retries = {"max_attempts": 1}
    s = ArtifactStore(tmp_path / "c", size_limit=10**6, shared=tier)
    assert s.get(key_of("x")) is None and not s.contains(key_of("x"))
    s.close()


def test_list_pages_over_both_tiers(nodes: tuple[ArtifactStore, ArtifactStore]) -> None:
    n1, n2 = nodes
    keys = sorted(artifact_key("video", {"i": i}) for i in range(5))
    for k in keys:
        n1.put("video", k, {"source.mp4": k.encode()})
    n1.put("test", key_of("other kind"), {"a.bin": b"1"})
    n2.get(keys[2])  # node 2 has one locally; the rest only in the bucket
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = n2.list("video", page_size=2, page_token=token)
        seen += [m.key for m in page]
        pages += 1
        assert all(m.kind == "video" for m in page)
        if not token:
            break
    assert seen == keys and pages == 3
    with pytest.raises(SpecError):
        n2.list("test", page_size=2, page_token=n2.list("video", page_size=2)[1])


def test_delete_and_prune_by_size(tmp_path: Path, s3_server: str, bucket: str, s3: Any) -> None:
    n1 = node(tmp_path, "n1", s3_server, bucket)
    keys = [key_of(f"p{i}") for i in range(4)]
    for k in keys:
        n1.put("test", k, {"a.bin": os.urandom(1000)})
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    assert n1.shared is not None and n1.shared.touch(n1.stat(keys[0]))  # type: ignore[arg-type]
    # Delete unpublishes at once; its blob goes with the next prune (blobs may be shared).
    assert n1.delete(keys[3]) and not n1.contains(keys[3])
    assert f"fleet/manifests/{keys[3]}.json" not in objects(s3, bucket)
    report = prune_lru(n1.shared, max_bytes=2000, grace_seconds=0)
    assert report.bytes_before == 4000 and report.bytes_after == 2000 and report.blobs_removed == 2
    # One of the least recently used went (1 and 2 were put within one second); keys[0] was touched later.
    fresh = node(tmp_path, "fresh", s3_server, bucket)
    present = [fresh.contains(k) for k in keys]
    assert present[0] and not present[3] and present[1] != present[2]
    assert sum(1 for o in objects(s3, bucket) if o.startswith("fleet/blobs/")) == 2
    n1.close()
    fresh.close()


def test_prune_command(tmp_path: Path, s3_server: str, bucket: str) -> None:
    n1 = node(tmp_path, "n1", s3_server, bucket)
    for i in range(3):
        n1.put("test", key_of(f"c{i}"), {"a.bin": os.urandom(500)})
    n1.close()
    args = ["--s3-bucket", bucket, "--s3-prefix", "fleet/", "--s3-endpoint-url", s3_server]
    run = subprocess.run(
        [sys.executable, "-m", "services.store", "usage", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "tier": f"s3://{bucket}/fleet/ at {s3_server}",
        "artifacts": 3,
        "blobs": 3,
        "bytes": 1500,
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.store",
            "prune",
            *args,
            "--max-bytes",
            "0.6kB",
            "--grace-seconds",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert (out["evicted"], out["bytes_after"], out["blobs_removed"]) == (2, 500, 2), (out, run.stderr)


def test_read_of_a_changed_upload_source_fails(s3_server: str, bucket: str) -> None:
    tier = S3Tier(bucket, endpoint_url=s3_server)
    key = key_of("liar")
    entry = {"a.bin": [3, hashlib.sha256(b"abc").hexdigest(), "application/octet-stream"]}
    m = Manifest.from_dict({"kind": "test", "key": key, "created": 0, "meta": {}, "files": entry}, key)
    with pytest.raises(CorruptArtifact):
        tier.put(m, lambda name: io.BytesIO(b"abd"))  # not the bytes the manifest names
    assert tier.stat(key) is None and not list(tier.scan_blobs())


_WORKER = """
import sys
from services.store import ArtifactStore, artifact_key
from services.store.s3 import S3Tier
directory, who, bucket, endpoint = sys.argv[1:5]
s = ArtifactStore(directory, size_limit=10**8, shared=S3Tier(bucket, "fleet/", endpoint))
for i in range(15):
    same = artifact_key("test", {"i": i})
    s.put("test", same, {"a.bin": bytes([i]) * 5_000})
    mine = artifact_key("test", {"i": i, "who": who})
    s.put("test", mine, {"a.bin": who.encode() * 100})
    for k, want in ((same, bytes([i]) * 5_000), (mine, who.encode() * 100)):
        art = s.get(k)
        assert art is not None and art.read("a.bin") == want, k
print("ok")
"""


def test_two_processes_on_two_nodes_share_one_bucket(
    tmp_path: Path, s3_server: str, bucket: str, s3: Any
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path / who), who, bucket, s3_server],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("p1", "p2")
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err
    objs = objects(s3, bucket)
    assert sum(1 for k in objs if k.startswith("fleet/manifests/")) == 15 + 2 * 15
    assert sum(1 for k in objs if k.startswith("fleet/blobs/")) == 15 + 2  # one blob per distinct content
    fresh = node(tmp_path, "fresh", s3_server, bucket)
    for i in range(15):
        art = fresh.get(artifact_key("test", {"i": i}), verify=True)
        assert art is not None and art.read("a.bin") == bytes([i]) * 5_000
    fresh.close()


def test_serve_flags_build_a_store_with_the_s3_tier(tmp_path: Path, s3_server: str, bucket: str) -> None:
    from services.server import build_parser, build_server, config_from_args

    args = ["--services", "artifacts", "--port", "0", "--metrics-port", "-1", "--host", "127.0.0.1"]
    args += ["--cache-dir", str(tmp_path / "c"), "--s3-bucket", bucket, "--s3-prefix", "fleet"]
    args += ["--s3-endpoint-url", s3_server, "--shared-store-size", "1GB"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.s3_bucket, config.s3_prefix, config.shared_store_size) == (bucket, "fleet", 10**9)
    running = build_server(config)
    try:
        store = running.store
        assert isinstance(store.shared, S3Tier) and store.shared.size_limit == 10**9
        assert store.tiers == {"local": str(tmp_path / "c"), "s3": f"s3://{bucket}/fleet/ at {s3_server}"}
        store.put("video", key_of("served"), {"v.mp4": b"video"})
    finally:
        running.stop(grace=0)
    other = node(tmp_path, "other", s3_server, bucket)
    assert other.get(key_of("served")) is not None
    other.close()
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(["--shared-store-size", "1GB"]))
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(["--shared-store", "/x", "--s3-bucket", "b"]))
