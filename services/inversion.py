"""The Inversion stage: decode an uploaded video and DDIM-invert it, once per clip and settings.

Besides the servicer, this module owns the inversion artifact: its key, its files (the library's
``inversion.safetensors`` + ``inversion.json``) and its metadata. The metadata records the recipe
(video digest, decode and inversion specs) so that an edit stage which finds a stored inversion corrupt
can rebuild it under the same key instead of serving bad data or failing (`load_inversion`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.convert import check_digest, decode_spec_from_proto, inversion_spec_from_proto, spec_from_proto
from services.features import DEFAULT_FEATURES_BUDGET, FEATURES_KIND, publish_features
from services.jobs import JobContext
from services.metrics import Metrics
from services.model_host import ModelHost
from services.progress import JobProgress
from services.results import common_warnings, finite_or_none, model_meta
from services.servicer import JobOutput, Plan, StageServicer, already_stored
from services.store import (
    Artifact,
    ArtifactNotFound,
    ArtifactStore,
    CorruptArtifact,
    Manifest,
    WrongArtifactKind,
)
from tokenflow import keys
from tokenflow.editing import record_source_features
from tokenflow.errors import SpecError, VideoError
from tokenflow.features import FeaturesRecorder
from tokenflow.inversion import Inversion
from tokenflow.keys import inversion_key
from tokenflow.limits import DEFAULT_LIMITS, DecodeLimits
from tokenflow.methods import method
from tokenflow.models import Model
from tokenflow.pipeline import invert_video
from tokenflow.schedule import check_inversion_steps
from tokenflow.shards import merge_inversions
from tokenflow.specs import DecodeSpec, EditSpec, InversionSpec
from tokenflow.video import probe
from tokenflow_pb.v1 import common_pb2, inversion_pb2, inversion_pb2_grpc

log = logging.getLogger(__name__)

KIND = "inversion"
SERVICE_NAME = inversion_pb2.DESCRIPTOR.services_by_name["Inversion"].full_name


@dataclass(frozen=True)
class InversionRecipe:
    """Everything that determines an inversion except the model: enough to rebuild it."""

    video_digest: str
    decode: DecodeSpec
    spec: InversionSpec

    def key(self, fingerprint: str) -> str:
        return inversion_key(self.video_digest, self.decode, self.spec, fingerprint)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> InversionRecipe:
        """The recipe kept in an inversion's metadata; KeyError, TypeError or ValueError if unreadable."""
        return cls(
            str(meta["video_digest"]), DecodeSpec(**meta["decode"]), InversionSpec(**meta["inversion"])
        )


def video_path(video: Artifact) -> Path:
    """Verified path of an uploaded video's source file (`source.mp4` or `source.bin`), for the decoder."""
    name = video.manifest.primary or video.names()[0]
    return video.path(name)


def _missing_video(digest: str) -> ArtifactNotFound:
    return ArtifactNotFound(
        f"no uploaded video {digest} on this server: upload it with Artifacts.Upload first "
        "(it may also have been evicted from the cache: upload it again)"
    )


def compute_inversion(
    store: ArtifactStore,
    host: ModelHost,
    metrics: Metrics,
    recipe: InversionRecipe,
    key: str,
    progress: JobProgress,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[Manifest, Inversion]:
    """Decode, invert and publish under `key`. Used by this stage and by edit stages rebuilding one.

    The inversion's files are written to the store's scratch (swept if this process dies).
    """
    with store.pin(recipe.video_digest):
        video = store.get(recipe.video_digest, kind="video")
        if video is None:
            raise _missing_video(recipe.video_digest)
        path = video_path(video)
        with host.use(progress.check_cancelled, progress.waiting) as model:
            progress.start()
            try:
                inversion = invert_video(
                    model,
                    path,
                    recipe.decode,
                    recipe.spec,
                    progress.hooks(),
                    scratch_parent=store.tmp_dir,
                    limits=limits,
                )
            except VideoError as exc:
                raise _readable(exc, recipe.video_digest, path) from exc
        meta = {
            **model_meta(host),
            "video_digest": recipe.video_digest,
            "decode": recipe.decode.to_dict(),
            "inversion": recipe.spec.to_dict(),
            "frames": inversion.n_frames,
            "fps": [inversion.fps.numerator, inversion.fps.denominator],
            "width": inversion.width,
            "height": inversion.height,
            "reconstruction_psnr": finite_or_none(inversion.reconstruction_psnr),
            "steps": recipe.spec.steps,
            "edit_steps": recipe.spec.edit_steps,
            "source_has_audio": bool(inversion.extra.get("source_has_audio", False)),
        }
        manifest = store.put(KIND, key, inversion.files(), meta=meta)  # tensor files streamed
    metrics.inversions_total.inc()
    log.info("inversion %s: %d frames, psnr %s", key[:12], inversion.n_frames, inversion.reconstruction_psnr)
    return manifest, inversion


def check_timesteps(model: Model, spec: InversionSpec) -> None:
    """Refuse up front (before a queue slot is taken) step counts the model's schedule cannot line up."""
    try:
        check_inversion_steps(model, spec.steps, spec.edit_steps)
    except SpecError as e:
        if e.field is not None:
            raise
        raise SpecError(str(e), field="inversion.steps") from None


def _readable(exc: VideoError, digest: str, path: Path) -> VideoError:
    """The decoder names the cache's internal blob file; name the uploaded video instead."""
    return VideoError(str(exc).replace(repr(path.name), f"uploaded video {digest[:16]}"))


def inversion_weights(spec: InversionSpec) -> dict[str, float]:
    """Share of each library phase in an inversion job (for the ETA)."""
    if spec.reconstruct:
        return {"encode": 0.05, "invert": 0.45, "reconstruct": 0.5}
    return {"encode": 0.1, "invert": 0.9}


def _missing_inversion(digest: str) -> ArtifactNotFound:
    return ArtifactNotFound(
        f"no inversion {digest} on this server: run Inversion.Invert first "
        "(it may also have been evicted from the cache: invert again, it gets the same digest)"
    )


def find_inversion(store: ArtifactStore, digest: str) -> Artifact:
    """The stored inversion named by a request (NOT_FOUND / INVALID_ARGUMENT with what to do)."""
    art = store.get(digest, kind=KIND)
    if art is None:
        raise _missing_inversion(digest)
    return art


def inversion_meta(store: ArtifactStore, digest: str) -> dict[str, Any]:
    """The metadata of a stored inversion, from its manifest alone: what planning an edit needs.

    No file is read or fetched from a shared tier here (the job does that when it loads the tensors).
    """
    manifest = store.stat(digest)
    if manifest is None:
        raise _missing_inversion(digest)
    if manifest.kind != KIND:
        raise WrongArtifactKind(f"digest {digest} names a {manifest.kind!r} artifact, not a {KIND!r} one")
    return dict(manifest.meta)


def load_inversion(
    store: ArtifactStore,
    host: ModelHost,
    metrics: Metrics,
    digest: str,
    meta: dict[str, Any],
    progress: JobProgress,
) -> Inversion:
    """Read a stored inversion (verified); if it is gone or corrupt, rebuild it from its recipe.

    The caller pins `digest`. `meta` is the artifact's metadata as seen when the request arrived.
    """
    art = store.get(digest, kind=KIND)
    if art is not None:
        try:
            # Verified paths, memory-mapped by the editor: the tensors are never read whole.
            return Inversion.from_paths({name: art.path(name) for name in art.names()})
        except CorruptArtifact as e:
            log.warning("inversion %s is corrupt (%s): rebuilding it", digest[:12], e)
    try:
        recipe = InversionRecipe.from_meta(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactNotFound(f"inversion {digest} is gone and cannot be rebuilt ({e}): invert again") from e
    if recipe.key(host.fingerprint) != digest:
        raise ArtifactNotFound(f"inversion {digest} is gone and was made differently: invert the video again")
    progress.note("rebuild", "the stored inversion was lost or corrupt: inverting the video again")
    rebuild = progress.child(inversion_weights(recipe.spec))
    _, inversion = compute_inversion(store, host, metrics, recipe, digest, rebuild)
    return inversion


def load_inversion_files(store: ArtifactStore, digest: str) -> Inversion:
    """A stored inversion over its verified files (the caller pins it); NOT_FOUND if it is gone."""
    art = find_inversion(store, digest)
    return Inversion.from_paths({name: art.path(name) for name in art.names()})


class InversionServicer(StageServicer, inversion_pb2_grpc.InversionServicer):
    """tokenflow.v1.Inversion: Invert (streamed job) and Cancel."""

    stage = "inversion"
    kind = KIND
    service_name = SERVICE_NAME
    response_type = inversion_pb2.InvertResponse
    cancel_response_type = inversion_pb2.InversionCancelResponse
    features_budget: int = DEFAULT_FEATURES_BUDGET
    """Set by the server from --features-budget (0 = off): bounds InvertRequest.features_for."""

    def Invert(  # noqa: N802 - gRPC method name
        self, request: inversion_pb2.InvertRequest, context: grpc.ServicerContext
    ) -> Iterator[inversion_pb2.InvertResponse]:
        return self.stream("Invert", context, lambda: self._plan(request))

    def Cancel(  # noqa: N802 - gRPC method name
        self, request: inversion_pb2.InversionCancelRequest, context: grpc.ServicerContext
    ) -> inversion_pb2.InversionCancelResponse:
        return self.cancel(request, context)

    def _plan(self, request: inversion_pb2.InvertRequest) -> Plan:
        check_digest(request.video_digest, "video_digest", "upload the video with Artifacts.Upload first")
        recipe = InversionRecipe(
            request.video_digest,
            decode_spec_from_proto(request.decode),
            inversion_spec_from_proto(request.inversion),
        )
        self.request_limits.check_inversion(recipe.spec)
        key = recipe.key(self.model_host.fingerprint)
        check_timesteps(self.model_host.get(), recipe.spec)
        plan = self._plan_inversion(request, recipe, key)
        if not request.HasField("features_for"):
            return plan
        if request.stored_only:
            raise SpecError("features_for cannot be combined with stored_only", field="features_for")
        spec = spec_from_proto(EditSpec, request.features_for, "features_for")
        # The prompt never reaches the source branch: any placeholder lets an empty one validate.
        spec = spec.replace(prompt=spec.prompt or "source features").validate()
        self.request_limits.check_edit(spec, "features_for")
        # A job of its own (the stored inversion alone is not its result), shared by identical requests.
        job_key = keys.artifact_key("inversion+features", {"inversion": key, "features_for": spec.to_dict()})

        def precheck() -> None:
            if not self.store.contains(key):
                plan.precheck()

        return Plan(job_key, precheck, lambda ctx: self._precompute(ctx, plan.run(ctx), spec))

    def _plan_inversion(
        self, request: inversion_pb2.InvertRequest, recipe: InversionRecipe, key: str
    ) -> Plan:
        if request.shard_digests:
            shards = list(request.shard_digests)
            for i, digest in enumerate(shards):
                check_digest(digest, f"shard_digests[{i}]", "give the digests of the shards' Invert results")
            return Plan(
                key, lambda: self._find_shards(shards), lambda ctx: self._merge(ctx, recipe, key, shards)
            )
        if request.stored_only:

            def not_stored() -> None:
                raise _missing_inversion(key)

            return Plan(key, not_stored, lambda ctx: self._run(ctx, recipe, key))
        return Plan(key, lambda: self._precheck(recipe), lambda ctx: self._run(ctx, recipe, key))

    def _precheck(self, recipe: InversionRecipe) -> None:
        """Fail fast, before a queue slot is taken: the video exists and the decoder can read it."""
        with self.store.pin(recipe.video_digest):
            video = self.store.get(recipe.video_digest, kind="video")
            if video is None:
                raise _missing_video(recipe.video_digest)
            path = video_path(video)
            try:
                # VideoError (not a video) or TooLargeError (a decode limit: frame size, frame count)
                probe(path, recipe.decode, self.decode_limits)
            except VideoError as exc:
                raise _readable(exc, recipe.video_digest, path) from exc

    def _run(self, ctx: JobContext, recipe: InversionRecipe, key: str) -> JobOutput:
        stored = already_stored(self.store, key, KIND)
        if stored is not None:
            return stored
        progress = JobProgress(ctx, self.stage, self.metrics, inversion_weights(recipe.spec))
        manifest, _ = compute_inversion(
            self.store, self.model_host, self.metrics, recipe, key, progress, limits=self.decode_limits
        )
        return JobOutput(manifest, computed=True)

    # -- precomputed source features (InvertRequest.features_for) ------------------------------------------

    def _precompute(self, ctx: JobContext, out: JobOutput, spec: EditSpec) -> JobOutput:
        """After the inversion exists: record and publish the source features of `spec` unless stored.

        The result stays the inversion; what was done with the features rides in an in-memory copy of
        its metadata (`result` reads it), never in the stored inversion.
        """
        if not method(spec.method).keyframes:
            found, note = None, f"features_for: method {spec.method!r} has no propagation pass, no features"
        elif self.features_budget <= 0:
            found, note = None, "features_for: source features are off on this server (--features-budget 0)"
        else:
            found, note = self._record_features(ctx, out.manifest, spec)
        meta = {**out.manifest.meta, "features": found or {}}
        if note:
            meta["warnings"] = [*meta.get("warnings", []), note]
        computed = out.computed or bool(found and found.get("precomputed"))
        return JobOutput(dataclasses.replace(out.manifest, meta=meta), computed=computed)

    def _record_features(
        self, ctx: JobContext, manifest: Manifest, spec: EditSpec
    ) -> tuple[dict[str, Any] | None, str | None]:
        """({digest, bytes, precomputed} or None, a warning or None) for the features of `spec`."""
        digest = manifest.key
        progress = JobProgress(ctx, self.stage, self.metrics, {"edit": 1.0})
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.store.pin(digest))
            inversion = load_inversion(
                self.store, self.model_host, self.metrics, digest, dict(manifest.meta), progress
            )
            n, steps = inversion.n_frames, len(inversion.edit_timesteps)
            key = keys.features_key(digest, spec, n, steps)  # exactly the key an edit looks up
            stack.enter_context(self.store.pin(key))
            stored = self.store.stat(key)
            if stored is not None and stored.kind == FEATURES_KIND:
                nbytes = int(stored.meta.get("bytes", 0))
                self._report_features(
                    ctx, f"the source features are already stored ({nbytes:,} bytes)", nbytes
                )
                return {"digest": key, "bytes": nbytes, "precomputed": False}, None
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self.store.tmp_dir)))
            recorder = FeaturesRecorder(
                scratch / "features",
                n,
                *keys.features_steps(spec, steps),
                budget=self.features_budget,
                meta={"key": key},
            )
            self._report_features(ctx, "precomputing the source features (the source branch only)", 0)
            with self.model_host.use(progress.check_cancelled, progress.waiting) as model:
                progress.start()
                record_source_features(model, inversion, spec, recorder, progress.hooks())
            features = recorder.finish()
            if features is None:
                self.metrics.features_total.labels(outcome="over_budget").inc()
                return None, f"features_for: {recorder.refused}"
            publish_features(self.store, self.model_host, key, digest, features)
        self.metrics.features_total.labels(outcome="precomputed").inc()
        self.metrics.features_bytes_total.labels(action="precomputed").inc(features.nbytes)
        note = f"precomputed the source features ({features.nbytes:,} bytes) for later prompts"
        self._report_features(ctx, note, features.nbytes)
        return {"digest": key, "bytes": features.nbytes, "precomputed": True}, None

    def _report_features(self, ctx: JobContext, message: str, nbytes: int) -> None:
        ctx.report({"stage": self.stage, "phase": "running", "message": message, "features_bytes": nbytes})

    # -- sharded inversion ---------------------------------------------------------------------------------

    def _find_shards(self, shards: list[str]) -> list[Manifest]:
        """The shards' manifests (NOT_FOUND for a missing one), before a queue slot is taken."""
        manifests = []
        for digest in shards:
            manifest = self.store.stat(digest)
            if manifest is None or manifest.kind != KIND:
                raise _missing_inversion(digest)
            manifests.append(manifest)
        return manifests

    def _check_shards(self, recipe: InversionRecipe, manifests: list[Manifest]) -> None:
        """The shards are this request's frames, in order, inverted the same way with this model."""
        full, offset = recipe.decode, 0
        for i, manifest in enumerate(manifests):
            try:
                part = InversionRecipe.from_meta(dict(manifest.meta))
            except (KeyError, TypeError, ValueError):
                raise SpecError(
                    f"shard_digests[{i}] is not a shard of this inversion", field="shard_digests"
                ) from None
            frames = int(manifest.meta["frames"])
            last = i == len(manifests) - 1
            expected = full.replace(
                start=full.start + offset * full.stride,
                max_frames=frames if not last or full.max_frames is not None else None,
            )
            if (
                part.video_digest != recipe.video_digest
                or part.spec != recipe.spec
                or part.decode != expected
                or part.key(self.model_host.fingerprint) != manifest.key
            ):
                raise SpecError(
                    f"shard_digests[{i}] is not frames {offset}.. of this request's video, decode and "
                    "inversion settings on this model: shards must be consecutive ranges, in order",
                    field="shard_digests",
                )
            offset += frames
        if full.max_frames is not None and offset != full.max_frames:
            raise SpecError(
                f"the shards hold {offset} frames, the request {full.max_frames}", field="shard_digests"
            )

    def _merge(self, ctx: JobContext, recipe: InversionRecipe, key: str, shards: list[str]) -> JobOutput:
        stored = already_stored(self.store, key, KIND)
        if stored is not None:
            return stored
        manifests = self._find_shards(shards)
        self._check_shards(recipe, manifests)
        ctx.report({"stage": self.stage, "phase": "publish", "message": f"merging {len(shards)} shards"})
        with contextlib.ExitStack() as stack:
            for digest in shards:
                stack.enter_context(self.store.pin(digest))
            parts = [load_inversion_files(self.store, digest) for digest in shards]
            ctx.check_cancelled()
            first = parts[0]
            source_fps = first.extra.get("source_fps", [first.fps.numerator, first.fps.denominator])
            extra = {
                **first.extra,
                "decode": recipe.decode.to_dict(),
                "audio_start": recipe.decode.start * source_fps[1] / source_fps[0],
            }
            scratch = stack.enter_context(
                tempfile.TemporaryDirectory(dir=self.store.tmp_dir, prefix="merge-")
            )
            merged = merge_inversions(parts, scratch, extra)
            meta = {
                **manifests[0].meta,
                "decode": recipe.decode.to_dict(),
                "frames": merged.n_frames,
                "reconstruction_psnr": finite_or_none(merged.reconstruction_psnr),
                "shards": shards,
            }
            manifest = self.store.put(KIND, key, merged.files(), meta=meta)
        log.info("inversion %s: merged from %d shards, %d frames", key[:12], len(shards), merged.n_frames)
        return JobOutput(manifest, computed=True)

    def result(self, manifest: Manifest, cache_hit: bool) -> common_pb2.Result:
        meta = manifest.meta
        fps = meta["fps"]
        info = common_pb2.InversionInfo(
            frames=int(meta["frames"]),
            fps=fps[0] / fps[1],
            width=int(meta["width"]),
            height=int(meta["height"]),
            steps=int(meta["steps"]),
            edit_steps=int(meta["edit_steps"]),
            video_digest=str(meta["video_digest"]),
            features_digest=str((meta.get("features") or {}).get("digest", "")),
            features_bytes=int((meta.get("features") or {}).get("bytes", 0)),
        )
        if meta.get("reconstruction_psnr") is not None:
            info.reconstruction_psnr_db = float(meta["reconstruction_psnr"])
        warnings = common_warnings(meta, "reconstruction_psnr") + [str(w) for w in meta.get("warnings") or []]
        result = self.base_result(manifest, cache_hit, warnings)
        result.inversion.CopyFrom(info)
        return result


def add_to_server(server: grpc.Server, servicer: InversionServicer) -> None:
    inversion_pb2_grpc.add_InversionServicer_to_server(servicer, server)
