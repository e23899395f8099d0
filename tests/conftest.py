"""Shared fixtures for the method tests: one tiny model, one small generated clip, one small inversion.

Everything here is session-scoped and cheap (a few seconds in all): the tiny preset is a seeded,
randomly initialised model with Stable Diffusion's block layout, so its mechanics are real even
though its pictures are noise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tokenflow.inversion import Inversion, frames_from_array, invert
from tokenflow.models import Model, load_model
from tokenflow.specs import DecodeSpec, InversionSpec
from tokenflow.synthetic import make_clip
from tokenflow.video import read_frames

# ../shared next to the repository: the parity fixture and evaluation clips. Optional.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY_FIXTURE = SHARED / "parity" / "wolf16"
WOLF = SHARED / "data" / "wolf.mp4"

CLIP_FRAMES = 10
CLIP_SIZE = (64, 64)  # (W, H)
CLIP_FPS = 10


@pytest.fixture(scope="session")
def tiny_model() -> Model:
    """The 'tiny' preset on CPU in float32 (about 3 s to build). Tests must not modify it in place."""
    return load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 10-frame 64x64 H.264 clip at 10 fps with an AAC tone."""
    return make_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4",
        frames=CLIP_FRAMES,
        size=CLIP_SIZE,
        fps=CLIP_FPS,
        audio=True,
    )


@pytest.fixture(scope="session")
def clip_array(clip_path: Path) -> np.ndarray:
    """The clip's decoded frames, uint8 [10, 64, 64, 3]."""
    frames, _ = read_frames(clip_path, DecodeSpec.sized(CLIP_SIZE))
    return frames


@pytest.fixture(scope="session")
def small_inversion(tiny_model: Model, clip_array: np.ndarray) -> Inversion:
    """The clip inverted with 4 DDIM steps, keeping 2 editing timesteps (no reconstruction pass)."""
    spec = InversionSpec(prompt="a dog running", steps=4, edit_steps=2, reconstruct=False)
    return invert(tiny_model, frames_from_array(clip_array), spec, fps=Fraction(CLIP_FPS))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1: yields its endpoint URL.

    For the whole session the AWS variables point at dummy credentials and no config files, so the
    standard credential chain -- which the S3 tier and any server subprocess use unchanged -- finds them
    and never a developer's real account. Each test creates its own bucket.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in failure reports
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(_S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
