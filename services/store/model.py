"""The artifact model: content keys, manifests, file names, the store's errors, and hashing helpers.

What an artifact is
    A manifest (kind, key, creation time, JSON metadata, and for each file its size, sha256 and media type)
    plus named files. The key is a content address (`artifact_key`): a sha256 over a canonical JSON
    encoding of everything that determines the artifact, so the same inputs always name the same
    artifact and it is computed once. Files are typed by extension only -- .safetensors, .json, .mp4,
    .png, and .bin (raw uploaded source bytes, e.g. a .webm video; only ever handed to a decoder). Nothing
    is ever pickled.

Every tier stores exactly these manifests (`Manifest.to_json` / `Manifest.from_json`), so an artifact
moves between tiers byte for byte and is verified against the same sizes and digests everywhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from tokenflow.errors import SpecError
from tokenflow.keys import artifact_key as identity_key
from tokenflow.keys import canonical_json  # noqa: F401 - re-exported: the store's callers use it

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
COPY_CHUNK = 1 << 20
"""Read/write chunk for copying blobs between tiers."""


class ArtifactNotFound(LookupError):
    """No artifact with this key (or no such file in it). Maps to NOT_FOUND."""


class CorruptArtifact(ArtifactNotFound):
    """A stored file did not match its manifest; the artifact was deleted and counts as a miss."""


class WrongArtifactKind(SpecError):
    """The digest names an artifact of another kind than the caller needs (INVALID_ARGUMENT)."""


class ArtifactInUse(RuntimeError):
    """A delete was refused: a job on this machine holds a pin on the artifact (FAILED_PRECONDITION)."""


class TierUnavailable(OSError):
    """A shared tier could not be reached or refused a write (retryable; the local tier is unaffected)."""


class StoreFull(OSError):
    """The disk (or quota) under the store is full: the write was refused and left nothing behind.

    RESOURCE_EXHAUSTED with a retry delay: the store evicts what it can and reports NOT_SERVING until a
    write succeeds again. The message never names a file of the store (callers cannot act on it).
    """


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the medium is full: ENOSPC/EDQUOT from the OS, SQLITE_FULL from SQLite."""
    if isinstance(exc, StoreFull):
        return True
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


# ----------------------------------------------------------------------------------------------------------
# Keys (the encoding and hashing live in tokenflow.keys, next to the identities they hash)


def artifact_key(kind: str, canonical: Mapping[str, Any]) -> str:
    """Content address of an artifact of `kind` (checked to be a storable kind name): `tokenflow.keys`."""
    check_kind(kind)
    return identity_key(kind, canonical)


def is_digest(value: str) -> bool:
    """True for a well-formed content address (64 lowercase hex characters)."""
    return isinstance(value, str) and bool(_KEY_RE.match(value))


def check_key(key: str) -> None:
    """SpecError (INVALID_ARGUMENT) unless `key` is a well-formed digest; keeps paths out of keys."""
    if not is_digest(key):
        raise SpecError(
            f"malformed digest {str(key)[:80]!r}: expected 64 lowercase hex characters (a sha256)"
        )


def check_kind(kind: str) -> None:
    """ValueError unless `kind` is a short lowercase identifier (it becomes part of index paths)."""
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

    def to_json(self) -> bytes:
        """The manifest as every tier stores it (sorted keys, UTF-8)."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str, key: str) -> Manifest:
        """Parse a stored manifest; CorruptArtifact if it is not one (torn, tampered, another key's)."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptArtifact(f"unreadable manifest for {key}: {e}") from None
        if not isinstance(d, dict):
            raise CorruptArtifact(f"unreadable manifest for {key}: not an object")
        return cls.from_dict(d, key)

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
            check_kind(m.kind)
            if m.key != key or not files or (m.primary is not None and m.primary not in files):
                raise ValueError("inconsistent manifest")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptArtifact(f"unreadable manifest for {key}: {e}") from None
        return m


# ----------------------------------------------------------------------------------------------------------
# Hashing


class HashingReader:
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


def file_sha256(f: BinaryIO) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    while chunk := f.read(COPY_CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()
