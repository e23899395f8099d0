"""The handle `ArtifactStore.get` returns: an artifact published in the local tier, read with verification.

`get` has checked that every blob exists with its manifest size (cheap). `Artifact.read`, `.path`,
`.verify` and reading an `Artifact.open` stream to its end check the sha256. Any mismatch or missing blob
deletes the whole artifact, counts ``cache_corrupt_total`` and raises `CorruptArtifact` (a kind of
`ArtifactNotFound`), so a corrupt entry is rebuilt, never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from services.store.model import COPY_CHUNK, ArtifactNotFound, FileEntry, Manifest, file_sha256

if TYPE_CHECKING:
    from services.store.composite import ArtifactStore


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
        handle = self._store.local.open_blob_of(self.key, self._nonce, name)
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
        return io.BufferedReader(_VerifyingStream(self, name, self._handle(name)), buffer_size=COPY_CHUNK)

    def verify(self, name: str) -> None:
        """Hash the file now (once per Artifact object); CorruptArtifact on mismatch."""
        if name in self._verified:
            return
        with self._handle(name) as h:
            size, sha = file_sha256(h)
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
