"""Content-addressed artifact store: a local diskcache tier in front of an optional shared-volume tier.

What an artifact is
    A manifest (kind, key, creation time, JSON metadata, and for each file its size, sha256 and media type)
    plus named files. The key is a content address (`artifact_key`): a sha256 over a canonical JSON
    encoding of everything that determines the artifact, so the same inputs always name the same
    artifact and it is computed once. Files are typed by extension only -- .safetensors, .json, .mp4,
    .png, and .bin (raw uploaded source bytes, e.g. a .webm video; only ever handed to a decoder). Nothing
    is ever pickled: the diskcache `Disk` used here refuses to store or load anything but bytes, str and
    int, so even a tampered cache database cannot make us unpickle.

Local tier (one machine, several processes)
    `diskcache.Cache(directory)` (SQLite index + one file per blob; process- and thread-safe; the
    directory must be on a local filesystem: SQLite and ``flock`` are not safe on NFS). Keys:
      * ``b:<key>:<nonce>:<name>`` -- a file's bytes, always stored as a file (written with ``read=True``).
        The per-put random nonce means two processes putting the same key never overwrite each other's
        blobs.
      * ``m:<key>`` -- the manifest JSON (plus the nonce locating its blobs).
      * ``t:<key>`` -- last access time (ns), our LRU clock.
    Atomic publish: blobs are written first *with an expiry* (``orphan_ttl``), then the manifest is
    published with ``Cache.add`` (first writer wins; a loser discards its blobs and returns the winner's
    manifest), then the blobs' expiry is cleared. A reader looks only at manifests, so it sees either no
    artifact or a complete one; a process that dies before publishing leaves blobs that expire on their
    own (the next cull removes them), and one that dies between publishing and clearing the expiry leaves
    an artifact whose blobs later vanish -- which readers detect and treat as a miss.

Reads verify
    `get` checks that every blob exists with the manifest's size (cheap). `Artifact.read`, `.path`,
    `.verify` and reading an `Artifact.open` stream to its end check the sha256. Any mismatch or missing
    blob deletes the whole artifact, counts ``cache_corrupt_total`` and is reported as a miss
    (`get` returns None; the read methods raise `CorruptArtifact`, a kind of `ArtifactNotFound`), so a
    corrupt entry is rebuilt, never served.

Eviction (whole artifacts, LRU, never a pinned one)
    diskcache's own culling is disabled (``eviction_policy="none"``, ``cull_limit=0``) because it evicts
    single entries -- it would tear artifacts apart -- and knows nothing of pins. Instead `cull` (run after
    every put) sums the manifests' sizes and, while over ``size_limit``, deletes the least recently used
    artifacts whole (manifest first, then blobs), skipping pinned ones and the artifact just put (its
    caller is about to hand it out); ``cache_evictions_total{kind}`` counts them. If everything else is
    pinned the cache stays over its limit until pins are released. ``size_limit`` bounds artifact bytes
    (SQLite's own few hundred KiB are not counted); a single artifact larger than it is refused with
    TooLargeError. Culls are serialised across processes by an ``fcntl`` lock file.

Pins (leases that work across processes)
    ``with store.pin(key):`` holds a *shared* ``flock`` on ``_pins/<key>.pin`` in the cache directory; the
    cull takes an *exclusive non-blocking* ``flock`` on the same file before evicting, and skips the
    artifact if that fails. The kernel drops the lock when the holder exits or crashes, so there are no
    stale leases to expire. After evicting, the cull unlinks the pin file while still holding it; `pin`
    re-checks the inode after locking so it never holds a lock on an unlinked file. Pin the inputs of a
    job *before* you `get` them: then they stay until the job is done.

Shared tier (several machines)
    ``shared_dir`` holds plain files on a shared volume, no SQLite: ``blobs/sha256/ab/<sha256>``
    (immutable, named by their own digest, so concurrent writers of equal bytes are harmless) and
    ``manifests/ab/<key>.json``. Every file is written to ``tmp/`` under a unique name, fsynced and
    moved into place with ``os.replace``; the manifest goes last. `get` checks the local tier, then the
    shared one, copying (and verifying) into the local tier; `put` writes both. The shared tier has no
    size limit of its own: an operator's lifecycle policy may delete files there at any time, which only
    produces misses. Pins are local; a blob deleted from the shared tier under a reader is a miss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import diskcache
from diskcache.core import MODE_RAW, UNKNOWN

from tokenflow.errors import SpecError, TooLargeError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Part of every artifact key: bump it when the layout or meaning of any artifact changes."""

MEDIA_TYPES: dict[str, str] = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".mp4": "video/mp4",
    ".png": "image/png",
    # Raw uploaded source bytes (e.g. a .webm or .mkv video). Never deserialised by us: only handed to a
    # media decoder, which treats them as untrusted input anyway.
    ".bin": "application/octet-stream",
}
ALLOWED_EXTENSIONS = frozenset(MEDIA_TYPES)

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_COPY_CHUNK = 1 << 20
_DEFAULT_ORPHAN_TTL = 6 * 3600.0


class ArtifactNotFound(LookupError):
    """No artifact with this key (or no such file in it). Maps to NOT_FOUND."""


class CorruptArtifact(ArtifactNotFound):
    """A stored file did not match its manifest; the artifact was deleted and counts as a miss."""


class WrongArtifactKind(SpecError):
    """The digest names an artifact of another kind than the caller needs (INVALID_ARGUMENT)."""


# ----------------------------------------------------------------------------------------------------------
# Keys


def canonical_json(obj: Any) -> bytes:
    """Canonical UTF-8 JSON: sorted keys, no whitespace, no NaN/inf, tuples as lists.

    Floats are written with Python's shortest round-trip repr (stable across platforms and runs), and a
    float with an integral value is written as the integer (``7.0`` and ``7`` mean the same setting, so
    they must name the same artifact).
    """
    return json.dumps(
        _normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _normalise(obj: Any) -> Any:
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"cannot put a non-finite float ({obj}) in an artifact key")
        return int(obj) if obj.is_integer() and abs(obj) < 2**53 else obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"artifact key dicts need str keys, got {k!r}")
            out[k] = _normalise(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    raise TypeError(f"cannot put a {type(obj).__name__} in an artifact key")


def artifact_key(kind: str, canonical: Mapping[str, Any]) -> str:
    """Content address of an artifact: sha256 hex of ``{"kind", "v": SCHEMA_VERSION, **canonical}``."""
    _check_kind(kind)
    if "kind" in canonical or "v" in canonical:
        raise ValueError("canonical dict must not contain the reserved fields 'kind' or 'v'")
    return hashlib.sha256(canonical_json({"kind": kind, "v": SCHEMA_VERSION, **canonical})).hexdigest()


def is_digest(value: str) -> bool:
    """True for a well-formed content address (64 lowercase hex characters)."""
    return isinstance(value, str) and bool(_KEY_RE.match(value))


def _check_key(key: str) -> None:
    if not is_digest(key):
        raise SpecError(
            f"malformed digest {str(key)[:80]!r}: expected 64 lowercase hex characters (a sha256)"
        )


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"artifact kind must match {_KIND_RE.pattern}, got {kind!r}")


def check_file_name(name: str) -> str:
    """Validate an artifact file name (no paths, an allowed extension) and return its media type."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid artifact file name {name!r}: letters, digits, '.', '_', '-' only")
    ext = os.path.splitext(name)[1]
    if ext not in MEDIA_TYPES:
        raise ValueError(
            f"refusing artifact file {name!r}: allowed extensions are "
            f"{', '.join(sorted(ALLOWED_EXTENSIONS))} "
            "(tensors as safetensors, metadata as JSON, videos as mp4, images as PNG; never pickle)"
        )
    return MEDIA_TYPES[ext]


# ----------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact as recorded in its manifest."""

    size: int
    sha256: str
    media_type: str


@dataclass(frozen=True)
class Manifest:
    """Everything known about an artifact except its bytes."""

    kind: str
    key: str
    created: float
    meta: dict[str, Any]
    files: dict[str, FileEntry]
    primary: str | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "kind": self.kind,
            "key": self.key,
            "created": self.created,
            "meta": self.meta,
            "files": {n: [f.size, f.sha256, f.media_type] for n, f in self.files.items()},
            "primary": self.primary,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str) -> Manifest:
        """Parse and validate; raises CorruptArtifact on anything unexpected (e.g. a tampered entry)."""
        try:
            files = {}
            for name, (size, sha, media) in d["files"].items():
                check_file_name(name)
                if not (isinstance(size, int) and size >= 0 and is_digest(sha) and isinstance(media, str)):
                    raise ValueError(f"bad file entry {name!r}")
                files[name] = FileEntry(size, sha, media)
            m = cls(
                kind=str(d["kind"]),
                key=str(d["key"]),
                created=float(d["created"]),
                meta=dict(d["meta"]),
                files=files,
                primary=d.get("primary"),
            )
            _check_kind(m.kind)
            if m.key != key or not files or (m.primary is not None and m.primary not in files):
                raise ValueError("inconsistent manifest")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptArtifact(f"unreadable manifest for {key}: {e}") from None
        return m


# ----------------------------------------------------------------------------------------------------------
# diskcache plumbing


class _RawOnlyDisk(diskcache.Disk):
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


class _HashingReader:
    """File-like wrapper that hashes and counts what is read through it (for ``Cache.set(read=True)``)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._sha.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _file_sha256(f: BinaryIO) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    while chunk := f.read(_COPY_CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


def _blob_key(key: str, nonce: str, name: str) -> str:
    return f"b:{key}:{nonce}:{name}"


# ----------------------------------------------------------------------------------------------------------
# Artifact handle


class _VerifyingStream(io.RawIOBase):
    """Sequential read-only stream over a blob that checks size and sha256 when it reaches the end."""

    def __init__(self, artifact: Artifact, name: str, handle: BinaryIO) -> None:
        super().__init__()
        self._artifact = artifact
        self._name = name
        self._handle: Any = handle  # a real file object (BinaryIO lacks readinto in typeshed)
        self._sha = hashlib.sha256()
        self._size = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._handle.readinto(buffer)
        if n:
            self._sha.update(memoryview(buffer)[:n])
            self._size += n
            self._artifact._store._count("cache_read_bytes_total", self._artifact.kind, n)
        elif not self._checked:
            self._checked = True
            self._artifact._check(self._name, self._size, self._sha.hexdigest())
        return n or 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._handle.close()
        super().close()


class Artifact:
    """A published artifact in the local tier. Reading verifies; a corrupt file raises CorruptArtifact.

    Hold a pin (`ArtifactStore.pin`) while using an artifact for long: eviction deletes unpinned ones.
    """

    def __init__(self, store: ArtifactStore, manifest: Manifest, nonce: str) -> None:
        self._store = store
        self.manifest = manifest
        self._nonce = nonce
        self._verified: set[str] = set()

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.meta

    def names(self) -> list[str]:
        return sorted(self.manifest.files)

    def _entry(self, name: str) -> FileEntry:
        try:
            return self.manifest.files[name]
        except KeyError:
            raise ArtifactNotFound(
                f"artifact {self.key} ({self.kind}) has no file {name!r}; it has {', '.join(self.names())}"
            ) from None

    def _handle(self, name: str) -> BinaryIO:
        self._entry(name)
        handle = self._store._cache.get(_blob_key(self.key, self._nonce, name), read=True)
        if handle is None:
            self._store._blob_missing(self.manifest, self._nonce, name)
        return handle

    def _check(self, name: str, size: int, sha: str) -> None:
        entry = self._entry(name)
        if size != entry.size or sha != entry.sha256:
            self._store._corrupt(
                self.key,
                self.kind,
                self._nonce,
                f"{name}: {size} bytes sha256 {sha[:12]}…, manifest says "
                f"{entry.size} bytes sha256 {entry.sha256[:12]}…",
            )
        self._verified.add(name)

    def read(self, name: str) -> bytes:
        """The whole file, verified against the manifest."""
        with self._handle(name) as h:
            data = h.read()
        self._store._count("cache_read_bytes_total", self.kind, len(data))
        self._check(name, len(data), hashlib.sha256(data).hexdigest())
        return data

    def open(self, name: str) -> io.BufferedReader:
        """A sequential stream of the file; reading it to the end verifies it (CorruptArtifact if not)."""
        return io.BufferedReader(_VerifyingStream(self, name, self._handle(name)), buffer_size=_COPY_CHUNK)

    def verify(self, name: str) -> None:
        """Hash the file now (once per Artifact object); CorruptArtifact on mismatch."""
        if name in self._verified:
            return
        with self._handle(name) as h:
            size, sha = _file_sha256(h)
        self._check(name, size, sha)

    def verify_all(self) -> None:
        for name in self.names():
            self.verify(name)

    def path(self, name: str) -> Path:
        """Filesystem path of the verified file, for readers that need one (mmap, media decoders).

        Read-only: never modify it. Valid while the artifact is pinned (an evicted file is unlinked; an
        already open descriptor keeps working).
        """
        with self._handle(name) as h:
            p = Path(h.name)
        self.verify(name)
        return p


# ----------------------------------------------------------------------------------------------------------
# Shared tier


class SharedTier:
    """Plain content-addressed files on a volume many machines mount (no SQLite, no locks needed)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for sub in ("blobs/sha256", "manifests", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def manifest_path(self, key: str) -> Path:
        return self.root / "manifests" / key[:2] / f"{key}.json"

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def _atomic_write(self, dest: Path, source: BinaryIO, expect_sha: str | None) -> tuple[int, str]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=dest.name[:16] + ".")
        try:
            with os.fdopen(fd, "wb") as out:
                reader = _HashingReader(source)
                while chunk := reader.read(_COPY_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if expect_sha is not None and reader.hexdigest() != expect_sha:
                raise CorruptArtifact(f"source of {dest.name} changed while copying to the shared tier")
            os.replace(tmp, dest)
            return reader.size, reader.hexdigest()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def has(self, key: str) -> bool:
        return self.manifest_path(key).exists()

    def read_manifest(self, key: str) -> Manifest | None:
        try:
            text = self.manifest_path(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return Manifest.from_dict(json.loads(text), key)
        except (ValueError, CorruptArtifact):
            log.warning("shared tier: unreadable manifest %s removed", key)
            self.remove_manifest(key)
            raise CorruptArtifact(f"unreadable shared manifest {key}") from None

    def put(self, manifest: Manifest, open_file: Callable[[str], BinaryIO]) -> None:
        """Copy every blob not yet present (by digest), then publish the manifest."""
        for name, entry in manifest.files.items():
            dest = self.blob_path(entry.sha256)
            with contextlib.suppress(FileNotFoundError):
                if dest.stat().st_size == entry.size:
                    continue
            with open_file(name) as src:
                self._atomic_write(dest, src, entry.sha256)
        data = json.dumps(manifest.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")
        self._atomic_write(self.manifest_path(manifest.key), io.BytesIO(data), None)

    def open_blob(self, sha256: str) -> BinaryIO:
        return open(self.blob_path(sha256), "rb")  # the caller closes it

    def remove_manifest(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(key).unlink()

    def remove_blob(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(sha256).unlink()


# ----------------------------------------------------------------------------------------------------------
# The store


@dataclass
class _Scan:
    manifests: dict[str, tuple[Manifest, str]] = field(default_factory=dict)  # key -> (manifest, nonce)
    atimes: dict[str, int] = field(default_factory=dict)
    blobs: list[str] = field(default_factory=list)


class ArtifactStore:
    """The content-addressed store every stage reads and writes (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        size_limit: int,
        shared_dir: str | os.PathLike[str] | None = None,
        metrics: Any = None,
        orphan_ttl: float = _DEFAULT_ORPHAN_TTL,
    ) -> None:
        if size_limit <= 0:
            raise ValueError("size_limit must be positive")
        self.directory = Path(directory)
        self.size_limit = int(size_limit)
        self.metrics = metrics
        self.orphan_ttl = float(orphan_ttl)
        self._cache = diskcache.Cache(
            str(self.directory),
            disk=_RawOnlyDisk,
            size_limit=self.size_limit,
            eviction_policy="none",
            cull_limit=0,
            statistics=False,
        )
        self._pins_dir = self.directory / "_pins"
        self._pins_dir.mkdir(exist_ok=True)
        self.tmp_dir = self.directory / "_tmp"
        """Scratch space on the same filesystem (e.g. for uploads before they are put)."""
        self.tmp_dir.mkdir(exist_ok=True)
        self._cull_lock_path = self.directory / "_cull.lock"
        self._thread_lock = threading.Lock()
        self.shared = SharedTier(shared_dir) if shared_dir is not None else None

    # -- metrics -------------------------------------------------------------------------------------------

    def _count(self, attr: str, kind: str, amount: float = 1) -> None:
        counter = getattr(self.metrics, attr, None) if self.metrics is not None else None
        if counter is not None and amount:
            counter.labels(kind=kind).inc(amount)

    def _set_bytes_gauge(self, total: int) -> None:
        gauge = getattr(self.metrics, "cache_bytes", None) if self.metrics is not None else None
        if gauge is not None:
            gauge.set(total)

    # -- put -----------------------------------------------------------------------------------------------

    def put(
        self,
        kind: str,
        key: str,
        files: Mapping[str, bytes | os.PathLike[str]],
        meta: Mapping[str, Any] | None = None,
        primary: str | None = None,
    ) -> Manifest:
        """Store an artifact (bytes or paths of files to copy) atomically in every tier; return its manifest.

        Content-addressed: if the key is already stored, the existing manifest is returned and nothing is
        written. `primary` names the file a plain download returns (default: the only file, if one).
        Raises TooLargeError if the artifact alone exceeds the local size limit.
        """
        _check_key(key)
        _check_kind(kind)
        if not files:
            raise ValueError("an artifact needs at least one file")
        sizes = {}
        for name, src in files.items():
            check_file_name(name)
            sizes[name] = len(src) if isinstance(src, bytes) else os.stat(src).st_size
        if primary is None and len(files) == 1:
            primary = next(iter(files))
        if primary is not None and primary not in files:
            raise ValueError(f"primary file {primary!r} is not among the files")
        meta_dict = json.loads(json.dumps(dict(meta or {}), allow_nan=False))  # JSON-able, detached copy
        total = sum(sizes.values())
        if total > self.size_limit:
            raise TooLargeError(
                f"{kind} artifact of {total} bytes exceeds the cache size limit of {self.size_limit} bytes; "
                "raise the cache size or lower the frame count/resolution"
            )

        def opener(name: str) -> BinaryIO:
            src = files[name]
            return io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")

        existing = self._get_local(key)  # (a corrupt existing entry is deleted here and rewritten below)
        if existing is not None:
            manifest, nonce = existing.manifest, existing._nonce
        else:
            manifest, nonce = self._write_local(
                kind, key, opener, meta_dict, primary, time.time(), None, names=list(files)
            )
        if self.shared is not None and not self.shared.has(key):
            self.shared.put(manifest, lambda name: self._open_local_blob(key, nonce, name))
        self.cull(keep=(key,))  # never evict what the caller is about to hand out
        return manifest

    def _write_local(
        self,
        kind: str,
        key: str,
        opener: Callable[[str], BinaryIO],
        meta: dict[str, Any],
        primary: str | None,
        created: float,
        expected: Mapping[str, FileEntry] | None,
        names: list[str],
    ) -> tuple[Manifest, str]:
        """Write blobs (expiring), publish the manifest, then make the blobs permanent."""
        nonce = secrets.token_hex(8)
        written: list[str] = []
        entries: dict[str, FileEntry] = {}
        try:
            for name in names:
                bkey = _blob_key(key, nonce, name)
                with opener(name) as src:
                    reader = _HashingReader(src)
                    self._cache.set(bkey, reader, read=True, expire=self.orphan_ttl)
                written.append(bkey)
                entry = FileEntry(reader.size, reader.hexdigest(), check_file_name(name))
                if expected is not None and (expected[name].size, expected[name].sha256) != (
                    entry.size,
                    entry.sha256,
                ):
                    raise CorruptArtifact(f"{name} does not match its manifest")
                entries[name] = entry
                self._count("cache_written_bytes_total", kind, entry.size)
            manifest = Manifest(kind, key, created, meta, entries, primary)
            if not self._publish_local(manifest, nonce):
                # Another process published this key first: content-addressed, so theirs is as good.
                for bkey in written:
                    self._cache.delete(bkey)
                winner = self._local_record(key)
                if winner is not None:
                    return winner
                return self._write_local(kind, key, opener, meta, primary, created, expected, names)
        except BaseException:
            for bkey in written:
                with contextlib.suppress(Exception):
                    self._cache.delete(bkey)
            raise
        for bkey in written:
            self._cache.touch(bkey, expire=None)
        self._touch(key)
        return manifest, nonce

    def _publish_local(self, manifest: Manifest, nonce: str) -> bool:
        """The commit point: the artifact becomes visible atomically when its manifest is added."""
        record = json.dumps({**manifest.to_dict(), "nonce": nonce}, sort_keys=True, ensure_ascii=False)
        return bool(self._cache.add(f"m:{manifest.key}", record))

    def _touch(self, key: str) -> None:
        self._cache.set(f"t:{key}", time.time_ns())

    # -- get -----------------------------------------------------------------------------------------------

    def get(self, key: str, kind: str | None = None, verify: bool = False) -> Artifact | None:
        """The artifact, or None on a miss (absent, evicted, or found corrupt and deleted).

        Checks the local tier, then the shared one (copying into the local tier). `kind`, if given, labels
        a miss in metrics and must match a hit (else WrongArtifactKind). `verify` hashes every file now.
        """
        _check_key(key)
        art = self._get_local(key)
        if art is None and self.shared is not None:
            art = self._fetch_shared(key)
        if art is not None and verify:
            try:
                art.verify_all()
            except CorruptArtifact:
                art = None
        if art is None:
            self._count("cache_misses_total", kind or "unknown")
            return None
        if kind is not None and art.kind != kind:
            raise WrongArtifactKind(f"digest {key} names a {art.kind!r} artifact, not a {kind!r} one")
        self._count("cache_hits_total", art.kind)
        return art

    def _local_record(self, key: str) -> tuple[Manifest, str] | None:
        text = self._cache.get(f"m:{key}")
        if text is None:
            return None
        try:
            d = json.loads(text)
            nonce = d["nonce"]
            if not isinstance(nonce, str) or not re.fullmatch(r"[0-9a-f]{16}", nonce):
                raise ValueError("bad nonce")
            return Manifest.from_dict(d, key), nonce
        except (ValueError, KeyError, TypeError, CorruptArtifact) as e:
            log.warning("artifact %s: unreadable manifest (%s); deleting", key, e)
            self._count("cache_corrupt_total", "unknown")
            self._cache.delete(f"m:{key}")
            self._cache.delete(f"t:{key}")
            return None

    def _get_local(self, key: str) -> Artifact | None:
        record = self._local_record(key)
        if record is None:
            return None
        manifest, nonce = record
        for name, entry in manifest.files.items():
            handle = self._cache.get(_blob_key(key, nonce, name), read=True)
            if handle is None:
                reason = f"{name} is missing"
            else:
                with handle:
                    size = os.fstat(handle.fileno()).st_size
                if size == entry.size:
                    continue
                reason = f"{name} has {size} bytes, manifest says {entry.size}"
            if self._published_nonce(key) != nonce:
                return None  # evicted (or replaced) under us: a plain miss
            try:
                self._corrupt(key, manifest.kind, nonce, reason)
            except CorruptArtifact:
                return None
        self._touch(key)
        return Artifact(self, manifest, nonce)

    def _open_local_blob(self, key: str, nonce: str, name: str) -> BinaryIO:
        handle = self._cache.get(_blob_key(key, nonce, name), read=True)
        if handle is None:
            raise ArtifactNotFound(f"artifact {key}: file {name} vanished")
        return handle

    def _published_nonce(self, key: str) -> str | None:
        """Nonce of the currently published manifest of `key` (None if there is none)."""
        text = self._cache.get(f"m:{key}")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return str(json.loads(text)["nonce"]) if text is not None else None
        return None

    def _blob_missing(self, manifest: Manifest, nonce: str, name: str) -> None:
        if self._published_nonce(manifest.key) != nonce:
            raise ArtifactNotFound(
                f"artifact {manifest.key} was evicted while in use; pin artifacts you read"
            )
        self._corrupt(manifest.key, manifest.kind, nonce, f"{name} is missing")

    def _corrupt(self, key: str, kind: str, nonce: str, reason: str) -> None:
        """Count, delete the artifact (if it is still the same publication) and raise CorruptArtifact."""
        log.warning("artifact %s (%s) is corrupt: %s; deleting it", key, kind, reason)
        self._count("cache_corrupt_total", kind)
        if self._published_nonce(key) == nonce:  # not a newer, healthy re-put of the same key
            self._delete_local(key)
        raise CorruptArtifact(
            f"artifact {key} ({kind}) was corrupt ({reason}) and has been removed; recompute or re-upload it"
        )

    def _fetch_shared(self, key: str) -> Artifact | None:
        assert self.shared is not None
        try:
            manifest = self.shared.read_manifest(key)
        except CorruptArtifact:
            self._count("cache_corrupt_total", "unknown")
            return None
        if manifest is None:
            return None
        if manifest.total_size > self.size_limit:
            raise TooLargeError(
                f"{manifest.kind} artifact {key} ({manifest.total_size} bytes) is larger than this node's "
                f"cache ({self.size_limit} bytes)"
            )
        shared = self.shared

        def opener(name: str) -> BinaryIO:
            return shared.open_blob(manifest.files[name].sha256)

        try:
            self._write_local(
                manifest.kind,
                key,
                opener,
                manifest.meta,
                manifest.primary,
                manifest.created,
                manifest.files,
                names=list(manifest.files),
            )
        except (CorruptArtifact, FileNotFoundError) as e:
            log.warning(
                "shared artifact %s (%s) is corrupt or incomplete: %s; removing it", key, manifest.kind, e
            )
            self._count("cache_corrupt_total", manifest.kind)
            for name, entry in manifest.files.items():
                path = shared.blob_path(entry.sha256)
                try:
                    with open(path, "rb") as f:
                        ok = _file_sha256(f) == (entry.size, entry.sha256)
                except FileNotFoundError:
                    ok = True
                if not ok:
                    log.warning("shared blob %s of %s is corrupt; removing", entry.sha256, name)
                    shared.remove_blob(entry.sha256)
            shared.remove_manifest(key)
            return None
        self.cull(keep=(key,))
        return self._get_local(key)

    # -- queries -------------------------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """Whether a manifest exists in either tier (no verification, no LRU update)."""
        _check_key(key)
        if self._cache.get(f"m:{key}") is not None:
            return True
        return self.shared is not None and self.shared.has(key)

    def stat(self, key: str) -> Manifest | None:
        """The manifest from either tier, without verifying or touching the LRU clock."""
        _check_key(key)
        record = self._local_record(key)
        if record is not None:
            return record[0]
        if self.shared is not None:
            with contextlib.suppress(CorruptArtifact):
                return self.shared.read_manifest(key)
        return None

    def delete(self, key: str) -> bool:
        """Remove the artifact from every tier (pins notwithstanding). True if something was removed."""
        _check_key(key)
        removed = self._delete_local(key)
        if self.shared is not None and self.shared.has(key):
            self.shared.remove_manifest(key)
            removed = True
        return removed

    def _delete_local(self, key: str, record: tuple[Manifest, str] | None = None) -> bool:
        if record is None:
            text = self._cache.get(f"m:{key}")
            record = None
            if text is not None:
                with contextlib.suppress(Exception):
                    d = json.loads(text)
                    record = (Manifest.from_dict(d, key), d["nonce"])
        existed = bool(self._cache.delete(f"m:{key}"))  # unpublish first
        if record is not None:
            manifest, nonce = record
            for name in manifest.files:
                self._cache.delete(_blob_key(key, nonce, name))
        self._cache.delete(f"t:{key}")
        return existed

    def total_bytes(self) -> int:
        """Sum of the sizes of the local tier's artifacts (what `size_limit` bounds)."""
        return sum(m.total_size for m, _ in self._scan().manifests.values())

    def _scan(self) -> _Scan:
        scan = _Scan()
        for k in list(self._cache.iterkeys()):
            if not isinstance(k, str):
                continue
            prefix, _, rest = k.partition(":")
            if prefix == "b":
                scan.blobs.append(k)
            elif prefix == "t":
                t = self._cache.get(k)
                if isinstance(t, int):
                    scan.atimes[rest] = t
            elif prefix == "m" and is_digest(rest):
                record = self._local_record(rest)
                if record is not None:
                    scan.manifests[rest] = record
        return scan

    # -- pins and eviction ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def pin(self, key: str) -> Iterator[None]:
        """Keep the artifact `key` from being evicted (by any process on this machine) inside the block.

        Pinning a key that is not (yet) stored is fine: it protects it from the moment it appears.
        """
        _check_key(key)
        path = self._pins_dir / f"{key}.pin"
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
            os.close(fd)  # the cull unlinked this file while we waited: lock the new one
        try:
            yield
        finally:
            os.close(fd)

    def _try_evict_lock(self, key: str) -> int | None:
        """An exclusive lock on the key's pin file, or None if someone holds a pin."""
        fd = os.open(self._pins_dir / f"{key}.pin", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        return fd

    def _release_evict_lock(self, key: str, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._pins_dir / f"{key}.pin")
        os.close(fd)

    @contextlib.contextmanager
    def _cull_lock(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self._cull_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def cull(self, keep: tuple[str, ...] = ()) -> list[str]:
        """Evict least-recently-used unpinned artifacts (other than `keep`), whole, until under the limit.

        If everything else is pinned the cache stays over its limit until the pins are released. Also
        removes expired orphan blobs (from puts that died before publishing) and unused pin files.
        Returns the evicted keys. Runs after every put; safe to call any time from any process.
        """
        evicted: list[str] = []
        with self._cull_lock():
            self._cache.expire()
            scan = self._scan()
            self._sweep_orphans(scan)
            total = sum(m.total_size for m, _ in scan.manifests.values())
            if total > self.size_limit:
                for key in sorted(scan.manifests, key=lambda k: scan.atimes.get(k, 0)):
                    if total <= self.size_limit:
                        break
                    if key in keep:
                        continue
                    fd = self._try_evict_lock(key)
                    if fd is None:
                        continue  # pinned by a running job
                    try:
                        manifest, nonce = scan.manifests[key]
                        if self._delete_local(key, (manifest, nonce)):
                            total -= manifest.total_size
                            evicted.append(key)
                            self._count("cache_evictions_total", manifest.kind)
                            log.info(
                                "evicted %s artifact %s (%d bytes)", manifest.kind, key, manifest.total_size
                            )
                    finally:
                        self._release_evict_lock(key, fd)
                if total > self.size_limit:
                    log.warning(
                        "cache holds %d bytes over its %d-byte limit: the rest is pinned",
                        total,
                        self.size_limit,
                    )
            self._sweep_pin_files()
        self._set_bytes_gauge(total)
        return evicted

    def _sweep_orphans(self, scan: _Scan) -> None:
        """Delete permanent blobs that no manifest references (left by a crash mid-delete)."""
        live = {(k, nonce) for k, (_, nonce) in scan.manifests.items()}
        for bkey in scan.blobs:
            parts = bkey.split(":", 3)
            if len(parts) != 4 or (parts[1], parts[2]) in live:
                continue
            got = self._cache.get(bkey, read=True, expire_time=True)
            handle, expire_time = got if isinstance(got, tuple) else (None, None)
            if handle is None:
                continue
            handle.close()
            if expire_time is not None:
                continue  # a put in progress (or a dead one: it expires on its own)
            # Permanent, so its manifest was published before (puts publish, then clear the expiry): look
            # again, since the scan may predate that publication.
            record = self._local_record(parts[1])
            if record is None or record[1] != parts[2]:
                self._cache.delete(bkey)

    def _sweep_pin_files(self) -> None:
        """Remove pin files nobody holds (safe: `pin` re-checks the inode after locking)."""
        for path in self._pins_dir.glob("*.pin"):
            key = path.stem
            if not is_digest(key):
                continue
            fd = self._try_evict_lock(key)
            if fd is not None:
                self._release_evict_lock(key, fd)

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
