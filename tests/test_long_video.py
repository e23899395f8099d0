"""Long clips: hundreds of frames edit end to end with host memory that does not grow with frames x steps.

- the gpu check (benchmarks/gpu_check.py) runs end to end on CPU (`--smoke`), so it cannot rot;
- a 320-frame generated clip is inverted into one file per step, round-trips through the artifact
  store as files (read in place from the store's blobs, memory-mapped), and edits end to end; the edit
  is watched reading the inversion (the real reads, recorded): it only ever reads batches of frames,
  never a whole [N, ...] tensor, let alone [T, N, ...];
- ``window:W`` with W covering the clip equals ``all`` bit for bit, and a narrower window differs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenflow.editing import edit
from tokenflow.inversion import CLEAN_FILE, META_FILE, NOISIEST_FILE, Inversion, invert, source_file
from tokenflow.latents_io import LatentFile
from tokenflow.models import Model
from tokenflow.specs import EditSpec, InversionSpec
from tokenflow.synthetic import clip_frames

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_end_to_end_on_cpu() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=1200,  # ~40 s on 2 idle cores
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["agreement"]["ok"] is True
    cases = report["presets"]["tiny"]
    assert [(c["frames"], c["keyframe_attention"]) for c in cases] == [
        (5, "all"),
        (9, "all"),
        (9, "window:1"),
    ]
    for case in cases:
        assert case["nan_frames"] == 0 and case["finite_latents"] is True
        assert all(v is not None and v > 0 for v in case["seconds_per_step"].values()), case


LONG_FRAMES = 320
LONG_SIZE = (32, 32)  # latents 4x4: the frame count is what this test is about, not the picture


@pytest.fixture(scope="module")
def long_inversion(tiny_model: Model, tmp_path_factory: pytest.TempPathFactory) -> Inversion:
    spec = InversionSpec(steps=2, edit_steps=2, reconstruct=False, batch_size=64)
    frames = lambda: clip_frames(frames=LONG_FRAMES, size=LONG_SIZE, seed=2)  # noqa: E731
    return invert(tiny_model, frames, spec, fps=Fraction(24), directory=tmp_path_factory.mktemp("inv"))


class _ReadSpy:
    """Records the frame ranges read from inversion files (the real reads still happen)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, int]] = []
        real = LatentFile._read  # every read of rows goes through it, one call per request

        def read(f: LatentFile, runs: Any) -> torch.Tensor:
            out = real(f, runs)
            self.reads.append((f.path.name, int(out.shape[0])))
            return out

        monkeypatch.setattr(LatentFile, "_read", read)


def test_a_long_clip_edits_end_to_end_through_the_store_read_by_frame_ranges(
    tiny_model: Model, long_inversion: Inversion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.store import ArtifactStore

    inv = long_inversion
    n = inv.n_frames
    assert n == LONG_FRAMES
    # One file per editing step (plus the clean and most-noised latents), each [N, 4, h, w].
    names = sorted(inv.tensor_files())
    assert names == sorted([CLEAN_FILE, NOISIEST_FILE, source_file(0), source_file(1)])
    for name in names:
        assert LatentFile(inv.paths[name], "latents").shape() == (n, 4, 4, 4)

    store = ArtifactStore(tmp_path / "store", size_limit=1 << 30)
    key = "a" * 64
    store.put("inversion", key, inv.files(), meta={"frames": n})  # tensor files are streamed in
    art = store.get(key, kind="inversion")
    assert art is not None and sorted(art.names()) == sorted([META_FILE, *names])
    stored = Inversion.from_paths({name: art.path(name) for name in art.names()})
    assert all(stored.paths[name].is_relative_to(tmp_path / "store") for name in names)  # read in place

    spec = EditSpec(prompt="a red fox", chunk_size=32, keyframe_interval=8, seed=4)  # 40 keyframes
    spy = _ReadSpy(monkeypatch)
    with store.pin(key):
        result = edit(tiny_model, stored, spec)
    assert result.latents.shape == (n, 4, 4, 4) and torch.isfinite(result.latents).all()
    # The edit never read a whole [N, ...] file, let alone all steps: only batches of frames.
    largest = max(rows for _, rows in spy.reads)
    assert largest <= max(spec.chunk_size, n // spec.keyframe_interval, 64) < n
    per_file = {name: sum(r for f, r in spy.reads if f == stored.paths[name].name) for name in names}
    assert all(per_file[source_file(s)] >= n for s in (0, 1))  # every step's latents were used
    monkeypatch.undo()
    # The same edit from the in-memory inversion is bit-identical: the store changed nothing.
    assert torch.equal(edit(tiny_model, inv, spec).latents, result.latents)


def test_window_covering_a_long_clip_equals_all(tiny_model: Model, long_inversion: Inversion) -> None:
    spec = EditSpec(prompt="a red fox", chunk_size=64, keyframe_interval=16, seed=4)  # 20 keyframes
    full = edit(tiny_model, long_inversion, spec).latents
    covering = edit(tiny_model, long_inversion, spec.replace(keyframe_attention="window:19")).latents
    assert torch.equal(covering, full)
    narrow = edit(tiny_model, long_inversion, spec.replace(keyframe_attention="window:2"))
    assert torch.isfinite(narrow.latents).all()
    assert float((narrow.latents - full).norm() / full.norm()) > 1e-4  # a real, different approximation


def test_the_final_decode_stops_when_the_job_is_cancelled(tiny_model: Model) -> None:
    """The VAE decode of a long edit takes minutes: the job's cancellation check runs before each batch."""
    from tokenflow.encoding import iter_decoded
    from tokenflow.errors import Cancelled

    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise Cancelled("cancelled by the caller")

    latents = torch.zeros(40, 4, 4, 4)
    frames = iter_decoded(tiny_model, latents, batch_size=8, check_cancelled=check)
    decoded = []
    with pytest.raises(Cancelled):
        for frame in frames:
            decoded.append(frame)
    assert len(decoded) == 16 and calls == 3  # two batches, then nothing after the cancellation


def test_rows_are_read_at_their_offsets_exactly(tmp_path: Path) -> None:
    """Scattered frames (a clip's keyframes), slices past the end, both layouts and dtypes read back
    bit for bit; a file cut short is an error, not garbage."""
    from safetensors.torch import save_file

    from tokenflow.errors import SpecError
    from tokenflow.latents_io import write_rows

    x = torch.randn(50, 4, 3, 5)
    f = LatentFile(write_rows(tmp_path / "x.safetensors", "latents", x, batch=7), "latents")
    frames = [0, 1, 2, 9, 17, 18, 49]
    assert torch.equal(f[frames], x[frames]) and torch.equal(f[3:11], x[3:11])
    assert torch.equal(f.rows(45, 80), x[45:]) and f.rows(60, 70).shape == (0, 4, 3, 5)
    stacked = torch.randn(3, 20, 4, 2, 2).to(torch.bfloat16)  # the older [T, N, ...] layout
    save_file({"a": torch.zeros(3), "latents": stacked}, tmp_path / "old.safetensors")
    old = LatentFile(tmp_path / "old.safetensors", "latents", index=2)
    assert old.shape() == (20, 4, 2, 2) and torch.equal(old[[1, 5, 6]], stacked[2, [1, 5, 6]])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "x.safetensors").read_bytes()[:-100])
    with pytest.raises(SpecError):
        LatentFile(cut, "latents")[[49]]
