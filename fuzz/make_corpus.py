"""Write the fuzzers' seed corpora (fuzz/corpus/video, fuzz/corpus/specs): a handful of small files.

    .venv/bin/python -m fuzz.make_corpus

The video seeds are one of each shape of fuzz.hostile_inputs plus small valid clips in several
containers, each under 20 KB; the spec seeds are inputs of fuzz.fuzz_specs' byte format that
build a valid spec of each class with many non-default fields (found by a seeded search), plus
regressions. libx264 output varies slightly on tiny frames, so regenerating may change bytes (not
behaviour); the committed files are the corpus.
"""

from __future__ import annotations

import random
from pathlib import Path

from fuzz import fuzz_specs
from fuzz import hostile_inputs as hostile
from tokenflow.errors import SpecError
from tokenflow.specs import spec_fields

CORPUS = Path(__file__).resolve().parent / "corpus"
MAX_SEED_BYTES = 20_000


def video_seeds() -> dict[str, bytes]:
    return {
        "clip.mp4": hostile.encode(4, (32, 32), fmt="mp4"),
        "clip.mkv": hostile.encode(3, (48, 32), fmt="matroska"),
        "clip.h264": hostile.encode(3, (32, 32), fmt="h264"),
        "clip.y4m": hostile.y4m(16, 16, frames=2, payload=bytes(16 * 16 * 3 // 2)),
        "switch-sps.mp4": hostile.switching_mp4(4096, 4096),
        "switch-sps.h264": hostile.switching_h264(2048, 2048),
        "huge-header.y4m": hostile.y4m(20000, 20000, frames=1, payload=bytes(64)),
        "claims-1e7-frames.mkv": hostile.claiming_frames(10**7),
        "audio-only.m4a": hostile.audio_only(0.1),
        "zero-frames.mp4": hostile.encode(0, fmt="mp4"),
    }


def _search_specs(tries: int = 60_000, seed: int = 1) -> dict[str, bytes]:
    """The shortest input that validates with the most non-default fields, per class; and one refusal
    per kind of bound (a regression seed for NaN, which once validated)."""
    rng = random.Random(seed)
    best: dict[str, tuple[int, bytes]] = {}
    refusals: dict[str, bytes] = {}
    for _ in range(tries):
        data = bytes(rng.choice([0, 0, 1, 2, 3, rng.getrandbits(8)]) for _ in range(rng.randint(1, 160)))
        spec = fuzz_specs.build_spec(data)
        cls = type(spec)
        try:
            spec.validate()
        except SpecError as exc:
            if "finite" in str(exc) and "nan" in str(exc) and "non-finite" not in refusals:
                refusals["non-finite"] = data
            continue
        changed = sum(1 for f in spec_fields(cls) if getattr(spec, f.name) != f.default)
        name = cls.__name__.lower()
        if name not in best or (changed, -len(data)) > (best[name][0], -len(best[name][1])):
            best[name] = (changed, data)
    seeds = {f"{name}-valid": data for name, (_, data) in best.items()}
    seeds.update({f"editspec-{kind}": data for kind, data in refusals.items()})
    seeds["defaults"] = b""
    return seeds


def main() -> None:
    for kind, seeds in (("video", video_seeds()), ("specs", _search_specs())):
        folder = CORPUS / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            assert len(data) < MAX_SEED_BYTES, (name, len(data))
            (folder / name).write_bytes(data)
            print(f"{folder.name}/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
