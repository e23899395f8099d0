"""`ArtifactStore`: the store every stage reads and writes -- a local tier in front of an optional shared one.

Lookups go local -> shared -> (the caller computes). An artifact found only in the shared tier is copied
into the local tier, verified against its manifest on the way (a mismatch removes it from the shared tier
and is a miss). A put publishes locally first, then uploads to the shared tier.

Uploads to the shared tier are synchronous, on purpose: in a fleet the shared tier is how one stage hands
its result to the next one (and to whichever replica answers the caller's Download). A stage RPC that
returned before its artifact was in the shared tier would send the next stage, on another node, into a
miss (NOT_FOUND, or a second computation of the same inversion). So `put` returns once the artifact is
published in both tiers; the upload skips blobs the tier already has (by digest), streams from the local
blob files, and uses multipart with parallel parts on S3. If the shared tier fails, `put` raises
`TierUnavailable` *after* the local publish: a retry finds the artifact locally and only repeats the
upload (`get` also re-uploads a local artifact the shared tier has never confirmed).

Shared-tier LRU: on a shared fetch and on put the shared access record is refreshed; on a local hit it is
refreshed at most once per ``shared_touch_interval`` (so a node serving an artifact from its own cache
keeps it alive in the shared tier without a request per read). If the shared tier has a size limit, a
background thread prunes it every ``prune_interval`` seconds (with jitter, so replicas do not prune in
step; concurrent prunes are harmless).

Pins are local (``flock``): they protect an artifact from this machine's eviction and refuse
`delete(..., if_unpinned=True)`; another node's shared-tier prune never removes an artifact accessed
within its grace period.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

from services.store.artifact import Artifact
from services.store.local import DEFAULT_ORPHAN_TTL, BlobMismatch, LocalRecord, LocalTier
from services.store.model import (
    ArtifactInUse,
    ArtifactNotFound,
    CorruptArtifact,
    Manifest,
    StoreFull,
    TierUnavailable,
    WrongArtifactKind,
    check_file_name,
    check_key,
    check_kind,
    is_disk_full,
)
from services.store.tier import (
    PruneReport,
    SharedTier,
    check_list_kind,
    clamp_page_size,
    decode_page_token,
    encode_page_token,
    prune_lru,
)
from services.store.volume import VolumeTier
from tokenflow.errors import TooLargeError

log = logging.getLogger(__name__)

DEFAULT_PRUNE_INTERVAL = 600.0
DEFAULT_PRUNE_GRACE = 3600.0
DEFAULT_SHARED_TOUCH_INTERVAL = 3600.0
DEFAULT_MAINTENANCE_INTERVAL = 60.0
"""Seconds between maintenance passes: scratch sweep, expired orphans, a write probe."""
DEFAULT_SCRATCH_TTL = 6 * 3600.0
"""Stray scratch entries (no live owner to tell) older than this are swept."""
UNWRITABLE_PROBE_INTERVAL = 2.0
"""While the store cannot write, how often it probes (health turns SERVING again this soon)."""
FULL_MESSAGE = (
    "the artifact store is out of disk space; it evicted what it could and nothing partial was kept. "
    "Retry later, or raise the disk or lower --cache-size below the free space"
)


def make_shared_tier(
    shared_dir: str | os.PathLike[str] | None = None,
    s3_bucket: str | None = None,
    s3_prefix: str = "",
    s3_endpoint_url: str | None = None,
    size_limit: int | None = None,
) -> SharedTier | None:
    """The shared tier the options name (a volume directory or an S3 bucket), or None."""
    if shared_dir is not None and s3_bucket:
        raise ValueError("choose one shared tier: --shared-store DIR or --s3-bucket NAME, not both")
    if s3_bucket:
        from services.store.s3 import S3Tier  # boto3 only when S3 is used

        return S3Tier(s3_bucket, prefix=s3_prefix, endpoint_url=s3_endpoint_url, size_limit=size_limit)
    if shared_dir is not None:
        return VolumeTier(shared_dir, size_limit=size_limit)
    if size_limit is not None:
        raise ValueError("--shared-store-size needs a shared tier (--shared-store or --s3-bucket)")
    return None


class ArtifactStore:
    """The content-addressed store every stage reads and writes (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        size_limit: int,
        shared_dir: str | os.PathLike[str] | None = None,
        metrics: Any = None,
        orphan_ttl: float = DEFAULT_ORPHAN_TTL,
        *,
        shared: SharedTier | None = None,
        shared_touch_interval: float = DEFAULT_SHARED_TOUCH_INTERVAL,
        prune_interval: float | None = DEFAULT_PRUNE_INTERVAL,
        prune_grace: float = DEFAULT_PRUNE_GRACE,
        maintenance_interval: float | None = DEFAULT_MAINTENANCE_INTERVAL,
        scratch_ttl: float = DEFAULT_SCRATCH_TTL,
    ) -> None:
        if shared is not None and shared_dir is not None:
            raise ValueError("pass either shared_dir or shared, not both")
        self.local = LocalTier(directory, size_limit, orphan_ttl)
        self.directory = self.local.directory
        self.size_limit = self.local.size_limit
        self.orphan_ttl = self.local.orphan_ttl
        self.tmp_dir = self.local.tmp_dir
        """Scratch space on the same filesystem (e.g. for uploads before they are put)."""
        self.metrics = metrics
        self.shared: SharedTier | None = (
            shared if shared is not None else (VolumeTier(shared_dir) if shared_dir is not None else None)
        )
        self.shared_touch_interval = float(shared_touch_interval)
        self.prune_grace = float(prune_grace)
        self._stop = threading.Event()
        self._pruner: threading.Thread | None = None
        if self.shared is not None and self.shared.size_limit is not None and prune_interval:
            self._pruner = threading.Thread(
                target=self._prune_loop, args=(float(prune_interval),), name="store-prune", daemon=True
            )
            self._pruner.start()
        self._set_bytes_gauge(self.local.total_bytes())  # right after a restart, not after the first put
        self.scratch_ttl = float(scratch_ttl)
        self._write_error: str | None = None
        self._health_lock = threading.Lock()
        self._health_listeners: list[Callable[[str], None]] = []
        self._wake = threading.Event()
        self._set_gauge("store_writable", 1)
        swept = self.sweep_scratch()  # a killed process's uploads and job scratch
        if swept:
            log.info("swept %d scratch entries left by processes that died", swept)
        self._maintainer: threading.Thread | None = None
        if maintenance_interval:
            self._maintainer = threading.Thread(
                target=self._maintain_loop,
                args=(float(maintenance_interval),),
                name="store-maintenance",
                daemon=True,
            )
            self._maintainer.start()

    @property
    def tiers(self) -> dict[str, str]:
        """Where each tier lives, for ServerInfo and the start-up log (never credentials)."""
        out = {"local": str(self.directory)}
        if self.shared is not None:
            out[self.shared.name] = self.shared.describe()
        return out

    # -- metrics -------------------------------------------------------------------------------------------

    def _count(self, attr: str, kind: str, amount: float = 1) -> None:
        counter = getattr(self.metrics, attr, None) if self.metrics is not None else None
        if counter is not None and amount:
            counter.labels(kind=kind).inc(amount)

    def _set_bytes_gauge(self, total: int) -> None:
        self._set_gauge("cache_bytes", total)

    def _set_gauge(self, attr: str, value: float) -> None:
        gauge = getattr(self.metrics, attr, None) if self.metrics is not None else None
        if gauge is not None:
            gauge.set(value)

    # -- health: can the store write? ----------------------------------------------------------------------

    @property
    def write_error(self) -> str | None:
        """Why the store cannot write now (None = it can); health reports it as NOT_SERVING."""
        return self._write_error

    def add_health_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` now and whenever writability changes ("" = the store can write)."""
        with self._health_lock:
            self._health_listeners.append(listener)
            reason = self._write_error or ""
        listener(reason)

    def _set_write_error(self, reason: str | None) -> None:
        with self._health_lock:
            if reason == self._write_error:
                return
            self._write_error = reason
            listeners = list(self._health_listeners)
        if reason is None:
            log.info("the artifact store can write again")
        else:
            log.error("the artifact store cannot write: %s", reason)
            counter = getattr(self.metrics, "store_write_failures_total", None) if self.metrics else None
            if counter is not None:
                counter.inc()
        self._set_gauge("store_writable", 0 if reason else 1)
        if reason is not None:
            self._wake.set()  # the maintenance loop probes often until a write succeeds
        for listener in listeners:
            listener(reason or "")

    def disk_full(self, error: BaseException) -> StoreFull:
        """What to raise for a full disk met outside `put` (an upload's scratch file): health follows."""
        log.warning("store: disk full: %s", error)
        self._set_write_error("the disk under the artifact store is full")
        return StoreFull(FULL_MESSAGE)

    def check_writable(self) -> bool:
        """Probe a write now (file + index); updates health. True if the store can write."""
        try:
            self.local.probe_write()
        except (OSError, sqlite3.Error) as e:
            full = is_disk_full(e)
            self._set_write_error("the disk under the artifact store is full" if full else "a write failed")
            if not is_disk_full(e):
                log.warning("store write probe failed: %s", e)
            return False
        self._set_write_error(None)
        return True

    def sweep_scratch(self) -> int:
        """Remove the scratch of processes that died, and stray scratch older than `scratch_ttl`."""
        return self.local.sweep_scratch(time.time() - self.scratch_ttl)

    def maintain(self) -> None:
        """One maintenance pass (the background thread runs it): sweep scratch and expired orphans, and
        probe a write so that health follows the disk."""
        try:
            self.sweep_scratch()
            self.local.expire_orphans(force=True)
        except (OSError, sqlite3.Error) as e:
            log.warning("store maintenance: %s", e)
        self.check_writable()

    def _maintain_loop(self, interval: float) -> None:
        while not self._stop.is_set():
            # A write error wakes the loop at once: from then on it probes every couple of seconds.
            self._wake.wait(UNWRITABLE_PROBE_INTERVAL if self._write_error else interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.maintain()
            except Exception:  # the next pass retries
                log.exception("store maintenance failed")

    def _write_local(self, kind: str, key: str, *args: Any, **kwargs: Any) -> LocalRecord:
        """`LocalTier.write` with the full-disk policy: a failed put leaves nothing (the tier removes its
        partial files); the store evicts least-recently-used artifacts to free the space and retries
        once; if that is not enough it raises StoreFull (RESOURCE_EXHAUSTED, no internal path) and
        reports NOT_SERVING until a write succeeds again."""
        needed = int(kwargs.pop("needed", 0))
        for attempt in (1, 2):
            try:
                record, _ = self.local.write(kind, key, *args, **kwargs)
            except Exception as e:
                if not is_disk_full(e):
                    raise
                log.warning("store: disk full writing %s %s (attempt %d): %s", kind, key[:12], attempt, e)
                if attempt == 1 and self._free_space(needed, keep=(key,)):
                    continue
                self._set_write_error("the disk under the artifact store is full")
                raise StoreFull(FULL_MESSAGE) from None
            if self._write_error is not None:
                self._set_write_error(None)
            return record
        raise AssertionError("unreachable")

    def _free_space(self, needed: int, keep: tuple[str, ...]) -> bool:
        """Make room on a full disk: dead scratch, expired orphans, then LRU eviction of at least `needed`
        bytes (plus a margin). True if anything was freed."""
        freed = self.sweep_scratch() > 0
        with contextlib.suppress(OSError, sqlite3.Error):
            self.local.expire_orphans(force=True)
        total = self.local.total_bytes()
        target = total - max(needed, 0) - (1 << 20)
        evicted, left = self.local.evict(
            keep, on_evict=lambda m: self._count("cache_evictions_total", m.kind), target=target
        )
        self._set_bytes_gauge(left)
        if evicted:
            log.warning("store: evicted %d artifacts to free disk space for a put", len(evicted))
        return freed or bool(evicted)

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
        Raises TooLargeError if the artifact alone exceeds the local size limit, and TierUnavailable if
        the shared tier cannot take it (the local copy is kept; retrying repeats only the upload).
        """
        check_key(key)
        check_kind(kind)
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

        with self.local.pin(key):  # nothing evicts it while it is uploaded and handed out
            found = self._get_local(key)  # (a corrupt existing entry is deleted here and rewritten below)
            if found is not None:
                record = found[1]
            else:
                record = self._write_local(
                    kind,
                    key,
                    opener,
                    meta_dict,
                    primary,
                    time.time(),
                    list(files),
                    on_bytes=lambda n: self._count("cache_written_bytes_total", kind, n),
                    needed=total,
                )
            if self.shared is not None and (found is None or record.shared_atime == 0):
                self._upload(record)
        self._cull_after(key)
        return record.manifest

    def _upload(self, record: LocalRecord) -> None:
        """Publish a local artifact in the shared tier (blobs streamed from local files, manifest last)."""
        assert self.shared is not None
        manifest, nonce = record.manifest, record.nonce

        def opener(name: str) -> BinaryIO:
            handle = self.local.open_blob_of(manifest.key, nonce, name)
            if handle is None:
                raise ArtifactNotFound(f"artifact {manifest.key}: file {name} vanished from the local tier")
            return handle

        started = time.monotonic()
        try:
            self.shared.put(manifest, opener)
        except TierUnavailable:
            log.warning("cannot publish %s %s to %s", manifest.kind, manifest.key, self.shared.name)
            raise
        self.local.mark_shared(manifest.key, time.time_ns())
        log.debug(
            "published %s %s (%d bytes) to the %s tier in %.2f s",
            manifest.kind,
            manifest.key,
            manifest.total_size,
            self.shared.name,
            time.monotonic() - started,
        )

    # -- get -----------------------------------------------------------------------------------------------

    def get(
        self, key: str, kind: str | None = None, verify: bool = False, raise_corrupt: bool = False
    ) -> Artifact | None:
        """The artifact, or None on a miss (absent, evicted, or found corrupt and deleted).

        Checks the local tier, then the shared one (copying into the local tier). `kind`, if given, labels
        a miss in metrics and must match a hit (else WrongArtifactKind). `verify` hashes every file now.
        `raise_corrupt`: a corrupt artifact (deleted all the same) raises CorruptArtifact instead of
        being a miss, for callers that cannot recompute it and must say so (Download).
        """
        check_key(key)
        found = self._get_local(key, raise_corrupt)
        art: Artifact | None = None
        if found is not None:
            art = found[0]
            if self.shared is not None:
                self._refresh_shared(found[1])
        elif self.shared is not None:
            art = self._fetch_shared(key)
        if art is not None and verify:
            try:
                art.verify_all()
            except CorruptArtifact:
                if raise_corrupt:
                    raise
                art = None
        if art is None:
            self._count("cache_misses_total", kind or "unknown")
            return None
        if kind is not None and art.kind != kind:
            raise WrongArtifactKind(f"digest {key} names a {art.kind!r} artifact, not a {kind!r} one")
        self._count("cache_hits_total", art.kind)
        return art

    def _get_local(self, key: str, raise_corrupt: bool = False) -> tuple[Artifact, LocalRecord] | None:
        try:
            record = self.local.record(key)
        except CorruptArtifact:
            self._count("cache_corrupt_total", "unknown")
            if raise_corrupt:
                raise
            return None
        if record is None:
            return None
        manifest, nonce = record.manifest, record.nonce
        for name, entry in manifest.files.items():
            size = self.local.blob_size(key, nonce, name)
            if size == entry.size:
                continue
            reason = f"{name} is missing" if size is None else f"{name} has {size} bytes, not {entry.size}"
            if self.local.published_nonce(key) != nonce:
                return None  # evicted (or replaced) under us: a plain miss
            try:
                self._corrupt(key, manifest.kind, nonce, reason)
            except CorruptArtifact:
                if raise_corrupt:
                    raise
                return None
        self.local.touch_record(key)
        return Artifact(self, manifest, nonce), record

    def _refresh_shared(self, record: LocalRecord) -> None:
        """Keep a locally served artifact alive in the shared tier (at most once per touch interval)."""
        assert self.shared is not None
        if record.shared_atime and time.time_ns() - record.shared_atime < self.shared_touch_interval * 1e9:
            return
        try:
            if self.shared.touch(record.manifest):
                self.local.mark_shared(record.manifest.key, time.time_ns())
            else:
                self._upload(record)  # never confirmed there (a failed upload) or pruned since
        except (TierUnavailable, ArtifactNotFound) as e:
            log.warning("could not refresh %s in the %s tier: %s", record.manifest.key, self.shared.name, e)

    def _blob_missing(self, manifest: Manifest, nonce: str, name: str) -> None:
        if self.local.published_nonce(manifest.key) != nonce:
            raise ArtifactNotFound(
                f"artifact {manifest.key} was evicted while in use; pin artifacts you read"
            )
        self._corrupt(manifest.key, manifest.kind, nonce, f"{name} is missing")

    def _corrupt(self, key: str, kind: str, nonce: str, reason: str) -> None:
        """Count, delete the artifact (if it is still the same publication) and raise CorruptArtifact."""
        log.warning("artifact %s (%s) is corrupt: %s; deleting it", key, kind, reason)
        self._count("cache_corrupt_total", kind)
        self.local.unpublish(key, nonce)  # not a newer, healthy re-put of the same key
        raise CorruptArtifact(
            f"artifact {key} ({kind}) was corrupt ({reason}) and has been removed; recompute or re-upload it"
        )

    def _fetch_shared(self, key: str) -> Artifact | None:
        shared = self.shared
        assert shared is not None
        try:
            manifest = shared.get_manifest(key)
        except CorruptArtifact:
            self._count("cache_corrupt_total", "unknown")
            return None
        except TierUnavailable as e:
            log.warning("shared tier unavailable, treating %s as a miss: %s", key, e)
            return None
        if manifest is None:
            return None
        if manifest.total_size > self.size_limit:
            raise TooLargeError(
                f"{manifest.kind} artifact {key} ({manifest.total_size} bytes) is larger than this node's "
                f"cache ({self.size_limit} bytes)"
            )
        with self.local.pin(key):
            try:
                self._write_local(
                    manifest.kind,
                    key,
                    lambda name: shared.open_blob(manifest, name),
                    manifest.meta,
                    manifest.primary,
                    manifest.created,
                    list(manifest.files),
                    expected=dict(manifest.files),
                    on_bytes=lambda n: self._count("cache_written_bytes_total", manifest.kind, n),
                    needed=manifest.total_size,
                )
            except (BlobMismatch, ArtifactNotFound) as e:
                log.warning(
                    "shared artifact %s (%s) is corrupt or incomplete: %s; removing it", key, manifest.kind, e
                )
                self._count("cache_corrupt_total", manifest.kind)
                with contextlib.suppress(TierUnavailable):
                    if isinstance(e, BlobMismatch):
                        shared.remove_blob(manifest.files[e.name].sha256)
                    shared.unpublish(key, manifest.kind)
                return None
            except TierUnavailable as e:
                log.warning("shared tier failed while copying %s, treating it as a miss: %s", key, e)
                return None
            with contextlib.suppress(TierUnavailable):
                if shared.touch(manifest):
                    self.local.mark_shared(key, time.time_ns())
            found = self._get_local(key)
        self._cull_after(key)
        return found[0] if found is not None else None

    # -- queries -------------------------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """Whether a manifest exists in either tier (no verification, no LRU update)."""
        check_key(key)
        if self.local.contains(key):
            return True
        if self.shared is None:
            return False
        try:
            return self.shared.stat(key) is not None
        except TierUnavailable:
            return False

    def stat(self, key: str) -> Manifest | None:
        """The manifest from either tier, without verifying or touching the LRU clock."""
        check_key(key)
        try:
            record = self.local.record(key)
        except CorruptArtifact:
            record = None
        if record is not None:
            return record.manifest
        if self.shared is not None:
            with contextlib.suppress(TierUnavailable):
                return self.shared.stat(key)
        return None

    def list(self, kind: str, page_size: int = 0, page_token: str = "") -> tuple[list[Manifest], str]:
        """Manifests of `kind` in both tiers, by key, a page at a time: (manifests, next_page_token).

        AIP-158 paging: `page_size` 0 means the default (100), larger than 1000 is coerced to 1000; the
        token is opaque, bound to `kind` (SpecError for another listing's token), "" when done.
        """
        check_list_kind(kind)
        after = decode_page_token(page_token, kind)
        size = clamp_page_size(page_size)
        merged: dict[str, Manifest] = {}
        more = False
        tiers: list[Any] = [self.local] + ([self.shared] if self.shared is not None else [])
        for tier in tiers:
            page, tier_more = tier.list(kind, size, after)
            more = more or tier_more
            for m in page:
                merged.setdefault(m.key, m)
        keys = sorted(merged)
        more = more or len(keys) > size
        page = [merged[k] for k in keys[:size]]
        return page, (encode_page_token(kind, page[-1].key) if more and page else "")

    def delete(self, key: str, *, if_unpinned: bool = False) -> bool:
        """Remove the artifact from every tier. True if something was removed.

        With `if_unpinned`, refuse (ArtifactInUse) while any process on this machine holds a pin on it --
        checked under the same lock eviction takes, so a pin cannot slip in between check and delete.
        Without it, pins notwithstanding (corruption handling, operators).
        """
        check_key(key)
        fd = self.local.try_evict_lock(key)
        if fd is None and if_unpinned:
            raise ArtifactInUse(f"artifact {key} is in use by a running job; retry when it has finished")
        try:
            removed = self.local.unpublish(key)
            if self.shared is not None and self.shared.delete(key):
                removed = True
        finally:
            if fd is not None:
                self.local.release_evict_lock(key, fd)
        self._set_bytes_gauge(self.local.total_bytes())
        return removed

    def is_pinned(self, key: str) -> bool:
        """Whether a job on this machine holds a pin on `key` (it is in use; Delete refuses it)."""
        return self.local.is_pinned(key)

    def total_bytes(self) -> int:
        """Sum of the sizes of the local tier's artifacts (what `size_limit` bounds); one row read."""
        return self.local.total_bytes()

    def count(self) -> int:
        """Number of artifacts in the local tier; one row read."""
        return self.local.count()

    # -- pins, eviction, pruning ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def pin(self, key: str) -> Iterator[None]:
        """Keep the artifact `key` from being evicted (by any process on this machine) inside the block.

        Pinning a key that is not (yet) stored is fine: it protects it from the moment it appears. Pin the
        inputs of a job *before* you `get` them: then they stay until the job is done.
        """
        with self.local.pin(key):
            yield

    def cull(self, keep: tuple[str, ...] = ()) -> list[str]:
        """Evict least-recently-used unpinned artifacts (other than `keep`), whole, until under the limit.

        If everything else is pinned the cache stays over its limit until the pins are released. Also
        removes expired orphan blobs (from puts that died before publishing), finishes deletes a crashed
        process left and removes pin files of crashed holders. Returns the evicted keys. Safe to call any
        time from any process (puts run the cheap part of it: the size check and eviction).
        """
        self.local.expire_orphans(force=True)
        evicted = self._evict(keep)
        self.local.sweep_pin_files()
        return evicted

    def _cull_after(self, key: str) -> None:
        self.local.expire_orphans(force=False)
        self._evict((key,))  # never evict what the caller is about to hand out

    def _evict(self, keep: tuple[str, ...]) -> list[str]:
        evicted, total = self.local.evict(
            keep, on_evict=lambda m: self._count("cache_evictions_total", m.kind)
        )
        self._set_bytes_gauge(total)
        return evicted

    def prune_shared(self, max_bytes: int | None = None, grace_seconds: float | None = None) -> PruneReport:
        """One LRU prune pass over the shared tier (to its size limit, or `max_bytes`)."""
        if self.shared is None:
            raise ValueError("this store has no shared tier to prune")
        limit = self.shared.size_limit if max_bytes is None else max_bytes
        return prune_lru(self.shared, limit, self.prune_grace if grace_seconds is None else grace_seconds)

    def _prune_loop(self, interval: float) -> None:
        delay = random.uniform(0.1, 1.0) * interval  # replicas started together do not prune in step
        while not self._stop.wait(delay):
            try:
                report = self.prune_shared()
                log.info("pruned the %s tier: %s", self.shared.name if self.shared else "-", report.summary())
            except Exception:  # a failed pass is retried at the next interval
                log.exception("pruning the shared tier failed")
            delay = interval * random.uniform(0.8, 1.2)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._pruner is not None:
            self._pruner.join(timeout=5)
        if self._maintainer is not None:
            self._maintainer.join(timeout=5)
        self.local.close()
        if self.shared is not None:
            self.shared.close()

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
