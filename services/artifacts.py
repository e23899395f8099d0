"""The Artifacts gRPC service: chunked upload and download, description, listing and deletion of artifacts.

Uploads stream to a temporary file inside the store's directory (same filesystem, so nothing large is
held in memory and the store can copy it cheaply), are hashed on the way, and are published under the
sha256 of their bytes -- the content address every later stage keys on. A video is stored as one file,
``source.<ext>``: ``.mp4`` for MP4 uploads, otherwise ``.bin`` (raw source bytes, e.g. WebM/MKV; the
store's fifth allowed file type, never deserialised by us, only handed to the video decoder). The original
file name and media type are kept in the artifact's metadata. Nothing is published unless the whole
upload arrived within the size limit and matched the client's sha256, so a failed upload leaves no trace.

With tokens (services/auth.py) every call is checked against services/access.py: artifacts a caller has
no access to look absent, metadata holding user data is shown only to its creators and requesters, and
Upload's `existed` is true only when the caller uploaded the same bytes before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from services.access import OPEN, Access
from services.auth import current_principal
from services.convert import artifact_kind, kind_name
from services.errors import DataLoss
from services.limits import DEFAULT_UPLOAD_IDLE_SECONDS, WATCHDOG
from services.store import ArtifactNotFound, ArtifactStore, CorruptArtifact, Manifest, is_digest
from services.store.model import is_disk_full
from tokenflow.errors import SpecError, TooLargeError
from tokenflow_pb.v1 import artifacts_pb2, artifacts_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
"""Largest payload per streamed message (1 MiB), far below gRPC's default 4 MiB message limit."""

SERVICE_NAME = artifacts_pb2.DESCRIPTOR.services_by_name["Artifacts"].full_name
UPLOAD_KINDS = ("video",)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _source_name(filename: str) -> str:
    return "source.mp4" if os.path.splitext(filename)[1].lower() in (".mp4", ".m4v") else "source.bin"


def _clean_filename(filename: str) -> str:
    base = os.path.basename(filename.replace("\\", "/")).strip()
    return "".join(ch for ch in base if ch.isprintable())[:255]


def _file_info(name: str, entry: Any) -> common_pb2.FileInfo:
    return common_pb2.FileInfo(name=name, size=entry.size, sha256=entry.sha256, media_type=entry.media_type)


class ArtifactsServicer(artifacts_pb2_grpc.ArtifactsServicer):
    """Upload / Download / Get / List / Delete over an `ArtifactStore` (errors: services.errors)."""

    upload_idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS
    """An upload that sends nothing for this long is closed and its handler thread freed."""

    def __init__(
        self, store: ArtifactStore, max_upload_bytes: int, metrics: Any = None, access: Access = OPEN
    ) -> None:
        self.store = store
        self.access = access
        self.max_upload_bytes = int(max_upload_bytes)
        self.metrics = metrics  # request metrics come from the server's interceptor; store metrics from store

    # -- Upload --------------------------------------------------------------------------------------------

    def Upload(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterable[artifacts_pb2.UploadRequest], context: grpc.ServicerContext
    ) -> artifacts_pb2.UploadResponse:
        tmp_path: Path | None = None
        try:
            requests = WATCHDOG.guard(request_iterator, context, self.upload_idle_seconds)
            first = next(requests, None)
            if first is None or first.WhichOneof("payload") != "header":
                raise SpecError(
                    "the first UploadRequest must carry the header (kind, filename, size, sha256)"
                )
            header = first.header
            kind = kind_name(header.kind)
            if kind not in UPLOAD_KINDS:
                given = common_pb2.ArtifactKind.Name(header.kind) if kind else str(header.kind)
                raise SpecError(
                    f"unsupported upload kind {given}; supported: "
                    + ", ".join(common_pb2.ArtifactKind.Name(artifact_kind(k)) for k in UPLOAD_KINDS),
                    field="header.kind",
                )
            want_sha = header.sha256.strip().lower()
            if want_sha and not _SHA_RE.match(want_sha):
                raise SpecError("header.sha256 must be 64 hex characters (or empty)")
            self._check_size(header.total_size, declared=True)

            fd, tmp = tempfile.mkstemp(dir=self.store.tmp_dir, prefix="upload-", suffix=".part")
            tmp_path = Path(tmp)
            sha = hashlib.sha256()
            received = 0
            with os.fdopen(fd, "wb", buffering=0) as out:  # unbuffered: a full disk fails in write
                for req in requests:
                    which = req.WhichOneof("payload")
                    if which == "header":
                        raise SpecError("the upload header must be sent once, in the first message only")
                    if which != "chunk":
                        continue
                    received += len(req.chunk)
                    self._check_size(received, declared=False)
                    sha.update(req.chunk)
                    self._write_chunk(out, req.chunk)
            if received == 0:
                raise SpecError("the upload is empty: send the file's bytes as chunks after the header")
            if header.total_size and received != header.total_size:
                raise SpecError(
                    f"the header announced {header.total_size} bytes but {received} arrived; upload again"
                )
            digest = sha.hexdigest()
            if want_sha and digest != want_sha:
                raise SpecError(
                    f"sha256 mismatch: the header says {want_sha} but the received bytes hash to {digest}; "
                    "the upload was corrupted in transit or the header is wrong; nothing was stored"
                )
            principal = current_principal()
            stored = self.store.contains(digest)
            existed = self.access.uploaded_before(digest, principal, stored)
            filename = _clean_filename(header.filename)
            manifest = self.store.put(
                kind,
                digest,
                {_source_name(filename): tmp_path},
                meta={"filename": filename, "media_type": header.media_type[:100], "size": received},
            )
            if not stored:
                self.access.record(digest, principal, "created")  # its filename is in the metadata
            self.access.record(digest, principal, "uploaded")
            log.info("upload %s: %d bytes (%s)%s", digest, received, filename, " existed" if existed else "")
            return artifacts_pb2.UploadResponse(
                digest=digest,
                kind=artifact_kind(manifest.kind),
                size=manifest.total_size,
                existed=existed,
                primary=manifest.primary or "",
            )
        finally:
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    tmp_path.unlink()

    def _write_chunk(self, out: Any, chunk: bytes) -> None:
        """Append to the upload's scratch file; a full disk is the store's (StoreFull, health)."""
        view = memoryview(chunk)
        try:
            while view:
                view = view[out.write(view) :]
        except OSError as e:
            if is_disk_full(e):
                raise self.store.disk_full(e) from None
            raise

    def _check_size(self, size: int, declared: bool) -> None:
        if size > self.max_upload_bytes:
            what = f"the declared size ({size} bytes)" if declared else "the upload"
            raise TooLargeError(
                f"{what} exceeds this server's upload limit of {self.max_upload_bytes} bytes; trim the clip "
                "(fewer frames or a lower resolution) before uploading",
                limit_name="max_upload_bytes",
                limit=self.max_upload_bytes,
            )

    # -- Download ------------------------------------------------------------------------------------------

    def Download(  # noqa: N802 - gRPC method name
        self, request: artifacts_pb2.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[artifacts_pb2.DownloadResponse]:
        _check_digest(request.digest)
        principal = current_principal()
        self.access.require_readable(request.digest, principal, _not_found_message(request.digest))
        art = self.store.get(request.digest, raise_corrupt=True)  # corrupt: ABORTED, retryable
        if art is None:
            raise ArtifactNotFound(_not_found_message(request.digest))
        manifest = art.manifest
        meta = self.access.visible_meta(manifest, principal)
        name = request.name or manifest.primary
        if not name:
            raise SpecError(
                f"artifact {request.digest} ({manifest.kind}) has several files and no primary one; "
                f"set DownloadRequest.name to one of: {', '.join(sorted(manifest.files))}",
                field="name",
            )
        if name not in manifest.files:
            raise ArtifactNotFound(
                f"artifact {request.digest} ({manifest.kind}) has no file {name!r}; "
                f"it has: {', '.join(sorted(manifest.files))}"
            )
        entry = manifest.files[name]
        if request.offset > entry.size:
            raise SpecError(
                f"offset {request.offset} is beyond the end of {name} ({entry.size} bytes)", field="offset"
            )
        art.verify(name)  # never send bytes that do not match the manifest
        stream = art.open(name)

        with stream:
            yield artifacts_pb2.DownloadResponse(
                header=artifacts_pb2.DownloadHeader(
                    digest=manifest.key,
                    kind=artifact_kind(manifest.kind),
                    name=name,
                    size=entry.size,
                    sha256=entry.sha256,
                    media_type=entry.media_type,
                    filename=_suggested_filename(manifest, name, meta),
                    offset=request.offset,
                )
            )
            try:
                position = 0
                while True:
                    chunk = stream.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    start = max(0, request.offset - position)
                    position += len(chunk)
                    if start < len(chunk):
                        yield artifacts_pb2.DownloadResponse(chunk=chunk[start:] if start else chunk)
            except CorruptArtifact as e:  # changed on disk since verified: the client must discard it
                raise DataLoss(f"{e}; discard the partial download and retry") from e

    # -- Get ------------------------------------------------------------------------------------------------

    def Get(  # noqa: N802 - gRPC method name
        self, request: artifacts_pb2.GetRequest, context: grpc.ServicerContext
    ) -> artifacts_pb2.GetResponse:
        _check_digest(request.digest)
        principal = current_principal()
        self.access.require_readable(request.digest, principal, _not_found_message(request.digest))
        manifest = self.store.stat(request.digest)
        if manifest is None:
            raise ArtifactNotFound(_not_found_message(request.digest))
        return artifacts_pb2.GetResponse(
            artifact=artifact_message(manifest, self.access.visible_meta(manifest, principal))
        )

    # -- List -----------------------------------------------------------------------------------------------

    def List(  # noqa: N802 - gRPC method name
        self, request: artifacts_pb2.ListRequest, context: grpc.ServicerContext
    ) -> artifacts_pb2.ListResponse:
        kind = kind_name(request.kind)
        if kind is None:
            raise SpecError(
                "kind is required: list one kind at a time (ARTIFACT_KIND_VIDEO, ..._INVERSION, "
                "..._KEYFRAMES or ..._PROPAGATION)",
                field="kind",
            )
        try:
            manifests, next_token = self.store.list(kind, request.page_size, request.page_token)
        except SpecError as e:  # the store's paging checks name no field
            if e.field is not None:
                raise
            field = "page_size" if "page_size" in str(e) else "page_token"
            raise SpecError(str(e), field=field) from None
        principal = current_principal()
        readable = self.access.readable((m.key for m in manifests), principal)
        # A page may hold fewer than page_size artifacts (those of others are left out); the token goes on.
        return artifacts_pb2.ListResponse(
            artifacts=[
                artifact_message(m, self.access.visible_meta(m, principal))
                for m in manifests
                if m.key in readable
            ],
            next_page_token=next_token,
        )

    # -- Delete ---------------------------------------------------------------------------------------------

    def Delete(  # noqa: N802 - gRPC method name
        self, request: artifacts_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> artifacts_pb2.DeleteResponse:
        """Remove an artifact from every tier; refused (ArtifactInUse) while a running job pins it."""
        _check_digest(request.digest)
        gone = f"no artifact {request.digest} on this server (nothing was deleted)"
        self.access.require_readable(request.digest, current_principal(), gone)
        if not self.store.delete(request.digest, if_unpinned=True):
            raise ArtifactNotFound(gone)
        self.access.forget(request.digest)
        log.info("deleted artifact %s", request.digest)
        return artifacts_pb2.DeleteResponse()


def artifact_message(manifest: Manifest, meta: dict[str, Any] | None = None) -> artifacts_pb2.Artifact:
    """The API's description of a stored artifact, with `meta` (default: all of its metadata)."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(manifest.created * 1e9))
    return artifacts_pb2.Artifact(
        digest=manifest.key,
        kind=artifact_kind(manifest.kind),
        create_time=created,
        total_size=manifest.total_size,
        files=[_file_info(n, e) for n, e in sorted(manifest.files.items())],
        primary=manifest.primary or "",
        meta_json=json.dumps(manifest.meta if meta is None else meta, sort_keys=True, ensure_ascii=False),
    )


def _check_digest(digest: str) -> None:
    if not is_digest(digest):
        raise SpecError(
            f"malformed digest {digest[:80]!r}: expected 64 lowercase hex characters (a sha256), as returned "
            "by Artifacts.Upload or in a job's Result.digest",
            field="digest",
        )


def _not_found_message(digest: str) -> str:
    return (
        f"no artifact {digest} on this server: upload the video with Artifacts.Upload, or rerun the stage "
        "that produced it (it may have been evicted from the cache)"
    )


def _suggested_filename(manifest: Manifest, name: str, meta: dict[str, Any]) -> str:
    original = meta.get("filename") if manifest.kind == "video" else None
    if isinstance(original, str) and original and name == manifest.primary:
        return original
    return f"{manifest.key[:12]}-{name}"


def add_to_server(server: grpc.Server, servicer: ArtifactsServicer) -> None:
    """Register the servicer on a `grpc.server`."""
    artifacts_pb2_grpc.add_ArtifactsServicer_to_server(servicer, server)
