"""The fuzzers (fuzz/): the kept corpus replayed through the harnesses, and bounded atheris runs (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import fuzz_specs, fuzz_video

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"
FUZZ_SECONDS = 60


def corpus(kind: str) -> list[Path]:
    files = sorted((CORPUS / kind).iterdir())
    assert files, f"no seeds in fuzz/corpus/{kind}"
    return files


def test_corpus_is_small() -> None:
    """A handful of seeds, each under 20 KB: the corpus lives in the repository."""
    for kind in ("video", "specs"):
        files = corpus(kind)
        assert 3 <= len(files) <= 20
        assert all(f.stat().st_size < 20_000 for f in files)


@pytest.mark.parametrize("seed", corpus("video"), ids=lambda p: p.name)
def test_video_corpus_replays(seed: Path, tmp_path: Path) -> None:
    fuzz_video.check_video(seed.read_bytes(), tmp_path)


def test_video_harness_catches_what_it_must(tmp_path: Path) -> None:
    """The harness is not vacuous: a valid clip yields frames, and a wrong frame size is a finding."""
    clip = (CORPUS / "video" / "clip.mp4").read_bytes()
    fuzz_video.check_video(clip, tmp_path)
    wrong = fuzz_video.SPECS
    try:
        fuzz_video.SPECS = (fuzz_video.SPECS[0].replace(width=128, height=128),)
        with pytest.raises(AssertionError, match="128"):
            fuzz_video.check_video(clip, tmp_path)
    finally:
        fuzz_video.SPECS = wrong


@pytest.mark.parametrize("seed", corpus("specs"), ids=lambda p: p.name)
def test_specs_corpus_replays(seed: Path) -> None:
    fuzz_specs.check_specs(seed.read_bytes())


def test_specs_corpus_builds_each_class() -> None:
    built = {type(fuzz_specs.build_spec(seed.read_bytes())).__name__ for seed in corpus("specs")}
    assert built == {cls.__name__ for cls in fuzz_specs.SPEC_CLASSES}


def test_specs_harness_flags_a_non_finite_value() -> None:
    """NaN compares false with every bound: the regression seed must be refused by validation."""
    spec = fuzz_specs.build_spec((CORPUS / "specs" / "editspec-non-finite").read_bytes())
    with pytest.raises(fuzz_specs.SpecError, match="finite"):
        spec.validate()
    with pytest.raises(AssertionError, match="non-finite"):
        fuzz_specs._assert_valid(spec.replace(guidance_scale=float("nan")))


def run_fuzzer(kind: str, tmp_path: Path, *flags: str) -> None:
    """The `kind` fuzzer (fuzz.run) for FUZZ_SECONDS; new inputs go to a scratch folder, not the corpus."""
    work, artifacts, scratch = tmp_path / "work", tmp_path / "artifacts", tmp_path / "scratch"
    for folder in (work, artifacts, scratch):
        folder.mkdir()
    command = [
        sys.executable,
        "-m",
        "fuzz.run",
        kind,
        str(work),
        str(CORPUS / kind),
        f"-max_total_time={FUZZ_SECONDS}",
        "-rss_limit_mb=1024",
        "-timeout=20",
        f"-artifact_prefix={artifacts}/",
        *flags,
    ]
    env = {**os.environ, "TOKENFLOW_FUZZ_SCRATCH": str(scratch)}
    try:
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=FUZZ_SECONDS + 180
        )
    except subprocess.TimeoutExpired:
        last = scratch / "upload"
        hint = f"; the input being decoded was {last.read_bytes()[:200]!r}" if last.exists() else ""
        pytest.fail(f"the {kind} fuzzer did not finish within {FUZZ_SECONDS + 180} s (a hang){hint}")
    findings = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not findings, (findings, proc.stderr[-4000:])
    assert "Done" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_fuzz_video_bounded_run(tmp_path: Path) -> None:
    run_fuzzer("video", tmp_path, "-max_len=20000")


@pytest.mark.slow
def test_fuzz_specs_bounded_run(tmp_path: Path) -> None:
    run_fuzzer("specs", tmp_path, "-max_len=4096")
