"""Video file in, edited video file out: the glue between video I/O and the method.

Frames are streamed from the decoder into the VAE and from the VAE into the encoder, so only
latents are ever held for the whole clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from tokenflow.branches import SourceHook
from tokenflow.editing import EditResult, edit
from tokenflow.encoding import iter_decoded
from tokenflow.inversion import Inversion, invert
from tokenflow.limits import DEFAULT_LIMITS, DecodeLimits
from tokenflow.models import TEST_MODEL_NOTICE, Model
from tokenflow.progress import NO_HOOKS, JobHooks
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec
from tokenflow.video import iter_frames, probe, write_video


def invert_video(
    model: Model,
    video: str | Path,
    decode: DecodeSpec,
    spec: InversionSpec,
    hooks: JobHooks = NO_HOOKS,
    directory: str | Path | None = None,
    scratch_parent: str | Path | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Inversion:
    """Decode (streaming), encode and invert a video file.

    The inversion's files go to `directory`, or to a scratch folder under `scratch_parent` that the
    returned object owns (see `tokenflow.inversion.invert`). `limits` bound what decoding the (untrusted)
    video may cost; cancellation is checked on every decoded frame.
    """
    decode.validate()
    spec.validate()
    info = probe(video, decode, limits)  # refuses a too-long selection before any work
    inversion = invert(
        model,
        lambda: iter_frames(video, decode, limits=limits, check_cancelled=hooks.check),
        spec,
        fps=info.fps / decode.stride,
        hooks=hooks,
        directory=directory,
        scratch_parent=scratch_parent,
    )
    inversion.extra.update(
        {
            "decode": decode.to_dict(),
            "source_fps": [info.fps.numerator, info.fps.denominator],
            "audio_start": decode.start / float(info.fps) if info.fps else 0.0,
            "source_has_audio": info.has_audio,
        }
    )
    return inversion


@dataclass
class EditOutput:
    path: Path
    frames: int
    fps: Fraction
    result: EditResult


def render_edit(
    model: Model,
    inversion: Inversion,
    spec: EditSpec,
    output: str | Path,
    audio_source: str | Path | None = None,
    hooks: JobHooks = NO_HOOKS,
    source_hook: SourceHook | None = None,
) -> EditOutput:
    """Edit and write an H.264 mp4 at the source frame rate, carrying the source's audio over.

    `source_hook`: records or replays the source features (tokenflow.features), see `editing.edit`."""
    result = edit(model, inversion, spec, hooks=hooks, source_hook=source_hook)
    frames = write_video(
        output,
        iter_decoded(model, result.latents, check_cancelled=hooks.check),
        inversion.fps,
        audio_source=audio_source,
        crf=spec.crf,
        comment=output_comment(model, spec),
        audio_start=float(inversion.extra.get("audio_start", 0.0)),
    )
    return EditOutput(Path(output), frames, inversion.fps, result)


def output_comment(model: Model, spec: EditSpec | None = None) -> str:
    text = f"tokenflow-service; method={spec.method}" if spec else "tokenflow-service"
    return f"{text}; {TEST_MODEL_NOTICE}" if model.is_test_model else text
