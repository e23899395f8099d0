"""Model presets and loading.

A `Model` bundles the four Stable Diffusion parts plus a DDIM scheduler config and a stable
fingerprint. Presets:

- a local diffusers folder (SD 1.5 / 2.x layout) — what real users run;
- ``tiny``: seeded random weights with SD's block layout at tiny widths and its own small
  tokenizer, built in-process in about a second — tests and the no-download default;
- ``sd15-arch`` / ``sd21-arch``: full-size architectures with random weights, for honest
  speed and memory benchmarks of the real compute.

No weights are ever downloaded: loading uses ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenflow.errors import ModelError

PRESETS = ("tiny", "sd15-arch", "sd21-arch")
TEST_MODEL_NOTICE = "made with the 'tiny' test model: random weights, the pictures are noise"

_fingerprint_cache: dict[tuple[str, int, float], str] = {}
_fingerprint_lock = threading.Lock()


@dataclass
class Model:
    """The parts TokenFlow needs, on one device and dtype."""

    name: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    is_test_model: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "prediction_type": self.prediction_type,
            "test_model": self.is_test_model,
        }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on GPU, fp32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(table))}")
    return table[dtype]


def quiet_libraries() -> None:
    """Keep diffusers/transformers from printing advice meant for notebooks into our logs."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()


def load_model(
    name_or_path: str = "tiny",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
) -> Model:
    """Load a preset or a local diffusers Stable Diffusion folder."""
    dev = torch.device(device) if device else default_device()
    dt = resolve_dtype(dtype, dev)
    quiet_libraries()
    if name_or_path in PRESETS:
        parts = _build_preset(name_or_path, seed)
        fingerprint = _preset_fingerprint(name_or_path, seed, parts)
        model = Model(name_or_path, *parts, fingerprint=fingerprint, device=dev, dtype=dt, is_test_model=True)
    else:
        model = _load_folder(Path(name_or_path), dev, dt)
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(device=dev)
        if dt != torch.float32:
            module.to(dtype=dt)
        module.eval()
        module.requires_grad_(False)
    return model


# ---------------------------------------------------------------- local folder


def _load_folder(path: Path, device: torch.device, dtype: torch.dtype) -> Model:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not path.is_dir():
        raise ModelError(
            f"model {str(path)!r} is neither a preset ({', '.join(PRESETS)}) nor a local diffusers folder"
        )
    missing = [
        p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()
    ]
    if missing:
        raise ModelError(
            f"model folder {path} lacks {', '.join(missing)}: expected a Stable Diffusion layout"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", local_files_only=True, low_cpu_mem_usage=False
        )
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        with open(path / "scheduler" / "scheduler_config.json", encoding="utf-8") as f:
            scheduler_config = json.load(f)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot load the model at {path}: {exc}") from exc
    return Model(
        name=str(path),
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        fingerprint=folder_fingerprint(path),
        device=device,
        dtype=dtype,
        is_test_model=False,
    )


def folder_fingerprint(path: Path) -> str:
    """sha256 over every config and the hashes of every weight file; memoised per path+mtime."""
    path = path.resolve()
    stamp = max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)
    key = (str(path), len(list(path.rglob("*"))), stamp)
    with _fingerprint_lock:
        if key in _fingerprint_cache:
            return _fingerprint_cache[key]
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        rel = p.relative_to(path).as_posix()
        if p.suffix not in (".json", ".txt", ".safetensors", ".bin", ".model"):
            continue
        h.update(rel.encode())
        h.update(_file_sha256(p).encode())
    digest = h.hexdigest()
    with _fingerprint_lock:
        _fingerprint_cache[key] = digest
    return digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- presets

_SCHEDULER_SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

_TINY_CORPUS = """
a photo of the wolf running in snow forest red fox marble sculpture woman man dog cat car street
painting oil watercolor van gogh style cartoon anime render shiny silver robotic golden statue
walking jumping dancing city night day sunset beach ocean river mountain tree flower bird horse
ugly blurry low res unrealistic unaesthetic high quality detailed colorful black white dark bright
"""


def _build_preset(name: str, seed: int) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name == "tiny":
        unet_cfg: dict[str, Any] = dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64, 64, 64),
            norm_num_groups=8,
            attention_head_dim=8,
            cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae_cfg: dict[str, Any] = dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 64, 64),
            norm_num_groups=8,
            sample_size=256,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_cfg = dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
        )
        scheduler = dict(_SCHEDULER_SD15)
    elif name in ("sd15-arch", "sd21-arch"):
        sd21 = name == "sd21-arch"
        unet_cfg = dict(
            sample_size=96 if sd21 else 64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=1024 if sd21 else 768,
            attention_head_dim=(5, 10, 20, 20) if sd21 else 8,
            use_linear_projection=sd21,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae_cfg = dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            sample_size=768 if sd21 else 512,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_cfg = dict(
            hidden_size=1024 if sd21 else 768,
            intermediate_size=4096 if sd21 else 3072,
            num_hidden_layers=23 if sd21 else 12,
            num_attention_heads=16 if sd21 else 12,
            max_position_embeddings=77,
            hidden_act="gelu" if sd21 else "quick_gelu",
            projection_dim=512 if sd21 else 768,
        )
        scheduler = dict(_SCHEDULER_SD15, prediction_type="v_prediction" if sd21 else "epsilon")
    else:  # pragma: no cover - guarded by PRESETS
        raise ModelError(f"unknown preset {name!r}")

    tokenizer = build_tiny_tokenizer()
    vocab_size = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **text_cfg,
            )
        )
    return unet, vae, text_encoder, tokenizer, scheduler


def _preset_fingerprint(name: str, seed: int, parts: tuple[Any, ...]) -> str:
    unet, vae, text_encoder, _, scheduler = parts
    h = hashlib.sha256(
        json.dumps({"preset": name, "seed": seed, "scheduler": scheduler}, sort_keys=True).encode()
    )
    if name == "tiny":  # cheap enough to hash the actual weights: catches a torch RNG change
        for module in (unet, vae, text_encoder):
            for k, v in sorted(module.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(torch.__version__.encode())
    return h.hexdigest()


def build_tiny_tokenizer() -> Any:
    """A CLIP-format BPE tokenizer with byte vocabulary and ~300 merges learnt from a fixed corpus."""
    import tempfile

    from transformers import CLIPTokenizer

    byte_chars = _bytes_to_unicode()
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    words = [w.strip() for w in _TINY_CORPUS.split() if w.strip()]
    merges = _learn_merges(words, 300)
    vocab_tokens += ["".join(m) for m in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_tokens:
        vocab.setdefault(tok, len(vocab))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "tokenizer_class": "CLIPTokenizer",
                    "model_max_length": 77,
                    "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                },
                f,
            )
        return CLIPTokenizer.from_pretrained(d, local_files_only=True)


def _bytes_to_unicode() -> list[str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            pairs.update(zip(s, s[1:], strict=False))
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_seqs = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new_seqs.append(out)
        seqs = new_seqs
    return merges
