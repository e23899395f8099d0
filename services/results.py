"""What every stage's artifact metadata and Result share: the model that made it, and the warnings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from services.model_host import ModelHost

LOW_PSNR_DB = 25.0
"""Below this reconstruction PSNR a clip inverts poorly and edits may not follow the source."""


def model_meta(host: ModelHost) -> dict[str, Any]:
    """The model part of every artifact's metadata (the Result reports it)."""
    model = host.get()
    return {"model": model.fingerprint, "model_name": model.name, "test_model": bool(model.is_test_model)}


def common_warnings(meta: Mapping[str, Any], psnr_key: str) -> list[str]:
    """Warnings every Result repeats: test model, poor inversion."""
    out = []
    if meta.get("test_model"):
        out.append(
            f"test model: made with {meta.get('model_name', 'a test model')!r}, random weights, "
            "so the pictures are noise (serve a real Stable Diffusion folder with --model)"
        )
    psnr = meta.get(psnr_key)
    if isinstance(psnr, (int, float)) and psnr < LOW_PSNR_DB:
        out.append(
            f"reconstruction PSNR is low ({psnr:.1f} dB < {LOW_PSNR_DB:g} dB): the clip inverts poorly and "
            "the edit may not follow the source; try more inversion steps or a caption as inversion prompt"
        )
    return out


def finite_or_none(value: float | None) -> float | None:
    """JSON metadata allows no NaN/inf (a perfect reconstruction has an infinite PSNR)."""
    return float(value) if value is not None and math.isfinite(value) else None
