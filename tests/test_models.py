"""Model presets and local folders: fingerprints, errors, the parity fixture's model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tokenflow.encoding import encode_prompt
from tokenflow.errors import ModelError
from tokenflow.models import TEST_MODEL_NOTICE, Model, folder_fingerprint, load_model
from tokenflow.pipeline import output_comment
from tokenflow.specs import EditSpec

FIXTURE_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "wolf16" / "model"
needs_fixture = pytest.mark.skipif(
    not FIXTURE_MODEL.is_dir(),
    reason=f"parity fixture model not present at {FIXTURE_MODEL} (../shared is optional)",
)
HEX64 = re.compile(r"[0-9a-f]{64}")


def _unet_out(model: Model, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.unet(
            x, 400, encoder_hidden_states=encode_prompt(model, "a dog").expand(2, -1, -1)
        ).sample


def test_tiny_fingerprint_is_stable_and_seed_dependent(tiny_model: Model) -> None:
    again = load_model("tiny", device="cpu", dtype="float32")
    other = load_model("tiny", device="cpu", dtype="float32", seed=1)
    assert HEX64.fullmatch(tiny_model.fingerprint)
    assert again.fingerprint == tiny_model.fingerprint
    assert other.fingerprint != tiny_model.fingerprint
    # The fingerprint follows the weights: same seed, same outputs; another seed, other outputs.
    assert torch.equal(_unet_out(again), _unet_out(tiny_model))
    assert float((_unet_out(other) - _unet_out(tiny_model)).abs().max()) > 1e-2


def test_tiny_preset_is_a_labelled_test_model_with_sd_layout(tiny_model: Model) -> None:
    assert tiny_model.is_test_model and tiny_model.describe()["test_model"] is True
    assert tiny_model.describe()["dtype"] == "float32" and tiny_model.prediction_type == "epsilon"
    assert "test model" in TEST_MODEL_NOTICE and "noise" in TEST_MODEL_NOTICE
    assert TEST_MODEL_NOTICE in output_comment(tiny_model, EditSpec(prompt="a fox"))
    cfg = tiny_model.unet.config
    assert tuple(cfg.block_out_channels) == (32, 64, 64, 64) and cfg.layers_per_block == 2
    assert tuple(cfg.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(cfg.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert tiny_model.vae_scale == 8
    assert encode_prompt(tiny_model, "a red fox running in the snow").shape == (1, 77, 32)
    # The tokenizer learnt the corpus' words: a known word is one token, not a spelling.
    assert len(tiny_model.tokenizer("wolf").input_ids) == 3  # <start> wolf </end>


def test_missing_or_broken_model_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a preset .* nor a local diffusers folder"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ModelError, match="lacks vae, text_encoder, tokenizer, scheduler"):
        load_model(str(tmp_path / "partial"), device="cpu")
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "partial" / sub).mkdir()
    with pytest.raises(ModelError, match="cannot load the model at"):
        load_model(str(tmp_path / "partial"), device="cpu")
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        load_model("tiny", device="cpu", dtype="float8")


def test_a_saved_tiny_model_loads_as_a_folder(tiny_model: Model, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-sd"
    tiny_model.unet.save_pretrained(folder / "unet")
    tiny_model.vae.save_pretrained(folder / "vae")
    tiny_model.text_encoder.save_pretrained(folder / "text_encoder")
    tiny_model.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny_model.scheduler_config))
    model = load_model(str(folder), device="cpu", dtype="float32")
    assert not model.is_test_model and model.fingerprint == folder_fingerprint(folder)
    assert HEX64.fullmatch(model.fingerprint) and model.fingerprint != tiny_model.fingerprint
    # The same weights bit for bit; the same outputs only within float noise: weights read from the files
    # sit at other addresses, and with one thread oneDNN picks its convolution kernels by alignment (6e-7
    # apart, seen on 1 CPU; cloning the loaded weights gives equal bits).
    loaded, saved = model.unet.state_dict(), tiny_model.unet.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    torch.testing.assert_close(_unet_out(model), _unet_out(tiny_model), rtol=1e-5, atol=1e-6)
    assert torch.equal(encode_prompt(model, "a wolf"), encode_prompt(tiny_model, "a wolf"))
    # The folder fingerprint covers configs too, and is recomputed when a file changes.
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**tiny_model.scheduler_config, "prediction_type": "v_prediction"}))
    changed = folder_fingerprint(folder)
    assert changed != model.fingerprint
    assert load_model(str(folder), device="cpu").prediction_type == "v_prediction"


@needs_fixture
def test_the_parity_fixture_model_loads(tmp_path: Path) -> None:
    model = load_model(str(FIXTURE_MODEL), device="cpu", dtype="float32")
    assert not model.is_test_model and model.prediction_type == "epsilon"
    assert HEX64.fullmatch(model.fingerprint)
    assert tuple(model.unet.config.block_out_channels) == (32, 64, 64, 64)
    assert model.unet.config.layers_per_block == 2 and model.text_encoder.config.hidden_size == 32
    assert encode_prompt(model, "a red fox running in the snow").shape == (1, 77, 32)
    # Content-addressed: a copy elsewhere has the same fingerprint; a second load is memoised and equal.
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE_MODEL, copy)
    assert folder_fingerprint(copy) == model.fingerprint == folder_fingerprint(FIXTURE_MODEL)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert folder_fingerprint(copy) != model.fingerprint
