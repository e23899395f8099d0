"""The `tokenflow` command end to end: real subprocesses of the installed script, real mp4 files via PyAV.

make-clip -> edit (cold: invert + edit) -> eval; invert --save -> two edits --from-inversion; errors exit 2
with `error:` on stderr. Sizes are tiny (64x64, 2 editing steps) so each command takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from tokenflow.cli import main
from tokenflow.inversion import Inversion
from tokenflow.models import TEST_MODEL_NOTICE
from tokenflow.specs import DecodeSpec
from tokenflow.video import count_frames, probe, read_frames

WOLF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wolf.mp4"
CLIP_FRAMES, CLIP_FPS = 12, 12


def tokenflow(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("tokenflow")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tokenflow.cli"]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ}
    )


def ok_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # stdout is exactly one JSON document (progress goes to stderr)


def comment_of(path: Path) -> str:
    with av.open(str(path)) as container:
        return str(container.metadata.get("comment", ""))


def audio_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return float(stream.duration * stream.time_base)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def clip(workdir: Path) -> Path:
    out = ok_json(
        tokenflow(
            "make-clip", workdir / "clip.mp4", "--frames", CLIP_FRAMES, "--size", "96x64", "--fps", CLIP_FPS
        )
    )
    assert out == {"output": str(workdir / "clip.mp4"), "frames": 12, "size": [96, 64], "fps": 12}
    info = probe(workdir / "clip.mp4")
    assert (info.width, info.height, info.fps, info.frame_count, info.has_audio) == (96, 64, 12, 12, True)
    return workdir / "clip.mp4"


@pytest.fixture(scope="module")
def edited(clip: Path, workdir: Path) -> tuple[Path, dict[str, Any], str]:
    """A cold edit (inversion + edit), with progress bars on stderr."""
    proc = tokenflow(
        "edit",
        clip,
        "-p",
        "a red fox running",
        "-o",
        workdir / "out.mp4",
        "--size",
        "64x64",
        "--steps",
        2,
        "--inversion-steps",
        4,
        "--keyframe-interval",
        4,
        "--reconstruct",
    )
    return workdir / "out.mp4", ok_json(proc), proc.stderr


def test_edit_keeps_frames_rate_and_audio(clip: Path, edited: tuple[Path, dict[str, Any], str]) -> None:
    out, report, stderr = edited
    assert report["frames"] == 12 and report["fps"] == 12.0 and report["method"] == "tokenflow"
    assert report["test_model"] is True and report["output"] == str(out)
    assert isinstance(report["reconstruction_psnr_db"], float) and report["reconstruction_psnr_db"] > 5
    # wall time per stage, which benchmarks/bench_long.py divides by frames x steps
    assert report["steps"] == 2 and set(report["seconds"]) == {"inversion", "keyframes", "propagation"}
    assert all(v > 0 for v in report["seconds"].values())
    info = probe(out)
    assert (info.width, info.height, info.fps, info.codec) == (64, 64, Fraction(12), "h264")
    assert count_frames(out) == count_frames(clip) == 12
    assert info.has_audio and audio_seconds(out) == pytest.approx(1.0, abs=0.05)
    # The output says plainly that it was made with the test model (and so does the CLI).
    assert TEST_MODEL_NOTICE in comment_of(out) and "method=tokenflow" in comment_of(out)
    assert "is a test model with random weights" in stderr
    assert "edit" in stderr  # progress bars went to stderr, not into the JSON on stdout


def test_invert_once_then_edit_twice(clip: Path, workdir: Path) -> None:
    saved = workdir / "inversion"
    inv = ok_json(
        tokenflow(
            "invert", clip, "--save", saved, "--size", "64x64", "--steps", 2, "--inversion-steps", 4, "-q"
        )
    )
    assert inv["frames"] == 12 and (inv["width"], inv["height"]) == (64, 64) and inv["fps"] == 12.0
    assert isinstance(inv["reconstruction_psnr_db"], float)
    assert sorted(p.name for p in saved.iterdir()) == [  # one tensor file per editing step
        "inversion.json",
        "latents_clean.safetensors",
        "noisiest.safetensors",
        "source_000.safetensors",
        "source_001.safetensors",
    ]
    loaded = Inversion.load(saved)
    assert loaded.n_frames == 12 and loaded.steps == 4 and len(loaded.edit_timesteps) == 2
    assert loaded.extra["source_path"] == str(clip.resolve())

    frames = {}
    for name, prompt in (("fox", "a red fox running"), ("statue", "a golden marble statue")):
        out = workdir / f"{name}.mp4"
        report = ok_json(
            tokenflow(
                "edit", "--from-inversion", saved, "-p", prompt, "-o", out, "--keyframe-interval", 4, "-q"
            )
        )
        assert report["frames"] == 12 and report["fps"] == 12.0
        assert report["source"] == str(clip.resolve())  # the audio source comes from the saved inversion
        assert report["reconstruction_psnr_db"] == inv["reconstruction_psnr_db"]
        assert count_frames(out) == 12 and probe(out).has_audio and probe(out).fps == 12
        frames[name], _ = read_frames(out, DecodeSpec.sized((64, 64)))
    assert frames["fox"].shape == frames["statue"].shape == (12, 64, 64, 3)
    assert not np.array_equal(frames["fox"], frames["statue"])  # the prompt mattered


def test_eval_prints_metrics(clip: Path, edited: tuple[Path, dict[str, Any], str]) -> None:
    out, _, _ = edited
    report = ok_json(tokenflow("eval", "--source", clip, "--edited", out))
    assert report["frames"] == 12 and report["fps"] == 12.0
    assert (report["width"], report["height"]) == (64, 64)
    assert math.isfinite(report["warp_error"]) and report["warp_error"] >= 0
    assert 0 <= report["warp_error_source"] < 0.01  # the source's own floor: its flow fits itself
    assert math.isfinite(report["psnr"]) and 0 < report["psnr"] < 40


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "edit",
                "{dir}/notes.txt",
                "-p",
                "a fox",
                "-o",
                "{dir}/o.mp4",
                "--size",
                "64x64",
                "--steps",
                "2",
            ],
            "is a text file, not a video",
        ),
        (["edit", "{dir}/missing.mp4", "-p", "a fox", "-o", "{dir}/o.mp4"], "no such file"),
        (
            ["invert", "{clip}", "--save", "{dir}/inv", "--steps", "30", "--inversion-steps", "50"],
            "must be a multiple of the editing steps",
        ),
        (
            ["edit", "--from-inversion", "{dir}", "-p", "a fox", "-o", "{dir}/o.mp4"],
            "holds no saved inversion",
        ),
        (
            ["edit", "{clip}", "-p", "a fox", "-o", "{dir}/o.mp4", "--model", "{dir}/no-model"],
            "neither a preset",
        ),
        (
            ["edit", "{clip}", "-p", " ", "-o", "{dir}/o.mp4", "--size", "64x64", "--steps", "2"],
            "edit.prompt must not be empty",
        ),
        (["edit", "{clip}", "-p", "a fox", "-o", "{dir}/o.mp4", "--size", "60x64"], "multiples of 8"),
        (["eval", "--source", "{clip}", "--edited", "{dir}/missing.mp4"], "no such file"),
        (["make-clip", "{dir}/c.mp4", "--size", "15x15"], "even sizes"),
        (["parity", "{dir}"], "is not a parity fixture"),
    ],
)
def test_errors_exit_2_with_a_message(
    args: list[str], message: str, clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("this is not a video\n" * 50)  # FFmpeg: a "tty" (ANSI art) file
    argv = [a.format(dir=tmp_path, clip=clip) for a in args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "o.mp4").exists()


def test_the_installed_script_exits_2(tmp_path: Path) -> None:
    proc = tokenflow("invert", tmp_path / "missing.mp4", "--save", tmp_path / "inv", "-q")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == "error: cannot read 'missing.mp4' as a video: no such file"


@pytest.mark.skipif(
    not WOLF.is_file(), reason=f"evaluation clip not present at {WOLF} (../shared is optional)"
)
def test_edit_the_wolf_clip(tmp_path: Path) -> None:
    out = tmp_path / "wolf_fox.mp4"
    report = ok_json(
        tokenflow(
            "edit",
            WOLF,
            "-p",
            "a red fox running in the snow",
            "-o",
            out,
            "--size",
            "64x64",
            "--steps",
            2,
            "--inversion-steps",
            2,
            "-q",
        )
    )
    source = probe(WOLF)
    assert report["frames"] == 40 and report["fps"] == 20.0
    info = probe(out)
    assert count_frames(out) == 40 and info.fps == source.fps == 20
    assert (info.width, info.height) == (64, 64)
    assert info.has_audio == source.has_audio
