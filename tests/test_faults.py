"""Faults the store must survive: a full disk, damaged databases, damaged blobs, killed processes.

The library-level cases run against a real ArtifactStore; the disk-full cases on a real, small tmpfs
(skipped where the machine does not let us mount one). The cases through real server processes on
loopback (SIGKILL of a stage mid-job, then restart and retry; a corrupted store under a running server)
are further down.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.store import ArtifactStore, StoreFull, artifact_key
from tests.rpc_client import Client, invert_request, result_of, wait_for_progress, wait_health
from tests.serve_process import ServeProcess
from tokenflow.synthetic import make_clip
from tokenflow_pb.v1 import artifacts_pb2, common_pb2, keyframes_pb2, propagation_pb2

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def key_of(i: int | str) -> str:
    return artifact_key("test", {"fault": i})


def blob_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.val") if "_corrupt" not in p.parts)


def assert_consistent(store: ArtifactStore) -> None:
    """Every published artifact verifies, and every blob file belongs to a published artifact."""
    rows = store.local._query("SELECT key, nonce, names FROM artifacts")
    expected = 0
    for key, _nonce, _names in rows:
        art = store.get(key, verify=True)
        assert art is not None, f"{key} is published but does not verify"
        expected += len(art.names())
    assert len(blob_files(store.directory)) == expected
    assert store.total_bytes() == sum(r[0] for r in store.local._query("SELECT size FROM artifacts"))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(directory: Path) -> Path:
    """Fill the file system under `directory` with one file (the "other tenant"); returns it."""
    filler = directory / f"filler-{uuid.uuid4().hex[:6]}"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (b"\xff" * MiB, b"\xff" * 4096):  # then the last partial MiB
            with contextlib.suppress(OSError):
                while f.write(chunk):
                    pass
    return filler


# --------------------------------------------------------------------------- a full disk


def test_full_disk_evicts_then_retries_once(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "12m") as disk:
        store = ArtifactStore(disk / "cache", size_limit=10**9, maintenance_interval=None)
        try:
            old = [key_of(f"old{i}") for i in range(3)]
            for k in old:
                store.put("test", k, {"a.bin": os.urandom(3 * MiB)})
            # 9 MiB stored on a 12 MiB disk: the next 4 MiB put hits ENOSPC, evicts LRU and succeeds.
            new = key_of("new")
            store.put("test", new, {"a.bin": os.urandom(4 * MiB)})
            assert store.contains(new) and not store.contains(old[0])
            assert store.write_error is None
            assert_consistent(store)
        finally:
            store.close()


def test_full_disk_is_a_clean_status_and_recovers(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        store = ArtifactStore(disk / "cache", size_limit=10**9, maintenance_interval=None)
        seen: list[str] = []
        store.add_health_listener(seen.append)
        try:
            kept = key_of("kept")
            store.put("test", kept, {"a.bin": os.urandom(MiB)})
            filler = fill_disk(disk)
            before = blob_files(store.directory)
            with store.pin(kept), pytest.raises(StoreFull) as info:  # nothing evictable: it is pinned
                store.put("test", key_of("big"), {"a.bin": os.urandom(2 * MiB)})
            message = str(info.value)
            assert "/" not in message and "cache.db" not in message and "space" in message
            assert blob_files(store.directory) == before  # no partial blob left behind
            assert not store.contains(key_of("big"))
            assert store.write_error and seen[-1] == store.write_error
            assert not store.check_writable()
            filler.unlink()
            assert store.check_writable() and store.write_error is None and seen[-1] == ""
            store.put("test", key_of("big"), {"a.bin": os.urandom(2 * MiB)})
            assert_consistent(store)
        finally:
            store.close()


def test_full_shared_volume_is_store_full_and_the_local_copy_stays(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "vol", "4m") as vol:
        store = ArtifactStore(tmp_path / "cache", size_limit=10**9, shared_dir=vol, maintenance_interval=None)
        try:
            key = key_of("shared")
            with pytest.raises(StoreFull) as info:
                store.put("test", key, {"a.bin": os.urandom(6 * MiB)})
            assert "/" not in str(info.value)
            assert store.local.contains(key)  # published locally; a retry repeats only the upload
            assert not list((vol / "tmp").iterdir())  # no partial file on the volume
        finally:
            store.close()


# --------------------------------------------------------------------------- damaged databases


def _stored(directory: Path, n: int = 3) -> list[str]:
    store = ArtifactStore(directory, size_limit=10**9, maintenance_interval=None)
    keys = [key_of(f"db{i}") for i in range(n)]
    for k in keys:
        store.put("test", k, {"a.bin": os.urandom(50_000), "b.json": b"{}"})
    store.close()
    return keys


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted", "zeroed"])
def test_a_damaged_index_is_set_aside_and_rebuilt(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "c"
    keys = _stored(directory)
    index = directory / "index.db"
    for extra in ("index.db-wal", "index.db-shm"):
        (directory / extra).unlink(missing_ok=True)
    size = index.stat().st_size
    if damage == "garbage":
        index.write_bytes(os.urandom(size))
    elif damage == "truncated":
        with open(index, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "deleted":
        index.unlink()
    else:
        index.write_bytes(b"\0" * size)
    store = ArtifactStore(directory, size_limit=10**9, maintenance_interval=None)  # never a crash
    try:
        assert any("rebuilt the index" in m for m in store.local.recovered), store.local.recovered
        for k in keys:
            assert store.contains(k)
        assert_consistent(store)
        if damage in ("garbage", "truncated"):
            assert list((directory / "_corrupt").glob("index.db.*"))
        store.put("test", key_of("after"), {"a.bin": b"x"})
    finally:
        store.close()


def test_a_damaged_blob_database_starts_empty_with_no_orphans(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    _stored(directory)
    for extra in ("cache.db-wal", "cache.db-shm"):
        (directory / extra).unlink(missing_ok=True)
    db = directory / "cache.db"
    db.write_bytes(os.urandom(db.stat().st_size))
    store = ArtifactStore(directory, size_limit=10**9, maintenance_interval=None)
    try:
        assert store.count() == 0 and blob_files(directory) == []
        assert list((directory / "_corrupt").glob("cache.db.*"))
        store.put("test", key_of("after"), {"a.bin": b"x"})
        assert_consistent(store)
    finally:
        store.close()


def test_an_index_that_lost_rows_sweeps_their_blobs(tmp_path: Path) -> None:
    """Rows gone but the manifest copies too (an index of an older version): no blob leaks."""
    directory = tmp_path / "c"
    keys = _stored(directory)
    store = ArtifactStore(directory, size_limit=10**9, maintenance_interval=None)
    for k in keys[:2]:
        nonce = store.local.published_nonce(k)
        store.local.cache.delete(f"m:{k}:{nonce}")
    store.close()
    (directory / "index.db").unlink()
    for extra in ("index.db-wal", "index.db-shm"):
        (directory / extra).unlink(missing_ok=True)
    store = ArtifactStore(directory, size_limit=10**9, maintenance_interval=None)
    try:
        assert not store.contains(keys[0]) and not store.contains(keys[1]) and store.contains(keys[2])
        assert_consistent(store)
    finally:
        store.close()


def test_a_quick_check_failure_is_detected(tmp_path: Path) -> None:
    """Damage inside a page (not the header) is found by the start-up check, not by a later query."""
    directory = tmp_path / "c"
    keys = _stored(directory, 50)
    index = directory / "index.db"
    for extra in ("index.db-wal", "index.db-shm"):
        (directory / extra).unlink(missing_ok=True)
    data = bytearray(index.read_bytes())
    page = sqlite3.connect(index).execute("PRAGMA page_size").fetchone()[0]
    for offset in range(page + 8, len(data), page):  # every page but the header: b-tree headers
        data[offset : offset + 16] = os.urandom(16)
    index.write_bytes(bytes(data))
    store = ArtifactStore(directory, size_limit=10**9, maintenance_interval=None)
    try:
        assert all(store.contains(k) for k in keys)
        assert_consistent(store)
    finally:
        store.close()


# --------------------------------------------------------------------------- damaged blobs


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "deleted"])
def test_a_damaged_blob_is_detected_removed_and_never_served(tmp_path: Path, damage: str) -> None:
    store = ArtifactStore(tmp_path / "c", size_limit=10**9, maintenance_interval=None)
    try:
        key = key_of(damage)
        data = os.urandom(100_000)
        store.put("test", key, {"a.bin": data})
        (blob,) = blob_files(store.directory)
        if damage == "truncated":
            with open(blob, "r+b") as f:
                f.truncate(50_000)
        elif damage == "bit-flipped":
            raw = bytearray(blob.read_bytes())
            raw[12345] ^= 0x10
            mtime = blob.stat().st_mtime_ns
            blob.write_bytes(bytes(raw))
            os.utime(blob, ns=(mtime, mtime))  # same size, same time: only the digest can tell
        else:
            blob.unlink()
        assert store.get(key, verify=True) is None  # a cache hit checks digests, not sizes
        assert not store.contains(key)
        assert blob_files(store.directory) == []
        store.put("test", key, {"a.bin": data})  # rebuilt under the same key
        assert store.get(key, verify=True).read("a.bin") == data
    finally:
        store.close()


# --------------------------------------------------------------------------- scratch of killed processes

_SCRATCH_CHILD = textwrap.dedent(
    """
    import sys, time
    from services.store import ArtifactStore
    store = ArtifactStore(sys.argv[1], size_limit=10**8, maintenance_interval=None)
    (store.tmp_dir / "upload-1.part").write_bytes(b"x" * 1000)
    (store.tmp_dir / "job").mkdir()
    (store.tmp_dir / "job" / "video.mp4").write_bytes(b"y" * 1000)
    print(store.tmp_dir, flush=True)
    time.sleep(600)
    """
)


def test_scratch_of_a_killed_process_is_swept_and_live_scratch_is_kept(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    live = ArtifactStore(directory, size_limit=10**8, maintenance_interval=None, scratch_ttl=0)
    child = subprocess.Popen(
        [sys.executable, "-c", _SCRATCH_CHILD, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        dead_dir = Path(child.stdout.readline().strip())
        assert (dead_dir / "job" / "video.mp4").exists()
        (live.tmp_dir / "upload-live.part").write_bytes(b"z")
        assert live.sweep_scratch() == 0  # the child is alive: its scratch stays, whatever its age
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        stray = directory / "_tmp" / "upload-old.part"  # a loose file of an older version
        stray.write_bytes(b"s")
        os.utime(stray, (time.time() - 10, time.time() - 10))
        restarted = ArtifactStore(directory, size_limit=10**8, maintenance_interval=None, scratch_ttl=5)
        try:
            assert not dead_dir.exists() and not stray.exists()
            assert (live.tmp_dir / "upload-live.part").exists()  # another live process's scratch
            names = {p.name for p in (directory / "_tmp").iterdir()}
            assert names == {
                live.tmp_dir.name,
                live.tmp_dir.name + ".lock",
                restarted.tmp_dir.name,
                restarted.tmp_dir.name + ".lock",
            }
        finally:
            restarted.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        live.close()
    assert not any((directory / "_tmp").iterdir())  # closing removes a store's own scratch


def test_maintenance_thread_follows_the_disk(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        store = ArtifactStore(disk / "cache", size_limit=10**9, maintenance_interval=0.2)
        try:
            filler = fill_disk(disk)
            deadline = time.monotonic() + 10
            while store.write_error is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert store.write_error is not None
            filler.unlink()
            deadline = time.monotonic() + 10
            while store.write_error is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert store.write_error is None
        finally:
            store.close()


# --------------------------------------------------------------------------- through server processes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def serve(tmp: Path, cache: Path, name: str, *extra: str) -> tuple[ServeProcess, Client]:
    process = ServeProcess(
        name, ["--model", "tiny", "--cache-dir", str(cache), "--metrics-port", "-1", *extra], tmp
    )
    try:
        process.wait_serving()
        client = Client(process.target)
        wait_health(client, SERVING)
    except BaseException:
        process.close()
        raise
    return process, client


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("fault-clip")
    return make_clip(folder / "clip.mp4", frames=8, size=(64, 64), fps=10, audio=True).read_bytes()


def edit_spec(prompt: str = "a marble statue") -> common_pb2.EditSpec:
    return common_pb2.EditSpec(prompt=prompt, keyframe_interval=4)


def stage_call(client: Client, stage: str, digest: str, prompt: str = "a marble statue") -> Iterator[object]:
    if stage == "keyframes":
        request = keyframes_pb2.EditKeyframesRequest(inversion_digest=digest, edit=edit_spec(prompt))
        return client.keyframes.EditKeyframes(request, timeout=300)
    request = propagation_pb2.PropagateRequest(inversion_digest=digest, edit=edit_spec(prompt))
    return client.propagation.Propagate(request, timeout=300)


def assert_store_sound(cache: Path) -> None:
    """Opened beside the live server: every entry verifies, and no dead process's scratch is left."""
    store = ArtifactStore(cache, size_limit=10**10, maintenance_interval=None)
    try:
        assert_consistent(store)
        root = cache / "_tmp"
        for entry in root.iterdir():
            if entry.suffix != ".lock":
                lock = root / f"{entry.name}.lock"
                assert lock.exists(), f"stray scratch {entry.name}"
                fd = os.open(lock, os.O_RDWR)
                try:
                    with pytest.raises(BlockingIOError):  # held: a live process's scratch
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                finally:
                    os.close(fd)
    finally:
        store.close()


@pytest.mark.parametrize(
    "stage",
    [
        "inversion",
        pytest.param("propagation", marks=pytest.mark.slow),
        pytest.param("keyframes", marks=pytest.mark.slow),
    ],
)
def test_sigkill_mid_job_then_restart_and_retry(tmp_path: Path, clip_bytes: bytes, stage: str) -> None:
    cache = tmp_path / "cache"
    process, client = serve(tmp_path, cache, "first")
    try:
        video = client.upload(clip_bytes)
        request = invert_request(video, max_frames=8, steps=12, edit_steps=12)
        if stage == "inversion":
            wait_for_progress(client.inversion.Invert(request, timeout=300))
        else:
            inversion = result_of(client.inversion.Invert(request, timeout=300)).digest
            wait_for_progress(stage_call(client, stage, inversion))
        process.kill()  # SIGKILL in the middle of the job: nothing gets to clean up
        dead = list((cache / "_tmp").glob(f"p{process.process.pid}-*"))
        assert dead, "the killed server's scratch is left behind (what the sweep is for)"
    finally:
        process.close()
    process, client = serve(tmp_path, cache, "restarted")
    try:
        if stage == "inversion":
            result = result_of(client.inversion.Invert(request, timeout=300))
        else:
            result = result_of(stage_call(client, stage, inversion))
        assert result.digest and not result.cache_hit  # the job ran again to the end
        assert not [p for p in dead if p.exists()]  # swept when the restarted server opened the store
        assert_store_sound(cache)
    finally:
        process.close()


def _blob_path(cache: Path, digest: str, name: str) -> Path:
    store = ArtifactStore(cache, size_limit=10**10, maintenance_interval=None)
    try:
        nonce = store.local.published_nonce(digest)
        assert nonce is not None
        handle = store.local.open_blob_of(digest, nonce, name)
        assert handle is not None
        with handle:
            return Path(handle.name)
    finally:
        store.close()


@pytest.mark.slow
def test_corrupt_store_under_a_server_is_detected_rebuilt_and_never_served(
    tmp_path: Path, clip_bytes: bytes
) -> None:
    cache = tmp_path / "cache"
    process, client = serve(tmp_path, cache, "corrupt")
    try:
        video = client.upload(clip_bytes)
        request = invert_request(video, max_frames=8, steps=4, edit_steps=4)
        first = result_of(client.inversion.Invert(request, timeout=300))
        # bit-flipped, same size and mtime: a cache hit that checked sizes only would serve it
        tensor = _blob_path(cache, first.digest, "source_000.safetensors")
        raw = bytearray(tensor.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        stat = tensor.stat()
        tensor.write_bytes(bytes(raw))
        os.utime(tensor, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        again = result_of(client.inversion.Invert(request, timeout=300))
        assert again.digest == first.digest and not again.cache_hit  # rebuilt transparently
        # a truncated edit result: Download says ABORTED (retryable), the stage rebuilds it
        edit = result_of(stage_call(client, "propagation", first.digest))
        video_blob = _blob_path(cache, edit.digest, "edited.mp4")
        with open(video_blob, "r+b") as f:
            f.truncate(video_blob.stat().st_size // 2)
        download = artifacts_pb2.DownloadRequest(digest=edit.digest)
        code, reason, _, details = client.refused(lambda: client.artifacts.Download(download, timeout=30))
        assert code == grpc.StatusCode.ABORTED and reason == "ARTIFACT_CORRUPT", (code, reason)
        assert any(type(d).__name__ == "RetryInfo" for d in details)
        rebuilt = result_of(stage_call(client, "propagation", first.digest))
        assert rebuilt.digest == edit.digest and not rebuilt.cache_hit
        data = b"".join(r.chunk for r in client.artifacts.Download(download, timeout=30))
        assert hashlib.sha256(data).hexdigest() == rebuilt.files[0].sha256
        # a deleted blob of the inversion: the edit stage rebuilds the inversion from its recipe
        _blob_path(cache, first.digest, "latents_clean.safetensors").unlink()
        other = result_of(stage_call(client, "propagation", first.digest, prompt="a bronze statue"))
        assert other.digest
        assert_store_sound(cache)
    finally:
        process.terminate()
        process.close()
    # a corrupted index: the server starts (no crash loop), rebuilds it and serves what it kept
    index = cache / "index.db"
    for extra in ("index.db-wal", "index.db-shm"):
        (cache / extra).unlink(missing_ok=True)
    index.write_bytes(os.urandom(index.stat().st_size))
    process, client = serve(tmp_path, cache, "reindexed")
    try:
        assert "rebuilt the index" in process.log_path.read_text()
        hit = result_of(client.inversion.Invert(request, timeout=300))
        assert hit.digest == first.digest and hit.cache_hit
        assert_store_sound(cache)
    finally:
        process.close()


def test_full_disk_under_a_server_is_a_clean_status_and_it_serves_again(
    tmp_path: Path, clip_bytes: bytes
) -> None:
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        cache = disk / "cache"
        process, client = serve(tmp_path, cache, "full")
        try:
            filler = fill_disk(disk)
            code, reason, metadata, details = client.refused(lambda: client.upload(clip_bytes))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "STORE_FULL", (code, reason)
            assert any(type(d).__name__ == "RetryInfo" for d in details)
            health = client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == NOT_SERVING
            partial = [p for p in (cache / "_tmp").rglob("*") if p.is_file() and p.suffix != ".lock"]
            assert not partial  # no partial upload left
            filler.unlink()
            wait_health(client, SERVING, timeout=15)  # the store probes every 2 s while it cannot write
            video = client.upload(clip_bytes)
            assert result_of(client.inversion.Invert(invert_request(video), timeout=300)).digest
            assert_store_sound(cache)
        finally:
            process.close()


# --------------------------------------------------------------------------- cancellation frees the CPU


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seconds_until_idle(pid: int, started: float, limit: float = 60.0) -> float:
    """Seconds from `started` until the process uses under a fifth of a core over half a second."""
    while time.monotonic() - started < limit:
        before, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(0.5)
        if (cpu_seconds(pid) - before) / (time.monotonic() - t0) < 0.2:
            return t0 - started
    raise AssertionError(f"still busy {limit} s after the cancel")


@pytest.mark.slow
def test_cancelled_and_abandoned_jobs_free_the_cpu_within_seconds(tmp_path: Path, clip_bytes: bytes) -> None:
    """Cancel (an inversion mid-way) and a caller who leaves with no grace (an edit):
    the work stops within a UNet batch, not at the end of a whole-clip step or of the job."""
    from tokenflow_pb.v1 import inversion_pb2

    process, client = serve(tmp_path, tmp_path / "cache", "cancel", "--job-grace-seconds", "0")
    pid = process.process.pid
    try:
        video = client.upload(clip_bytes)
        long = invert_request(video, max_frames=8, steps=500, edit_steps=50, reconstruct=True)
        responses = client.inversion.Invert(long, timeout=600)
        progress = wait_for_progress(responses, step=2)
        started = time.monotonic()
        cancel = client.inversion.Cancel(inversion_pb2.InversionCancelRequest(job_id=progress.job_id))
        assert cancel.cancelled
        code = None
        try:
            list(responses)
        except grpc.RpcError as e:
            code = e.code()
        assert code == grpc.StatusCode.CANCELLED
        inversion_idle = seconds_until_idle(pid, started)

        short = invert_request(video, max_frames=8, steps=50, edit_steps=50)
        inversion = result_of(client.inversion.Invert(short, timeout=600)).digest
        edit = stage_call(client, "propagation", inversion)
        wait_for_progress(edit, step=1)
        started = time.monotonic()
        edit.cancel()  # the caller leaves; with no grace the job is cancelled
        edit_idle = seconds_until_idle(pid, started)
        print(f"CPU idle after cancel: inversion {inversion_idle:.1f} s, abandoned edit {edit_idle:.1f} s")
        assert inversion_idle < 15 and edit_idle < 15, (inversion_idle, edit_idle)
        wait_health(client, SERVING)
    finally:
        process.close()


def test_reconstruction_stops_within_one_unet_batch(tiny_model: Any, clip_array: Any) -> None:
    """A cancel during the reconstruction lands after the UNet batch in progress, not at the step's end."""
    from tokenflow.errors import Cancelled
    from tokenflow.inversion import frames_from_array, invert
    from tokenflow.progress import JobHooks
    from tokenflow.specs import InversionSpec

    calls = {"unet": 0, "at_cancel": -1}
    reconstructing = {"on": False}

    def progress(event: Any) -> None:
        if event.stage == "invert" and event.step == event.total:
            reconstructing["on"] = True  # the inversion is done: the next check is inside reconstruct

    def check() -> None:
        if reconstructing["on"] and calls["at_cancel"] < 0 and calls["unet"] > 0:
            calls["at_cancel"] = calls["unet"]
            raise Cancelled("cancelled by the test")

    def count(*_: Any) -> None:
        if reconstructing["on"]:
            calls["unet"] += 1

    handle = tiny_model.unet.register_forward_hook(count)
    try:
        spec = InversionSpec(steps=2, edit_steps=2, reconstruct=True, batch_size=2)
        with pytest.raises(Cancelled):
            invert(tiny_model, frames_from_array(clip_array[:8]), spec, hooks=JobHooks(progress, check))
    finally:
        handle.remove()
    assert calls["at_cancel"] == 1 and calls["unet"] == 1  # one batch of 2 of the step's 4 batches
