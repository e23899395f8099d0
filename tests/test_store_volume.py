"""The shared-volume tier: write order and fsyncs, conditional manifest create, LRU prune by size (with
shared blobs and a grace period), the background pruner, listing, and the prune command."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from services.store import ArtifactStore, Manifest, artifact_key
from services.store.tier import SharedTier, Tier, prune_lru
from services.store.volume import VolumeTier

ROOT = Path(__file__).resolve().parent.parent


def key_of(label: str) -> str:
    return artifact_key("test", {"label": label})


def manifest_for(key: str, files: dict[str, bytes], created: float = 0.0, kind: str = "test") -> Manifest:
    entries = {
        n: [len(b), hashlib.sha256(b).hexdigest(), "application/octet-stream"] for n, b in files.items()
    }
    d = {"kind": kind, "key": key, "created": created, "meta": {}, "files": entries}
    return Manifest.from_dict(d, key)


def put(tier: VolumeTier, key: str, files: dict[str, bytes], created: float = 0.0) -> Manifest:
    return tier.put(manifest_for(key, files, created), lambda name: io.BytesIO(files[name]))


def set_access(tier: VolumeTier, m: Manifest, when: float) -> None:
    os.utime(tier.record_path(m.kind, m.key), (when, when))


def test_volume_tier_implements_the_interface(tmp_path: Path) -> None:
    tier = VolumeTier(tmp_path / "v")
    assert isinstance(tier, Tier) and isinstance(tier, SharedTier)


def test_write_order_fsyncs_and_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = VolumeTier(tmp_path / "v")
    events: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        is_dir = os.path.isdir(target)
        events.append(f"fsync dir {Path(target).name}" if is_dir else f"fsync {Path(target).parent.name}")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"rename -> {Path(dst).parent.parent.name}")
        real_replace(src, dst)

    def link(src: Any, dst: Any) -> None:
        events.append(f"link -> {Path(dst).parent.parent.name}")
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    data = b"blob bytes"
    key = key_of("order")
    m = put(tier, key, {"a.bin": data})
    sha = hashlib.sha256(data).hexdigest()
    assert (
        events
        == [
            "fsync dir sha256",  # a new bucket directory is itself made durable
            "fsync tmp",  # the blob's bytes, before anything names them
            "rename -> sha256",
            f"fsync dir {sha[:2]}",  # the blob directory, after the rename
            "fsync dir manifests",
            "fsync tmp",  # the manifest's bytes
            "link -> manifests",  # conditional create
            f"fsync dir {key[:2]}",
        ]
    )
    assert tier.blob_path(sha).read_bytes() == data
    assert Manifest.from_json(tier.manifest_path(key).read_bytes(), key) == m
    assert tier.record_path("test", key).exists()
    assert list((tmp_path / "v" / "tmp").iterdir()) == []


def test_first_manifest_wins(tmp_path: Path) -> None:
    tier = VolumeTier(tmp_path / "v")
    key = key_of("race")
    assert put(tier, key, {"a.bin": b"x"}, created=1.0).created == 1.0
    # A writer that looked before the first published still loses the create.
    tmp = tier.root / "tmp" / "late"
    tmp.write_bytes(manifest_for(key, {"a.bin": b"x"}, created=2.0).to_json())
    with pytest.raises(FileExistsError):
        os.link(tmp, tier.manifest_path(key))
    assert put(tier, key, {"a.bin": b"x"}, created=2.0).created == 1.0
    assert tier.stat(key).created == 1.0  # type: ignore[union-attr]


def test_prune_lru_by_size_with_shared_blobs_and_grace(tmp_path: Path) -> None:
    tier = VolumeTier(tmp_path / "v")
    now = time.time()
    common = os.urandom(1000)
    ms = [put(tier, key_of(f"k{i}"), {"own.bin": os.urandom(1000), "common.bin": common}) for i in range(4)]
    for i, m in enumerate(ms):
        set_access(tier, m, now - 10_000 + i)  # k0 least recently used ... k3 most
    old = now - 20_000
    for path in (tier.root / "blobs").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    # 4 own blobs + 1 common blob = 5 000 bytes; a limit of 3 000 evicts k0 and k1, whose own blobs go,
    # while the blob they share with k2 and k3 stays.
    report = prune_lru(tier, max_bytes=3000, grace_seconds=3600, now=now)
    assert report.bytes_before == 5000 and report.bytes_after == 3000
    assert sorted(report.evicted) == sorted([ms[0].key, ms[1].key]) and report.blobs_removed == 2
    assert [tier.has(m.key) for m in ms] == [False, False, True, True]
    assert tier.blob_path(hashlib.sha256(common).hexdigest()).exists()
    # Recently used artifacts are never pruned, even over the limit.
    set_access(tier, ms[2], now - 5)
    report = prune_lru(tier, max_bytes=0, grace_seconds=3600, now=now)
    assert tier.has(ms[2].key) and not tier.has(ms[3].key) and report.bytes_after == 2000
    # An unreferenced blob younger than the grace (a put on another node, manifest not yet written) stays.
    young = tier.blob_path("f" * 64)
    young.parent.mkdir(parents=True, exist_ok=True)
    young.write_bytes(b"in flight")
    prune_lru(tier, max_bytes=None, grace_seconds=3600, now=now)
    assert young.exists()
    prune_lru(tier, max_bytes=None, grace_seconds=3600, now=now + 7200)
    assert not young.exists()


def test_torn_manifest_is_a_miss_and_pruned_first(tmp_path: Path) -> None:
    tier = VolumeTier(tmp_path / "v")
    a, b = key_of("a"), key_of("b")
    put(tier, a, {"x.bin": b"1"})
    put(tier, b, {"x.bin": b"2"})
    tier.manifest_path(a).write_text("{torn")
    assert tier.stat(a) is None
    report = prune_lru(tier, max_bytes=None, grace_seconds=3600)
    assert report.evicted == [a] and not tier.has(a) and tier.has(b)


def test_background_pruner_keeps_the_shared_tier_under_its_limit(tmp_path: Path) -> None:
    shared = VolumeTier(tmp_path / "v", size_limit=3000)
    # The grace must outlast a put (a prune with none would sweep the temporary file of a put in flight).
    s = ArtifactStore(tmp_path / "c", size_limit=10**7, shared=shared, prune_interval=0.2, prune_grace=0.5)
    for i in range(6):
        s.put("test", key_of(f"bg{i}"), {"a.bin": os.urandom(1000)})
    deadline = time.monotonic() + 60
    while shared.total_bytes() > 3000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shared.total_bytes() <= 3000
    assert s.total_bytes() == 6000  # the local tier has its own limit
    s.close()


def test_list_pages_and_delete(tmp_path: Path) -> None:
    tier = VolumeTier(tmp_path / "v")
    keys = sorted(key_of(f"l{i}") for i in range(5))
    for k in keys:
        put(tier, k, {"a.bin": k.encode()})
    page, more = tier.list("test", 2, None)
    assert [m.key for m in page] == keys[:2] and more
    page, more = tier.list("test", 2, keys[3])
    assert [m.key for m in page] == keys[4:] and not more
    assert tier.list("video", 10, None) == ([], False)
    assert tier.delete(keys[0]) and not tier.has(keys[0]) and not tier.delete(keys[0])
    assert [m.key for m in tier.list("test", 10, None)[0]] == keys[1:]


def test_prune_command(tmp_path: Path) -> None:
    root = tmp_path / "v"
    tier = VolumeTier(root)
    for i in range(3):
        put(tier, key_of(f"c{i}"), {"a.bin": os.urandom(500)})
    run = subprocess.run(
        [sys.executable, "-m", "services.store", "prune", "--shared-store", str(root), "--max-bytes", "600"]
        + ["--grace-seconds", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert (out["evicted"], out["bytes_after"], out["blobs_removed"]) == (2, 500, 2)
    run = subprocess.run(
        [sys.executable, "-m", "services.store", "list", "--shared-store", str(root), "--kind", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and len(run.stdout.splitlines()) == 1
