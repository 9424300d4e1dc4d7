"""Decoded images held in memory, or memory-mapped from a cache file when they are too large.

Below `max_memory_mb` (or with no bound) images are decoded into a float32 array in memory.
Above it they are decoded once, a chunk at a time, into a ``.npy`` file in the user-named
`cache_dir` (never next to the data) and memory-mapped from there: a job reads only the
pages of its own samples, and the operating system keeps or drops pages as memory allows.
The file name holds a fingerprint of the images (paths, sizes and modification times, or
the encoded bytes), the target size and the colour mode, so a changed folder gets a new
cache file; a finished file is renamed into place, so a killed run leaves no half-written
cache that a later run would trust. Values are the same as decoding into memory, bit for bit.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .image_folder import decode

CHUNK = 256  # images decoded per write into the cache file


def fingerprint(items: Sequence[Path | bytes], size: tuple[int, int], mode: str) -> str:
    """Returns a hex digest of the images (path, size and mtime of a file; hash of bytes) and the target format."""
    h = hashlib.sha256(f"{size[0]}x{size[1]}:{mode}:{len(items)}".encode())
    for item in items:
        if isinstance(item, bytes):
            h.update(hashlib.sha256(item).digest())
        else:
            st = item.stat()
            h.update(f"{item.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def decoded_bytes(count: int, size: tuple[int, int], mode: str) -> int:
    """Returns the bytes `count` decoded float32 images of `size` in `mode` take."""
    return count * (3 if mode == "RGB" else 1) * size[0] * size[1] * 4


def over_bound(count: int, size: tuple[int, int], mode: str, max_memory_mb: float | None) -> bool:
    """Whether `count` decoded images exceed `max_memory_mb` MiB (never without a bound)."""
    return max_memory_mb is not None and decoded_bytes(count, size, mode) > max_memory_mb * 2**20


def images(items: Sequence[Path | bytes], size: tuple[int, int], mode: str, *, name: str,
           max_memory_mb: float | None, cache_dir: str | None, where: Callable[[int], str] | None = None) -> torch.Tensor:
    """Returns [n, C, H, W] float32 in [0, 1]: decoded in memory, or memory-mapped from the
    cache file `cache_dir`/<name>-<fingerprint>.npy when larger than `max_memory_mb` MiB.
    Raises ConfigError at data.cache_dir when the cache is needed but not named or not
    writable, DataError for an unreadable image."""
    if not over_bound(len(items), size, mode, max_memory_mb):
        return torch.from_numpy(decode(items, size, mode, where))
    need = decoded_bytes(len(items), size, mode)
    if cache_dir is None:
        raise ConfigError("data.cache_dir", f"the decoded images ({need / 2**20:.3g} MiB) exceed data.max_memory_mb="
                          f"{max_memory_mb:g}; name a folder for their memory-mapped cache (not the data folder)")
    folder = Path(cache_dir)
    file = folder / f"{name}-{fingerprint(items, size, mode)}.npy"
    shape = (len(items), 3 if mode == "RGB" else 1, *size)
    if not file.is_file():
        write_cache(file, items, size, mode, shape, where)
    try:
        arr = np.load(file, mmap_mode="c", allow_pickle=False)  # copy-on-write: writable, the file never changes
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable image cache ({exc}); delete it to rebuild it") from None
    if arr.shape != shape or arr.dtype != np.float32:
        raise DataError(f"{file}: holds {arr.dtype} {list(arr.shape)}, expected float32 {list(shape)}; "
                        "delete it to rebuild it")
    return torch.from_numpy(arr)


def write_cache(file: Path, items: Sequence[Path | bytes], size: tuple[int, int], mode: str,
                shape: tuple[int, ...], where: Callable[[int], str] | None) -> None:
    """Decodes `items` chunk by chunk into a temporary .npy beside `file`, then renames it to `file`."""
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.npy")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    except OSError as exc:
        raise ConfigError("data.cache_dir", f"cannot write the image cache in {file.parent} ({exc})") from None
    try:
        for lo in range(0, len(items), CHUNK):
            hi = min(lo + CHUNK, len(items))
            at = (lambda i, lo=lo: where(lo + i)) if where else None
            out[lo:hi] = decode(items[lo:hi], size, mode, at)
        out.flush()
        del out
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_executor(info: dict, executor: str) -> None:
    """Raises ConfigError at executor.kind when a memory-mapped source (`info['memory_mapped']`)
    meets the vmap executor, which copies the whole training set to its device."""
    if info.get("memory_mapped") and executor == "vmap":
        raise ConfigError("executor.kind", "vmap copies the whole training set to its device, but this one is "
                          "memory-mapped (larger than data.max_memory_mb): use serial or ray, or raise the bound")


__all__ = ["check_executor", "images", "over_bound"]
