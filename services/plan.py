"""The edit plan: what Keyframes.EditKeyframes and Propagation.Propagate do with a request before any job.

A request goes one way: the servicer converts the proto spec (services.convert), this module finds the
inversion it names and checks the edit against it (NOT_FOUND / INVALID_ARGUMENT before a queue slot is
taken), and computes the result's content key (tokenflow.keys) -- which needs the inversion's frame and
step counts, because the key holds step counts and the keyframe schedule actually used, not the
fractions and seed that produced them. The job itself later loads (or rebuilds) the inversion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.convert import check_digest, edit_spec_from_proto
from services.inversion import inversion_meta, load_inversion
from services.jobs import JobContext
from services.metrics import Metrics
from services.model_host import ModelHost
from services.progress import JobProgress
from services.request_limits import RequestLimits
from services.servicer import JobOutput, Plan
from services.store import ArtifactStore
from tokenflow import keys
from tokenflow.errors import SpecError
from tokenflow.inversion import Inversion
from tokenflow.methods import METHODS, method
from tokenflow.schedule import validate_schedule
from tokenflow.specs import EditSpec
from tokenflow_pb.v1 import common_pb2

_INVERSION_HINT = "pass Result.digest of Inversion.Invert"


class EditStage(Protocol):
    """What the plan needs of the stage servicer it plans for."""

    kind: str
    store: ArtifactStore
    model_host: ModelHost
    request_limits: RequestLimits


def check_edit_against_inversion(
    spec: EditSpec, meta: Mapping[str, Any], fingerprint: str, digest: str, preview: bool
) -> None:
    """Refuse an edit the library would refuse later for this inversion (the methods table decides)."""
    if meta.get("model") != fingerprint:
        raise SpecError(
            f"inversion {digest[:12]} was made with another model ({meta.get('model_name', '?')}) than this "
            "server's: invert the video again on this server",
            field="inversion_digest",
        )
    steps, frames = int(meta["edit_steps"]), int(meta["frames"])
    m = method(spec.method)
    if preview and not m.preview:
        with_preview = ", ".join(name for name, other in METHODS.items() if other.preview)
        raise SpecError(
            f"keyframe previews exist for the {with_preview} methods, not {spec.method!r}: "
            "use Propagation.Propagate for it",
            field="edit.method",
        )
    _, run_steps = keys.run_steps(spec, steps)
    if run_steps < 1:
        raise SpecError(
            f"edit.sdedit_start {spec.sdedit_start} leaves no denoising step of {steps}: raise it",
            field="edit.sdedit_start",
        )
    # A preview ignores the schedule, but it is checked all the same: it is stored in the metadata, and
    # unchecked it could be any size.
    if spec.keyframe_schedule is not None and m.keyframes:
        try:
            validate_schedule(spec.keyframe_schedule, frames, spec.keyframe_interval, run_steps)
        except SpecError as e:
            raise SpecError(str(e), field="edit.keyframe_schedule") from None


@dataclass
class InversionInput:
    """The inversion an edit request names: checked when planned, loaded (or rebuilt) by the job."""

    digest: str
    meta: dict[str, Any] = field(default_factory=dict)

    def load(
        self, store: ArtifactStore, host: ModelHost, metrics: Metrics, progress: JobProgress
    ) -> Inversion:
        """The inversion's tensors; the caller pins `digest` around this and the use of the result."""
        return load_inversion(store, host, metrics, self.digest, self.meta, progress)


def plan_edit(
    stage: EditStage,
    inversion_digest: str,
    edit: common_pb2.EditSpec,
    run: Callable[[JobContext, InversionInput, EditSpec, str], JobOutput],
    preview: bool,
) -> Plan:
    """The plan of an edit stage (keyframes or propagation) on a stored inversion."""
    check_digest(inversion_digest, "inversion_digest", _INVERSION_HINT)
    spec = edit_spec_from_proto(edit)
    stage.request_limits.check_edit(spec)
    fingerprint = stage.model_host.fingerprint
    meta = inversion_meta(stage.store, inversion_digest)
    check_edit_against_inversion(spec, meta, fingerprint, inversion_digest, preview)
    key = keys.edit_key(
        stage.kind, inversion_digest, spec, fingerprint, int(meta["frames"]), int(meta["edit_steps"])
    )
    source = InversionInput(inversion_digest, meta)
    return Plan(key, lambda: None, lambda ctx: run(ctx, source, spec, key))
