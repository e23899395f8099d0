"""Content-addressed artifact store: a local diskcache tier in front of an optional shared tier.

One module per concern:

    model.py      keys (`artifact_key`, `canonical_json`), `Manifest` / `FileEntry`, file names, errors
    tier.py       the `Tier` / `SharedTier` interface every tier implements, LRU pruning, list paging
    local.py      the local tier: blobs in diskcache, a SQLite index of sizes and access times, pins
    volume.py     the shared tier on a mounted volume (plain files named by digest)
    s3.py         the shared tier in an S3-compatible bucket (boto3)
    artifact.py   `Artifact`, the verified-read handle `get` returns
    composite.py  `ArtifactStore`: local in front of shared; what the stages use
    __main__.py   ``python -m services.store prune|stat|list`` for operators

Everything callers need is re-exported here. Nothing is ever pickled.
"""

from services.store.artifact import Artifact
from services.store.composite import ArtifactStore, make_shared_tier
from services.store.model import (
    ALLOWED_EXTENSIONS,
    MEDIA_TYPES,
    SCHEMA_VERSION,
    ArtifactInUse,
    ArtifactNotFound,
    CorruptArtifact,
    FileEntry,
    Manifest,
    StoreFull,
    TierUnavailable,
    WrongArtifactKind,
    artifact_key,
    canonical_json,
    check_file_name,
    is_digest,
)
from services.store.tier import PruneReport, SharedTier, Tier

__all__ = [
    "ALLOWED_EXTENSIONS",
    "MEDIA_TYPES",
    "SCHEMA_VERSION",
    "Artifact",
    "ArtifactInUse",
    "ArtifactNotFound",
    "ArtifactStore",
    "CorruptArtifact",
    "FileEntry",
    "Manifest",
    "PruneReport",
    "SharedTier",
    "StoreFull",
    "Tier",
    "TierUnavailable",
    "WrongArtifactKind",
    "artifact_key",
    "canonical_json",
    "check_file_name",
    "is_digest",
    "make_shared_tier",
]
