"""The tier interface: what every storage tier of the artifact store offers, and the LRU prune they share.

Modelled on bazel-remote's cache: one small interface per storage tier (local disk, shared volume, S3),
composed by `ArtifactStore` as a local tier in front of an optional shared one. Every tier stores the
same `Manifest` and the same blobs; only the naming and the publish primitive differ:

====================  ======================================  ==========================================
tier                  blobs                                   manifest publish (the commit point)
====================  ======================================  ==========================================
local (diskcache)     ``b:<key>:<nonce>:<name>`` (per put)    INSERT into the SQLite index (first wins)
shared volume         ``blobs/sha256/ab/<digest>``            ``link(tmp, manifests/ab/<key>.json)``
S3                    ``<prefix>blobs/sha256/<digest>``       PutObject with ``If-None-Match: *``
====================  ======================================  ==========================================

Rules every tier keeps:
  * blobs first, manifest last: a reader that finds a manifest finds a complete artifact (or a torn one,
    which verification turns into a miss);
  * publishing is first-writer-wins where the medium allows it; a loser's manifest describes the same
    content (the key is a content address), so losing is harmless;
  * tiers do not verify what `open_blob` streams: the reader does (size and sha256 against the manifest),
    because only the reader knows when it has read to the end;
  * ``touch`` records an access for LRU; ``stat`` never does.

Shared tiers additionally have an access record per artifact (its time is the LRU clock: file mtimes on
a volume, ``LastModified`` of an index object on S3, which has no atime) and an optional size limit that
`prune_lru` enforces by deleting whole artifacts, least recently used first, then every blob no
remaining manifest references.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

from services.store.model import Manifest, check_kind, is_digest
from tokenflow.errors import SpecError

log = logging.getLogger(__name__)

Opener = Callable[[str], BinaryIO]
"""Opens the named file of the artifact being put (the caller's source); the tier closes it."""

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@runtime_checkable
class Tier(Protocol):
    """One storage tier of the artifact store."""

    name: str
    """Short label for logs, metrics and ServerInfo: ``local``, ``volume``, ``s3``."""

    def get_manifest(self, key: str) -> Manifest | None:
        """The published manifest, or None. An unreadable one is removed and raises CorruptArtifact."""
        ...

    def open_blob(self, manifest: Manifest, name: str) -> BinaryIO:
        """A stream of the named file (unverified: the reader checks size and sha256 at the end).

        Raises ArtifactNotFound if the blob is gone (evicted or pruned under the reader: a miss).
        """
        ...

    def put(self, manifest: Manifest, open_file: Opener) -> Manifest:
        """Store the blobs the tier lacks, then publish `manifest` last; returns the published manifest.

        If another writer published the key first, theirs is returned (same content address).
        """
        ...

    def stat(self, key: str) -> Manifest | None:
        """The manifest, without recording an access, deleting anything or raising on corruption."""
        ...

    def touch(self, manifest: Manifest) -> bool:
        """Record an access (the LRU clock). False if the artifact is not (or no longer) published."""
        ...

    def delete(self, key: str) -> bool:
        """Unpublish the artifact and remove what only it used. True if it was published."""
        ...

    def list(self, kind: str, page_size: int, after: str | None) -> tuple[list[Manifest], bool]:
        """Manifests of `kind` with keys greater than `after`, ascending, at most `page_size`; and
        whether more follow."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BlobInfo:
    """A blob as a shared tier's listing reports it (for pruning)."""

    sha256: str
    size: int
    mtime: float


@dataclass(frozen=True)
class RecordInfo:
    """A published artifact as a shared tier's listing reports it (for pruning)."""

    key: str
    atime: float
    """Last recorded access (seconds since the epoch); the LRU clock."""
    manifest: Manifest | None
    """None if the manifest could not be read (torn or tampered): pruned first."""


@runtime_checkable
class SharedTier(Tier, Protocol):
    """A tier many machines share: adds a size limit and what LRU pruning needs."""

    size_limit: int | None
    """Bytes the tier may hold (None = unbounded); enforced by `prune`, not by every put."""

    def describe(self) -> str:
        """Where the tier lives, for logs and ServerInfo (never credentials)."""
        ...

    def scan_records(self) -> Iterator[RecordInfo]:
        """Every published artifact with its access time (a full listing: for pruning only)."""
        ...

    def scan_blobs(self) -> Iterator[BlobInfo]:
        """Every blob (a full listing: for pruning only)."""
        ...

    def unpublish(self, key: str, kind: str | None) -> None:
        """Remove the manifest and the access record (blobs stay: others may share them)."""
        ...

    def remove_blob(self, sha256: str) -> None: ...

    def sweep_temporary(self, older_than: float) -> int:
        """Remove abandoned temporary uploads older than `older_than` (epoch seconds); how many."""
        ...


@dataclass
class PruneReport:
    """What one prune pass found and did."""

    artifacts: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    evicted: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    temporary_removed: int = 0

    def summary(self) -> str:
        return (
            f"{self.artifacts} artifacts, {self.bytes_before} -> {self.bytes_after} bytes; evicted "
            f"{len(self.evicted)} artifacts, removed {self.blobs_removed} blobs and "
            f"{self.temporary_removed} temporary files"
        )


def prune_lru(
    tier: SharedTier,
    max_bytes: int | None,
    grace_seconds: float = 3600.0,
    keep: Collection[str] = (),
    now: float | None = None,
) -> PruneReport:
    """Bring `tier` under `max_bytes` by deleting whole artifacts, least recently used first.

    Bytes are counted per distinct blob (artifacts that share a file share its bytes). A blob is removed
    only when no remaining manifest references it and it is older than `grace_seconds`, so the blobs of
    a put in progress on another machine (written, manifest not yet) survive. Artifacts accessed within
    the grace period are never evicted either: a node may be copying them right now. `max_bytes=None`
    only sweeps unreferenced blobs and abandoned temporary files. Cost: one full listing of the tier, so
    this runs periodically (a background thread or a CronJob), never on a put or get.
    """
    now = time.time() if now is None else now
    report = PruneReport()
    blobs = {b.sha256: b for b in tier.scan_blobs()}
    records = list(tier.scan_records())
    report.artifacts = len(records)
    refs: dict[str, int] = {}
    for r in records:
        for sha in _shas(r.manifest):
            refs[sha] = refs.get(sha, 0) + 1
    report.bytes_before = sum(b.size for b in blobs.values())

    def recent(t: float) -> bool:
        # grace 0 means none at all, even for a timestamp a skewed clock puts in the future
        return grace_seconds > 0 and now - t < grace_seconds

    def removable(sha: str) -> bool:
        b = blobs.get(sha)
        return b is not None and sha not in refs and not recent(b.mtime)

    # What stays once unreferenced old blobs are swept (the loop below lowers it as it evicts).
    live = report.bytes_before - sum(b.size for sha, b in blobs.items() if removable(sha))
    # Unreadable manifests first (they serve nobody), then the least recently used.
    for r in sorted(records, key=lambda r: (r.manifest is not None, r.atime, r.key)):
        if r.manifest is not None:
            if max_bytes is None or live <= max_bytes:
                break
            if r.key in keep or recent(r.atime):
                continue
        tier.unpublish(r.key, r.manifest.kind if r.manifest is not None else None)
        report.evicted.append(r.key)
        for sha in _shas(r.manifest):
            refs[sha] -= 1
            if refs[sha] == 0:
                del refs[sha]
                if removable(sha):
                    live -= blobs[sha].size
        if r.manifest is not None:
            log.info("pruned %s artifact %s from the %s tier", r.manifest.kind, r.key, tier.name)
    for sha in [sha for sha in blobs if removable(sha)]:
        tier.remove_blob(sha)
        report.blobs_removed += 1
    cutoff = now - grace_seconds if grace_seconds > 0 else float("inf")
    report.temporary_removed = tier.sweep_temporary(cutoff)
    report.bytes_after = live
    if max_bytes is not None and live > max_bytes:
        log.warning(
            "%s tier holds %d bytes over its %d-byte limit: the rest was used within the last %.0f s",
            tier.name,
            live,
            max_bytes,
            grace_seconds,
        )
    return report


def _shas(manifest: Manifest | None) -> set[str]:
    return set() if manifest is None else {f.sha256 for f in manifest.files.values()}


# ----------------------------------------------------------------------------------------------------------
# Listing


def clamp_page_size(page_size: int) -> int:
    """AIP-158: 0 means the default; above the maximum is coerced to it; negative is an error."""
    if page_size < 0:
        raise SpecError(f"page_size must be >= 0, got {page_size}")
    return DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)


def encode_page_token(kind: str, last_key: str) -> str:
    """An opaque token for the page after `last_key` in a listing of `kind`."""
    return base64.urlsafe_b64encode(f"v1:{kind}:{last_key}".encode()).decode().rstrip("=")


def decode_page_token(token: str, kind: str) -> str | None:
    """The key to list after, or None for the first page; SpecError for a token of another listing."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    version, _, rest = raw.partition(":")
    token_kind, _, last_key = rest.rpartition(":")
    if version != "v1" or token_kind != kind or not is_digest(last_key):
        raise SpecError("page_token is not a token from a previous List call with the same kind")
    return last_key


def check_list_kind(kind: str) -> None:
    try:
        check_kind(kind)
    except ValueError as e:
        raise SpecError(str(e)) from None
