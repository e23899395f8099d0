"""What a principal may do with artifacts and jobs, and the small index of who owns which artifact.

Rules, on a server with tokens (services/auth.py; without tokens every caller may do everything):

- **Artifacts.** A principal has access to an artifact it uploaded, or whose job it submitted or
  attached to, or that it received as a cache hit of its own request (its request named every input,
  so it already knew them). Without access the artifact does not exist for it: Get, Download, Delete
  and a stage request naming it as an input answer ARTIFACT_NOT_FOUND with the same message as for a
  digest never stored, and List leaves it out. So the store is no oracle: neither Stat nor Upload tells
  anyone whether someone else holds a file (Upload's `existed` is true only when this principal
  uploaded the bytes before).
- **User data in metadata.** Filenames, media types, prompts and the links between artifacts (an
  edit's inversion, an inversion's video and its decode and inversion settings) are user data. They are
  shown only to principals that created or requested the artifact; a principal that only uploaded the
  same bytes again (someone else's filename is in the metadata) gets the rest of the metadata without
  them. Metadata keys are shown by an allowlist, `PUBLIC_META`: a key added later stays hidden until
  it is listed here.
- **Jobs.** A job can be cancelled by a principal attached to it (it submitted the job, or sent the
  same request and re-attached) or by an admin; anyone else gets PERMISSION_DENIED. The same holds for
  google.longrunning.Operations (services/operations.py): an operation is visible to the callers
  attached to its job, to principals with access to its result and to admins; CancelOperation is
  for attached callers and admins.
- **Admins** have access to everything; a call an admin makes on behalf of a user (the Editor's)
  counts as the user's for ownership and is trusted for the inputs, which the admin checked.

Ownership is kept in a side index, ``_access/owners.db`` (SQLite) in the store's local directory, not
in the artifacts' manifests: manifests are content-addressed and immutable, while the set of principals
that may read an artifact grows with every request. The index is local to a server's cache directory:
call the server (front door) that you uploaded to. Rows of deleted artifacts are removed; rows of
evicted ones stay (a few bytes each) and apply again if the same content is stored again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from services.auth import Principal
from services.errors import PermissionDenied
from services.store import ArtifactNotFound, Manifest, is_digest

RELATIONS: tuple[str, ...] = ("created", "uploaded", "requested")
"""How a principal came to an artifact: its put created it; it uploaded the bytes; it asked for it."""
SEES_USER_DATA: frozenset[str] = frozenset({"created", "requested"})

PUBLIC_META: frozenset[str] = frozenset(
    {
        # every kind: the model (services/results.py), sizes and times
        "model",
        "model_name",
        "test_model",
        "size",
        "frames",
        "fps",
        "width",
        "height",
        # inversions
        "steps",
        "edit_steps",
        "reconstruction_psnr",
        "source_has_audio",
        # edits and keyframe previews
        "inversion_psnr",
        "keyframe_indices",
        "image_files",
    }
)
"""Metadata keys anyone with access sees; every other key is user data (module docstring)."""

_MISSING_INVERSION = (
    "no inversion {digest} on this server: run Inversion.Invert first "
    "(it may also have been evicted from the cache: invert again, it gets the same digest)"
)
INPUT_FIELDS: Mapping[str, str] = {
    "video_digest": (
        "no uploaded video {digest} on this server: upload it with Artifacts.Upload first "
        "(it may also have been evicted from the cache: upload it again)"
    ),
    "inversion_digest": _MISSING_INVERSION,
    "shard_digests": _MISSING_INVERSION,  # repeated: the inversions a sharded Invert merges
}
"""Request fields naming input artifacts (one digest or a repeated list), with the stages' own message
for a missing one (a test checks they are the stages' words), so a refusal reads exactly like a miss."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    digest TEXT NOT NULL,
    principal TEXT NOT NULL,
    relation TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (digest, principal, relation)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS owners_by_principal ON owners (principal, digest);
"""


class OwnersIndex:
    """(digest, principal, relation) rows in SQLite; safe across threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def add(self, digest: str, principal: str, relation: str) -> None:
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}")
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO owners (digest, principal, relation, since) VALUES (?, ?, ?, ?)",
                (digest, principal, relation, time.time()),
            )

    def relations(self, digest: str, principal: str) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT relation FROM owners WHERE digest = ? AND principal = ?", (digest, principal)
            ).fetchall()
        return {r[0] for r in rows}

    def owned(self, digests: Iterable[str], principal: str) -> set[str]:
        """Those of `digests` the principal has any relation to."""
        wanted = list(dict.fromkeys(digests))
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT DISTINCT digest FROM owners WHERE principal = ? AND digest IN ({marks})",
                    (principal, *part),
                ).fetchall()
            found.update(r[0] for r in rows)
        return found

    def forget(self, digest: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM owners WHERE digest = ?", (digest,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Access:
    """The rules of the module docstring over an `OwnersIndex`; `enabled` False allows everything.

    A principal of None means "no tokens on this server" and is allowed everything too.
    """

    def __init__(self, index: OwnersIndex | None) -> None:
        self.index = index
        self._jobs: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._jobs_lock = threading.Lock()

    @classmethod
    def open(cls, store_directory: str | Path, enabled: bool) -> Access:
        """Access control for a server whose store lives in `store_directory` (disabled: no index)."""
        return cls(OwnersIndex(Path(store_directory) / "_access" / "owners.db") if enabled else None)

    @property
    def enabled(self) -> bool:
        return self.index is not None

    def _restricted(self, principal: Principal | None) -> bool:
        return self.index is not None and principal is not None and not principal.is_admin

    # -- artifacts -----------------------------------------------------------------------------------------

    def record(self, digest: str, principal: Principal | None, relation: str) -> None:
        """Note that `principal` came to `digest` by `relation` (nothing without tokens)."""
        if self.index is not None and principal is not None:
            self.index.add(digest, principal.name, relation)

    def relations(self, digest: str, principal: Principal) -> set[str]:
        return self.index.relations(digest, principal.name) if self.index is not None else set()

    def can_read(self, digest: str, principal: Principal | None) -> bool:
        if not self._restricted(principal) or principal is None or principal.delegated_by is not None:
            return True
        return bool(self.relations(digest, principal))

    def require_readable(self, digest: str, principal: Principal | None, missing: str) -> None:
        """ArtifactNotFound(`missing`) -- the words of a real miss -- unless the principal has access."""
        if not self.can_read(digest, principal):
            raise ArtifactNotFound(missing)

    def readable(self, digests: Iterable[str], principal: Principal | None) -> set[str]:
        """Those of `digests` the principal has access to."""
        digests = list(digests)
        if not self._restricted(principal) or principal is None or principal.delegated_by is not None:
            return set(digests)
        assert self.index is not None
        return self.index.owned(digests, principal.name)

    def uploaded_before(self, digest: str, principal: Principal | None, stored: bool) -> bool:
        """Upload's `existed`: the store had it and, with tokens, this principal had uploaded it."""
        if not stored or not self._restricted(principal) or principal is None:
            return stored
        return "uploaded" in self.relations(digest, principal)

    def visible_meta(self, manifest: Manifest, principal: Principal | None) -> dict[str, Any]:
        """The artifact's metadata as `principal` may see it (module docstring)."""
        meta = dict(manifest.meta)
        if not self._restricted(principal) or principal is None:
            return meta
        if self.relations(manifest.key, principal) & SEES_USER_DATA:
            return meta
        return {k: v for k, v in meta.items() if k in PUBLIC_META}

    def forget(self, digest: str) -> None:
        if self.index is not None:
            self.index.forget(digest)

    def check_inputs(self, request: Any, principal: Principal) -> None:
        """Refuse a request naming an input the principal has no access to, as if it were missing.

        Called by services.auth.AuthInterceptor for every unary request, before its handler.
        """
        if not self._restricted(principal) or principal.delegated_by is not None:
            return
        descriptor = getattr(request, "DESCRIPTOR", None)
        if descriptor is None:
            return
        for name, missing in INPUT_FIELDS.items():
            if name not in descriptor.fields_by_name:
                continue
            value = getattr(request, name)
            for digest in [value] if isinstance(value, str) else list(value):
                if isinstance(digest, str) and is_digest(digest):
                    self.require_readable(digest, principal, missing.format(digest=digest))

    # -- jobs ----------------------------------------------------------------------------------------------

    def attach(self, job: Any, principal: Principal | None) -> None:
        """Record that `principal` submitted or attached to `job` (kept as long as the job object lives)."""
        if self.index is None or principal is None:
            return
        with self._jobs_lock:
            self._jobs.setdefault(job, set()).add(principal.name)

    def attached(self, job: Any) -> set[str]:
        with self._jobs_lock:
            return set(self._jobs.get(job, ()))

    def require_cancel(self, job: Any, principal: Principal | None, stage: str) -> None:
        """PERMISSION_DENIED unless `principal` is attached to `job` or an admin."""
        if not self._restricted(principal) or principal is None:
            return
        if principal.name not in self.attached(job):
            raise PermissionDenied(
                f"this {stage} job was not submitted by {principal.name!r}: only a caller attached to a job "
                "(or an admin) may cancel it",
                action="cancel",
            )

    # -- operations (google.longrunning over the same jobs) -------------------------------------------------

    def _attached_to_any(self, jobs: Iterable[Any], principal: Principal) -> bool:
        return any(principal.name in self.attached(job) for job in jobs)

    def may_see_operation(self, key: str, jobs: Iterable[Any], principal: Principal | None) -> bool:
        """An operation (a job, or its stored result) is visible to the callers attached to its local
        job, to principals with access to its result, and to admins; to others it does not exist."""
        if not self._restricted(principal) or principal is None or principal.delegated_by is not None:
            return True
        return self._attached_to_any(jobs, principal) or bool(self.relations(key, principal))

    def require_cancel_operation(self, key: str, jobs: Iterable[Any], principal: Principal | None) -> None:
        """CancelOperation: as Cancel, for a caller attached to the job here (or an admin). A job known
        only from another replica's lease can be cancelled by an admin, or on the replica running it."""
        if not self._restricted(principal) or principal is None:
            return
        if not self._attached_to_any(jobs, principal):
            raise PermissionDenied(
                f"operation {key[:12]} was not submitted by {principal.name!r} on this server: only a caller "
                "attached to a job (on the replica running it) or an admin may cancel it",
                action="cancel",
            )

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


OPEN = Access(None)
"""Access control off: every caller may do everything (a server without tokens)."""
