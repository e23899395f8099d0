"""TokenFlow's self-attention and PnP injection as diffusers attention processors and one hook.

Everything the method changes inside the UNet lives here: a processor on every ``attn1``
(self-attention) with three modes, and a forward hook for the PnP conv injection. Both read
one `TokenFlowState` object that the editing loop owns and updates per step and per batch;
nothing is stored on diffusers modules and the original processors are restored on exit.

A batch stacks branches along the batch axis, n frames each, in the order of the state's
`BranchLayout` (tokenflow.branches): the keyframe pass holds source (inverted latents, inversion
prompt), unconditional and conditional (edited latents); a propagation pass whose source contributions
come from a `SourceHook` (tokenflow.features) holds only the edited branches.

Modes:
- ``keyframes``: extended attention — uncond/cond queries of each keyframe attend to the keys
  and values of all keyframes of the same branch, the source branch keeps per-frame attention;
  records each layer's input tokens of the source branch and its output (after ``to_out``).
- ``propagate``: no attention is computed; each frame's output is gathered from the recorded
  keyframe outputs at the nearest-neighbour (cosine) tokens of its source-branch input among
  the two nearest keyframes' source tokens, blended by temporal distance. The correspondences go
  through the state's hooks, which may record them or supply them instead of the source branch.
- ``per-frame``: ordinary per-frame attention on all branches (the per-frame PnP baseline).

PnP injection: in the decoder's self-attention layers (all up-block attentions but the first
at the lowest resolution) the uncond/cond queries and keys are replaced by the source's while
`pnp_attn` is on; the residual-branch output of ``up_blocks[1].resnets[1]`` (its ``conv2``,
before the skip connection, as the public code does) is replaced likewise while `pnp_conv` is on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from tokenflow.branches import SOURCE, WITH_SOURCE, BranchLayout, HookRegistry

MODES = ("keyframes", "propagate", "per-frame")
# Decoder self-attentions that get PnP query/key injection: up-blocks 1..3, except up_blocks[1].attentions[0].
PNP_ATTENTIONS = {1: (1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}
NN_ROW_BLOCK = 8192  # rows of the similarity matrix computed at once (bounds memory, same result)

T = TypeVar("T")
LayerRecord = tuple[torch.Tensor, torch.Tensor]
"""(source tokens [K,seq,dim], outputs [branches,K,seq,dim]) in the keyframe pass's branch layout."""


class Lockstep:
    """Runs one UNet pass over the keyframes as several smaller passes that meet at every self-attention.

    Extended attention needs every keyframe's keys and values in every transformer block, and those
    depend on all keyframes' earlier blocks, so the groups cannot run one after the other. Each group
    runs in its own thread; at every ``attn1`` it posts its keys/values, waits for the other groups
    (a barrier) and attends to all of them. A baton lets one group compute at a time, so the transient
    activations are one group's. The keys are concatenated in group order, so the result equals the
    one-batch pass up to floating-point summation order.
    """

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self._barrier = threading.Barrier(groups)
        self._baton = threading.Lock()
        self._local = threading.local()
        self._posted: dict[str, list[Any]] = {}
        self.records: list[dict[str, LayerRecord]] = [{} for _ in range(groups)]

    @property
    def group(self) -> int:
        return int(self._local.group)

    def _wait(self) -> None:
        self._baton.release()
        try:
            self._barrier.wait()
        finally:
            self._baton.acquire()

    def exchange(self, key: str, value: Any) -> list[Any]:
        """Post this group's value under `key`; returns every group's, in group order, once all posted."""
        self._posted.setdefault(key, [None] * self.groups)[self.group] = value
        self._wait()
        return self._posted[key]

    def release(self, key: str) -> None:
        """Every group is done with `key`: free it (bounds the keys/values held to one layer's)."""
        self._wait()
        if self.group == 0:
            self._posted.pop(key, None)

    def run(self, work: Sequence[Callable[[], T]]) -> list[T]:
        """Run one callable per group in lockstep; re-raises the first error of any group."""
        if len(work) != self.groups:
            raise ValueError("one callable per group")
        results: list[Any] = [None] * self.groups
        errors: list[BaseException] = []

        def worker(g: int) -> None:
            self._local.group = g
            with self._baton, torch.no_grad():
                try:
                    results[g] = work[g]()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                    errors.append(exc)
                    self._barrier.abort()

        threads = [
            threading.Thread(target=worker, args=(g,), name=f"keyframes-{g}") for g in range(self.groups)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
            raise (real or errors)[0]
        return results


@dataclass
class TokenFlowState:
    """Per-step, per-batch instructions to the processors, owned by the editing loop."""

    mode: str = "keyframes"
    pnp_attn: bool = False
    pnp_conv: bool = False
    frame_indices: list[int] = field(default_factory=list)  # global frame index of each frame in the batch
    keyframe_interval: int = 8
    weighting: str = "sigmoid"
    layout: BranchLayout = WITH_SOURCE
    """The branches of the batch the UNet runs on now."""
    keyframe_layout: BranchLayout = WITH_SOURCE
    """The branches of the keyframe records (the layout of the keyframe pass that made them)."""
    hooks: HookRegistry = field(default_factory=HookRegistry)
    """Observe or supply what propagation takes from the source branch (tokenflow.branches)."""
    recorded: dict[str, LayerRecord] = field(default_factory=dict)
    """The last keyframe pass's records, for the keyframes of that pass in batch order."""
    keyframes: dict[int, dict[str, LayerRecord]] = field(default_factory=dict)
    """What propagation reads: window -> layer -> (tokens [1,seq,dim], outputs [branches,1,seq,dim])."""
    lockstep: Lockstep | None = None
    """Set while a keyframe pass runs in groups (see `Lockstep`)."""

    def record(self, name: str, tokens: torch.Tensor, out: torch.Tensor) -> None:
        if self.lockstep is not None:
            self.lockstep.records[self.lockstep.group][name] = (tokens, out)
        else:
            self.recorded[name] = (tokens, out)

    def keep(self, windows: Sequence[int], positions: Sequence[int], copy: bool) -> None:
        """Make the last pass's keyframes at batch `positions` the keyframes of `windows` for propagation."""
        for w, p in zip(windows, positions, strict=True):
            layers = {}
            for name, (tokens, out) in self.recorded.items():
                tok, o = tokens[p : p + 1], out[:, p : p + 1]
                layers[name] = (tok.clone(), o.clone()) if copy else (tok, o)
            self.keyframes[w] = layers

    def forget_before(self, window: int) -> None:
        for w in [w for w in self.keyframes if w < window]:
            del self.keyframes[w]

    def clear(self) -> None:
        self.recorded.clear()
        self.keyframes.clear()


def is_pnp_attention(name: str) -> bool:
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "up_blocks" or parts[2] != "attentions":
        return False
    return int(parts[3]) in PNP_ATTENTIONS.get(int(parts[1]), ())


class TokenFlowAttnProcessor:
    """Self-attention processor for one ``attn1`` layer; see the module docstring."""

    def __init__(self, name: str, state: TokenFlowState, pnp_layer: bool) -> None:
        self.name = name
        self.state = state
        self.pnp_layer = pnp_layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise RuntimeError(f"{self.name}: TokenFlow processors only handle plain self-attention")
        state = self.state
        if state.mode == "propagate":
            return self._propagate(hidden_states)
        layout = state.layout
        n = layout.frames(hidden_states.shape[0])
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.pnp_layer and state.pnp_attn:  # every branch's queries and keys are the source's
            q = torch.cat([layout.part(q, SOURCE)] * layout.count)
            k = torch.cat([layout.part(k, SOURCE)] * layout.count)
        if state.mode == "keyframes":
            # Extended attention for the edited branches; the source keeps per-frame attention.
            kv = [(layout.part(k, b), layout.part(v, b)) for b in layout.names if b != SOURCE]
            ls = state.lockstep
            if ls is not None:  # a group of a larger pass: attend to every group's keys and values
                posted = ls.exchange(self.name, kv)
                kv = [
                    (torch.cat([p[j][0] for p in posted]), torch.cat([p[j][1] for p in posted]))
                    for j in range(len(kv))
                ]
            joint = iter(kv)
            parts = []
            for b in layout.names:
                qb = layout.part(q, b)
                if b == SOURCE:
                    parts.append(_attention(attn, qb, layout.part(k, b), layout.part(v, b), joint=False))
                else:
                    kb, vb = next(joint)
                    parts.append(_attention(attn, qb, kb, vb, joint=True))
            out = torch.cat(parts)
            del kv, joint, parts
            if ls is not None:
                ls.release(self.name)
        elif state.mode == "per-frame":
            out = _attention(attn, q, k, v, joint=False)
        else:
            raise RuntimeError(f"unknown TokenFlow mode {state.mode!r}")
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        out = out / attn.rescale_output_factor
        if state.mode == "keyframes":
            seq, dim = out.shape[1:]
            state.keyframe_layout = layout
            # A copy of the source part: a view would keep the whole stacked input alive.
            state.record(self.name, layout.part(hidden_states, SOURCE).clone(), out.view(-1, n, seq, dim))
        return out

    def _propagate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        state = self.state
        layout = state.layout
        n = layout.frames(hidden_states.shape[0])
        seq, dim = hidden_states.shape[1:]
        frames = torch.tensor(state.frame_indices, device=hidden_states.device)
        windows = frames // state.keyframe_interval
        src = layout.part(hidden_states, SOURCE) if layout.has(SOURCE) else None
        rows = [state.keyframe_layout.index(b) for b in layout.names]  # keyframe record rows, batch order
        out = torch.empty(layout.count, n, seq, dim, dtype=hidden_states.dtype, device=hidden_states.device)
        for w in windows.unique().tolist():
            sel = (windows == w).nonzero().squeeze(1)
            m = len(sel)
            pair = state.hooks.correspondence(
                self.name, frames[sel].tolist(), lambda w=w, sel=sel: self._nearest(src, sel, w, seq, dim)
            ).to(hidden_states.device, torch.long)
            kf_out = self._keyframe(w)[1][rows]
            current = kf_out[:, pair[:, 0].reshape(-1)].view(layout.count, m, seq, dim)
            if w == 0:
                out[:, sel] = current
                continue
            kf_prev = self._keyframe(w - 1)[1][rows]
            previous = kf_prev[:, pair[:, 1].reshape(-1)].view(layout.count, m, seq, dim)
            w1 = blend_weights(frames[sel], w, state.keyframe_interval, state.weighting)
            w1 = w1.to(current.dtype).view(1, -1, 1, 1)
            out[:, sel] = w1 * current + (1 - w1) * previous
        return out.reshape(layout.count * n, seq, dim)

    def _nearest(
        self, src: torch.Tensor | None, sel: torch.Tensor, window: int, seq: int, dim: int
    ) -> torch.Tensor:
        """[m, 2, seq]: each token's nearest source token in the keyframe of `window` and of the previous
        window (zeros for window 0, which has none), from the source branch's input tokens."""
        if src is None:
            raise RuntimeError(
                f"{self.name}: the batch has no source branch and no hook supplies the correspondences"
            )
        x = src[sel].reshape(-1, dim)
        current = nearest_tokens(x, self._keyframe(window)[0]).view(len(sel), seq)
        if window == 0:
            previous = torch.zeros_like(current)
        else:
            previous = nearest_tokens(x, self._keyframe(window - 1)[0]).view(len(sel), seq)
        return torch.stack([current, previous], dim=1)

    def _keyframe(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source tokens [seq,dim], outputs [branches,seq,dim]) recorded for the keyframe of `window`."""
        layers = self.state.keyframes.get(window)
        if layers is None or self.name not in layers:
            raise RuntimeError(f"{self.name}: propagation before the keyframe pass of window {window}")
        tokens, out = layers[self.name]
        return tokens[0], out[:, 0]


def _attention(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, joint: bool) -> torch.Tensor:
    """Per-frame attention, or (joint) every query of every frame over all frames' keys.

    Joint: `k`/`v` may hold more frames than `q` (a group of keyframes attending to all of them).
    """
    frames, seq, inner = q.shape
    heads = attn.heads
    head_dim = inner // heads
    if joint:
        q, k, v = (t.reshape(1, -1, inner) for t in (q, k, v))
    b = q.shape[0]
    q, k, v = (t.view(b, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=attn.scale)
    return out.transpose(1, 2).reshape(frames, seq, inner)


def nearest_tokens(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index of the cosine-nearest row of `keys` [S,D] for every row of `x` [M,D] (blocked)."""
    kn = keys / keys.norm(dim=-1, keepdim=True)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for r in range(0, x.shape[0], NN_ROW_BLOCK):
        xb = x[r : r + NN_ROW_BLOCK]
        xn = xb / xb.norm(dim=-1, keepdim=True)
        idx[r : r + NN_ROW_BLOCK] = (xn @ kn.T).argmax(dim=-1)
    return idx


def blend_weights(frames: torch.Tensor, window: int, interval: int, weighting: str) -> torch.Tensor:
    """Weight of the current window's keyframe for each frame.

    Public code: distances d1, d2 of the frame to the centres of its window and of the previous
    window, w = sigmoid(d2 / (d1 + d2)) — always in (0.5, 0.73), so the current keyframe always
    dominates. ``linear`` (w = d2 / (d1 + d2)) is an option, not the default.
    """
    c1 = window * interval + interval // 2
    c2 = (window - 1) * interval + interval // 2
    d1 = (frames - c1).abs()
    d2 = (frames - c2).abs()
    w = d2 / (d1 + d2)
    return torch.sigmoid(w) if weighting == "sigmoid" else w


def _conv_injection_hook(state: TokenFlowState):  # noqa: ANN202 - torch hook signature
    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not state.pnp_conv:
            return None
        layout = state.layout

        def source() -> torch.Tensor:
            if not layout.has(SOURCE):
                raise RuntimeError("PnP conv injection: no source branch and no hook supplies its feature")
            return layout.part(output, SOURCE)

        # In propagation the source's feature goes through the hooks (recorded, or supplied instead).
        feature = state.hooks.conv(state.frame_indices, source) if state.mode == "propagate" else source()
        return torch.cat([feature.to(output.device, output.dtype)] * layout.count)

    return hook


@contextlib.contextmanager
def tokenflow_unet(unet: Any, state: TokenFlowState) -> Iterator[TokenFlowState]:
    """Install the processors and the conv hook for the duration of one edit, then restore."""
    original = dict(unet.attn_processors)
    processors = {
        name: (
            TokenFlowAttnProcessor(name.removesuffix(".processor"), state, is_pnp_attention(name))
            if name.endswith("attn1.processor")
            else proc
        )
        for name, proc in original.items()
    }
    unet.set_attn_processor(processors)
    handle = unet.up_blocks[1].resnets[1].conv2.register_forward_hook(_conv_injection_hook(state))
    try:
        yield state
    finally:
        handle.remove()
        unet.set_attn_processor(original)
        state.clear()
