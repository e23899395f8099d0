"""The local tier: blobs in a diskcache directory, published and accounted in a SQLite index beside it.

One machine, several processes. The directory must be on a local filesystem (SQLite and ``flock`` are not
safe on NFS).

Layout
    ``cache.db`` + blob files -- a ``diskcache.Cache`` holding only blobs, under ``b:<key>:<nonce>:<name>``,
    always as files. The per-put random nonce means two processes putting the same key never overwrite
    each other's blobs. The `Disk` used refuses to store or load anything but bytes, str and int, so even a
    tampered database cannot make us unpickle.
    ``index.db`` -- our own SQLite database (WAL, one connection per process), the source of truth:
      * ``artifacts(key, kind, nonce, size, atime, shared_atime, names, manifest)`` -- one row per
        published artifact, indexed by ``atime`` (the LRU order) and by ``(kind, key)`` (listing);
        ``names`` repeats the file names so that even a damaged manifest's blobs can be deleted;
      * ``totals`` -- bytes and count, kept by triggers on ``artifacts`` in the same transaction, so
        knowing whether the tier is over its limit is one row read;
      * ``doomed(key, nonce, names)`` -- artifacts unpublished whose blobs are not yet deleted (so a crash
        mid-delete leaves work for the next cull, not orphans nobody can find without a full scan).
    ``_pins/<key>.pin`` -- pin lock files; ``_cull.lock`` -- serialises eviction across processes.

Why an index
    Put, get and the after-put eviction check each cost a few indexed SQLite statements, whatever the
    number of stored artifacts: sizes and access times are never rescanned. Eviction walks the ``atime``
    index from the oldest row and stops as soon as the tier is under its limit.

Atomic publish
    Blobs are written first *with an expiry* (``orphan_ttl``), then the manifest row is INSERTed (first
    writer wins; a loser discards its blobs and returns the winner's record), then the blobs' expiry is
    cleared. A reader looks only at rows, so it sees either no artifact or a complete one; a process that
    dies before publishing leaves blobs that expire on their own, and one that dies between publishing and
    clearing the expiry leaves an artifact whose blobs later vanish -- which readers detect and treat as a
    miss.

Pins (leases that work across processes)
    ``with tier.pin(key):`` holds a *shared* ``flock`` on ``_pins/<key>.pin``; eviction takes an *exclusive
    non-blocking* ``flock`` on the same file first and skips the artifact if that fails. The kernel drops
    the lock when the holder exits or crashes, so there are no stale leases. The last holder to leave (and
    the evictor) unlinks the file while holding it exclusively; `pin` re-checks the inode after locking so
    it never holds a lock on an unlinked file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import diskcache
from diskcache.core import MODE_RAW, UNKNOWN

from services.store.model import (
    ArtifactNotFound,
    CorruptArtifact,
    FileEntry,
    HashingReader,
    Manifest,
    check_file_name,
    check_key,
    is_digest,
)
from services.store.tier import Opener, clamp_page_size

log = logging.getLogger(__name__)

DEFAULT_ORPHAN_TTL = 6 * 3600.0
LAYOUT_VERSION = 2
"""Version of this directory layout (1 kept manifests in diskcache and rescanned them on every put)."""
_NONCE_RE = re.compile(r"^[0-9a-f]{16}$")
_EXPIRE_EVERY = 30.0
"""Seconds between sweeps of expired orphan blobs (a write transaction in diskcache) on the put path."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layout (id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    nonce TEXT NOT NULL,
    size INTEGER NOT NULL,
    atime INTEGER NOT NULL,
    shared_atime INTEGER NOT NULL DEFAULT 0,
    names TEXT NOT NULL,
    manifest TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS artifacts_by_atime ON artifacts (atime);
CREATE INDEX IF NOT EXISTS artifacts_by_kind ON artifacts (kind, key);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL, count INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS artifacts_added AFTER INSERT ON artifacts BEGIN
    UPDATE totals SET bytes = bytes + NEW.size, count = count + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS artifacts_removed AFTER DELETE ON artifacts BEGIN
    UPDATE totals SET bytes = bytes - OLD.size, count = count - 1 WHERE id = 0;
END;
CREATE TABLE IF NOT EXISTS doomed (key TEXT NOT NULL, nonce TEXT NOT NULL, names TEXT NOT NULL,
    PRIMARY KEY (key, nonce)) WITHOUT ROWID;
"""


class RawOnlyDisk(diskcache.Disk):
    """A diskcache Disk that never pickles: str keys; bytes/str/int values or file streams only."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError("artifact store keys are str")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> Any:
        # A non-raw key would be a pickle: never load it, just make it match no prefix of ours.
        return super().get(key, raw) if raw else "\x00foreign"

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> Any:
        if not read and type(value) not in (bytes, str, int):
            raise TypeError(f"artifact store values are bytes/str/int, not {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (MODE_RAW, diskcache.core.MODE_BINARY, diskcache.core.MODE_TEXT):
            raise CorruptArtifact("refusing to load a serialised Python object from the cache")
        return super().fetch(mode, filename, value, read)

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: str | None = None) -> int:
        """diskcache's file write, made durable and clean: fsynced (file and directory) before the
        caller publishes anything that names it, and removed if it fails half-way (a full disk must
        not keep the partial file)."""
        directory = os.path.dirname(full_path)
        for attempt in range(1, 11):
            with contextlib.suppress(OSError):
                os.makedirs(directory)
            try:
                writer = open(full_path, mode, encoding=encoding)  # noqa: SIM115 - closed below
            except FileNotFoundError:  # another cache removed the directory meanwhile: retry
                if attempt == 10:
                    raise
                continue
            break
        try:
            with writer:
                size = 0
                for chunk in iterator:
                    size += len(chunk)
                    writer.write(chunk)
                writer.flush()
                os.fsync(writer.fileno())
            fsync_dir(directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(full_path)
            raise
        return size


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so names created or renamed in it survive a crash (where the medium allows)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class BlobMismatch(CorruptArtifact):
    """A file copied into the local tier did not match the manifest it came with."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class LocalRecord:
    """A published artifact in the local tier: its manifest and the nonce naming its blobs."""

    manifest: Manifest
    nonce: str
    shared_atime: int = 0
    """When the shared tier last confirmed/recorded an access to it (ns; 0 = never)."""


def blob_key(key: str, nonce: str, name: str) -> str:
    return f"b:{key}:{nonce}:{name}"


def manifest_copy_key(key: str, nonce: str) -> str:
    """The diskcache entry holding a copy of a publication's manifest (the index can be rebuilt from it)."""
    return f"m:{key}:{nonce}"


class LocalTier:
    """diskcache blobs + SQLite index; implements `Tier` plus pins, eviction and file paths."""

    name = "local"

    def __init__(
        self, directory: str | os.PathLike[str], size_limit: int, orphan_ttl: float = DEFAULT_ORPHAN_TTL
    ) -> None:
        if size_limit <= 0:
            raise ValueError("size_limit must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.size_limit = int(size_limit)
        self.orphan_ttl = float(orphan_ttl)
        self._pins_dir = self.directory / "_pins"
        self._pins_dir.mkdir(exist_ok=True)
        self.scratch_root = self.directory / "_tmp"
        self.scratch_root.mkdir(exist_ok=True)
        self._cull_lock_path = self.directory / "_cull.lock"
        self._thread_lock = threading.Lock()  # cull, within this process
        self._db_lock = threading.RLock()  # the one sqlite connection
        self._last_expire = 0.0
        self.recovered: list[str] = []
        """What start-up found damaged and repaired (for the log and tests)."""
        self.tmp_dir, self._scratch_lock_fd = self._claim_scratch()
        try:
            self._open()
        except BaseException:
            os.close(self._scratch_lock_fd)
            raise

    def _open(self) -> None:
        """Open (or repair) cache.db and index.db. A damaged database is moved aside, never a crash loop.

        A damaged index is rebuilt from the manifest copies kept beside the blobs; a damaged blob
        database (which alone knows the blob files' names) takes the whole cache with it: both are
        moved aside, the blob files are removed, and the cache starts empty.
        """
        with self._cull_lock():
            try:
                self.cache = self._open_cache()
            except sqlite3.DatabaseError as e:
                self._set_aside("cache.db", e)
                self._set_aside("index.db", e)
                self._remove_blob_files()
                self.cache = self._open_cache()
            try:
                self._db = self._open_index()
                rebuild = self._prepare_index()
            except sqlite3.DatabaseError as e:
                with contextlib.suppress(Exception):
                    self._db.close()
                self._set_aside("index.db", e)
                self._db = self._open_index()
                rebuild = self._prepare_index()
            if rebuild:
                self._rebuild_index()

    def _open_cache(self) -> diskcache.Cache:
        cache = diskcache.Cache(
            str(self.directory),
            disk=RawOnlyDisk,
            size_limit=self.size_limit,
            eviction_policy="none",
            cull_limit=0,
            statistics=False,
        )
        try:
            _quick_check(cache._sql)
        except BaseException:
            cache.close()
            raise
        return cache

    def _open_index(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.directory / "index.db", timeout=120, isolation_level=None, check_same_thread=False
        )

    def _prepare_index(self) -> bool:
        """Check and set up the index schema; True if it must be rebuilt from the manifest copies."""
        db = self._db
        _quick_check(db.execute)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT version FROM layout").fetchone()
        if row is None:
            db.execute("INSERT INTO layout VALUES (0, ?)", (LAYOUT_VERSION,))
            # A new index beside existing blobs: lost or truncated, or a layout-1 cache. Rebuild from
            # the manifest copies; whatever no manifest accounts for is swept.
            return len(self.cache) > 0
        if row[0] != LAYOUT_VERSION:
            raise RuntimeError(
                f"artifact cache {self.directory} has layout {row[0]}; this version reads "
                f"{LAYOUT_VERSION}: point --cache-dir at a fresh directory"
            )
        return False

    def _set_aside(self, name: str, error: BaseException) -> None:
        """Move a damaged database (with its WAL and shared-memory files) to ``_corrupt/``."""
        aside = self.directory / "_corrupt"
        aside.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(3)}"
        for suffix in ("", "-wal", "-shm"):
            path = self.directory / (name + suffix)
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, aside / f"{name}{suffix}.{stamp}")
        fsync_dir(self.directory)
        message = f"{name} was unreadable ({error}); moved it to _corrupt/ and started a new one"
        log.error("artifact cache %s: %s", self.directory, message)
        self.recovered.append(message)

    def _remove_blob_files(self) -> None:
        """Remove diskcache's blob directories (their names lived in the lost cache.db)."""
        for entry in os.scandir(self.directory):
            if entry.is_dir(follow_symlinks=False) and re.fullmatch(r"[0-9a-f]{2}", entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
        self.recovered.append("removed the blob files the lost cache.db named")

    def _rebuild_index(self) -> None:
        """Re-insert every publication whose manifest copy and blobs are intact; sweep everything else.

        Entries that still expire belong to puts in flight (possibly in another process) and are left to
        expire; permanent entries no rebuilt row accounts for are orphans and are deleted now.
        """
        published: set[tuple[str, str]] = set()
        orphans: list[str] = []
        copies = [k for k in self.cache.iterkeys() if isinstance(k, str) and k.startswith("m:")]
        for mkey in copies:
            _, key, nonce = (mkey.split(":") + ["", ""])[:3]
            got = self.cache.get(mkey, default=None, read=True, expire_time=True)
            if got is None or got[0] is None:
                continue  # gone meanwhile
            if not is_digest(key) or not _NONCE_RE.match(nonce):
                _close(got[0])
                orphans.append(mkey)  # not one of ours (an older layout's entry)
                continue
            handle, expires = got
            if expires is not None:
                _close(handle)
                continue  # a put in flight (or one that died: it expires)
            if isinstance(handle, (bytes, str)):
                text = handle
            else:
                with handle:
                    text = handle.read()
            try:
                manifest = Manifest.from_json(text, key)
            except CorruptArtifact:
                orphans.append(mkey)
                continue
            if all(self.blob_size(key, nonce, n) == e.size for n, e in manifest.files.items()):
                if self._publish(manifest, nonce):
                    published.add((key, nonce))
                    continue
            orphans.append(mkey)
        for ckey in list(self.cache.iterkeys()):
            if not isinstance(ckey, str) or ckey.startswith("m:"):
                continue
            parts = ckey.split(":")
            if len(parts) == 4 and parts[0] == "b" and (parts[1], parts[2]) in published:
                continue
            got = self.cache.get(ckey, default=None, read=True, expire_time=True)
            if got is not None and got[0] is not None:
                _close(got[0])
                if got[1] is not None:
                    continue  # in flight
            orphans.append(ckey)
        for ckey in orphans:
            self.cache.delete(ckey)
        message = (
            f"rebuilt the index: {len(published)} artifacts recovered, {len(orphans)} orphan entries removed"
        )
        log.warning("artifact cache %s: %s", self.directory, message)
        self.recovered.append(message)

    # -- scratch -------------------------------------------------------------------------------------------

    def _claim_scratch(self) -> tuple[Path, int]:
        """This process's scratch directory under ``_tmp/``, kept alive by an exclusive ``flock``.

        Uploads in progress and job scratch go here. A process that dies (SIGKILL, OOM) drops its lock,
        so `sweep_scratch` can tell dead scratch from live without guessing from ages.
        """
        name = f"p{os.getpid()}-{secrets.token_hex(4)}"
        lock_path = self.scratch_root / f"{name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = self.scratch_root / name
        path.mkdir(exist_ok=True)
        return path, fd

    def sweep_scratch(self, older_than: float) -> int:
        """Remove dead scratch: the directories of processes that died, and loose files and directories
        (older layouts, strays) last modified before `older_than` (epoch seconds). Returns how many."""
        removed = 0
        own = self.tmp_dir.name
        for entry in os.scandir(self.scratch_root):
            name = entry.name
            if name in (own, own + ".lock"):
                continue
            try:
                if name.endswith(".lock"):
                    if not (self.scratch_root / name[: -len(".lock")]).exists() and _lock_is_free(entry.path):
                        os.unlink(entry.path)
                    continue
                lock = self.scratch_root / f"{name}.lock"
                if lock.exists():
                    if not _lock_is_free(str(lock)):
                        continue  # a live process's scratch
                elif _newest_mtime(entry.path) >= older_than:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                with contextlib.suppress(FileNotFoundError):
                    if lock.exists() and _lock_is_free(str(lock)):
                        os.unlink(lock)
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def probe_write(self) -> None:
        """Write, fsync and remove a small file, and commit an index transaction: raises if the store
        cannot write (full disk, read-only remount)."""
        probe = self.tmp_dir / f".probe-{secrets.token_hex(4)}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        with self._transaction() as db:
            db.execute("UPDATE totals SET bytes = bytes WHERE id = 0")

    # -- sqlite --------------------------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._db_lock:
            return self._db.execute(sql, args).rowcount

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- records -------------------------------------------------------------------------------------------

    def record(self, key: str) -> LocalRecord | None:
        """The published record, or None. An unreadable row is deleted and raises CorruptArtifact."""
        rows = self._query("SELECT nonce, manifest, shared_atime FROM artifacts WHERE key = ?", (key,))
        if not rows:
            return None
        nonce, text, shared_atime = rows[0]
        try:
            if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
                raise CorruptArtifact(f"bad nonce in the index row of {key}")
            return LocalRecord(Manifest.from_json(text, key), nonce, int(shared_atime))
        except CorruptArtifact as e:
            log.warning("artifact %s: unreadable manifest (%s); deleting", key, e)
            self.unpublish(key)
            raise

    def published_nonce(self, key: str) -> str | None:
        rows = self._query("SELECT nonce FROM artifacts WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def contains(self, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM artifacts WHERE key = ?", (key,)))

    def touch_record(self, key: str) -> None:
        self._write("UPDATE artifacts SET atime = ? WHERE key = ?", (time.time_ns(), key))

    def mark_shared(self, key: str, when_ns: int) -> None:
        self._write("UPDATE artifacts SET shared_atime = ? WHERE key = ?", (when_ns, key))

    def total_bytes(self) -> int:
        return int(self._query("SELECT bytes FROM totals WHERE id = 0")[0][0])

    def count(self) -> int:
        return int(self._query("SELECT count FROM totals WHERE id = 0")[0][0])

    # -- blobs ---------------------------------------------------------------------------------------------

    def open_blob_of(self, key: str, nonce: str, name: str) -> BinaryIO | None:
        """The blob's file, or None if it is gone."""
        handle = self.cache.get(blob_key(key, nonce, name), read=True)
        return handle  # type: ignore[no-any-return]

    def blob_size(self, key: str, nonce: str, name: str) -> int | None:
        handle = self.open_blob_of(key, nonce, name)
        if handle is None:
            return None
        with handle:
            return os.fstat(handle.fileno()).st_size

    # -- write ---------------------------------------------------------------------------------------------

    def write(
        self,
        kind: str,
        key: str,
        opener: Opener,
        meta: dict[str, Any],
        primary: str | None,
        created: float,
        names: list[str],
        expected: dict[str, FileEntry] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> tuple[LocalRecord, bool]:
        """Write blobs (expiring), publish the manifest, then make the blobs permanent.

        Hashes while copying, so the manifest is computed from the bytes actually stored; with `expected`
        (a copy from another tier) a mismatch raises BlobMismatch and nothing is published. Returns the
        published record and whether it is ours (False: another process published the key first).
        """
        nonce = secrets.token_hex(8)
        written: list[str] = []
        entries: dict[str, FileEntry] = {}
        try:
            for name in names:
                bkey = blob_key(key, nonce, name)
                with opener(name) as src:
                    reader = HashingReader(src)
                    self.cache.set(bkey, reader, read=True, expire=self.orphan_ttl)
                written.append(bkey)
                entry = FileEntry(reader.size, reader.hexdigest(), check_file_name(name))
                if expected is not None and (expected[name].size, expected[name].sha256) != (
                    entry.size,
                    entry.sha256,
                ):
                    raise BlobMismatch(
                        f"{name}: {entry.size} bytes sha256 {entry.sha256[:12]}…, manifest says "
                        f"{expected[name].size} bytes sha256 {expected[name].sha256[:12]}…",
                        name,
                    )
                entries[name] = entry
                if on_bytes is not None:
                    on_bytes(entry.size)
            manifest = Manifest(kind, key, created, meta, entries, primary)
            # A copy of the manifest beside the blobs: a lost or damaged index is rebuilt from these.
            mkey = manifest_copy_key(key, nonce)
            self.cache.set(mkey, manifest.to_json(), expire=self.orphan_ttl)
            written.append(mkey)
            if not self._publish(manifest, nonce):
                # Another process published this key first: content-addressed, so theirs is as good.
                for bkey in written:
                    self.cache.delete(bkey)
                written = []
                winner = self.record(key)
                if winner is not None:
                    return winner, False
                return self.write(kind, key, opener, meta, primary, created, names, expected, on_bytes)
        except BaseException:
            for bkey in written:
                with contextlib.suppress(Exception):
                    self.cache.delete(bkey)
            raise
        for bkey in written:
            self.cache.touch(bkey, expire=None)
        return LocalRecord(manifest, nonce), True

    def _publish(self, manifest: Manifest, nonce: str) -> bool:
        """The commit point: the artifact becomes visible atomically when its row is inserted."""
        return (
            self._write(
                "INSERT INTO artifacts (key, kind, nonce, size, atime, names, manifest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (
                    manifest.key,
                    manifest.kind,
                    nonce,
                    manifest.total_size,
                    time.time_ns(),
                    json.dumps(sorted(manifest.files)),
                    manifest.to_json().decode("utf-8"),
                ),
            )
            == 1
        )

    # -- delete --------------------------------------------------------------------------------------------

    def unpublish(self, key: str, nonce: str | None = None) -> bool:
        """Remove the row (only that publication, if `nonce` is given) and then its blobs."""
        with self._transaction() as db:
            row = db.execute("SELECT nonce, names FROM artifacts WHERE key = ?", (key,)).fetchone()
            if row is None or (nonce is not None and row[0] != nonce):
                return False
            db.execute("DELETE FROM artifacts WHERE key = ? AND nonce = ?", (key, row[0]))
            names = _file_names(row[1])
            db.execute("INSERT OR REPLACE INTO doomed VALUES (?, ?, ?)", (key, row[0], json.dumps(names)))
        self._delete_blobs(key, row[0], names)
        return True

    def _delete_blobs(self, key: str, nonce: str, names: list[str]) -> None:
        self.cache.delete(manifest_copy_key(key, nonce))  # first: a rebuild never resurrects it
        for name in names:
            self.cache.delete(blob_key(key, nonce, name))
        self._write("DELETE FROM doomed WHERE key = ? AND nonce = ?", (key, nonce))

    def finish_deletes(self) -> None:
        """Delete the blobs of unpublished artifacts a crashed process left behind."""
        for key, nonce, names in self._query("SELECT key, nonce, names FROM doomed LIMIT 100"):
            with contextlib.suppress(ValueError, TypeError):
                self._delete_blobs(key, nonce, [n for n in json.loads(names) if isinstance(n, str)])

    # -- Tier interface ------------------------------------------------------------------------------------

    def get_manifest(self, key: str) -> Manifest | None:
        record = self.record(key)
        return None if record is None else record.manifest

    def open_blob(self, manifest: Manifest, name: str) -> BinaryIO:
        nonce = self.published_nonce(manifest.key)
        handle = None if nonce is None else self.open_blob_of(manifest.key, nonce, name)
        if handle is None:
            raise ArtifactNotFound(f"artifact {manifest.key}: file {name} is not in the local tier")
        return handle

    def put(self, manifest: Manifest, open_file: Opener) -> Manifest:
        record, _ = self.write(
            manifest.kind,
            manifest.key,
            open_file,
            manifest.meta,
            manifest.primary,
            manifest.created,
            list(manifest.files),
            expected=dict(manifest.files),
        )
        return record.manifest

    def stat(self, key: str) -> Manifest | None:
        rows = self._query("SELECT manifest FROM artifacts WHERE key = ?", (key,))
        with contextlib.suppress(CorruptArtifact):
            return Manifest.from_json(rows[0][0], key) if rows else None
        return None

    def touch(self, manifest: Manifest) -> bool:
        self.touch_record(manifest.key)
        return self.contains(manifest.key)

    def delete(self, key: str) -> bool:
        return self.unpublish(key)

    def list(self, kind: str, page_size: int, after: str | None) -> tuple[list[Manifest], bool]:
        size = clamp_page_size(page_size)
        rows = self._query(
            "SELECT key, manifest FROM artifacts WHERE kind = ? AND key > ? ORDER BY key LIMIT ?",
            (kind, after or "", size + 1),
        )
        out = []
        for key, text in rows[:size]:
            with contextlib.suppress(CorruptArtifact):
                out.append(Manifest.from_json(text, key))
        return out, len(rows) > size

    def close(self) -> None:
        with self._db_lock:
            self._db.close()
        self.cache.close()
        if self._scratch_lock_fd >= 0:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.scratch_root / f"{self.tmp_dir.name}.lock")
            os.close(self._scratch_lock_fd)
            self._scratch_lock_fd = -1

    # -- pins ----------------------------------------------------------------------------------------------

    def _pin_path(self, key: str) -> Path:
        return self._pins_dir / f"{key}.pin"

    @contextlib.contextmanager
    def pin(self, key: str) -> Iterator[None]:
        """Keep `key` from being evicted by any process on this machine inside the block."""
        check_key(key)
        path = self._pin_path(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was unlinked while we waited: lock the new one
        try:
            yield
        finally:
            # The last holder removes the file, so _pins/ holds only live pins (no sweep needed).
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass
            else:
                with contextlib.suppress(FileNotFoundError):
                    if os.fstat(fd).st_ino == os.stat(path).st_ino:
                        os.unlink(path)
            os.close(fd)

    def is_pinned(self, key: str) -> bool:
        """Whether any process on this machine (this one included) holds a pin on `key` now."""
        check_key(key)
        try:
            fd = os.open(self._pin_path(key), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def try_evict_lock(self, key: str) -> int | None:
        """An exclusive lock on the key's pin file, or None if someone holds a pin."""
        fd = os.open(self._pin_path(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        return fd

    def sweep_pin_files(self) -> int:
        """Remove pin files nobody holds (left by a holder that crashed); how many."""
        removed = 0
        for path in self._pins_dir.glob("*.pin"):
            if not is_digest(path.stem):
                continue
            fd = self.try_evict_lock(path.stem)
            if fd is not None:
                self.release_evict_lock(path.stem, fd)
                removed += 1
        return removed

    def release_evict_lock(self, key: str, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._pin_path(key))
        os.close(fd)

    # -- eviction ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _cull_lock(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self._cull_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def expire_orphans(self, force: bool = False) -> None:
        """Remove expired blobs of puts that died before publishing (at most every few seconds)."""
        now = time.monotonic()
        if force or now - self._last_expire >= _EXPIRE_EVERY:
            self._last_expire = now
            self.cache.expire()
            self.finish_deletes()

    def evict(
        self,
        keep: tuple[str, ...] = (),
        on_evict: Callable[[Manifest], None] | None = None,
        target: int | None = None,
    ) -> tuple[list[str], int]:
        """Evict least-recently-used unpinned artifacts (other than `keep`), whole, until under the limit
        (or under `target` bytes: freeing space on a full disk).

        Walks the ``atime`` index from the oldest row, so its cost is the number of rows it looks at,
        not the number stored. Returns the evicted keys and the bytes left.
        """
        evicted: list[str] = []
        limit = self.size_limit if target is None else max(0, min(target, self.size_limit))
        if self.total_bytes() <= limit:
            return evicted, self.total_bytes()
        with self._cull_lock():
            cursor: tuple[int, str] = (-1, "")
            while (total := self.total_bytes()) > limit:
                rows = self._query(
                    "SELECT atime, key, nonce, manifest FROM artifacts WHERE (atime, key) > (?, ?) "
                    "ORDER BY atime, key LIMIT 64",
                    cursor,
                )
                if not rows:
                    log.warning(
                        "cache holds %d bytes over its %d-byte target: the rest is pinned", total, limit
                    )
                    break
                for atime, key, nonce, text in rows:
                    cursor = (atime, key)
                    if self.total_bytes() <= limit:
                        break
                    if key in keep:
                        continue
                    fd = self.try_evict_lock(key)
                    if fd is None:
                        continue  # pinned by a running job
                    try:
                        if self.unpublish(key, nonce):
                            evicted.append(key)
                            try:
                                manifest = Manifest.from_json(text, key)
                            except CorruptArtifact:
                                continue
                            log.info("evicted %s %s (%d bytes)", manifest.kind, key, manifest.total_size)
                            if on_evict is not None:
                                on_evict(manifest)
                    finally:
                        self.release_evict_lock(key, fd)
        return evicted, self.total_bytes()


def _file_names(names_json: str) -> list[str]:
    """The file names recorded beside a manifest (to delete its blobs)."""
    try:
        names = json.loads(names_json)
    except ValueError:
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _quick_check(execute: Callable[..., Any]) -> None:
    """Raise sqlite3.DatabaseError unless SQLite's quick check of the database passes."""
    rows = execute("PRAGMA quick_check").fetchall()
    if not rows or rows[0][0] != "ok":
        detail = "; ".join(str(r[0]) for r in rows[:3])
        raise sqlite3.DatabaseError(f"quick_check failed: {detail}")


def _lock_is_free(path: str) -> bool:
    """Whether nobody holds a flock on `path` (its owner exited)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _newest_mtime(path: str) -> float:
    """The newest modification time in a file or directory tree (a job writing inside keeps it fresh)."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _close(handle: Any) -> None:
    """Close what diskcache's ``get(read=True)`` returned (a file, or the bytes of a small value)."""
    close = getattr(handle, "close", None)
    if callable(close):
        close()
