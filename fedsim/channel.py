"""Gossip channels: what a gossip step sends when the messages are not dense models.

A decentralized protocol given ``compression:`` (`build_channel`) runs each of its gossip
steps as ``channel.step`` instead of the strategy's plain ``merge``, and keeps the channel's
per-node state in its own state (so it is checkpointed):

* ``init(models [n, d]) -> state``: the initial channel state (a dict of ``[n, d]`` stacks,
  e.g. CHOCO's public copies x̂), from the initial node stack;
* ``step(models, weights, state, senders, key, layout, merge) -> (models, state, sizes)``:
  one gossip step of all n nodes, mixing with the strategy's ``merge`` rule. ``senders [n]`` (bool) marks the nodes with at least one
  out-link this step (the others send nothing and must not change their channel state),
  ``key`` keys the step's compression randomness, and ``sizes [n]`` (int) is the encoded
  size in bytes of the message each node sent to every one of its out-neighbours (0 for
  non-senders);
* ``static_graph``: True when receivers keep state per sender (CHOCO's x̂_j), which is only
  consistent when the neighbours do not change; the protocol then refuses time-varying
  topologies.

`link_bytes` turns the per-node message sizes into the bytes each node sends and receives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from .config.checks import Ge, Range

Tensor = torch.Tensor
ChannelStep = Callable[[Tensor, Tensor, Any, np.ndarray, int, Any, Any], "tuple[Tensor, Any, np.ndarray]"]


class Channel(NamedTuple):
    """A stateful gossip exchange; see the module docstring."""

    init: Callable[[Tensor], Any]
    step: ChannelStep
    static_graph: bool = False


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
    return compressed_channel(comp, spec.feedback, spec.gamma, spec.eta)


def compressed_channel(compress: Any, feedback: str, gamma: float, eta: float) -> Channel:
    """Returns the channel of `Compression` for a built compressor."""
    from . import feedback as fb
    from .comm import nbytes
    from .compressors import decode
    from .errors import DivergenceError
    from .rng import key as rng_key

    keys, tracked = fb.STATE_KEYS[feedback], fb.tracks_estimate(feedback)

    def step(x: Tensor, w: Tensor, state: dict, senders: np.ndarray, key: int, layout: Any, merge: Any) -> tuple:
        new, sizes = {k: v.clone() for k, v in state.items()}, np.zeros(len(x), dtype=np.int64)
        view = new[fb.ESTIMATE] if tracked else x.clone()  # non-senders: any finite row (no link uses it)
        for i in np.flatnonzero(senders):
            msg, st = fb.send(feedback, x[i], {k: state[k][i] for k in keys}, compress, rng_key(key, "node", i), eta)
            sizes[i] = nbytes(msg)
            for k, v in st.items():
                new[k][i] = v
            if not tracked:
                view[i] = decode(msg)
        mixed = merge(view, w, torch.arange(len(x), device=x.device), layout)
        out = x + gamma * (mixed - view)
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):  # else: training diverged
            raise DivergenceError("compressed gossip diverged (NaN/inf in the node models); lower "
                                  "protocol.compression.gamma, or use a contractive compressor (e.g. qsgd with contractive: true)")
        return out, new, sizes

    return Channel(lambda models: fb.initial_state(feedback, models), step, static_graph=tracked)
