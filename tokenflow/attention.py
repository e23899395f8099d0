"""TokenFlow's self-attention and PnP injection as diffusers attention processors and one hook.

Everything the method changes inside the UNet lives here: a processor on every ``attn1``
(self-attention) with three modes, and a forward hook for the PnP conv injection. Both read
one `TokenFlowState` object that the editing loop owns and updates per step and per batch;
nothing is stored on diffusers modules and the original processors are restored on exit.

Batches are always three branches stacked along the batch axis: source (inverted latents,
inversion prompt), unconditional and conditional (edited latents), n frames each.

Modes:
- ``keyframes``: extended attention — uncond/cond queries of each keyframe attend to the keys
  and values of all keyframes of the same branch, the source branch keeps per-frame attention;
  records each layer's input tokens of the source branch and its output (after ``to_out``).
- ``propagate``: no attention is computed; each frame's output is gathered from the recorded
  keyframe outputs at the nearest-neighbour (cosine) tokens of its source-branch input among
  the two nearest keyframes' source tokens, blended by temporal distance.
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

MODES = ("keyframes", "propagate", "per-frame")
# Decoder self-attentions that get PnP query/key injection: up-blocks 1..3, except up_blocks[1].attentions[0].
PNP_ATTENTIONS = {1: (1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}
NN_ROW_BLOCK = 8192  # rows of the similarity matrix computed at once (bounds memory, same result)

T = TypeVar("T")
LayerRecord = tuple[torch.Tensor, torch.Tensor]  # (source tokens [K,seq,dim], outputs [3,K,seq,dim])


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
    recorded: dict[str, LayerRecord] = field(default_factory=dict)
    """The last keyframe pass's records, for the keyframes of that pass in batch order."""
    keyframes: dict[int, dict[str, LayerRecord]] = field(default_factory=dict)
    """What propagation reads: window -> layer -> (tokens [1,seq,dim], outputs [3,1,seq,dim])."""
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
        n = hidden_states.shape[0] // 3
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.pnp_layer and state.pnp_attn:
            q = torch.cat([q[:n]] * 3)
            k = torch.cat([k[:n]] * 3)
        if state.mode == "keyframes":
            ku, vu, kc, vc = k[n : 2 * n], v[n : 2 * n], k[2 * n :], v[2 * n :]
            ls = state.lockstep
            if ls is not None:  # a group of a larger pass: attend to every group's keys and values
                posted = ls.exchange(self.name, (ku, vu, kc, vc))
                ku, vu, kc, vc = (torch.cat([p[i] for p in posted]) for i in range(4))
            out = torch.cat(
                [
                    _attention(attn, q[:n], k[:n], v[:n], joint=False),
                    _attention(attn, q[n : 2 * n], ku, vu, joint=True),
                    _attention(attn, q[2 * n :], kc, vc, joint=True),
                ]
            )
            del ku, vu, kc, vc
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
            # A copy of the source third: a view would keep the whole [3n, ...] input alive.
            state.record(self.name, hidden_states[:n].clone(), out.view(3, n, seq, dim))
        return out

    def _propagate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        state = self.state
        n = hidden_states.shape[0] // 3
        seq, dim = hidden_states.shape[1:]
        frames = torch.tensor(state.frame_indices, device=hidden_states.device)
        windows = frames // state.keyframe_interval
        src = hidden_states[:n]
        out = torch.empty(3, n, seq, dim, dtype=hidden_states.dtype, device=hidden_states.device)
        for w in windows.unique().tolist():
            sel = (windows == w).nonzero().squeeze(1)
            x = src[sel].reshape(-1, dim)
            tokens, kf_out = self._keyframe(w)
            current = _gather(kf_out, nearest_tokens(x, tokens))
            if w == 0:
                out[:, sel] = current.view(3, len(sel), seq, dim)
                continue
            tokens, kf_out = self._keyframe(w - 1)
            previous = _gather(kf_out, nearest_tokens(x, tokens))
            w1 = blend_weights(frames[sel], w, state.keyframe_interval, state.weighting)
            w1 = w1.to(current.dtype).view(1, -1, 1, 1)
            blended = w1 * current.view(3, len(sel), seq, dim) + (1 - w1) * previous.view(
                3, len(sel), seq, dim
            )
            out[:, sel] = blended
        return out.reshape(3 * n, seq, dim)

    def _keyframe(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source tokens [seq,dim], outputs [3,seq,dim]) recorded for the keyframe of `window`."""
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


def _gather(kf_out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """kf_out [3,seq,dim] at token indices idx [M] -> [3,M,dim]."""
    return kf_out[:, idx]


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
        n = output.shape[0] // 3
        return torch.cat([output[:n]] * 3)

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
