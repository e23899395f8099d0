"""Publishing source features (tokenflow.features) as a ``features`` artifact: the one place that does it.

Two stages make them: Propagation records them while the first TokenFlow edit of an (inversion,
keyframe schedule) runs its source branch anyway, and Inversion precomputes them on request
(InvertRequest.features_for). Both publish through `publish_features`, so the artifact's files and
metadata are the same however it was made.
"""

from __future__ import annotations

from services.model_host import ModelHost
from services.results import model_meta
from services.store import ArtifactStore, Manifest
from tokenflow import keys
from tokenflow.features import Features

FEATURES_KIND = keys.FEATURES_KIND
DEFAULT_FEATURES_BUDGET = 8 << 30
"""Bytes one artifact of source features may take (a stage's default; the server sets --features-budget)."""


def publish_features(
    store: ArtifactStore, host: ModelHost, key: str, inversion_digest: str, features: Features
) -> Manifest:
    """Store `features` under `key` (tokenflow.keys.features_key), beside their inversion."""
    return store.put(
        FEATURES_KIND,
        key,
        features.files(),
        meta={
            "inversion": inversion_digest,
            "frames": features.frames,
            "steps": features.steps,
            "conv_steps": features.conv_steps,
            "bytes": features.nbytes,
            **model_meta(host),
        },
    )
