"""Gossip channels: what gossip sends when the messages are compressed instead of dense models.

A decentralized protocol given ``compression:`` (`build_channel`) sends, for every gossip
exchange, a compressed message per sender (`Channel.send`) and moves every receiver towards
the merge of what it knows of its neighbours, ``x ← x + γ (merge(views) − own view)``
(`Channel.step` for a synchronous step over all nodes; the asynchronous gossip protocol does
the same per receiver). A node's channel state (CHOCO's public copy x̂, an error memory)
is per-node memory the runtime keeps in its client-state store, outside the node's jobs
(`RunContext.memory`), so it is bounded, spilled and checkpointed like any client state.

``static_graph`` is True when receivers must know each sender's past messages (CHOCO's
x̂_j), which is only consistent when the neighbours do not change; the protocols then refuse
time-varying topologies. `link_bytes` turns per-node message sizes into the bytes each node
sends and receives in a synchronous step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from . import feedback as fb
from .comm import nbytes
from .compressors import Compressor, Key, decode, split_messages
from .config.checks import Ge, Range
from .errors import DivergenceError
from .rng import key as rng_key
from .rng import keys as rng_keys

Tensor = torch.Tensor


class Channel(NamedTuple):
    """Compressed gossip under a feedback rule (see `Compression` for the rules)."""

    compress: Compressor
    feedback: str
    gamma: float
    eta: float = 0.0

    @property
    def static_graph(self) -> bool:
        """True when receivers rely on each sender's past messages (the public copies x̂)."""
        return fb.tracks_estimate(self.feedback)

    def initial_state(self, model: Tensor) -> dict[str, Tensor]:
        """Returns a node's channel state before it sent anything (zeros shaped like its model)."""
        return fb.initial_state(self.feedback, model)

    def send(self, x: Tensor, state: Mapping[str, Tensor], key: Key) -> tuple[Any, dict[str, Tensor], Tensor]:
        """Returns (the message a node with model x sends, its new channel state, the view its
        receivers take of it: the public copy x̂ under ef21/econtrol, else the decoded message)."""
        msg, new = fb.send(self.feedback, x, {k: state[k] for k in fb.STATE_KEYS[self.feedback]}, self.compress, key,
                           self.eta)
        return msg, new, (new[fb.ESTIMATE] if self.static_graph else decode(msg))

    def _send_together(self, x: Tensor, state: Mapping[str, Tensor], rows: Tensor,
                       keys: Tensor) -> tuple[list[Any], dict[str, Tensor], Tensor] | None:
        """`send` for the nodes `rows` with keys `keys` (int64, one per row) in one vectorised
        call: (their messages, their new states and views, stacked). None when the compressor
        cannot run that way (it seeds a torch.Generator from its key), and the nodes send one
        by one."""
        own = {k: state[k][rows] for k in fb.STATE_KEYS[self.feedback]}
        try:
            msg, new, seen = torch.func.vmap(self.send)(x[rows], own, keys)
        except (NotImplementedError, TypeError, RuntimeError, ValueError):
            return None
        return split_messages(msg, len(rows)), new, seen

    def consensus(self, x: Tensor, mixed: Tensor, view: Tensor) -> Tensor:
        """Returns x + γ (mixed − view); raises DivergenceError if that overflows from finite x."""
        out = x + self.gamma * (mixed - view)
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):  # else: training diverged
            raise DivergenceError("compressed gossip diverged (NaN/inf in the node models); lower "
                                  "protocol.compression.gamma, or use a contractive compressor (e.g. qsgd with "
                                  "contractive: true)")
        return out

    def step(self, x: Tensor, w: Tensor, state: Mapping[str, Tensor], senders: np.ndarray, key: int, layout: Any,
             merge: Any) -> tuple[Tensor, dict[str, Tensor], np.ndarray]:
        """One synchronous gossip step of all n nodes: every node with an out-link (``senders``)
        sends, then every node moves towards ``merge`` of the views with the mixing matrix w.
        `state` maps names to ``[n, ...]`` stacks. Returns (new models, new state, the encoded
        size in bytes of the message each node sent to each out-neighbour, 0 for non-senders)."""
        new, sizes = {k: v.clone() for k, v in state.items()}, np.zeros(len(x), dtype=np.int64)
        view = new[fb.ESTIMATE] if self.static_graph else x.clone()  # non-senders: any finite row (no link uses it)
        ids = np.flatnonzero(senders)
        rows = torch.as_tensor(ids, device=x.device)
        together = None
        if len(ids) >= SEND_TOGETHER_FROM:
            keys = torch.tensor(rng_keys(key, "node", ids.tolist()), dtype=torch.int64, device=x.device)
            together = self._send_together(x, state, rows, keys)
        if together is not None:
            msgs, st, seen = together
            sizes[ids] = [nbytes(m) for m in msgs]
            for k, v in st.items():
                new[k][rows] = v
            if not self.static_graph:
                view[rows] = seen
        else:
            for i in ids:
                msg, st, seen = self.send(x[i], {k: v[i] for k, v in state.items()}, rng_key(key, "node", i))
                sizes[i] = nbytes(msg)
                for k, v in st.items():
                    new[k][i] = v
                if not self.static_graph:
                    view[i] = seen
        mixed = merge(view, w, torch.arange(len(x), device=x.device), layout)
        return self.consensus(x, mixed, view), new, sizes


SEND_TOGETHER_FROM = 32  # senders in a step from which their messages are made in one vectorised call


def link_bytes(w: sp.csr_array, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (bytes each node receives, bytes each node sends) in one gossip step with W when
    node j sends a message of ``sizes[j]`` bytes to each of its out-neighbours (the nonzero
    off-diagonal entries of column j)."""
    off = (w - sp.diags_array(w.diagonal(), shape=w.shape)).tocsr()
    links = (off != 0).astype(np.int64)  # links[i, j] = 1: i receives from j
    sizes = np.asarray(sizes, dtype=np.int64)
    return links @ sizes, np.asarray(links.sum(axis=0)).ravel() * sizes


@dataclass(frozen=True)
class Compression:
    """The ``compression`` setting of the decentralized protocols: compressed gossip messages.

    CHOCO-Gossip / CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019, arXiv 1902.00340) and the
    baselines it is compared with. Each gossip step node i sends one compressed message
    (`fedsim.compressors`) under a feedback rule (`fedsim.feedback`); v_j is what j's
    neighbours then know of x_j, and every node moves x_i ← x_i + γ (merge(v)_i − v_i) with the
    strategy's merge rule (plain mixing: x_i + γ Σ_j w_ij (v_j − v_i)). ``ef21`` is CHOCO:
    v = x̂, the public copies, q_i = Q(x_i − x̂_i), x̂_i ← x̂_i + q_i (EF21's h); Q must be
    contractive (qsgd needs ``contractive: true``). ``none``: v_j = Q(x_j), naive; ``ef``:
    DeepSqueeze (Tang et al., arXiv 1907.07346), v_j = Q(e_j + x_j), e_j ← e_j + x_j − v_j;
    ``econtrol``: EControl's sender rule on x̂ (an extension, in no paper). The local steps come
    first (K = 1: CHOCO-SGD, Alg. 2). Checked: the order (SGD step, compress x^{t+½} − x̂,
    x̂_j += q_j for all j, γ-step with the new x̂), x̂⁰ = 0 and the step with W − I match a
    third-party port (nda's CHOCO_SGD.update); the authors' code (epfml/ChocoSGD) gossips with
    the old x̂ before compressing (the same iteration, shifted) and its DeepSqueeze is ``ef``.
    One x̂_j per node suffices: all of j's neighbours hold the same copy. Deviation: a node
    offline in a round misses its neighbours' q_j; it is assumed to catch up on return,
    uncounted.
    """

    compressor: Any = "topk"
    feedback: Literal["none", "ef", "ef21", "econtrol"] = "ef21"
    gamma: Annotated[float, Range(0.0, 1.0, open_lo=True)] = 1.0
    eta: Annotated[float, Ge(0)] = 0.1


def build_channel(path: str, raw: Mapping[str, Any] | None) -> Channel | None:
    """Returns the channel a protocol's ``compression`` setting (at `path`) asks for, or None
    for dense gossip; raises ConfigError naming the key at fault."""
    if raw is None:
        return None
    from .compressors import COMPRESSORS
    from .config.components import ComponentSpec, dataclass_knobs, validate_knobs
    from .errors import ConfigError

    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a mapping (compressor, feedback, gamma, eta), got {type(raw).__name__}")
    if "gamma" not in raw:
        raise ConfigError(f"{path}.gamma", "required: the consensus step size γ ∈ (0, 1] depends on the compressor "
                          "and the graph (Top-1% on a ring of 20: 0.05; identity: 1 is plain gossip)")
    spec = Compression(**validate_knobs(path, dict(raw), dataclass_knobs(Compression), "gossip compression"))
    comp = ComponentSpec(COMPRESSORS).resolve(f"{path}.compressor", spec.compressor).build()
    return Channel(comp, spec.feedback, spec.gamma, spec.eta)
