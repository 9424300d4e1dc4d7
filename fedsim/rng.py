"""Keyed random draws: every draw depends on (seed, purpose, ids) only, never on a shared stream.

That makes results independent of the executor, the number of workers and the order in
which results come back. Two kinds of draws:

* `numpy_rng` / `torch_generator`: a fresh generator per key, for draws of arbitrary shape
  (a client's batch order, a model's initialisation).
* `uniform` / `normal`: counter-based hashes (SplitMix64), vectorised over an id array, for
  per-client draws in large populations (availability, dropout, speed profiles) in O(ids).

Code that cannot take a generator (random layers such as dropout, ``reset_parameters``)
draws from torch's global generators; every such block runs inside `keyed_torch`, which
seeds them by a key and restores them after, so no draw depends on what ran before it in
the process. This is the only module that seeds or forks a global generator.
"""
from __future__ import annotations

import functools
import hashlib
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK63


def key(seed: int, purpose: str, *ids: int) -> int:
    """Returns a 63-bit integer derived from (seed, purpose, ids)."""
    return _digest("\x1f".join([str(int(seed)), purpose, *(str(int(i)) for i in ids)]))


def keys(seed: int, purpose: str, *ids: Sequence[int]) -> list[int]:
    """Returns ``key(seed, purpose, *row)`` for every row of the zipped id sequences (the
    common prefix is formatted once: ~2.5x cheaper per row)."""
    prefix = f"{int(seed)}\x1f{purpose}"
    columns = [[str(int(i)) for i in col] for col in ids]
    return [_digest("\x1f".join((prefix, *row))) for row in zip(*columns)]


M32 = 0xFFFFFFFF


def mix32(x: Any) -> Any:
    """murmur3's 32-bit finaliser, elementwise on int64 arrays or tensors holding values < 2^32
    (or on a Python int): only +, *, ^, >> and & with products cut to 32 bits, so numpy,
    torch on any device and Python evaluate it identically."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def combine(h: Any, v: Any) -> Any:
    """Folds the low 32 bits of `v` into the 32-bit hash `h` (elementwise)."""
    return mix32(((h * 0x9E3779B1) & M32) ^ (v & M32))


def hash32(key: Any, purpose: str) -> Any:
    """Returns a 32-bit hash of (a non-negative 64-bit `key`, `purpose`): elementwise, on a
    Python int or an int64 tensor (also a row of a vectorised call), the same value on both."""
    return combine(combine(_word(purpose), key & M32), key >> 32)


@functools.lru_cache(maxsize=None)
def _word(purpose: str) -> int:
    return mix32(key(0, purpose) & M32)


def hashed_uniform(key: Any, purpose: str, n: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Returns n draws in [0, 1) (24 bits each) from the counter-based hash of (`key`,
    `purpose`, position): a pure function of its arguments, on any device and inside
    ``torch.func.vmap`` (where `key` may be a row of a batched int64 tensor)."""
    h = combine(hash32(key, purpose), torch.arange(n, device=device))
    return (h >> 8).to(dtype) * (1.0 / (1 << 24))


def hashed_subset(key: Any, purpose: str, n: int, k: int, device: Any) -> torch.Tensor:
    """Returns k distinct positions of [0, n) (sorted, int64), those whose hash of (`key`,
    `purpose`, position) is smallest (ties to the lower position): a uniform k-subset, as
    `hashed_uniform` a pure function of its arguments on any device and inside vmap. n < 2^31."""
    if n > _MASK31:
        raise ValueError(f"hashed_subset draws from fewer than 2^31 positions, not {n}")
    pos = torch.arange(n, device=device)
    order = (combine(hash32(key, purpose), pos) << 31) | pos  # distinct: a hash, then the position
    return (torch.topk(order, k, largest=False, sorted=False).values & _MASK31).sort().values


_MASK31 = (1 << 31) - 1


def numpy_rng(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    """Returns a numpy Generator seeded by the key of (seed, purpose, ids)."""
    return np.random.default_rng(key(seed, purpose, *ids))


def numpy_rngs(seed: int, purpose: str, *ids: Sequence[int]) -> Iterator[np.random.Generator]:
    """Yields ``numpy_rng(seed, purpose, *row)`` for every row of the zipped id sequences:
    the same streams, seeded in bulk (~3x cheaper per generator than `numpy_rng`).

    The yielded generator is ONE object, re-seeded for every row: use it before taking the next.
    """
    seeds = np.array(keys(seed, purpose, *ids), dtype=np.uint64)
    if not _bulk_seeding_matches_numpy():
        yield from (np.random.default_rng(int(k)) for k in seeds)
        return
    bits = np.random.PCG64()
    gen = np.random.Generator(bits)
    for state, inc in _pcg64_seeds(seeds):
        bits.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}
        yield gen


class CounterRngs:
    """``numpy_rng(seed, purpose, i)`` for integer counters i that mostly come in increasing
    order (job ids): the same streams, seeded in bulk a block of counters at a time (~4x
    cheaper per generator). `get` returns ONE generator object, re-seeded on every call:
    use it before the next call. Not shared between threads."""

    def __init__(self, seed: int, purpose: str, block: int = 256):
        self.seed, self.purpose, self.block = int(seed), purpose, block
        self._first = 0
        self._seeds: list[tuple[int, int]] = []
        self._bits = np.random.PCG64()
        self._gen = np.random.Generator(self._bits)

    def get(self, counter: int) -> np.random.Generator:
        """Returns the generator of ``numpy_rng(seed, purpose, counter)``, at its start."""
        i = counter - self._first
        if not 0 <= i < len(self._seeds):
            if not _bulk_seeding_matches_numpy():
                return numpy_rng(self.seed, self.purpose, counter)
            self._first, i = counter, 0
            ks = keys(self.seed, self.purpose, range(counter, counter + self.block))
            self._seeds = _pcg64_seeds(np.array(ks, dtype=np.uint64))
        state, inc = self._seeds[i]
        self._bits.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}
        return self._gen


def draw_one(gen: np.random.Generator, a: np.ndarray) -> np.ndarray:
    """Returns ``gen.choice(a, 1, replace=False)`` — the same element, from the same draw —
    at a quarter of its cost: for one element, numpy's choice (Floyd's algorithm) makes one
    bounded draw on [0, len(a) − 1], which is what ``integers(len(a))`` makes."""
    k = int(gen.integers(len(a)))
    return a[k : k + 1]


_BULK_OK: list[bool] = []


def _bulk_seeding_matches_numpy() -> bool:
    """Checks once per process that `_pcg64_seeds` reproduces this numpy's seeding (it is
    numpy's documented, stable algorithm; a mismatch falls back to one generator per key)."""
    if not _BULK_OK:
        probe = [0, 7, 2**40 + 3, 2**63 - 1]
        mine = _pcg64_seeds(np.array(probe, dtype=np.uint64))
        ref = [np.random.PCG64(k).state["state"] for k in probe]
        _BULK_OK.append(mine == [(r["state"], r["inc"]) for r in ref])
    return _BULK_OK[0]


# numpy's SeedSequence (numpy/random/bit_generator.pyx), vectorised over many integer seeds
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _M32 = 0xCA01F9DD, 0x4973F715, 0xFFFFFFFF
_PCG_MULT, _M128 = 0x2360ED051FC65DA44385DF649FCCF645, (1 << 128) - 1


def _pcg64_seeds(keys: np.ndarray) -> list[tuple[int, int]]:
    """Returns the (state, inc) that ``PCG64(SeedSequence(k))`` starts from, for each k < 2**64."""
    u32 = np.uint32
    with np.errstate(over="ignore"):
        hash_a = [u32(_INIT_A)]

        def hashmix(value: np.ndarray) -> np.ndarray:
            value = value ^ hash_a[0]
            hash_a[0] = u32((int(hash_a[0]) * _MULT_A) & _M32)
            value = value * hash_a[0]
            return value ^ (value >> u32(16))

        def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            r = u32(_MIX_L) * x - u32(_MIX_R) * y
            return r ^ (r >> u32(16))

        # a seed < 2**64 is 1 or 2 little-endian 32-bit words; the pool (4 words) is filled by
        # hashing zeros, which equals hashing a zero high word, so 2 words + 2 zeros always
        zero = np.zeros(len(keys), dtype=u32)
        words = [(keys & np.uint64(_M32)).astype(u32), (keys >> np.uint64(32)).astype(u32), zero, zero]
        pool = [hashmix(w) for w in words]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        hash_b = _INIT_B
        out = []
        for i in range(8):  # generate_state(4, uint64): 8 words cycling over the pool
            value = pool[i % 4] ^ u32(hash_b)
            hash_b = (hash_b * _MULT_B) & _M32
            value = value * u32(hash_b)
            out.append(value ^ (value >> u32(16)))
    w = [o.astype(np.uint64) for o in out]
    v = [(w[2 * j] | (w[2 * j + 1] << np.uint64(32))).tolist() for j in range(4)]
    seeds = []
    for v0, v1, v2, v3 in zip(*v):  # pcg64_set_seed: state 0, inc = 2·seq + 1, step, += init, step
        inc = ((((v2 << 64) | v3) << 1) | 1) & _M128
        state = ((inc + ((v0 << 64) | v1)) * _PCG_MULT + inc) & _M128
        seeds.append((state, inc))
    return seeds


def torch_generator(seed: int, purpose: str, *ids: int) -> torch.Generator:
    """Returns a CPU torch.Generator seeded by the key of (seed, purpose, ids)."""
    gen = torch.Generator()
    gen.manual_seed(key(seed, purpose, *ids))
    return gen


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_M64 = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    """`_splitmix64` of one unsigned 64-bit value as a Python int (the same bits)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=1024)
def _stream_key(seed: int, purpose: str, extra: tuple[int, ...]) -> int:
    return key(seed, purpose, *extra)


def uniform(seed: int, purpose: str, ids: np.ndarray | int, *extra: int) -> np.ndarray:
    """Returns one U[0, 1) draw per id, keyed by (seed, purpose, extra, id) (an array of the
    shape of `ids`). One id is drawn in Python integers: the same bits, without numpy's
    per-call overhead (the asynchronous protocols draw job by job)."""
    ids_arr = np.asarray(ids, dtype=np.int64)
    if ids_arr.size == 1:
        x = int(ids_arr.reshape(-1)[0]) & _M64
        bits = _splitmix64_int(_splitmix64_int((x * 0xD1B54A32D192ED03) & _M64) ^ _stream_key(seed, purpose, extra))
        return np.full(ids_arr.shape, (bits >> 11) * (1.0 / (1 << 53)))
    base = np.uint64(_stream_key(seed, purpose, extra))
    ids64 = ids_arr.astype(np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(_splitmix64(ids64 * np.uint64(0xD1B54A32D192ED03)) ^ base)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(seed: int, purpose: str, ids: np.ndarray | int, *extra: int) -> np.ndarray:
    """Returns one N(0, 1) draw per id (Box-Muller on two keyed uniforms)."""
    u1 = uniform(seed, purpose + "/u1", ids, *extra)
    u2 = uniform(seed, purpose + "/u2", ids, *extra)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def cuda_index(device: torch.device | None) -> list[int]:
    """Returns ``[index]`` of a CUDA `device` (the current device when it has none), else ``[]``."""
    if device is None or device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def initialised_cuda() -> list[int]:
    """Returns every CUDA device index once CUDA is initialised in this process, else ``[]``
    (asking for more would initialise CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def seed_torch(seed_key: int, cuda: Sequence[int] = ()) -> None:
    """Seeds torch's global CPU generator and the generators of the CUDA devices `cuda` only
    (``torch.manual_seed`` would also queue a seed for every other CUDA device)."""
    torch.default_generator.manual_seed(seed_key)
    for index in cuda:
        torch.cuda.default_generators[index].manual_seed(seed_key)


@contextmanager
def keyed_torch(seed_key: int, cuda: Sequence[int] = ()) -> Iterator[None]:
    """Runs the block with torch's global CPU generator (and those of the CUDA devices `cuda`)
    seeded by `seed_key`, and puts them back as they were after it."""
    with torch.random.fork_rng(devices=list(cuda)):
        seed_torch(seed_key, cuda)
        yield


def torch_states(cuda: Sequence[int] = ()) -> list[torch.Tensor]:
    """Returns the states of torch's global CPU generator and of the CUDA devices `cuda`."""
    return [torch.default_generator.get_state(), *(torch.cuda.get_rng_state(i) for i in cuda)]


def set_torch_states(states: Sequence[torch.Tensor], cuda: Sequence[int] = ()) -> None:
    """Restores states saved by `torch_states` (CUDA ones only if the device count matches)."""
    torch.default_generator.set_state(states[0])
    if len(states) == len(cuda) + 1:
        for index, state in zip(cuda, states[1:]):
            torch.cuda.set_rng_state(state, index)
