"""FedHyper-SL (Wang, Wang, Li, ICLR 2024, arXiv 2310.03156): a server-side schedule of the local rate.

The server accumulates a ← a + β_h·⟨Δ_{t−1}, Δ_t⟩ (unclipped) and sets the next round's local
rate η_l = clip(η_l^0·(1 + a), η_min, η_max); the global step stays x ← x + η_g Δ_t.
Deviation from the released code, on purpose: there the per-client rates are reset to η_l^0
at the top of every round, so the schedule never reaches the clients; here it does. The
payload carries ρ = 1 + a (`local_lr_scale`) and clients use clip(local.lr·ρ, ...), so that
η_l^0 stays the `local.lr` setting.
"""
from __future__ import annotations

import math
from typing import Annotated

from fedsim.blocks import chain, fl_server, sgd
from fedsim.config import Ge, Gt
from fedsim.errors import ConfigError
from fedsim.hypergrad import Normalize, hyper_local, hypergrad_lr, with_server_extras
from fedsim.registry import STRATEGIES
from fedsim.strategy import ServerStrategy


@STRATEGIES.register("fedhyper_sl")
def fedhyper_sl(
    server_lr: Annotated[float, Gt(0)] = 1.0,
    hyper_lr: Annotated[float, Ge(0)] = 1.0,
    local_lr_min: Annotated[float, Gt(0)] = 0.001,
    local_lr_max: Annotated[float, Gt(0)] = 0.1,
    normalize: Normalize = "none",
) -> ServerStrategy:
    """FedHyper-SL: the server schedules the clients' learning rate by the hypergradient.

    Args:
        server_lr: Global learning rate η_g (fixed).
        hyper_lr: Hyper learning rate β_h of the accumulator a.
        local_lr_min: Lower bound of the scheduled local rate (absolute).
        local_lr_max: Upper bound of the scheduled local rate (absolute).
        normalize: 'none', 'cosine' or 'sigmoid' (see fedhyper_g).
    """
    if local_lr_min > local_lr_max:
        raise ConfigError("strategy.local_lr_min", f"{local_lr_min} exceeds local_lr_max={local_lr_max}")
    scale = hypergrad_lr(1.0, hyper_lr, -math.inf, math.inf, normalize=normalize, apply=False)
    server = fl_server(hyper_local(lr_lo=local_lr_min, lr_hi=local_lr_max), transform=chain(scale, sgd(server_lr)))
    return with_server_extras(
        server,
        lambda opt: {"local_lr_scale": opt[0].lr},
        lambda opt: {"global_lr": server_lr, "local_lr_scale": opt[0].lr},
    )
