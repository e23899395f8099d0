"""The shared-volume tier: plain content-addressed files on a volume many machines mount (NFS, a RWX PVC).

No SQLite and no locks (neither is reliable on network file systems). Layout under the root:

    blobs/sha256/ab/<sha256>         a file's bytes, named by their own digest (immutable)
    manifests/ab/<key>.json          the manifest, written last
    index/<kind>/ab/<key>            empty access record: its mtime is the LRU clock; also the kind index
    tmp/                             files being written (unique names)

Writes: every file goes to ``tmp/`` under a unique name, is fsynced, then moved into place; the
directory is fsynced after the move, so a published name survives a crash of the writer's machine.
Blobs are moved with ``rename`` (concurrent writers of one digest write equal bytes). The manifest is
published with ``link(tmp, dest)``, which fails if `dest` exists: a conditional create, so the first
writer wins, as on the other tiers (file systems without hard links fall back to ``rename``). The access
record is written after the manifest and removed before it.

Reads: the caller verifies every blob it streams (size and sha256); a torn or tampered file is a miss.

Size limit: `prune` (LRU by access-record mtime; see `prune_lru`) runs from a background thread of the
server when ``--shared-store-size`` is set, or from ``python -m services.store prune``. Anything an
operator's own lifecycle policy deletes is just a miss.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from services.store.model import (
    COPY_CHUNK,
    ArtifactNotFound,
    CorruptArtifact,
    HashingReader,
    Manifest,
    StoreFull,
    is_digest,
    is_disk_full,
)
from services.store.tier import BlobInfo, Opener, PruneReport, RecordInfo, clamp_page_size, prune_lru

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on directories; the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """`path` exists, and a directory created here is itself durable (its parent is fsynced)."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    _fsync_dir(path.parent)


SHARED_FULL_MESSAGE = "the shared store's volume is out of space; retry later (the local copy is kept)"


class VolumeTier:
    """Shared tier on a mounted volume; implements `SharedTier`."""

    name = "volume"

    def __init__(self, root: str | os.PathLike[str], size_limit: int | None = None) -> None:
        self.root = Path(root)
        self.size_limit = size_limit
        for sub in ("blobs/sha256", "manifests", "index", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"volume {self.root}"

    # -- names ---------------------------------------------------------------------------------------------

    def manifest_path(self, key: str) -> Path:
        return self.root / "manifests" / key[:2] / f"{key}.json"

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def record_path(self, kind: str, key: str) -> Path:
        return self.root / "index" / kind / key[:2] / key

    # -- writing -------------------------------------------------------------------------------------------

    def _write_tmp(self, source: BinaryIO, prefix: str) -> tuple[str, int, str]:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=prefix[:16] + ".")
        except OSError as e:
            if is_disk_full(e):
                raise StoreFull(SHARED_FULL_MESSAGE) from None
            raise
        try:
            with os.fdopen(fd, "wb") as out:
                reader = HashingReader(source)
                while chunk := reader.read(COPY_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if is_disk_full(e):
                log.warning("shared volume %s is full: %s", self.root, e)
                raise StoreFull(SHARED_FULL_MESSAGE) from None
            raise
        return tmp, reader.size, reader.hexdigest()

    def _put_blob(self, sha256: str, size: int, source: BinaryIO) -> None:
        dest = self.blob_path(sha256)
        _ensure_dir(dest.parent)
        tmp, got_size, got_sha = self._write_tmp(source, sha256)
        try:
            if (got_size, got_sha) != (size, sha256):
                raise CorruptArtifact(f"source of blob {sha256[:12]}… changed while copying it to the volume")
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(dest.parent)

    def _has_blob(self, sha256: str, size: int) -> bool:
        path = self.blob_path(sha256)
        try:
            if path.stat().st_size != size:
                return False
            os.utime(path)  # fresh again: a prune running now keeps it for its grace period
            return True
        except FileNotFoundError:
            return False

    def put(self, manifest: Manifest, open_file: Opener) -> Manifest:
        existing = self.stat(manifest.key)
        if existing is not None:
            self.touch(existing)
            return existing
        for name, entry in manifest.files.items():
            if not self._has_blob(entry.sha256, entry.size):
                with open_file(name) as src:
                    self._put_blob(entry.sha256, entry.size, src)
        dest = self.manifest_path(manifest.key)
        _ensure_dir(dest.parent)
        tmp, _, _ = self._write_tmp(io.BytesIO(manifest.to_json()), manifest.key)
        try:
            os.link(tmp, dest)  # conditional create: fails if published meanwhile
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.replace(tmp, dest)  # no hard links here: last writer wins (same content)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(dest.parent)
        published = self.stat(manifest.key) or manifest
        self._touch_record(published)
        return published

    # -- reading -------------------------------------------------------------------------------------------

    def get_manifest(self, key: str) -> Manifest | None:
        try:
            data = self.manifest_path(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Manifest.from_json(data, key)
        except CorruptArtifact:
            log.warning("shared tier: unreadable manifest %s removed", key)
            self.unpublish(key, None)
            raise CorruptArtifact(f"unreadable shared manifest {key}") from None

    def stat(self, key: str) -> Manifest | None:
        try:
            return Manifest.from_json(self.manifest_path(key).read_bytes(), key)
        except (FileNotFoundError, CorruptArtifact):
            return None

    def has(self, key: str) -> bool:
        return self.manifest_path(key).exists()

    def open_blob(self, manifest: Manifest, name: str) -> BinaryIO:
        try:
            return open(self.blob_path(manifest.files[name].sha256), "rb")  # the caller closes it
        except FileNotFoundError:
            raise ArtifactNotFound(f"shared blob of {manifest.key}/{name} is gone") from None

    def _touch_record(self, manifest: Manifest) -> None:
        path = self.record_path(manifest.kind, manifest.key)
        try:
            os.utime(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def touch(self, manifest: Manifest) -> bool:
        if not self.has(manifest.key):
            return False
        self._touch_record(manifest)
        return True

    def list(self, kind: str, page_size: int, after: str | None) -> tuple[list[Manifest], bool]:
        size = clamp_page_size(page_size)
        base = self.root / "index" / kind
        out: list[Manifest] = []
        after = after or ""
        try:
            buckets = sorted(p.name for p in os.scandir(base) if p.is_dir() and p.name >= after[:2])
        except FileNotFoundError:
            return [], False
        for bucket in buckets:
            for key in sorted(e.name for e in os.scandir(base / bucket)):
                if key <= after or not is_digest(key):
                    continue
                manifest = self.stat(key)
                if manifest is None or manifest.kind != kind:
                    continue  # a record whose manifest went (a prune or delete in progress)
                if len(out) == size:
                    return out, True
                out.append(manifest)
        return out, False

    # -- deleting and pruning ------------------------------------------------------------------------------

    def unpublish(self, key: str, kind: str | None) -> None:
        kinds = [kind] if kind is not None else [p.name for p in (self.root / "index").iterdir()]
        for k in kinds:
            with contextlib.suppress(FileNotFoundError):
                self.record_path(k, key).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(key).unlink()

    def delete(self, key: str) -> bool:
        """Unpublish; blobs no other manifest uses go at the next prune (they may be shared)."""
        manifest = self.stat(key)
        existed = self.has(key)
        self.unpublish(key, manifest.kind if manifest is not None else None)
        return existed

    def remove_blob(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(sha256).unlink()

    def scan_blobs(self) -> Iterator[BlobInfo]:
        for bucket in os.scandir(self.root / "blobs" / "sha256"):
            if not bucket.is_dir():
                continue
            for e in os.scandir(bucket.path):
                if is_digest(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat()
                        yield BlobInfo(e.name, st.st_size, st.st_mtime)

    def scan_records(self) -> Iterator[RecordInfo]:
        for bucket in os.scandir(self.root / "manifests"):
            if not bucket.is_dir():
                continue
            for e in os.scandir(bucket.path):
                key = e.name.removesuffix(".json")
                if not (e.name.endswith(".json") and is_digest(key)):
                    continue
                try:
                    st = e.stat()
                    manifest: Manifest | None = Manifest.from_json(Path(e.path).read_bytes(), key)
                except FileNotFoundError:
                    continue
                except CorruptArtifact:
                    manifest = None
                atime = st.st_mtime  # no access record (yet): the publication time
                if manifest is not None:
                    with contextlib.suppress(FileNotFoundError):
                        atime = self.record_path(manifest.kind, key).stat().st_mtime
                yield RecordInfo(key, atime, manifest)

    def sweep_temporary(self, older_than: float) -> int:
        removed = 0
        for e in os.scandir(self.root / "tmp"):
            with contextlib.suppress(FileNotFoundError):
                if e.stat().st_mtime < older_than:
                    os.unlink(e.path)
                    removed += 1
        return removed

    def prune(self, max_bytes: int | None = None, grace_seconds: float = 3600.0) -> PruneReport:
        return prune_lru(self, self.size_limit if max_bytes is None else max_bytes, grace_seconds)

    def total_bytes(self) -> int:
        """Bytes of all blobs (a full listing)."""
        return sum(b.size for b in self.scan_blobs())

    def close(self) -> None:
        pass
