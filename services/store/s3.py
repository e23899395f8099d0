"""The S3 tier: the shared tier in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, GCS's XML API, ...).

Client: boto3, the reference S3 client, maintained by AWS: it reads credentials from the standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
``~/.aws/config``, web identity / IRSA, ECS and EC2 instance metadata), retries throttling and transient
errors itself (``standard`` retry mode), streams multipart uploads, and supports conditional writes
(``IfNoneMatch`` on PutObject). We pass no credentials of our own, ever.

Layout under ``s3://<bucket>/<prefix>`` (the same shape as the volume tier):

    blobs/sha256/<sha256>       a file's bytes, named by their digest (metadata ``sha256`` repeats it)
    manifests/<key>.json        the manifest, written last with ``If-None-Match: *``
    index/<kind>/<key>          empty access record: its ``LastModified`` is the LRU clock (S3 has no
                                atime, so an access *rewrites* this small object); also the kind index

Semantics (as on the volume):
  * blobs first (skipped when an object of that digest and size exists), then the manifest with a
    conditional create, so the first writer wins; a server that does not implement conditional writes
    (answers 501 NotImplemented) gets a HEAD-then-PUT instead, which is still safe because equal keys
    describe equal content;
  * every blob upload is hashed on the way; if the bytes sent do not have the digest they are named by,
    the object is deleted again and the put fails;
  * readers verify what they stream (size and sha256), and a torn artifact is a miss;
  * LRU pruning by a size limit (`prune_lru`): one listing of the bucket plus one GET per manifest, so it
    runs periodically (server thread or CronJob), never per request. Incomplete multipart uploads older
    than the grace period are aborted by the same pass (also worth an AbortIncompleteMultipartUpload
    lifecycle rule on the bucket).

Errors talking to the service raise `TierUnavailable` (the composite store treats reads that fail as
misses and writes that fail as retryable errors).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from services.store.model import (
    ArtifactNotFound,
    CorruptArtifact,
    HashingReader,
    Manifest,
    TierUnavailable,
    is_digest,
)
from services.store.tier import BlobInfo, Opener, PruneReport, RecordInfo, clamp_page_size, prune_lru

log = logging.getLogger(__name__)

T = TypeVar("T")

_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_LOST_RACE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_NO_CONDITIONAL = frozenset({"NotImplemented", "501"})
_STALE_RECORD_SECONDS = 3600.0
"""An access record without a manifest this old is debris (younger: a put between its two writes)."""


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Tier:
    """Shared tier in an S3 bucket; implements `SharedTier`."""

    name = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        size_limit: int | None = None,
        client: Any = None,
        max_concurrency: int = 8,
        multipart_threshold: int = 64 << 20,
    ) -> None:
        if not bucket:
            raise ValueError("--s3-bucket needs a bucket name")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.size_limit = size_limit
        self.conditional_writes = True
        """False once the server said it does not implement If-None-Match (then HEAD-then-PUT)."""
        self._client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            config=botocore.config.Config(
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=max(10, 2 * max_concurrency),
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(5 << 20, min(16 << 20, multipart_threshold)),  # S3: parts >= 5 MiB
            max_concurrency=max_concurrency,
        )
        self._max_concurrency = max_concurrency

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    # -- names ---------------------------------------------------------------------------------------------

    def manifest_name(self, key: str) -> str:
        return f"{self.prefix}manifests/{key}.json"

    def blob_name(self, sha256: str) -> str:
        return f"{self.prefix}blobs/sha256/{sha256}"

    def record_name(self, kind: str, key: str) -> str:
        return f"{self.prefix}index/{kind}/{key}"

    # -- plumbing ------------------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Run a client call; ClientErrors pass through, connection trouble becomes TierUnavailable."""
        try:
            return fn(**kwargs)
        except botocore.exceptions.ClientError:
            raise
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            raise TierUnavailable(f"S3 tier {self.describe()}: {what} failed: {e}") from e

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call("HEAD", self._client.head_object, Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise TierUnavailable(f"S3 tier {self.describe()}: HEAD {name}: {e}") from e

    def _get_bytes(self, name: str) -> bytes | None:
        try:
            resp = self._call("GET", self._client.get_object, Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise TierUnavailable(f"S3 tier {self.describe()}: GET {name}: {e}") from e
        with resp["Body"] as body:
            return bytes(body.read())

    def _put_small(self, name: str, body: bytes, **extra: Any) -> None:
        try:
            self._call("PUT", self._client.put_object, Bucket=self.bucket, Key=name, Body=body, **extra)
        except botocore.exceptions.ClientError as e:
            raise TierUnavailable(f"S3 tier {self.describe()}: PUT {name}: {e}") from e

    def _delete(self, name: str) -> None:
        try:
            self._call("DELETE", self._client.delete_object, Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as e:
            if _code(e) not in _MISSING:
                raise TierUnavailable(f"S3 tier {self.describe()}: DELETE {name}: {e}") from e

    def _list(self, prefix: str, start_after: str = "", limit: int | None = None) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        seen = 0
        while True:
            if limit is not None:
                kwargs["MaxKeys"] = min(1000, limit - seen)
            try:
                resp = self._call("LIST", self._client.list_objects_v2, **kwargs)
            except botocore.exceptions.ClientError as e:
                raise TierUnavailable(f"S3 tier {self.describe()}: LIST {prefix}: {e}") from e
            for obj in resp.get("Contents", []):
                yield obj
                seen += 1
            if not resp.get("IsTruncated") or (limit is not None and seen >= limit):
                return
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]
            kwargs.pop("StartAfter", None)

    # -- writing -------------------------------------------------------------------------------------------

    def _put_blob(self, sha256: str, size: int, source: BinaryIO) -> None:
        name = self.blob_name(sha256)
        reader = HashingReader(source)  # not seekable: the transfer reads it once, in order
        try:
            self._call(
                "upload",
                self._client.upload_fileobj,
                Fileobj=reader,
                Bucket=self.bucket,
                Key=name,
                ExtraArgs={"Metadata": {"sha256": sha256}, "ContentType": "application/octet-stream"},
                Config=self._transfer,
            )
        except (botocore.exceptions.ClientError, boto3.exceptions.S3UploadFailedError) as e:
            raise TierUnavailable(f"S3 tier {self.describe()}: upload of blob {sha256[:12]}…: {e}") from e
        if (reader.size, reader.hexdigest()) != (size, sha256):
            self._delete(name)
            raise CorruptArtifact(f"source of blob {sha256[:12]}… changed while uploading it")

    def put(self, manifest: Manifest, open_file: Opener) -> Manifest:
        existing = self.stat(manifest.key)
        if existing is not None:
            self.touch(existing)
            return existing
        for name, entry in manifest.files.items():
            head = self._head(self.blob_name(entry.sha256))
            if head is not None and int(head.get("ContentLength", -1)) == entry.size:
                continue
            with open_file(name) as src:
                self._put_blob(entry.sha256, entry.size, src)
        published = self._publish(manifest)
        self._put_small(self.record_name(published.kind, published.key), b"")
        return published

    def _publish(self, manifest: Manifest) -> Manifest:
        """The commit point: create the manifest object if absent (first writer wins)."""
        name = self.manifest_name(manifest.key)
        body = manifest.to_json()
        if self.conditional_writes:
            try:
                self._call(
                    "PUT",
                    self._client.put_object,
                    Bucket=self.bucket,
                    Key=name,
                    Body=body,
                    ContentType="application/json",
                    IfNoneMatch="*",
                )
                return manifest
            except botocore.exceptions.ClientError as e:
                code = _code(e)
                if code in _LOST_RACE:
                    return self.stat(manifest.key) or manifest
                if code not in _NO_CONDITIONAL:
                    raise TierUnavailable(f"S3 tier {self.describe()}: PUT {name}: {e}") from e
                log.warning("%s does not implement conditional writes; using HEAD-then-PUT", self.describe())
                self.conditional_writes = False
        existing = self.stat(manifest.key)
        if existing is not None:
            return existing
        self._put_small(name, body, ContentType="application/json")
        return manifest

    # -- reading -------------------------------------------------------------------------------------------

    def get_manifest(self, key: str) -> Manifest | None:
        data = self._get_bytes(self.manifest_name(key))
        if data is None:
            return None
        try:
            return Manifest.from_json(data, key)
        except CorruptArtifact:
            log.warning("S3 tier: unreadable manifest %s removed", key)
            self.unpublish(key, None)
            raise CorruptArtifact(f"unreadable shared manifest {key}") from None

    def stat(self, key: str) -> Manifest | None:
        data = self._get_bytes(self.manifest_name(key))
        if data is None:
            return None
        with contextlib.suppress(CorruptArtifact):
            return Manifest.from_json(data, key)
        return None

    def has(self, key: str) -> bool:
        return self._head(self.manifest_name(key)) is not None

    def open_blob(self, manifest: Manifest, name: str) -> BinaryIO:
        obj = self.blob_name(manifest.files[name].sha256)
        try:
            resp = self._call("GET", self._client.get_object, Bucket=self.bucket, Key=obj)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING:
                raise ArtifactNotFound(f"shared blob of {manifest.key}/{name} is gone") from None
            raise TierUnavailable(f"S3 tier {self.describe()}: GET {obj}: {e}") from e
        return resp["Body"]  # type: ignore[no-any-return]  # an io.IOBase stream; the caller closes it

    def touch(self, manifest: Manifest) -> bool:
        if not self.has(manifest.key):
            return False
        self._put_small(self.record_name(manifest.kind, manifest.key), b"")
        return True

    def list(self, kind: str, page_size: int, after: str | None) -> tuple[list[Manifest], bool]:
        size = clamp_page_size(page_size)
        base = f"{self.prefix}index/{kind}/"
        keys = [
            o["Key"][len(base) :]
            for o in self._list(base, start_after=base + after if after else "", limit=size + 1)
        ]
        keys = [k for k in keys if is_digest(k)]
        with ThreadPoolExecutor(self._max_concurrency) as pool:
            manifests = list(pool.map(self.stat, keys[:size]))
        return [m for m in manifests if m is not None and m.kind == kind], len(keys) > size

    # -- deleting and pruning ------------------------------------------------------------------------------

    def _kinds(self) -> list[str]:
        try:
            resp = self._call(
                "LIST",
                self._client.list_objects_v2,
                Bucket=self.bucket,
                Prefix=f"{self.prefix}index/",
                Delimiter="/",
            )
        except botocore.exceptions.ClientError as e:
            raise TierUnavailable(f"S3 tier {self.describe()}: LIST index/: {e}") from e
        base = len(f"{self.prefix}index/")
        return [p["Prefix"][base:].rstrip("/") for p in resp.get("CommonPrefixes", [])]

    def unpublish(self, key: str, kind: str | None) -> None:
        for k in [kind] if kind is not None else self._kinds():
            self._delete(self.record_name(k, key))
        self._delete(self.manifest_name(key))

    def delete(self, key: str) -> bool:
        """Unpublish; blobs no other manifest uses go at the next prune (they may be shared)."""
        if not self.has(key):
            return False
        manifest = self.stat(key)
        self.unpublish(key, manifest.kind if manifest is not None else None)
        return True

    def remove_blob(self, sha256: str) -> None:
        self._delete(self.blob_name(sha256))

    def scan_blobs(self) -> Iterator[BlobInfo]:
        base = f"{self.prefix}blobs/sha256/"
        for o in self._list(base):
            sha = o["Key"][len(base) :]
            if is_digest(sha):
                yield BlobInfo(sha, int(o["Size"]), o["LastModified"].timestamp())

    def scan_records(self) -> Iterator[RecordInfo]:
        base = f"{self.prefix}manifests/"
        published = {}
        for o in self._list(base):
            key = o["Key"][len(base) :].removesuffix(".json")
            if is_digest(key):
                published[key] = o["LastModified"].timestamp()
        ibase = f"{self.prefix}index/"
        accessed: dict[str, float] = {}
        for o in self._list(ibase):
            kind, _, key = o["Key"][len(ibase) :].partition("/")
            if not is_digest(key):
                continue
            if key not in published:
                if time.time() - o["LastModified"].timestamp() > _STALE_RECORD_SECONDS:
                    self._delete(o["Key"])  # a record whose manifest is gone (a delete that died midway)
                continue
            accessed[key] = max(accessed.get(key, 0.0), o["LastModified"].timestamp())

        def read(key: str) -> RecordInfo | None:
            data = self._get_bytes(self.manifest_name(key))
            if data is None:
                return None
            try:
                manifest: Manifest | None = Manifest.from_json(data, key)
            except CorruptArtifact:
                manifest = None
            return RecordInfo(key, accessed.get(key, published[key]), manifest)

        with ThreadPoolExecutor(self._max_concurrency) as pool:
            for info in pool.map(read, sorted(published)):
                if info is not None:
                    yield info

    def sweep_temporary(self, older_than: float) -> int:
        """Abort multipart uploads started before `older_than` (their parts are billed storage)."""
        aborted = 0
        try:
            resp = self._call(
                "LIST uploads", self._client.list_multipart_uploads, Bucket=self.bucket, Prefix=self.prefix
            )
        except botocore.exceptions.ClientError as e:
            log.warning("S3 tier %s: cannot list multipart uploads: %s", self.describe(), e)
            return 0
        for up in resp.get("Uploads", []):
            if up["Initiated"].timestamp() < older_than:
                with contextlib.suppress(botocore.exceptions.ClientError):
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    aborted += 1
        return aborted

    def prune(self, max_bytes: int | None = None, grace_seconds: float = 3600.0) -> PruneReport:
        return prune_lru(self, self.size_limit if max_bytes is None else max_bytes, grace_seconds)

    def total_bytes(self) -> int:
        """Bytes of all blobs (a listing of the bucket's blobs/ prefix)."""
        return sum(b.size for b in self.scan_blobs())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
