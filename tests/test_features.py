"""Source features: recorded while the source branch runs, replayed so propagation runs without it.

Equivalence: for the same inversion and schedule, an edit that replays features equals the edit that
computes them. The indices are exact and the conv feature is stored in the UNet's dtype, so the only
difference is the batch size of the uncond/cond UNet work (2n rows instead of 3n), which changes the
kernels' blocking and so their summation order: we allow 1e-5 relative L2 on the final latents
(measured here, fp32 on CPU: 1.9e-6 to 3.6e-6). The recording edit is the plain edit, bit for bit.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tokenflow.branches import EDITED_ONLY, WITH_SOURCE, BranchLayout, HookRegistry, SourceHook
from tokenflow.editing import PATH_FEATURES, PATH_SOURCE_BRANCH, edit
from tokenflow.errors import SpecError
from tokenflow.features import (
    CONV,
    META_FILE,
    Features,
    index_dtype,
    nn_name,
    recorder_for,
    replayer_for,
    step_file,
)
from tokenflow.inversion import Inversion, frames_from_array, invert
from tokenflow.keys import features_key, features_steps
from tokenflow.models import Model
from tokenflow.schedule import draw_keyframes
from tokenflow.specs import EditSpec, InversionSpec

TOLERANCE = 1e-5


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def inversion9(tiny_model: Model, clip_array: np.ndarray) -> Inversion:
    """9 frames (an odd count: with interval 4 the last window holds one frame), 4 editing steps."""
    spec = InversionSpec(prompt="a dog running", steps=4, edit_steps=4, reconstruct=False)
    return invert(tiny_model, frames_from_array(clip_array[:9]), spec, fps=Fraction(10))


def _record(model: Model, inv: Inversion, spec: EditSpec, directory: Path, budget: int | None = None):
    rec = recorder_for(directory, inv.n_frames, len(inv.edit_timesteps), spec, budget=budget)
    result = edit(model, inv, spec, source_hook=rec)
    return result, rec, rec.finish()


CASES = {
    "tokenflow": EditSpec(prompt="a red fox", keyframe_interval=4, chunk_size=4),
    "sdedit-start": EditSpec(
        prompt="a red fox", method="sdedit", sdedit_start=0.5, keyframe_interval=4, chunk_size=4
    ),
    "tokenflow-window": EditSpec(
        prompt="a red fox", keyframe_interval=2, chunk_size=5, keyframe_attention="window:1"
    ),
}


@pytest.fixture(scope="module")
def plain_tokenflow(tiny_model: Model, inversion9: Inversion):  # noqa: ANN201
    return edit(tiny_model, inversion9, CASES["tokenflow"])


@pytest.fixture(scope="module")
def recorded_tokenflow(tiny_model: Model, inversion9: Inversion, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    directory = tmp_path_factory.mktemp("features")
    return (directory, *_record(tiny_model, inversion9, CASES["tokenflow"], directory))


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_features_give_the_edit_without_them(
    tiny_model: Model,
    inversion9: Inversion,
    tmp_path: Path,
    case: str,
    plain_tokenflow,
    recorded_tokenflow,  # noqa: ANN001
) -> None:
    spec = CASES[case]
    if case == "tokenflow":
        plain = plain_tokenflow
        directory, recorded, rec, features = recorded_tokenflow
    else:
        plain = edit(tiny_model, inversion9, spec)
        directory = tmp_path
        recorded, rec, features = _record(tiny_model, inversion9, spec, directory)
    assert features is not None, rec.refused
    # Recording only observes: the recording edit is the plain edit, bit for bit.
    assert torch.equal(recorded.latents, plain.latents)
    assert plain.propagation_batches == recorded.propagation_batches
    assert set(plain.propagation_batches) == {PATH_SOURCE_BRANCH}
    # Features recorded under one prompt serve another prompt (they never see it).
    other = spec.replace(prompt="a marble statue", guidance_scale=5.0)
    expected = edit(tiny_model, inversion9, other)
    replayer = replayer_for(Features.load(directory), 9, 4, other)
    replayed = edit(tiny_model, inversion9, other, source_hook=replayer)
    assert set(replayed.propagation_batches) == {PATH_FEATURES}
    assert replayed.propagation_batches[PATH_FEATURES] == plain.propagation_batches[PATH_SOURCE_BRANCH]
    assert replayed.keyframes == expected.keyframes
    err = rel_l2(replayed.latents, expected.latents)
    print(f"\n{case}: replayed vs computed source features, final latents rel L2 {err:.2e}")
    assert err <= TOLERANCE
    steps, conv_steps = features_steps(spec, 4)
    assert features.steps == steps and features.conv_steps == conv_steps
    assert (case == "sdedit-start") == (steps[0] == 2 and not conv_steps)
    assert replayer.read_bytes > 0


def test_the_artifact_layout_dtypes_and_sizes(recorded_tokenflow) -> None:  # noqa: ANN001
    directory, _, rec, features = recorded_tokenflow
    assert features is not None
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["frames"] == 9 and meta["steps"] == [0, 1, 2, 3] and meta["conv_steps"] == [0, 1, 2]
    assert len(meta["layers"]) == 16  # every self-attention of SD's block layout
    total = 0
    for step in meta["steps"]:
        path = directory / step_file(step)
        total += path.stat().st_size
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            assert (CONV in names) == (step in meta["conv_steps"])
            for layer, seq in meta["layers"].items():
                part = f.get_slice(nn_name(layer))
                assert part.get_shape() == [9, 2, seq]
                assert part.get_dtype() == "I16"
                idx = f.get_tensor(nn_name(layer))
                assert 0 <= int(idx.min()) and int(idx.max()) < seq
    assert total == meta["bytes"] == features.nbytes == rec.written
    assert not list(directory.glob(".*"))  # no part files left behind


def test_index_dtype_cannot_overflow() -> None:
    assert index_dtype(4096) == torch.int16
    assert index_dtype(32767) == torch.int16
    assert torch.iinfo(torch.int16).max >= 32767 - 1
    assert index_dtype(32768) == torch.int32
    assert index_dtype(2**24) == torch.int32


def test_over_the_budget_nothing_is_kept_and_the_edit_is_unchanged(
    tiny_model: Model,
    inversion9: Inversion,
    tmp_path: Path,
    plain_tokenflow,  # noqa: ANN001
) -> None:
    spec = CASES["tokenflow"]
    plain = plain_tokenflow
    result, rec, features = _record(tiny_model, inversion9, spec, tmp_path, budget=10_000)
    assert features is None
    assert rec.refused is not None and "over the budget of 10,000" in rec.refused
    assert torch.equal(result.latents, plain.latents)
    assert not [p for p in tmp_path.iterdir()]  # nothing published, nothing left


def test_features_that_do_not_fit_the_edit_are_refused(recorded_tokenflow) -> None:  # noqa: ANN001
    spec = CASES["tokenflow"]
    features = recorded_tokenflow[3]
    assert features is not None
    with pytest.raises(SpecError, match="cover"):
        replayer_for(features, 9, 4, spec.replace(pnp_f_t=0.5))  # other conv-injection steps
    with pytest.raises(SpecError, match="cover"):
        replayer_for(features, 10, 4, spec)


def test_branch_layouts_and_the_hook_registry() -> None:
    assert WITH_SOURCE.count == 3 and EDITED_ONLY.count == 2
    t = torch.arange(6).view(6, 1)
    assert WITH_SOURCE.part(t, "uncond").flatten().tolist() == [2, 3]
    assert EDITED_ONLY.part(t, "cond").flatten().tolist() == [3, 4, 5]
    with pytest.raises(RuntimeError, match="not 'source'"):
        EDITED_ONLY.part(t, "source")
    with pytest.raises(ValueError):
        BranchLayout(("cond", "cond"))

    seen: list[str] = []

    class Observer(SourceHook):
        def post_conv(self, frames, feature):  # noqa: ANN001, ANN202
            seen.append(f"post {frames} {feature.tolist()}")

    class Supplier(SourceHook):
        supplies_source = True

        def pre_conv(self, frames):  # noqa: ANN001, ANN202
            return torch.tensor([7.0])

    reg = HookRegistry()
    reg.register_hook(Observer(), "observer")
    assert not reg.supplies_source
    assert reg.conv([1], lambda: torch.tensor([1.0])).tolist() == [1.0]
    reg.register_hook(Supplier(), "supplier")
    assert reg.supplies_source
    assert reg.conv([2], lambda: pytest.fail("computed although supplied")).tolist() == [7.0]
    assert seen == ["post [1] [1.0]", "post [2] [7.0]"]
    with pytest.raises(ValueError):
        reg.register_hook(Observer(), "observer")
    reg.remove_hook("supplier")
    assert reg.get_hook("supplier") is None and not reg.supplies_source


def test_propagation_without_a_source_branch_needs_a_hook(tiny_model: Model, inversion9: Inversion) -> None:
    """Asking for the edited-only layout with no features is an error, never a silent wrong edit."""

    class Claims(SourceHook):
        supplies_source = True  # but supplies nothing

    with pytest.raises(RuntimeError, match="no hook supplies"):
        edit(tiny_model, inversion9, CASES["tokenflow"], source_hook=Claims())


# -- the features key ------------------------------------------------------------------------------------

N, T = 20, 10
BASE = EditSpec(prompt="a fox")


def test_the_features_key_changes_with_exactly_its_ingredients() -> None:
    base = features_key("a" * 64, BASE, N, T)
    schedule = tuple(tuple(w * 8 + (1 if w < 2 else 0) for w in range(3)) for _ in range(T))
    ingredients = {
        "inversion": features_key("b" * 64, BASE, N, T),
        "seed": features_key("a" * 64, BASE.replace(seed=1), N, T),
        "explicit schedule": features_key("a" * 64, BASE.replace(keyframe_schedule=schedule), N, T),
        "keyframe_interval": features_key("a" * 64, BASE.replace(keyframe_interval=4), N, T),
        "propagation_weighting": features_key("a" * 64, BASE.replace(propagation_weighting="linear"), N, T),
        "steps covered (sdedit start)": features_key(
            "a" * 64, BASE.replace(method="sdedit", sdedit_start=0.5), N, T
        ),
        "conv-injection steps": features_key("a" * 64, BASE.replace(pnp_f_t=0.5), N, T),
    }
    for name, key in ingredients.items():
        assert key != base, name
    assert len(set(ingredients.values())) == len(ingredients)
    same = {
        "prompt": BASE.replace(prompt="a statue"),
        "negative_prompt": BASE.replace(negative_prompt=""),
        "guidance_scale": BASE.replace(guidance_scale=3.0),
        "pnp_attn_t": BASE.replace(pnp_attn_t=0.9),
        "pnp_f_t with the same step count": BASE.replace(pnp_f_t=0.85),
        "chunk_size": BASE.replace(chunk_size=3),
        "crf": BASE.replace(crf=30),
        "keyframe_attention": BASE.replace(keyframe_attention="window:1"),
        "keyframe_group_size": BASE.replace(keyframe_group_size=2),
        "explicit schedule equal to the draw": BASE.replace(
            keyframe_schedule=tuple(tuple(r) for r in draw_keyframes(N, 8, T, 0))
        ),
    }
    for name, spec in same.items():
        assert features_key("a" * 64, spec, N, T) == base, name
    # sdedit without a start offset change: the same source computation as tokenflow minus conv steps.
    assert features_key("a" * 64, BASE.replace(method="sdedit", sdedit_start=1.0), N, T) == features_key(
        "a" * 64, BASE.replace(pnp_f_t=0.0), N, T
    )
    with pytest.raises(ValueError):
        features_key("a" * 64, BASE.replace(method="per-frame"), N, T)


def test_the_library_cli_keeps_features_beside_a_saved_inversion(
    small_inversion: Inversion, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenflow import cli

    saved = small_inversion.save(tmp_path / "inv")
    base = ["edit", "--from-inversion", str(saved), "--keyframe-interval", "4", "-q", "-y", "--device", "cpu"]
    reports = []
    for i, extra in enumerate([["-p", "a fox"], ["-p", "a statue"], ["-p", "a cat", "--no-features"]]):
        assert cli.main([*base, "-o", str(tmp_path / f"{i}.mp4"), *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert [r["features"] for r in reports] == ["recorded", "features", "source_branch"]
    assert [set(r["propagation_batches"]) for r in reports] == [
        {PATH_SOURCE_BRANCH},
        {PATH_FEATURES},
        {PATH_SOURCE_BRANCH},
    ]
    folder = Path(reports[0]["features_dir"])
    assert folder.parent == saved / "features" and (folder / META_FILE).is_file()
    assert Inversion.load(saved).n_frames == small_inversion.n_frames  # the saved inversion still loads


def test_features_precomputed_from_the_source_branch_alone(
    tiny_model: Model,
    inversion9: Inversion,
    tmp_path: Path,
    recorded_tokenflow,  # noqa: ANN001
) -> None:
    """Ahead of any prompt: only the source branch runs, and its features serve an edit as well."""
    from tokenflow.editing import record_source_features

    spec = CASES["tokenflow"]
    rec = recorder_for(tmp_path, 9, 4, spec)
    record_source_features(tiny_model, inversion9, spec.replace(prompt="unused"), rec)
    features = rec.finish()
    assert features is not None
    by_edit = recorded_tokenflow[3]
    assert features.meta["layers"] == by_edit.meta["layers"] and features.steps == by_edit.steps
    for step in features.steps:
        with (
            safe_open(features.paths[step_file(step)], framework="pt") as a,
            safe_open(by_edit.paths[step_file(step)], framework="pt") as b,
        ):
            assert set(a.keys()) == set(b.keys())
            for name in a.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                x, y = a.get_tensor(name), b.get_tensor(name)
                if name == CONV:
                    assert rel_l2(x, y) <= TOLERANCE, (step, name)
                else:  # a batch of n rows instead of 3n may flip a near-tie, nothing more
                    assert (x == y).float().mean() >= 0.999, (step, name)
    other = spec.replace(prompt="a marble statue")
    replayed = edit(tiny_model, inversion9, other, source_hook=replayer_for(features, 9, 4, other))
    assert rel_l2(replayed.latents, edit(tiny_model, inversion9, other).latents) <= TOLERANCE
