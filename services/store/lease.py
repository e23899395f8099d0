"""Leases in the shared tier: which replica computes a job now, its heartbeat and progress, expiry.

Why: every stage job is named by the content address of its result, so two replicas asked for the same
job should compute it once. The replica that computes holds a *lease* on the key in the tier every
replica shares (the volume or the S3 bucket); another replica asked for the same job finds the lease,
waits on it (relaying the holder's progress) and returns the published result. A holder that dies stops
heartbeating; its lease expires and a waiting replica takes the job over. Any replica answers for any
job from the same records (services/operations.py).

The interface, beside the tier interface (tier.py): a `LeaseMedium` is five primitives on small named
objects, which both shared tiers implement (and a local directory, for a server without a shared tier):

=================  ===========================================  ========================================
primitive          volume (`VolumeLeaseMedium`)                  S3 (`S3LeaseMedium`)
=================  ===========================================  ========================================
create (exclusive) ``link(tmp, name)``: fails if `name` exists   PutObject with ``If-None-Match: *``
replace            write tmp, ``rename`` over the name           PutObject
read / list        read the file / ``scandir``                   GetObject / ListObjectsV2
delete             ``unlink``                                    DeleteObject
=================  ===========================================  ========================================

`LeaseTable` builds leases on them. A lease on `key` is a series of *generations*:
``leases/<key>/<gen>.json`` (gen zero-padded), each created exclusively, so exactly one replica creates
generation g+1. The current lease is the highest generation. Only its creator (the holder) rewrites it
(heartbeat: ``beat`` +1, ``updated``, ``progress``), and when the job ends it writes the final state
(succeeded / failed / cancelled) once, which frees the key. A takeover creates g+1 and deletes the older
generations. A cancel request for generation g is a separate object, ``<gen>.cancel``, which the holder
(and every replica waiting on g) sees at its next poll.

Guarantees relied on, and what they give:
  * exclusive create is atomic (POSIX ``link`` on local file systems and NFSv3+; S3's conditional writes,
    which AWS S3, MinIO and moto implement): at most one holder per generation;
  * the generation number is the fencing token: a holder that stalled past its expiry and finds a higher
    generation has lost the lease; it stops heartbeating and never writes the newer generation's
    records. The job's own output needs no fence: it is a content-addressed artifact published
    first-writer-wins, so two holders publishing the same key publish the same artifact;
  * expiry: a lease is expired when its heartbeat has not advanced for ``ttl`` seconds *as the waiting
    replica observes it on its own monotonic clock*, or when its ``updated`` wall-clock time is more than
    ``ttl`` old (this second test assumes the replicas' clocks agree to well within ``ttl``: NTP). A
    server without conditional writes (S3 answering 501) falls back to check-then-put and two replicas
    may then both compute: harmless (same artifact), only wasteful.

Nothing here is pickled: records are JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from services.store.model import TierUnavailable, is_digest

log = logging.getLogger(__name__)

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

DEFAULT_TTL_SECONDS = 30.0
"""A lease not renewed for this long has expired (the holder heartbeats every ttl / 4)."""
DEFAULT_RETENTION_SECONDS = 3600.0
"""Finished leases are kept this long, so any replica can still say how a job ended."""

_GEN_DIGITS = 12


@runtime_checkable
class LeaseMedium(Protocol):
    """Small named objects with an exclusive create: what leases need from a shared tier."""

    def describe(self) -> str: ...

    def create(self, name: str, data: bytes) -> bool:
        """Create `name` holding `data` if it does not exist (atomically); False if it existed."""
        ...

    def replace(self, name: str, data: bytes) -> None:
        """Write `name` (readers see the old or the new bytes, never a mix)."""
        ...

    def read(self, name: str) -> bytes | None: ...

    def names(self, prefix: str = "") -> list[str]:
        """Every object name that starts with `prefix` (names are ``<key>/<file>``)."""
        ...

    def delete(self, name: str) -> None:
        """Remove `name` (no error if it is gone)."""
        ...


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of a lease, as stored (JSON)."""

    key: str
    stage: str
    gen: int
    holder: str
    """Which replica computes: ``host:port pid N``."""
    state: str = RUNNING
    beat: int = 0
    created: float = 0.0
    updated: float = 0.0
    ttl: float = DEFAULT_TTL_SECONDS
    progress: dict[str, Any] = field(default_factory=dict)
    """The holder's latest progress, in the field names of the proto `Progress` message."""
    error: dict[str, Any] | None = None
    """For failed / cancelled: ``{"code": <google.rpc.Code>, "message": ..., "status": <base64 Status>}``."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def expired(self, now: float | None = None) -> bool:
        """By wall clock (see the module docstring); a finished lease never expires, it is free."""
        now = time.time() if now is None else now
        return not self.done and now - self.updated > self.ttl

    def to_json(self) -> bytes:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["progress"] = _json_safe(self.progress)  # a heartbeat must never fail over a progress value
        return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None if the bytes are not one (torn or foreign)."""
        try:
            d = json.loads(data)
            return cls(
                key=str(d["key"]),
                stage=str(d["stage"]),
                gen=int(d["gen"]),
                holder=str(d["holder"]),
                state=str(d["state"]),
                beat=int(d["beat"]),
                created=float(d["created"]),
                updated=float(d["updated"]),
                ttl=float(d["ttl"]),
                progress=dict(d.get("progress") or {}),
                error=dict(d["error"]) if d.get("error") else None,
            )
        except (ValueError, KeyError, TypeError):
            return None


def _json_safe(value: Any) -> Any:
    """`value` with what strict JSON cannot hold dropped (non-finite floats) or made a string."""
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _json_safe(v)) for k, v in value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _record_name(key: str, gen: int) -> str:
    return f"{key}/{gen:0{_GEN_DIGITS}d}.json"


def _cancel_name(key: str, gen: int) -> str:
    return f"{key}/{gen:0{_GEN_DIGITS}d}.cancel"


def _parse(name: str) -> tuple[str, int, str] | None:
    """(key, gen, suffix) of an object name, or None for a foreign one."""
    key, _, file = name.partition("/")
    stem, dot, suffix = file.partition(".")
    if not is_digest(key) or not dot or len(stem) != _GEN_DIGITS or not stem.isdigit():
        return None
    return key, int(stem), suffix


class LeaseTable:
    """Leases on job keys over a `LeaseMedium` (see the module docstring)."""

    def __init__(self, medium: LeaseMedium, retention: float = DEFAULT_RETENTION_SECONDS) -> None:
        self.medium = medium
        self.retention = retention

    def describe(self) -> str:
        return self.medium.describe()

    # -- reading -------------------------------------------------------------------------------------------

    def _generations(self, key: str) -> tuple[list[int], set[int]]:
        """(record generations ascending, generations with a cancel request)."""
        gens, cancels = set(), set()
        for name in self.medium.names(f"{key}/"):
            parsed = _parse(name)
            if parsed is None or parsed[0] != key:
                continue
            (gens if parsed[2] == "json" else cancels).add(parsed[1])
        return sorted(gens), cancels

    def _read(self, key: str, gen: int) -> LeaseRecord | None:
        data = self.medium.read(_record_name(key, gen))
        return LeaseRecord.from_json(data) if data is not None else None

    def current(self, key: str) -> LeaseRecord | None:
        """The highest generation's record, or None if the key has no lease."""
        gens, _ = self._generations(key)
        for gen in reversed(gens):
            record = self._read(key, gen)
            if record is not None:
                return record
        return None

    def cancel_requested(self, key: str, gen: int) -> bool:
        return self.medium.read(_cancel_name(key, gen)) is not None

    def records(self) -> Iterator[LeaseRecord]:
        """The current record of every key with a lease (a full listing: for ListOperations)."""
        latest: dict[str, int] = {}
        for name in self.medium.names(""):
            parsed = _parse(name)
            if parsed is not None and parsed[2] == "json":
                latest[parsed[0]] = max(latest.get(parsed[0], -1), parsed[1])
        for key in sorted(latest):
            record = self._read(key, latest[key])
            if record is not None:
                yield record

    # -- acquiring -----------------------------------------------------------------------------------------

    def acquire(
        self,
        key: str,
        stage: str,
        holder: str,
        ttl: float = DEFAULT_TTL_SECONDS,
        stale_gen: int | None = None,
    ) -> HeldLease | None:
        """Take the lease on `key`: if it has none, if the current one is finished or expired, or if it is
        generation `stale_gen` (a waiter saw its heartbeat stop). None while another holder's is live."""
        gens, _ = self._generations(key)
        top = gens[-1] if gens else 0
        if gens:
            record = self._read(key, top)
            if record is not None and not record.done and not record.expired() and top != stale_gen:
                return None
        now = time.time()
        record = LeaseRecord(key, stage, top + 1, holder, RUNNING, 0, now, now, ttl)
        if not self.medium.create(_record_name(key, record.gen), record.to_json()):
            return None  # another replica created this generation first
        for gen in gens:  # older generations (and their cancel requests) are history now
            self.medium.delete(_record_name(key, gen))
            self.medium.delete(_cancel_name(key, gen))
        if gens:
            log.info("lease on %s taken over at generation %d by %s", key[:12], record.gen, holder)
        return HeldLease(self, record)

    def request_cancel(self, key: str, gen: int) -> None:
        self.medium.create(_cancel_name(key, gen), b"{}")

    # -- housekeeping --------------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Remove leases that ended (or expired) more than `retention` seconds ago; how many."""
        now = time.time() if now is None else now
        removed = 0
        for record in list(self.records()):
            if now - record.updated > max(self.retention, record.ttl):
                for name in self.medium.names(f"{record.key}/"):
                    self.medium.delete(name)
                removed += 1
        return removed


class HeldLease:
    """A lease this replica holds: heartbeats from a thread until `finish`.

    `progress` is called at each beat for the job's latest progress; `on_cancel` runs (once) when a cancel
    request for this generation appears; `on_lost` when a higher generation shows this holder was fenced
    off (it stops heartbeating).
    """

    def __init__(self, table: LeaseTable, record: LeaseRecord) -> None:
        self.table = table
        self.record = record
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Callable[[], Mapping[str, Any] | None] = lambda: None
        self._on_cancel: Callable[[], None] | None = None
        self._on_lost: Callable[[], None] | None = None

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def gen(self) -> int:
        return self.record.gen

    def start(
        self,
        progress: Callable[[], Mapping[str, Any] | None],
        on_cancel: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        interval: float | None = None,
    ) -> HeldLease:
        self._progress, self._on_cancel, self._on_lost = progress, on_cancel, on_lost
        every = interval if interval is not None else max(0.05, self.record.ttl / 4)
        self._thread = threading.Thread(
            target=self._beat_loop, args=(every,), name=f"lease-{self.key[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def _fenced(self) -> bool:
        gens, _ = self.table._generations(self.key)
        return bool(gens) and gens[-1] > self.gen

    def beat(self) -> bool:
        """Renew once (with the latest progress); False once the lease is lost or finished."""
        with self._lock:
            if self.lost or self.record.done:
                return False
            if self._fenced():
                self.lost = True
                log.warning("lease on %s generation %d was taken over: this replica was fenced off",
                            self.key[:12], self.gen)  # fmt: skip
                if self._on_lost is not None:
                    self._on_lost()
                return False
            progress = self._progress()
            self.record = replace(
                self.record,
                beat=self.record.beat + 1,
                updated=time.time(),
                progress=dict(progress) if progress is not None else self.record.progress,
            )
            self.table.medium.replace(_record_name(self.key, self.gen), self.record.to_json())
        if self._on_cancel is not None and self.table.cancel_requested(self.key, self.gen):
            callback, self._on_cancel = self._on_cancel, None
            callback()
        return True

    def _beat_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if not self.beat():
                    return
            except Exception as e:  # noqa: BLE001 - the next beat retries; expiry covers a long outage
                log.warning("lease heartbeat for %s failed: %s", self.key[:12], e)

    def finish(self, state: str, error: Mapping[str, Any] | None = None) -> None:
        """Record how the job ended (frees the key) and stop heartbeating. Idempotent."""
        if state not in TERMINAL:
            raise ValueError(f"not a final state: {state}")
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            if self.record.done:
                return
            self.record = replace(
                self.record,
                state=state,
                updated=time.time(),
                error=dict(error) if error is not None else None,
                progress=dict(self._progress() or self.record.progress),
            )
            if self.lost or self._fenced():
                return  # a newer generation owns the key: its records are not ours to write
            try:
                self.table.medium.replace(_record_name(self.key, self.gen), self.record.to_json())
            except (OSError, TierUnavailable) as e:  # it expires instead
                log.warning("could not record the end of the lease on %s: %s", self.key[:12], e)


# ----------------------------------------------------------------------------------------------------------
# media


class VolumeLeaseMedium:
    """Leases as files under ``<root>/leases`` on the shared volume (or a local cache directory)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root) / "leases"
        self._tmp = self.root / ".tmp"  # same file system as the names: link and rename stay atomic
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"volume {self.root}"

    def _tmpfile(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="lease.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, name: str, data: bytes) -> bool:
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmpfile(data)
        try:
            os.link(tmp, dest)  # atomic, fails if dest exists: the exclusive create
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def replace(self, name: str, data: bytes) -> None:
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmpfile(data)
        try:
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def names(self, prefix: str = "") -> list[str]:
        key, slash, _ = prefix.partition("/")
        dirs = [self.root / key] if slash else [d for d in self._scandir(self.root) if d.is_dir()]
        out = []
        for d in dirs:
            for f in self._scandir(d):
                name = f"{d.name}/{f.name}"
                if name.startswith(prefix) and f.is_file():
                    out.append(name)
        return sorted(out)

    @staticmethod
    def _scandir(path: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(path) as it:
                return list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / name)
        if "/" in name:  # drop the key's directory once empty (another writer may refill it: harmless)
            with contextlib.suppress(OSError):
                (self.root / name).parent.rmdir()


class S3LeaseMedium:
    """Leases as objects under ``<prefix>leases/`` in the S3 tier's bucket (its client and credentials)."""

    def __init__(self, tier: Any) -> None:
        self.tier = tier
        self.base = f"{tier.prefix}leases/"

    def describe(self) -> str:
        return f"{self.tier.describe()} leases/"

    def create(self, name: str, data: bytes) -> bool:
        import botocore.exceptions

        from services.store.s3 import _LOST_RACE, _NO_CONDITIONAL, _code

        if self.tier.conditional_writes:
            try:
                self.tier._call("PUT", self.tier._client.put_object, Bucket=self.tier.bucket,
                                Key=self.base + name, Body=data, IfNoneMatch="*")  # fmt: skip
                return True
            except botocore.exceptions.ClientError as e:
                if _code(e) in _LOST_RACE:
                    return False
                if _code(e) not in _NO_CONDITIONAL:
                    raise TierUnavailable(f"S3 leases: PUT {name}: {e}") from e
                log.warning(
                    "%s has no conditional writes: leases fall back to check-then-put", self.describe()
                )
                self.tier.conditional_writes = False
        if self.read(name) is not None:
            return False
        self.replace(name, data)
        return True

    def replace(self, name: str, data: bytes) -> None:
        self.tier._put_small(self.base + name, data)

    def read(self, name: str) -> bytes | None:
        data: bytes | None = self.tier._get_bytes(self.base + name)
        return data

    def names(self, prefix: str = "") -> list[str]:
        return sorted(o["Key"][len(self.base) :] for o in self.tier._list(self.base + prefix))

    def delete(self, name: str) -> None:
        self.tier._delete(self.base + name)


def lease_table(shared: Any, local_dir: str | os.PathLike[str], retention: float = DEFAULT_RETENTION_SECONDS,
                ) -> LeaseTable:  # fmt: skip
    """The lease table of a server: in its shared tier (volume or S3), else in its local cache directory
    (one machine: leases then only say what runs here, which is all there is)."""
    name = getattr(shared, "name", None)  # no isinstance: importing the S3 tier imports boto3
    if name == "s3":
        return LeaseTable(S3LeaseMedium(shared), retention)
    if name == "volume":
        return LeaseTable(VolumeLeaseMedium(shared.root), retention)
    return LeaseTable(VolumeLeaseMedium(local_dir), retention)
