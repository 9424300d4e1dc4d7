"""Per-client persistent state (SCAFFOLD's c_i, …), created on first use and kept by client id.

The protocols read a client's state when they dispatch it and write the new state only
when its result is accepted (a straggler's or a dropped client's state is not changed), so
only clients that reported ever have an entry.

Memory is bounded: the most recently used states stay in memory up to a byte budget; the
least recently used ones beyond it spill to disk, one fixed-size slot per client in one
file per state layout (names, dtypes, shapes), written and read with plain positional
I/O (no memory map, so spilled bytes never count as resident memory). A spilled state is
read back bit for bit. What stays in memory besides the budget is the index: 12 bytes per
client id up to the largest id seen.

Spill files live in a private folder (under `spill_root`, or the system temp folder) that
`close()` deletes. For checkpoints, `snapshot()` returns every entry as a mapping and
`snapshot(path)` streams them into a folder; `restore` takes either back.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

Tensor = torch.Tensor
State = dict[str, Tensor]
Layout = tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) per tensor, by name
ALIGN = 16
_PAD = np.zeros(ALIGN, dtype=np.uint8)

SPILL_PREFIX = "client-state-"  # the private spill folder made in `spill_root`


def layout_of(state: State) -> Layout:
    """Returns the layout of a state: (name, dtype, shape) of each tensor, sorted by name."""
    return tuple((k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in sorted(state.items()))


def _nbytes(state: State) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _raw(t: Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a uint8 array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _compact(t: Tensor) -> Tensor:
    """Returns a detached, contiguous CPU tensor that owns exactly its own bytes."""
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def _dtype(name: str) -> torch.dtype:
    """Returns the torch dtype called `name` (a layout read back from disk names only dtypes)."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{str(name)[:40]!r} is not a torch dtype")
    return dtype


class SlotFile:
    """A file of fixed-size slots, each holding one state of a given layout."""

    def __init__(self, path: Path, layout: Layout, create: bool = True):
        self.path = path
        self.layout = layout
        self.dtypes = [_dtype(dt) for _, dt, _ in layout]
        self.sizes = [int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=d).element_size()
                      for (_, _, shape), d in zip(layout, self.dtypes)]
        # every tensor starts at a multiple of ALIGN bytes, so reads can view one buffer
        self.offsets = np.concatenate([[0], np.cumsum([-(-n // ALIGN) * ALIGN for n in self.sizes])]).tolist()
        self.slot_bytes = int(self.offsets[-1])
        self.count = 0  # slots allocated
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) if create else os.open(path, os.O_RDONLY)

    def allocate(self) -> int:
        """Returns a fresh slot number."""
        self.count += 1
        return self.count - 1

    def write(self, slot: int, state: State) -> None:
        """Writes `state` (of this file's layout) into `slot`."""
        buffers = []
        for (name, _, _), size, start, end in zip(self.layout, self.sizes, self.offsets, self.offsets[1:]):
            buffers.append(_raw(state[name]))
            if end - start > size:
                buffers.append(_PAD[: end - start - size])
        done = os.pwritev(self._fd, buffers, slot * self.slot_bytes) if self.slot_bytes else 0
        if done != self.slot_bytes:
            raise OSError(f"short write to {self.path}: {done} of {self.slot_bytes} bytes")

    def read(self, slot: int) -> State:
        """Reads the state in `slot` into fresh tensors (views of one buffer)."""
        buf = torch.empty(self.slot_bytes, dtype=torch.uint8)
        done = os.preadv(self._fd, [buf.numpy()], slot * self.slot_bytes) if self.slot_bytes else 0
        if done != self.slot_bytes:
            raise OSError(f"short read from {self.path}: {done} of {self.slot_bytes} bytes")
        return {
            name: buf[start:start + size].view(dtype).reshape(shape)
            for (name, _, shape), dtype, size, start in zip(self.layout, self.dtypes, self.sizes, self.offsets)
        }

    def close(self) -> None:
        """Closes the file descriptor (the file stays)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ClientStateStore:
    """Client id -> {name: tensor}, in memory up to `memory_bytes`, spilled to disk beyond it.

    Args:
        memory_bytes: Budget for states held in memory (None: unbounded, nothing spills).
        spill_root: Folder in which the private spill folder is created (default: temp).

    Stored tensors are treated as immutable: callers must not modify what `get` returns.
    """

    def __init__(self, memory_bytes: int | None = None, spill_root: str | Path | None = None):
        self.memory_bytes = memory_bytes
        self.spill_root = Path(spill_root) if spill_root is not None else None
        self._mem: OrderedDict[int, State] = OrderedDict()  # least recently used first
        self._mem_bytes = 0
        self._slot = np.full(0, -1, dtype=np.int64)  # client -> slot on disk (−1: none)
        self._file_of = np.full(0, -1, dtype=np.int32)  # client -> index into _files
        self._files: list[SlotFile] = []
        self._layouts: dict[Layout, int] = {}
        self._dir: Path | None = None
        self._count = 0
        self.spilled_writes = 0  # states written to disk so far (for benchmarks)

    # -- queries -------------------------------------------------------------------------
    def _on_disk(self, client: int) -> bool:
        return client < len(self._slot) and self._slot[client] >= 0

    def __contains__(self, client: int) -> bool:
        return client in self._mem or self._on_disk(client)

    def __len__(self) -> int:
        return self._count

    @property
    def spilled(self) -> bool:
        """True when some entry lives on disk (a checkpoint should stream, not inline, it)."""
        return bool(np.any(self._slot >= 0))

    @property
    def memory_in_use(self) -> int:
        """Bytes of the states currently held in memory."""
        return self._mem_bytes

    def clients(self) -> Iterator[int]:
        """Yields the ids of clients that have a stored state, in increasing order."""
        on_disk = np.flatnonzero(self._slot >= 0).tolist()
        return iter(sorted(set(on_disk) | set(self._mem)))

    def get(self, client: int) -> State | None:
        """Returns the stored state of `client` (read back from disk if spilled), or None."""
        state = self._mem.get(client)
        if state is not None:
            self._mem.move_to_end(client)
            return state
        if self._on_disk(client):
            return self._files[self._file_of[client]].read(int(self._slot[client]))
        return None

    def items(self) -> Iterator[tuple[int, State]]:
        """Yields (client, state) for every entry, in increasing client order, without
        changing which entries stay in memory."""
        for c in self.clients():
            state = self._mem.get(c)
            yield c, state if state is not None else self._files[self._file_of[c]].read(int(self._slot[c]))

    # -- updates -------------------------------------------------------------------------
    def put(self, client: int, state: State) -> None:
        """Stores `state` as the persistent state of `client` (an empty dict stores nothing)."""
        if not state:
            return
        if client < 0:
            raise ValueError(f"client ids must be >= 0, got {client}")
        compact = {k: _compact(v) for k, v in state.items()}
        self._keep(client, compact, _nbytes(compact))

    def put_many(self, clients: Sequence[int], stacked: Mapping[str, Tensor]) -> None:
        """Stores row i of each of the `stacked` tensors ([m, ...]) as the state of clients[i],
        in order: what `put` one client after another stores (a client listed twice keeps
        its last row). The stack comes to the CPU once, and each row is copied out of it
        into storage of its own, as `put` keeps it."""
        if not stacked or not len(clients):
            return
        ids = [int(c) for c in clients]
        if min(ids) < 0:
            raise ValueError(f"client ids must be >= 0, got {min(ids)}")
        names = list(stacked)
        columns = [stacked[k].detach().cpu().contiguous() for k in names]
        nbytes = sum(c[0].numel() * c.element_size() for c in columns)
        for i, client in enumerate(ids):
            self._keep(client, {k: c[i].clone() for k, c in zip(names, columns)}, nbytes)

    def _keep(self, client: int, state: State, nbytes: int) -> None:
        """Keeps `state` (compact CPU tensors of `nbytes` bytes) as `client`'s, most recently
        used, then spills the least recently used states beyond the budget."""
        if client not in self:
            self._count += 1
        old = self._mem.pop(client, None)
        if old is not None:
            self._mem_bytes -= _nbytes(old)
        self._mem[client] = state
        self._mem_bytes += nbytes
        if self.memory_bytes is not None:
            while self._mem_bytes > self.memory_bytes and self._mem:
                self._spill(*self._mem.popitem(last=False))

    def _spill(self, client: int, state: State) -> None:
        self._mem_bytes -= _nbytes(state)
        layout = layout_of(state)
        idx = self._layouts.get(layout)
        if idx is None:
            idx = self._layouts[layout] = len(self._files)
            self._files.append(SlotFile(self._spill_dir() / f"states-{idx}.bin", layout))
        if client >= len(self._slot):
            grow = max(client + 1, 2 * len(self._slot), 1024)
            self._slot = np.concatenate([self._slot, np.full(grow - len(self._slot), -1, np.int64)])
            self._file_of = np.concatenate([self._file_of, np.full(grow - len(self._file_of), -1, np.int32)])
        if self._file_of[client] != idx:  # first spill, or the state changed layout
            self._file_of[client] = idx
            self._slot[client] = self._files[idx].allocate()
        self._files[idx].write(int(self._slot[client]), state)
        self.spilled_writes += 1

    def _spill_dir(self) -> Path:
        if self._dir is None:
            if self.spill_root is not None:
                self.spill_root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self.spill_root))
            # also removed if the store is garbage-collected or the interpreter exits unclosed
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def clear(self) -> None:
        """Forgets every entry and deletes the spill files."""
        self._remove_spill()
        self._mem.clear()
        self._mem_bytes = 0
        self._slot = np.full(0, -1, dtype=np.int64)
        self._file_of = np.full(0, -1, dtype=np.int32)
        self._count = 0

    def snapshot(self) -> dict[int, dict[str, Tensor]]:
        """Returns every stored state (for checkpoints)."""
        return {c: dict(s) for c, s in self._states.items()}

    def restore(self, snap: dict[int, dict[str, Tensor]]) -> None:
        """Replaces the store's content with a `snapshot()`."""
        self._states = {int(c): dict(s) for c, s in snap.items()}

    def close(self) -> None:
        """Deletes the spill files; states still held in memory stay readable."""
        self._remove_spill()
        self._slot[:] = -1
        self._file_of[:] = -1
        self._count = len(self._mem)

    def _remove_spill(self) -> None:
        for f in self._files:
            f.close()
        self._files, self._layouts = [], {}
        if self._dir is not None:
            self._cleanup()
            self._dir = None

    # -- checkpoints -----------------------------------------------------------------------
    def snapshot(self, path: str | Path | None = None) -> dict[int, State] | None:
        """Copies every entry for a checkpoint.

        Without `path`, returns {client: state} (every spilled state is read into memory, so
        this suits stores that fit in memory). With `path`, streams the entries into that
        folder (index.json + one slot file per layout) using one state's memory at a time.
        """
        if path is None:
            return {c: dict(s) for c, s in self.items()}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files: dict[Layout, SlotFile] = {}
        index: dict[Layout, list[int]] = {}
        try:
            for client, state in self.items():
                layout = layout_of(state)
                if layout not in files:
                    files[layout] = SlotFile(path / f"states-{len(files)}.bin", layout)
                    index[layout] = []
                files[layout].write(files[layout].allocate(), state)
                index[layout].append(client)
        finally:
            for f in files.values():
                f.close()
        entries = [{"file": f.path.name, "layout": [list(x) for x in lay], "clients": index[lay]}
                   for lay, f in files.items()]
        (path / "index.json").write_text(json.dumps({"version": 1, "files": entries}))
        return None

    def restore(self, snap: dict[int, State] | str | Path) -> None:
        """Replaces the content with a snapshot: the mapping `snapshot()` returned, or the
        folder `snapshot(path)` wrote. Entries beyond the budget spill as they are put."""
        self.clear()
        if isinstance(snap, dict):
            for client, state in sorted(snap.items()):
                self.put(int(client), state)
            return
        path = Path(snap)
        meta = json.loads((path / "index.json").read_text())
        for entry in meta["files"]:
            layout = tuple((n, dt, tuple(shape)) for n, dt, shape in entry["layout"])
            if Path(entry["file"]).name != entry["file"]:  # a file of this folder, never a path elsewhere
                raise ValueError(f"{path / 'index.json'} names {str(entry['file'])[:80]!r}, not a file of its folder")
            src = SlotFile(path / entry["file"], layout, create=False)
            try:
                for slot, client in enumerate(entry["clients"]):
                    self.put(int(client), src.read(slot))
            finally:
                src.close()
