"""Faults the store must survive: a full disk, damaged databases, damaged blobs, killed processes.

The library-level cases run against a real ArtifactStore; the disk-full cases on a real, small tmpfs
(skipped where the machine does not let us mount one). The cases through real server processes on
loopback (SIGKILL of a stage mid-job, then restart and retry; a corrupted store under a running server)
are further down.
"""

from __future__ import annotations

import contextlib
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

import pytest

from services.store import ArtifactStore, StoreFull, artifact_key

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
