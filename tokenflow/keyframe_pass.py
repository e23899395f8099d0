"""The keyframe pass of one denoising step, for any clip length: attention scope and batching.

Two independent options:

- ``keyframe_attention``: which keyframes each keyframe's extended attention sees.
  ``all`` (default, the paper's method): every keyframe of the clip, in one joint pass; the work
  of the attention grows as K², the memory of the records that propagation reads as K.
  ``window:W``: each keyframe is edited jointly with the keyframes of the W windows on each side of
  it (its *context*, clipped at the ends of the clip), and only its own outputs are kept. The cost is
  (2W+1) keyframe UNet passes per keyframe, linear in the clip, and the keyframes are computed
  just before propagation needs them and dropped right after, so memory does not grow with the clip.
  Trade-off: keyframes farther than W windows apart no longer share attention, so a long clip can
  drift in appearance over more than 2W+1 windows; with W >= K-1 every context is the whole clip and
  the result equals ``all`` exactly.
- ``keyframe_group_size``: how many keyframes go through the UNet at once. A joint pass larger than
  that runs as groups in lockstep (`tokenflow.attention.Lockstep`), which gives the one-batch result
  within float tolerance while the transient activations are one group's. It changes only how the
  pass runs, never what it computes.

What stays O(K) with ``all``, grouped or not: the records propagation reads (every keyframe's
source tokens and three attention outputs in all 16 self-attention layers, about 92 MB per keyframe
for SD 1.5 at 512x512 in fp16, i.e. 2.8 GB at 240 frames, 23 GB at 2,000) and the UNet's skip
activations of all groups during the pass. ``window:W`` holds the records of two windows plus one
context pass, whatever the clip's length: it is the setting for clips of thousands of frames.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from tokenflow.attention import Lockstep, TokenFlowState
from tokenflow.branches import WITH_SOURCE
from tokenflow.errors import SpecError
from tokenflow.specs import parse_keyframe_attention  # noqa: F401 - declared beside its field; editing uses it

log = logging.getLogger(__name__)

SLOW_ALL_KEYFRAMES = 256
"""From this many keyframes on, `all` warns: its attention cost (K² token pairs) dominates the step."""


def contexts(k: int, window: int | None) -> list[tuple[int, int]]:
    """The keyframes [lo, hi) that keyframe p is edited with, for every p of K keyframes."""
    if window is None or window >= k - 1:
        return [(0, k)] * k
    return [(max(0, p - window), min(k, p + window + 1)) for p in range(k)]


def auto_group_size(
    device: torch.device, latent_hw: tuple[int, int], channels: int, dtype: torch.dtype
) -> int | None:
    """Keyframes per UNet batch from the free memory of a CUDA device; None (one batch) elsewhere.

    Estimate per keyframe: 3 branches x 24 activations of the first block's size (the feed-forward's
    GEGLU and the attention's q/k/v/out at full resolution dominate), to fit half of the free memory.
    On CPU the pass runs in one batch (host memory is rarely what stops a CPU run first).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    elt = torch.tensor([], dtype=dtype).element_size()
    per_keyframe = WITH_SOURCE.count * 24 * latent_hw[0] * latent_hw[1] * channels * elt
    return max(1, int(0.5 * free // per_keyframe))


def attention_cost_warning(k: int, window: int | None, tokens: int) -> str | None:
    """A warning for `all` on many keyframes, with the expected attention work per step."""
    if window is not None or k < SLOW_ALL_KEYFRAMES:
        return None
    pairs = 2 * (k * tokens) ** 2  # uncond + cond, at the finest level alone
    window_pairs = 2 * k * (5 * tokens) ** 2  # window:2: each keyframe's context of 5
    return (
        f"keyframe_attention=all with {k} keyframes: each step's keyframe pass attends over "
        f"{pairs:.2e} token pairs at the finest level alone (grows as K²), {pairs / window_pairs:.0f}x "
        "the attention work of window:2; use keyframe_attention=window:W for time linear in the clip"
    )


class KeyframePass:
    """One step's keyframe pass: records each keyframe's attention outputs in `state.keyframes`.

    `run(positions)` runs the UNet (in ``keyframes`` mode) on the keyframes at those positions of the
    step's keyframe list and returns its [branches * n, ...] output (branches in the state's keyframe
    layout). Keyframe p belongs to window p.
    """

    def __init__(
        self,
        state: TokenFlowState,
        run: Callable[[list[int]], torch.Tensor],
        k: int,
        window: int | None,
        group_size: int | None,
        keep_noise: bool = False,
    ) -> None:
        if group_size is not None and group_size < 1:
            raise SpecError("keyframe_group_size must be at least 1", field="edit.keyframe_group_size")
        self.state = state
        self.run = run
        self.contexts = contexts(k, window)
        self.group_size = group_size
        self.keep_noise = keep_noise
        self.noise: dict[int, torch.Tensor] = {}  # position -> [branches, ...] UNet output, when kept
        self.passes = 0
        self.unet_frames = 0  # keyframes put through the UNet (x3 branches), over all passes
        self.seconds = 0.0

    @property
    def joint(self) -> bool:
        """One context for every keyframe: the whole pass is a single joint pass (`all`)."""
        return len(set(self.contexts)) <= 1

    def ensure(self, lo: int, hi: int) -> None:
        """Have the records of keyframes lo..hi-1 (computing the missing ones)."""
        for p in range(max(0, lo), min(hi, len(self.contexts))):
            if p not in self.state.keyframes:
                self._compute(self.contexts[p])

    def run_all(self) -> None:
        self.ensure(0, len(self.contexts))

    def _compute(self, context: tuple[int, int]) -> None:
        started = time.perf_counter()
        positions = list(range(*context))
        members = [p for p in positions if self.contexts[p] == context]
        noise = self._grouped(positions)
        # Views into the pass's tensors when every keyframe is kept, else copies (the pass is freed).
        self.state.keep(members, [positions.index(p) for p in members], copy=len(members) < len(positions))
        self.state.recorded.clear()
        if self.keep_noise:
            per_branch = noise.view(self.state.keyframe_layout.count, len(positions), *noise.shape[1:])
            for p in members:
                self.noise[p] = per_branch[:, positions.index(p)].clone()
        self.passes += 1
        self.unet_frames += len(positions)
        self.seconds += time.perf_counter() - started  # the outputs are on the host: the work is done

    def _grouped(self, positions: Sequence[int]) -> torch.Tensor:
        g = self.group_size
        state = self.state
        if g is None or g >= len(positions):
            return self.run(list(positions))
        groups = [list(positions[i : i + g]) for i in range(0, len(positions), g)]
        lockstep = Lockstep(len(groups))
        state.lockstep = lockstep
        try:
            outs = lockstep.run([lambda grp=grp: self.run(grp) for grp in groups])
        finally:
            state.lockstep = None
        names = lockstep.records[0].keys()
        state.recorded = {
            name: (
                torch.cat([r[name][0] for r in lockstep.records]),
                torch.cat([r[name][1] for r in lockstep.records], dim=1),
            )
            for name in names
        }
        per_branch = [o.view(state.keyframe_layout.count, -1, *o.shape[1:]) for o in outs]
        merged = torch.cat(per_branch, dim=1)
        return merged.reshape(-1, *merged.shape[2:])


def propagation_windows(chunk: Sequence[int], interval: int) -> tuple[int, int]:
    """The keyframe windows [lo, hi) that propagating these frames reads (their own and the previous)."""
    first, last = min(chunk) // interval, max(chunk) // interval
    return max(0, first - 1), last + 1


def warn_if_slow(k: int, window: int | None, tokens: int) -> str | None:
    message = attention_cost_warning(k, window, tokens)
    if message:
        log.warning(message)
    return message
