"""The editing methods and their properties: the one table every layer consults.

The loops (tokenflow.editing), the prechecks, the content keys, both CLIs and the proto's `EditMethod`
enum are derived from (or checked against, by a test) this table, so no layer decides what a method does
by testing its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenflow.errors import SpecError


@dataclass(frozen=True)
class Method:
    """What an editing method does; each flag answers one question a loop or a key asks."""

    name: str
    help: str
    pnp: bool
    """Plug-and-play injection of the source branch's attention queries/keys and conv features."""
    keyframes: bool
    """TokenFlow: a keyframe pass (extended attention) and a propagation pass per step; False = per frame."""
    sdedit_start: bool
    """Starts from the clean latents noised to `sdedit_start` of the schedule instead of the full noise."""
    uses_prompt: bool
    """The target prompt, negative prompt and guidance matter (False: sampling with the inversion prompt)."""
    preview: bool
    """Keyframe previews (Keyframes.EditKeyframes) exist for it."""

    @property
    def proto_name(self) -> str:
        """Its value in the proto's EditMethod enum, e.g. EDIT_METHOD_PER_FRAME."""
        return "EDIT_METHOD_" + self.name.upper().replace("-", "_")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "tokenflow",
            "TokenFlow + plug-and-play injection: the paper's method; structure-preserving, consistent edits",
            pnp=True,
            keyframes=True,
            sdedit_start=False,
            uses_prompt=True,
            preview=True,
        ),
        Method(
            "sdedit",
            "TokenFlow on SDEdit: no PnP, start from latents noised to sdedit_start; looser structure",
            pnp=False,
            keyframes=True,
            sdedit_start=True,
            uses_prompt=True,
            preview=True,
        ),
        Method(
            "per-frame",
            "PnP on each frame independently, no TokenFlow: the baseline of the paper's consistency figures",
            pnp=True,
            keyframes=False,
            sdedit_start=False,
            uses_prompt=True,
            preview=False,
        ),
        Method(
            "reconstruct",
            "no edit: DDIM sampling back with the inversion prompt, a self-check of the inversion",
            pnp=False,
            keyframes=False,
            sdedit_start=False,
            uses_prompt=False,
            preview=False,
        ),
    )
}
DEFAULT_METHOD = "tokenflow"


def method(name: str) -> Method:
    """The method called `name`; SpecError naming the valid ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise SpecError(
            f"edit.method must be one of {', '.join(METHODS)}; got {name!r}", field="edit.method"
        ) from None


def preview_methods() -> tuple[str, ...]:
    return tuple(m.name for m in METHODS.values() if m.preview)
