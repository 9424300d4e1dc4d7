"""Privacy accounting of DP aggregation with Google's dp-accounting library (optional extra).

Each aggregation of the ``dp`` strategy (strategies/dp.py) with central noise is a sampled
Gaussian mechanism: the cohort is a uniform sample of the population and the aggregate
gets Gaussian noise of standard deviation z·C·max_i w_i (C the clipping norm, w_i the
aggregation weights), z·(sensitivity) for one client's contribution. Its privacy over T
aggregations is the T-fold composition, computed here:

* ``sampling: fixed`` — a cohort of m clients drawn without replacement from N (what
  fedsim's sync protocol does): `SampledWithoutReplacementDpEvent`, replace-one adjacency,
  RDP only. Replacing one client's update moves the clipped sum by up to 2C, so the
  accountant gets the noise multiplier z/2 (noise over sensitivity).
* ``sampling: poisson`` — each client joins independently with probability q = m/N
  (add/remove adjacency, sensitivity C, multiplier z): RDP or PLD. fedsim's protocols draw
  fixed-size cohorts, so a run's rows mark Poisson ε as not valid.
* local noise (each client adds z·C noise to its own clipped update): the server sees who
  sent what, so there is no amplification by sampling; ε is the T-fold composition of the
  Gaussian mechanism with multiplier z/2, a client's worst case (it took part every time).

Where the cohort is not a uniform sample — asynchronous protocols (buffers mix updates of
different model versions; who arrives depends on speed), an availability model other than
'always' — `sampling_problem` says why, and the rows say ``dp_epsilon: null`` with that
reason rather than a number that looks valid.

Why dp-accounting: it is maintained by Google's differential-privacy team, implements RDP
and PLD accountants for Poisson and fixed-size sampling, and ships tests against published
values; it is a pure-Python dependency (``pip install 'fedsim[privacy]'``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Sampling = Literal["fixed", "poisson"]
AccountantKind = Literal["rdp", "pld"]
INSTALL_HINT = "needs the optional dependency dp-accounting (pip install 'fedsim[privacy]')"


def _library() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:
        raise ValueError(f"privacy accounting {INSTALL_HINT}") from exc
    return dp_accounting


def installed() -> bool:
    """True when dp-accounting can be imported."""
    try:
        _library()
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Mechanism:
    """One aggregation's mechanism as the accountant sees it."""

    noise_multiplier: float  # z: noise std over the clipping norm (times the largest weight)
    num_clients: int  # N
    cohort: int  # m, clients sampled per aggregation
    sampling: Sampling = "fixed"
    local: bool = False  # noise added by each client to its own update (no amplification)


def _event(dp: Any, mech: Mechanism, steps: int) -> Any:
    if mech.local:
        return dp.SelfComposedDpEvent(dp.GaussianDpEvent(mech.noise_multiplier / 2), steps)
    if mech.sampling == "fixed":
        one = dp.SampledWithoutReplacementDpEvent(mech.num_clients, mech.cohort,
                                                  dp.GaussianDpEvent(mech.noise_multiplier / 2))
    else:
        one = dp.PoissonSampledDpEvent(mech.cohort / mech.num_clients, dp.GaussianDpEvent(mech.noise_multiplier))
    return dp.SelfComposedDpEvent(one, steps)


def _accountant(dp: Any, mech: Mechanism, kind: AccountantKind) -> Any:
    rel = dp.NeighboringRelation
    if kind == "pld":
        if mech.sampling == "fixed" and not mech.local:
            raise ValueError("the PLD accountant does not support fixed-size sampling; use accountant 'rdp'")
        return dp.pld.PLDAccountant(rel.ADD_OR_REMOVE_ONE)
    relation = rel.REPLACE_ONE if mech.sampling == "fixed" and not mech.local else rel.ADD_OR_REMOVE_ONE
    return dp.rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(mech: Mechanism, steps: int, delta: float, kind: AccountantKind = "rdp") -> float:
    """Returns ε at `delta` after `steps` aggregations of `mech` (0 steps: 0; z = 0: inf)."""
    if steps <= 0:
        return 0.0
    if mech.noise_multiplier <= 0:
        return float("inf")
    dp = _library()
    acc = _accountant(dp, mech, kind)
    acc.compose(_event(dp, mech, steps))
    return float(acc.get_epsilon(delta))


def calibrate(target_epsilon: float, mech: Mechanism, steps: int, delta: float, kind: AccountantKind = "rdp") -> float:
    """Returns the smallest noise multiplier z whose ε after `steps` aggregations is at most
    `target_epsilon` (dp-accounting's bracketed search, to a relative tolerance of 1e-4)."""
    dp = _library()
    from dataclasses import replace

    def event(z: float) -> Any:
        return _event(dp, replace(mech, noise_multiplier=z), steps)

    return float(dp.calibrate_dp_mechanism(lambda: _accountant(dp, mech, kind), event, target_epsilon, delta,
                                           dp.mechanism_calibration.ExplicitBracketInterval(1e-3, 1e3),
                                           tol=1e-4))


def sampling_problem(protocol: str, availability: str, cohort: int | None) -> str | None:
    """Returns why a run's aggregations are not uniformly sampled cohorts (None when they are)."""
    if protocol != "sync":
        return (f"protocol {protocol!r} aggregates whoever arrives (speed-dependent, stale, buffered); "
                "the accountant assumes each aggregation samples a uniform cohort")
    if availability != "always":
        return (f"availability model {availability!r} makes some clients likelier to be sampled; "
                "the accountant assumes a uniform cohort")
    if cohort is None:
        return "the cohort size is unknown"
    return None
