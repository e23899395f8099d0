"""Which branches a UNet batch holds, and the hooks that may stand in for the source branch.

A TokenFlow batch stacks branches along the batch axis, n frames each. Which ones, and in which order,
is data (`BranchLayout`), not a constant: the keyframe pass always holds the source branch (inverted
latents, inversion prompt) next to the edited ones (unconditional and conditional), while a propagation
pass whose source-branch contributions are supplied by a hook holds only the edited ones.

What the propagation pass takes from the source branch goes through a `HookRegistry` of `SourceHook`s,
shaped like diffusers' ``ModelHook`` / ``HookRegistry`` (named hooks, registered and removed by name,
called in registration order, ``pre_*`` callbacks that may supply a value, ``post_*`` callbacks that
observe the one computed):

- the nearest-neighbour correspondences of every frame's tokens to its two keyframes' (per layer);
- the PnP conv feature injected into every frame (on the steps that inject it).

A recorder observes them while the source branch runs; a replayer supplies them so that it need not run
(tokenflow.features).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SOURCE = "source"
UNCOND = "uncond"
COND = "cond"


@dataclass(frozen=True)
class BranchLayout:
    """The branches of a batch, in batch order; each holds the same n frames."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"a branch layout needs distinct branch names, got {self.names}")

    @property
    def count(self) -> int:
        return len(self.names)

    def has(self, name: str) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise RuntimeError(f"this batch holds the branches {self.names}, not {name!r}") from None

    def frames(self, batch: int) -> int:
        """Frames per branch of a batch of `batch` rows."""
        if batch % self.count:
            raise RuntimeError(f"a batch of {batch} rows does not split into the branches {self.names}")
        return batch // self.count

    def part(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """Branch `name` of a stacked batch tensor [count * n, ...] -> [n, ...] (a view)."""
        n = self.frames(t.shape[0])
        i = self.index(name)
        return t[i * n : (i + 1) * n]

    def edited(self) -> tuple[str, ...]:
        """The branches that carry the edited latents (every one but the source)."""
        return tuple(b for b in self.names if b != SOURCE)


WITH_SOURCE = BranchLayout((SOURCE, UNCOND, COND))
"""The keyframe pass, and a propagation pass that runs the source branch."""
EDITED_ONLY = BranchLayout((UNCOND, COND))
"""A propagation pass whose source contributions come from a hook."""


class SourceHook:
    """Callbacks around what the propagation pass takes from the source branch (no-ops here).

    ``pre_*`` returns a value to use instead of computing it from the source branch, or None;
    ``post_*`` sees the value used (computed or supplied). `frames` are the global frame indices, in
    batch order. `begin_step` / `end_step` bracket each denoising step (its index among all T steps).
    """

    supplies_source = False
    """True if the hook supplies every source contribution, so the batch may omit the source branch."""

    def begin_step(self, step: int) -> None:
        """A denoising step starts."""

    def end_step(self, step: int) -> None:
        """A denoising step ended (all of its frames were propagated)."""

    def pre_correspondence(self, layer: str, frames: Sequence[int]) -> torch.Tensor | None:
        """[len(frames), 2, seq] token indices into (the frame's window's, the previous window's) keyframe."""
        return None

    def post_correspondence(self, layer: str, frames: Sequence[int], indices: torch.Tensor) -> None:
        return None

    def pre_conv(self, frames: Sequence[int]) -> torch.Tensor | None:
        """[len(frames), C, h, w]: the source's conv feature to inject into every branch."""
        return None

    def post_conv(self, frames: Sequence[int], feature: torch.Tensor) -> None:
        return None


class HookRegistry:
    """Named `SourceHook`s, called in registration order; the first ``pre_*`` value wins."""

    def __init__(self) -> None:
        self.hooks: dict[str, SourceHook] = {}

    def register_hook(self, hook: SourceHook, name: str) -> None:
        if name in self.hooks:
            raise ValueError(f"a hook named {name!r} is already registered")
        self.hooks[name] = hook

    def get_hook(self, name: str) -> SourceHook | None:
        return self.hooks.get(name)

    def remove_hook(self, name: str) -> None:
        self.hooks.pop(name, None)

    @property
    def supplies_source(self) -> bool:
        return any(h.supplies_source for h in self.hooks.values())

    def begin_step(self, step: int) -> None:
        for h in self.hooks.values():
            h.begin_step(step)

    def end_step(self, step: int) -> None:
        for h in self.hooks.values():
            h.end_step(step)

    def correspondence(
        self, layer: str, frames: Sequence[int], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        value = self._pre(lambda h: h.pre_correspondence(layer, frames), compute)
        for h in self.hooks.values():
            h.post_correspondence(layer, frames, value)
        return value

    def conv(self, frames: Sequence[int], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        value = self._pre(lambda h: h.pre_conv(frames), compute)
        for h in self.hooks.values():
            h.post_conv(frames, value)
        return value

    def _pre(
        self, ask: Callable[[SourceHook], torch.Tensor | None], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        for h in self.hooks.values():
            value = ask(h)
            if value is not None:
                return value
        return compute()
