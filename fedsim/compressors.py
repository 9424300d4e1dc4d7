"""Compressors: what a sender puts on the wire instead of a dense vector, and its exact size.

A compressor maps a flat vector v and a key (its randomness, see `job_key`: a Python int,
or inside a vectorised call one row of an int64 tensor) to an *encoded message*: a frozen
dataclass holding exactly the fields that travel, with

* ``nbytes`` — the encoded size in bytes, which `fedsim.comm.nbytes` counts as ``bytes_up``
  (bit-exact: ⌈total bits / 8⌉; values cost their dtype's width, indices ⌈log₂ d⌉ bits);
* ``decode()`` — the dense vector the receiver reconstructs (dequantization happens on the
  receiver side, in the strategy's combine or merge, never in the sender's accounting).

Messages are pytrees (their tensor fields are the leaves), so the vmap executor maps a
whole cohort's compression in one call and splits the stacked message back into one per
client (`split_messages`). Draws from the key are counter-based hashes
(`fedsim.rng.hashed_uniform`, `hashed_subset`): pure tensor functions of the key, so a
vectorised call, given each row's key, draws what the job would draw alone. A compressor
that needs a `torch.Generator` instead (`keyed_generator`) cannot be mapped; the vmap
executor then runs its jobs one by one.

Built-ins (registered in `COMPRESSORS`; a new one is one decorated factory):

* ``identity``: the dense vector itself.
* ``topk`` (Aji & Heafield 2017; Stich et al. 2018): the k = round(ratio·d) largest |v_j|,
  sent as (index, value) pairs. Contractive with δ = k/d.
* ``randk``: k coordinates chosen uniformly by the key's hash; only the values and the
  8-byte key travel (the receiver regenerates the indices). ``unbiased`` scales by d/k.
* ``sign``: scaled sign (Karimireddy, Rebjock, Stich, Jaggi 2019): (‖v‖₁/d)·sign(v), one
  bit per coordinate (0 is sent as +) plus one scale.
* ``qsgd`` (Alistarh, Grubic, Li, Tomioka, Vojnovic 2017): per bucket of `bucket`
  coordinates, ‖v_B‖₂·sign(v_j)·ξ_j/s with ξ_j the stochastic rounding of s|v_j|/‖v_B‖₂ to
  an integer in [0, s], s = 2^(bits−1) − 1 levels; unbiased (or, ``contractive``, scaled by
  1/(1 + ω) with ω = min(b/s², √b/s) its variance bound). `bits` counts the sign bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Annotated, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils._pytree import register_pytree_node, tree_flatten, tree_unflatten

from .config import Ge, Range
from .registry import Registry
from .rng import hash32, hashed_subset, hashed_uniform, torch_generator
from .state_types import checkpointable

Tensor = torch.Tensor
COMPRESSORS = Registry("compressor", ["fedsim.compressors"])


def index_bits(dim: int) -> int:
    """Returns the bits needed to address one of `dim` coordinates (at least 1)."""
    return max(1, math.ceil(math.log2(dim))) if dim > 1 else 1


def _bits_to_bytes(bits: int) -> int:
    return -(-bits // 8)


def message_type(cls: type) -> type:
    """Registers an encoded message dataclass as a pytree whose leaves are its tensor fields
    (the others are constants of its type), so that a vectorised call (``torch.func.vmap``)
    can return one message for many clients, each field stacked over them."""
    fields = dataclasses.fields(cls)
    tensors = tuple(f.name for f in fields if f.type in ("Tensor", Tensor))
    rest = tuple(f.name for f in fields if f.name not in tensors)
    register_pytree_node(cls, lambda m: ([getattr(m, n) for n in tensors], tuple(getattr(m, n) for n in rest)),
                         lambda leaves, consts: cls(**dict(zip(tensors, leaves)), **dict(zip(rest, consts))))
    return cls


def keyed_generator(key: Key, purpose: str) -> torch.Generator:
    """Returns a CPU generator of a compressor's draws for the Python int `key` (`job_key`).
    Inside a vectorised call (the key is a tensor row) there is no generator per row: raises
    NotImplementedError, and the vmap executor then runs those jobs one by one. Draws through
    `fedsim.rng.hashed_uniform` / `hashed_subset` have no such limit."""
    if not isinstance(key, int):
        raise NotImplementedError(f"compressor draws ({purpose}) from a torch.Generator need one job's own key, "
                                  "which a vectorised call over many jobs does not have")
    return torch_generator(key, purpose)


def split_messages(stacked: Message, count: int) -> list[Message]:
    """Returns the first `count` messages of a stacked message (each field [m, ...], as a
    vectorised call returns them), one per row: the inverse of stacking them."""
    if isinstance(stacked, torch.Tensor):
        return list(stacked[:count].unbind(0))
    leaves, spec = tree_flatten(stacked)
    return [tree_unflatten([leaf[i] for leaf in leaves], spec) for i in range(count)]


class Encoded:
    """Base of encoded messages: `decode()`, `nbytes`, and a `detach()` the executors call."""

    def decode(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def nbytes(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def detach(self) -> "Encoded":
        """Returns a copy whose tensors are detached from any autograd graph."""
        changes = {f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)  # type: ignore[arg-type]
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@message_type
@checkpointable
@dataclass(frozen=True)
class Sparse(Encoded):
    """k (index, value) pairs of a d-vector: k·(⌈log₂ d⌉ + value bits) bits."""

    indices: Tensor
    values: Tensor
    dim: int

    def decode(self) -> Tensor:
        out = torch.zeros(self.dim, dtype=self.values.dtype, device=self.values.device)
        return out.index_put((self.indices,), self.values)  # out of place: vmap maps it

    @property
    def nbytes(self) -> int:
        k = self.values.numel()
        return _bits_to_bytes(k * (index_bits(self.dim) + 8 * self.values.element_size()))


@message_type
@checkpointable
@dataclass(frozen=True)
class SeededSparse(Encoded):
    """k values at coordinates drawn from `key` (an int64 tensor, 0-d): k value bits plus the
    64-bit key."""

    key: Tensor
    values: Tensor
    dim: int

    def decode(self) -> Tensor:
        out = torch.zeros(self.dim, dtype=self.values.dtype, device=self.values.device)
        return out.index_put((random_indices(self.key, self.dim, self.values.numel(), out.device),), self.values)

    @property
    def nbytes(self) -> int:
        return _bits_to_bytes(self.values.numel() * 8 * self.values.element_size()) + 8


@message_type
@checkpointable
@dataclass(frozen=True)
class Signs(Encoded):
    """One bit per coordinate (True = +) and one scale."""

    positive: Tensor
    scale: Tensor

    def decode(self) -> Tensor:
        return self.scale * (2 * self.positive.to(self.scale.dtype) - 1)

    @property
    def nbytes(self) -> int:
        return _bits_to_bytes(self.positive.numel()) + self.scale.element_size()


@message_type
@checkpointable
@dataclass(frozen=True)
class Quantized(Encoded):
    """Per coordinate `bits` bits (sign + level in [0, s]); one norm per bucket."""

    levels: Tensor  # integer levels, [d]
    negative: Tensor  # bool, [d]
    norms: Tensor  # [number of buckets]
    levels_max: int  # s
    bits: int
    bucket: int
    shrink: float = 1.0  # a constant of the configuration (`contractive`), not sent

    def decode(self) -> Tensor:
        d = self.levels.numel()
        scale = self.norms.repeat_interleave(self.bucket)[:d] * (self.shrink / self.levels_max)
        signs = 1 - 2 * self.negative.to(self.norms.dtype)
        return signs * self.levels.to(self.norms.dtype) * scale

    @property
    def nbytes(self) -> int:
        return _bits_to_bytes(self.levels.numel() * self.bits) + self.norms.numel() * self.norms.element_size()


Message = Union[Tensor, Encoded]
Key = Union[int, Tensor]  # a job's key: a Python int, or inside a vectorised call a row of an int64 tensor
Compressor = Callable[[Tensor, Key], Message]  # (flat vector, key) -> what is sent


def decode(msg: Message) -> Tensor:
    """Returns the dense vector a receiver reconstructs from `msg` (a tensor passes through)."""
    return msg if isinstance(msg, torch.Tensor) else msg.decode()


def decode_many(messages: Sequence[Message]) -> Tensor:
    """Returns the dense vectors of `messages` stacked, [m, d]; row i equals ``decode(messages[i])``
    bit for bit. Messages of one registered type and layout (the same constants and field
    shapes, as one compressor sends) are stacked field by field and decoded in one vectorised
    call; others one by one."""
    first = messages[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(messages))
    flat = [tree_flatten(m) for m in messages]
    spec = flat[0][1]
    if not spec.is_leaf() and all(s == spec for _, s in flat):
        columns = list(zip(*(leaves for leaves, _ in flat)))  # one tuple per field, a row per message
        if all(len({c.shape for c in col}) == 1 for col in columns):
            stacked = tree_unflatten([torch.stack(col) for col in columns], spec)
            return torch.func.vmap(lambda msg: msg.decode())(stacked)
    return torch.stack([decode(m) for m in messages])


class NeedsJobKeys(NotImplementedError):
    """`job_key` was asked inside a vectorised call that was not given each row's job seed;
    the vmap executor answers by giving them (`row_job_seeds`) and running the call again."""


_ROWS = threading.local()


@contextlib.contextmanager
def row_job_seeds(seeds: Tensor | None) -> Iterator[None]:
    """Inside a vectorised call over jobs, makes `job_key` derive each row's key from `seeds`
    (that row's job seed, ``key(seed, "job", job_id)``: what the serial executor seeds the
    job's torch generators with), so the row draws what its job draws alone."""
    before = getattr(_ROWS, "seeds", None)
    _ROWS.seeds = seeds
    try:
        yield
    finally:
        _ROWS.seeds = before


def job_key(purpose: str = "compress") -> Key:
    """Returns the key of a job's compression randomness: a 32-bit hash of the job's seed
    (``keyed_torch(key(seed, "job", job_id))`` in `fedsim.executors.base.Worker`) and
    `purpose`, so draws depend on (seed, job) only and never consume the job's random stream.

    Inside a vectorised call the executor gives each row its job's seed (`row_job_seeds`) and
    the key is that row's, an int64 tensor; without them (or inside ``torch.compile``) raises
    `NeedsJobKeys`."""
    if torch._C._functorch.maybe_current_level() is not None or torch.compiler.is_compiling():
        seeds = getattr(_ROWS, "seeds", None)
        if seeds is None or torch.compiler.is_compiling():
            raise NeedsJobKeys(f"job_key({purpose!r}) inside a vectorised call needs each row's job seed")
        return hash32(seeds, purpose)
    return hash32(torch.initial_seed(), purpose)


def random_indices(key: Key, dim: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """Returns k distinct coordinates of [0, dim) drawn from `key` (sorted; `hashed_subset`)."""
    return hashed_subset(key, "randk", dim, k, device)


def _count(ratio: float, dim: int) -> int:
    return min(dim, max(1, round(ratio * dim)))


Ratio = Annotated[float, Range(0.0, 1.0, open_lo=True)]


@COMPRESSORS.register("identity")
def identity() -> Compressor:
    """No compression: the dense vector is sent."""
    return lambda v, key: v


@COMPRESSORS.register("topk")
def topk(ratio: Ratio = 0.01) -> Compressor:
    """Top-k sparsification: the k = round(ratio·d) entries of largest magnitude.

    Args:
        ratio: Fraction of coordinates sent (k is at least 1).
    """

    def compress(v: Tensor, key: Key) -> Sparse:
        idx = torch.topk(v.abs(), _count(ratio, v.numel()), sorted=False).indices.sort().values
        return Sparse(idx, v[idx], v.numel())

    return compress


@COMPRESSORS.register("randk")
def randk(ratio: Ratio = 0.01, unbiased: bool = False) -> Compressor:
    """Random-k sparsification: k coordinates drawn from the job's key (a counter-based hash).

    Args:
        ratio: Fraction of coordinates sent (k is at least 1).
        unbiased: Scale the kept values by d/k (unbiased; otherwise contractive, δ = k/d).
    """

    def compress(v: Tensor, key: Key) -> SeededSparse:
        d = v.numel()
        k = _count(ratio, d)
        values = v[random_indices(key, d, k, v.device)]
        return SeededSparse(torch.as_tensor(key, dtype=torch.int64, device=v.device),
                            values * (d / k) if unbiased else values, d)

    return compress


@COMPRESSORS.register("sign")
def sign() -> Compressor:
    """Scaled sign: (‖v‖₁ / d)·sign(v), one bit per coordinate plus the scale."""
    return lambda v, key: Signs(v >= 0, v.abs().mean())


@COMPRESSORS.register("qsgd")
def qsgd(bits: Annotated[int, Ge(2)] = 4, bucket: Annotated[Optional[int], Ge(1)] = 512,
         contractive: bool = False) -> Compressor:
    """QSGD stochastic quantization with s = 2^(bits−1) − 1 levels per sign, by buckets.

    Args:
        bits: Bits per coordinate, sign included (4 → 7 magnitude levels).
        bucket: Coordinates sharing one norm (the paper's bucketing); null = the whole vector.
        contractive: Scale the decoded vector by 1/(1 + ω), ω = min(b/s², √b/s) the QSGD variance
            bound for buckets of b: biased but contractive, as CHOCO needs (the CHOCO authors'
            'qsgd-biased'); false = unbiased.
    """
    s = 2 ** (bits - 1) - 1

    def compress(v: Tensor, key: Key) -> Quantized:
        d = v.numel()
        b = bucket or d
        padded = torch.cat([v, v.new_zeros(-d % b)]).view(-1, b)
        norms = torch.linalg.vector_norm(padded, dim=1)
        ratio = (padded.abs() / norms.clamp_min(torch.finfo(v.dtype).tiny)[:, None]).reshape(-1)[:d] * s
        noise = hashed_uniform(key, "qsgd", d, v.dtype, v.device)
        levels = torch.floor(ratio + noise).clamp(0, s).to(torch.int16)
        shrink = 1.0 / (1.0 + min(b / s**2, math.sqrt(b) / s)) if contractive else 1.0
        return Quantized(levels, v < 0, norms, s, bits, b, shrink)

    return compress
