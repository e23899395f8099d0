"""The content-addressed artifact store: keys, atomic publish, verification, eviction, pins, tiers.

The index at scale, listing and delete: test_store_index.py; the shared-volume tier's pruning and the
prune command: test_store_volume.py; the S3 tier on a real S3-compatible server: test_store_s3.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

import services.store as store_package
from services.store import (
    ArtifactStore,
    CorruptArtifact,
    WrongArtifactKind,
    artifact_key,
    canonical_json,
)
from services.store.local import RawOnlyDisk
from tokenflow.errors import SpecError, TooLargeError
from tokenflow.keys import KEY_SCHEMA
from tokenflow.specs import EditSpec

ROOT = Path(__file__).resolve().parent.parent


def key_of(label: str) -> str:
    return artifact_key("test", {"label": label})


def blob_files(directory: Path) -> list[Path]:
    """The files diskcache wrote for blobs (it names them *.val)."""
    return sorted(directory.rglob("*.val"))


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


def value(m: SimpleNamespace, name: str, kind: str | None = None) -> float:
    labels = {"kind": kind} if kind is not None else {}
    return m.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArtifactStore]:
    s = ArtifactStore(tmp_path / "cache", size_limit=10 * 1024 * 1024, metrics=make_metrics())
    yield s
    s.close()


# -- keys ----------------------------------------------------------------------------------------------------


def test_key_is_stable_and_canonical() -> None:
    spec = {"prompt": "a marble statue — 大理石", "guidance_scale": 7.5, "steps": 50, "size": [512, 512]}
    key = artifact_key("inversion", spec)
    # Pinned value: changing it silently would orphan every cached artifact.
    expected_bytes = canonical_json({"kind": "inversion", "v": KEY_SCHEMA, **spec})
    assert (
        expected_bytes
        == (
            '{"guidance_scale":7.5,"kind":"inversion","prompt":"a marble statue — 大理石","size":[512,512],'
            '"steps":50,"v":2}'
        ).encode()
    )
    assert key == hashlib.sha256(expected_bytes).hexdigest()
    assert key == artifact_key("inversion", dict(reversed(list(spec.items()))))  # key order irrelevant
    assert key == artifact_key("inversion", {**spec, "size": (512, 512)})  # tuples are lists
    assert artifact_key("x", {"g": 7.0}) == artifact_key("x", {"g": 7})  # same number, same key
    assert canonical_json({"a": 0.1}) == b'{"a":0.1}'  # shortest round-trip repr


def test_key_pinned_value() -> None:
    assert artifact_key("test", {"label": "a"}) == (
        "71e6426c8233dc38883dee262bc658865e0620868f411b44478699a30383892c"
    )


def test_key_is_sensitive_to_every_field() -> None:
    base = EditSpec(prompt="a cat").to_dict()
    k0 = artifact_key("propagation", base)
    seen = {k0}
    for field_name, new in [
        ("prompt", "a dog"),
        ("negative_prompt", ""),
        ("guidance_scale", 7.6),
        ("pnp_attn_t", 0.4),
        ("pnp_f_t", 0.7),
        ("seed", 1),
        ("keyframe_interval", 4),
        ("chunk_size", 4),
        ("method", "sdedit"),
        ("sdedit_start", 0.8),
        ("keyframe_schedule", [[0, 8]]),
        ("propagation_weighting", "linear"),
        ("crf", 20),
    ]:
        k = artifact_key("propagation", {**base, field_name: new})
        assert k not in seen, field_name
        seen.add(k)
    assert artifact_key("keyframes", base) not in seen


def test_key_rejects_non_json_values() -> None:
    with pytest.raises(ValueError):
        artifact_key("x", {"a": float("nan")})
    with pytest.raises(TypeError):
        artifact_key("x", {"a": object()})
    with pytest.raises(ValueError):
        artifact_key("Bad Kind", {})


# -- round trip ----------------------------------------------------------------------------------------------


def test_put_get_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    big = os.urandom(200_000)
    src = tmp_path / "video.mp4"
    src.write_bytes(big)
    key = key_of("rt")
    m = store.put("inversion", key, {"latents.safetensors": b"abc", "video.mp4": src}, meta={"fps": 24.0})
    assert m.files["video.mp4"].size == len(big) and m.files["video.mp4"].media_type == "video/mp4"
    assert m.primary is None and m.total_size == len(big) + 3
    assert store.contains(key) and store.stat(key) == m
    art = store.get(key, kind="inversion")
    assert (
        art is not None and art.meta == {"fps": 24.0} and art.names() == ["latents.safetensors", "video.mp4"]
    )
    assert art.read("latents.safetensors") == b"abc"
    with art.open("video.mp4") as f:
        assert f.read() == big
    assert art.path("video.mp4").read_bytes() == big
    assert store.total_bytes() == m.total_size
    # Content-addressed: putting the same key again keeps the first artifact.
    again = store.put("inversion", key, {"other.json": b"{}"})
    assert again == m
    with pytest.raises(WrongArtifactKind):
        store.get(key, kind="keyframes")
    assert value(store.metrics, "cache_hits_total", "inversion") == 1
    assert store.get(key_of("absent"), kind="video") is None
    assert value(store.metrics, "cache_misses_total", "video") == 1
    assert value(store.metrics, "cache_written_bytes_total", "inversion") == m.total_size
    assert value(store.metrics, "cache_read_bytes_total", "inversion") >= 3 + len(big)
    assert store.delete(key) and not store.contains(key) and store.get(key) is None
    assert blob_files(store.directory) == []


def test_single_file_is_primary(store: ArtifactStore) -> None:
    m = store.put("video", key_of("p"), {"source.mp4": b"x" * 10})
    assert m.primary == "source.mp4"


def test_refuses_unsafe_names_and_keys(store: ArtifactStore) -> None:
    for name in ["model.pkl", "weights.pt", "../x.json", "a/b.json", ".hidden.json", "x.JSON", "noext"]:
        with pytest.raises(ValueError):
            store.put("test", key_of("n"), {name: b"x"})
    with pytest.raises(SpecError):
        store.get("../../etc/passwd")
    with pytest.raises(SpecError):
        store.put("test", "ABC", {"a.json": b"{}"})
    with pytest.raises(TooLargeError):
        store.put("test", key_of("big"), {"a.bin": b"x" * (store.size_limit + 1)})
    assert not store.contains(key_of("n"))


def test_package_never_pickles() -> None:
    modules = sorted(Path(store_package.__file__).parent.glob("*.py"))
    assert len(modules) >= 8
    for module in modules:
        source = module.read_text(encoding="utf-8")
        for forbidden in ("import pickle", "pickle.load", "pickle.dump", "torch.load", "import torch"):
            assert forbidden not in source, module.name
    # The backend refuses to store Python objects at all.
    with pytest.raises(TypeError):
        RawOnlyDisk("/nonexistent").store({"a": 1}, read=False)


# -- verification --------------------------------------------------------------------------------------------


def test_truncated_blob_is_a_miss_and_can_be_rebuilt(store: ArtifactStore) -> None:
    key = key_of("trunc")
    data = os.urandom(50_000)
    store.put("inversion", key, {"latents.safetensors": data})
    (blob,) = blob_files(store.directory)
    with open(blob, "r+b") as f:
        f.truncate(1000)
    assert store.get(key) is None
    assert not store.contains(key) and blob_files(store.directory) == []
    assert value(store.metrics, "cache_corrupt_total", "inversion") == 1
    store.put("inversion", key, {"latents.safetensors": data})
    art = store.get(key)
    assert art is not None and art.read("latents.safetensors") == data


def test_flipped_bytes_are_detected_on_read(store: ArtifactStore) -> None:
    key = key_of("flip")
    data = os.urandom(50_000)
    store.put("inversion", key, {"latents.safetensors": data, "meta.json": b"{}"})
    target = next(p for p in blob_files(store.directory) if p.stat().st_size == len(data))
    raw = bytearray(target.read_bytes())
    raw[1234] ^= 0xFF
    target.write_bytes(bytes(raw))
    art = store.get(key)
    assert art is not None  # sizes match: the cheap check passes
    with pytest.raises(CorruptArtifact):
        art.read("latents.safetensors")
    assert store.get(key) is None and not store.contains(key)
    assert blob_files(store.directory) == []  # the whole artifact went, not just the bad file
    # Same for a stream read to its end, and for get(verify=True).
    store.put("inversion", key, {"latents.safetensors": data})
    (target,) = blob_files(store.directory)
    target.write_bytes(b"\0" * len(data))
    assert store.get(key, verify=True) is None
    store.put("inversion", key, {"latents.safetensors": data})
    (target,) = blob_files(store.directory)
    target.write_bytes(b"\0" * len(data))
    art = store.get(key)
    assert art is not None
    with pytest.raises(CorruptArtifact), art.open("latents.safetensors") as f:
        f.read()
    assert not store.contains(key)


def test_tampered_manifest_is_a_miss(store: ArtifactStore) -> None:
    key = key_of("tamper")
    store.put("test", key, {"a.json": b"{}"})
    with sqlite3.connect(store.directory / "index.db") as db:
        db.execute("UPDATE artifacts SET manifest = '{not json' WHERE key = ?", (key,))
    assert store.get(key) is None and not store.contains(key)
    assert value(store.metrics, "cache_corrupt_total", "unknown") == 1
    assert blob_files(store.directory) == [] and store.total_bytes() == 0


def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_crash_before_publish_leaves_nothing_visible(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    key = key_of("crash")
    proc = _run(
        """
        import os, sys
        from services.store import ArtifactStore
        from services.store.local import LocalTier
        s = ArtifactStore(sys.argv[1], size_limit=10**7, orphan_ttl=0.3)
        LocalTier._publish = lambda self, manifest, nonce: os._exit(3)  # die at the commit point
        s.put("test", sys.argv[2], {"a.bin": os.urandom(100_000), "b.json": b"{}"})
        """,
        str(directory),
        key,
    )
    assert proc.returncode == 3, proc.stderr
    s = ArtifactStore(directory, size_limit=10**7)
    assert blob_files(directory), "the blobs were written before the crash"
    assert s.get(key) is None and not s.contains(key) and s.stat(key) is None
    time.sleep(0.4)  # orphan blobs expire on their own; the next cull removes them
    s.cull()
    assert blob_files(directory) == []
    s.put("test", key, {"a.bin": b"ok"})
    assert s.get(key) is not None


# -- eviction and pins ---------------------------------------------------------------------------------------


def test_lru_eviction_whole_artifacts_never_pinned(tmp_path: Path) -> None:
    m = make_metrics()
    s = ArtifactStore(tmp_path / "c", size_limit=10_000, metrics=m)
    keys = {n: key_of(n) for n in "abcdef"}

    def put(n: str, kind: str = "inversion") -> None:
        s.put(kind, keys[n], {"x.safetensors": os.urandom(2_000), "y.json": os.urandom(1_000)})

    for n in "abc":  # 9 000 bytes
        put(n)
        time.sleep(0.002)
    assert s.get(keys["a"]) is not None  # a is now more recent than b and c
    time.sleep(0.002)
    put("d", kind="keyframes")  # 12 000 > 10 000: evict the LRU one, b, whole
    assert not s.contains(keys["b"]) and all(s.contains(keys[n]) for n in "acd")
    assert len(blob_files(s.directory)) == 6 and s.total_bytes() == 9_000
    assert value(m, "cache_evictions_total", "inversion") == 1
    assert value(m, "cache_bytes") == 9_000
    with s.pin(keys["c"]):  # c is now the LRU one, but pinned
        put("e")
        assert s.contains(keys["c"]) and not s.contains(keys["a"])
        with s.pin(keys["d"]), s.pin(keys["e"]):
            put("f")  # everything but f is pinned: over the limit rather than evict a pinned one
            assert all(s.contains(keys[n]) for n in "cdef")
    s.cull()  # unpinned now: back under the limit by evicting the LRU one, c
    assert [n for n in "abcdef" if s.contains(keys[n])] == ["d", "e", "f"]
    assert list((s.directory / "_pins").glob("*.pin")) == []


def test_pin_held_by_another_process(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    s = ArtifactStore(directory, size_limit=5_000)
    old, new = key_of("old"), key_of("new")
    s.put("test", old, {"a.bin": b"o" * 3_000})
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from services.store import ArtifactStore
                s = ArtifactStore(sys.argv[1], size_limit=5_000)
                with s.pin(sys.argv[2]):
                    print("pinned", flush=True)
                    sys.stdin.readline()
                """
            ),
            str(directory),
            old,
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "pinned"
        s.put("test", new, {"a.bin": b"n" * 3_000})
        assert s.contains(old), "evicted while another process had it pinned"
    finally:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=30)
    s.cull()
    assert not s.contains(old) and s.contains(new)


# -- shared tier ---------------------------------------------------------------------------------------------


def test_shared_tier_between_two_nodes(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    m1, m2 = make_metrics(), make_metrics()
    node1 = ArtifactStore(tmp_path / "n1", size_limit=10**7, shared_dir=shared, metrics=m1)
    node2 = ArtifactStore(tmp_path / "n2", size_limit=10**7, shared_dir=shared, metrics=m2)
    key = key_of("shared")
    data = os.urandom(100_000)
    node1.put("inversion", key, {"latents.safetensors": data, "meta.json": b'{"a":1}'}, meta={"fps": 8})
    assert node2.contains(key) and node2.stat(key) is not None
    art = node2.get(key)
    assert art is not None and art.read("latents.safetensors") == data and art.meta == {"fps": 8}
    assert node2.local.contains(key)  # now also in node2's local tier
    assert value(m2, "cache_hits_total", "inversion") == 1
    # node2 writes; node1 sees it.
    key2 = key_of("from-node2")
    node2.put("video", key2, {"source.mp4": b"video!"})
    art = node1.get(key2)
    assert art is not None and art.read("source.mp4") == b"video!"
    # Shared files are plain content-addressed files.
    assert node1.shared is not None
    assert node1.shared.blob_path(hashlib.sha256(data).hexdigest()).read_bytes() == data
    assert json.loads(node1.shared.manifest_path(key).read_text())["kind"] == "inversion"


def test_corrupt_shared_blob_is_a_miss(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    node1 = ArtifactStore(tmp_path / "n1", size_limit=10**7, shared_dir=shared)
    m3 = make_metrics()
    node3 = ArtifactStore(tmp_path / "n3", size_limit=10**7, shared_dir=shared, metrics=m3)
    key = key_of("bad-shared")
    manifest = node1.put("inversion", key, {"latents.safetensors": os.urandom(10_000)})
    assert node1.shared is not None
    node1.shared.blob_path(manifest.files["latents.safetensors"].sha256).write_bytes(os.urandom(10_000))
    assert node3.get(key) is None
    assert value(m3, "cache_corrupt_total", "inversion") == 1
    assert not node1.shared.has(key)
    assert node1.get(key) is not None  # node1's local copy was never corrupt


# -- several processes ---------------------------------------------------------------------------------------

_WORKER = """
import os, sys
from services.store import ArtifactStore, artifact_key
directory, who = sys.argv[1], sys.argv[2]
s = ArtifactStore(directory, size_limit=10**8)
for i in range(25):
    same = artifact_key("test", {"i": i})
    s.put("test", same, {"a.bin": bytes([i]) * 20_000, "m.json": b"{}"})
    mine = artifact_key("test", {"i": i, "who": who})
    s.put("test", mine, {"a.bin": who.encode() * 1000})
    for k, want in ((same, bytes([i]) * 20_000), (mine, who.encode() * 1000)):
        art = s.get(k)
        assert art is not None, k
        assert art.read("a.bin") == want
print("ok")
"""


def test_two_processes_share_one_cache_directory(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(directory), who],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("p1", "p2")
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err
    s = ArtifactStore(directory, size_limit=10**8)
    assert s.total_bytes() == 25 * (20_000 + 2 + 2 * 2_000)
    # Exactly one set of blobs per artifact: the losers of publish races discarded theirs.
    assert len(blob_files(directory)) == 25 * 2 + 2 * 25


_EVICTING_WORKER = """
import os, sys
from services.store import ArtifactStore, artifact_key

class Count:
    n = 0
    def labels(self, **kw): return self
    def inc(self, amount=1): Count.n += amount

metrics = type("M", (), {"cache_corrupt_total": Count()})()
directory, who = sys.argv[1], sys.argv[2]
s = ArtifactStore(directory, size_limit=100_000, metrics=metrics)
hits = 0
for i in range(40):
    k = artifact_key("test", {"i": i % 8})
    s.put("test", k, {"a.bin": bytes([i % 8]) * 20_000, "m.json": b"{}"})
    for j in range(8):
        kj = artifact_key("test", {"i": j})
        with s.pin(kj):
            art = s.get(kj)
            if art is not None:  # may have been evicted; if not, pinned reads must succeed
                assert art.read("a.bin") == bytes([j]) * 20_000
                hits += 1
assert Count.n == 0, "corruption reported"
assert s.total_bytes() <= 100_000 + 20_002, s.total_bytes()
print("ok", hits)
"""


def test_two_processes_evicting_concurrently(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _EVICTING_WORKER, str(directory), who],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("p1", "p2")
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.startswith("ok"), err
    s = ArtifactStore(directory, size_limit=100_000)
    s.cull()
    assert s.total_bytes() <= 100_000
    manifests, token = s.list("test", page_size=1000)
    assert token == "" and len(manifests) == s.count()
    live = sum(len(m.files) for m in manifests)
    assert len(blob_files(directory)) == live  # no orphan blobs
