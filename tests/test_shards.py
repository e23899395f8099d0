"""Sharded inversion (tokenflow/shards.py): frame ranges inverted apart merge into the whole clip's
inversion within float rounding, and into exactly the same tensors when every batch is the same."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tokenflow.inversion import Inversion, frames_from_array, invert
from tokenflow.models import Model
from tokenflow.shards import merge_inversions, relative_l2, shard_ranges
from tokenflow.specs import InversionSpec

TOLERANCE = 1e-4
"""Relative L2 per tensor of a merged inversion against an unsharded one (float32 on CPU; the module
docstring of tokenflow/shards.py says why it is not zero)."""


def test_shard_ranges_cover_the_clip() -> None:
    assert shard_ranges(10, 2) == [(0, 5), (5, 10)]
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(2, 5) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError):
        shard_ranges(0, 2)


SPEC = InversionSpec(prompt="a dog", steps=2, edit_steps=2, reconstruct=True, batch_size=4)


@pytest.fixture(scope="module")
def whole(tiny_model: Model, clip_array: np.ndarray) -> Inversion:
    return invert(tiny_model, frames_from_array(clip_array), SPEC, fps=Fraction(10))


@pytest.mark.parametrize("ranges", [[(0, 3), (3, 10)], [(0, 4), (4, 10)]], ids=["unaligned", "batch-aligned"])
def test_merged_shards_match_the_unsharded_inversion(
    tiny_model: Model, clip_array: np.ndarray, whole: Inversion, tmp_path: Path, ranges: list[tuple[int, int]]
) -> None:
    spec = SPEC
    parts = [
        invert(tiny_model, frames_from_array(clip_array[a:b]), spec, fps=Fraction(10)) for a, b in ranges
    ]
    merged = merge_inversions(parts, tmp_path / "merged", extra={"note": "whole clip"})
    assert merged.latent_shape == whole.latent_shape and merged.extra["note"] == "whole clip"
    assert merged.edit_timesteps == whole.edit_timesteps
    errors = [
        relative_l2(merged.latents_clean, whole.latents_clean),
        relative_l2(merged.noisiest, whole.noisiest),
    ]
    errors += [relative_l2(merged.latents_at(t), whole.latents_at(t)) for t in whole.edit_timesteps]
    print("rel l2 per tensor:", [f"{e:.2e}" for e in errors])
    assert max(errors) <= TOLERANCE, errors
    if all(a % spec.batch_size == 0 for a, _ in ranges):
        assert max(errors) == 0.0  # the same batches: the same kernels, bit for bit
    assert whole.reconstruction_psnr is not None and merged.reconstruction_psnr is not None
    assert abs(merged.reconstruction_psnr - whole.reconstruction_psnr) < 0.01  # dB
    assert merged.extra["reconstruction_latent_rel_l2"] == pytest.approx(
        whole.extra["reconstruction_latent_rel_l2"], rel=1e-3
    )
