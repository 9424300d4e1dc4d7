"""The per-client state store: exact read-back after spilling, bounded memory, snapshots,
and that a run creates state only for clients that reported."""
from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch

from fedsim.state_store import ClientStateStore

from .conftest import quadratic_config, run_config

MiB = 2**20


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b have the same dtype, shape and bytes (NaN payloads and −0.0 included)."""
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def odd_state(i: int) -> dict[str, torch.Tensor]:
    """A state with awkward dtypes, shapes and values, different for every client i."""
    g = torch.Generator().manual_seed(i)
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45, -float("inf")])
    nan_payload = torch.tensor([0x7FC00000 + i % 1000], dtype=torch.int32).view(torch.float32)
    return {
        "c": torch.cat([torch.randn(37, generator=g), special, nan_payload]),
        "half": torch.randn(3, 5, generator=g).to(torch.float16),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "count": torch.tensor(i, dtype=torch.int64),
        "mask": torch.rand(3, generator=g) > 0.5,
        "empty": torch.zeros(0),
    }


def test_spilled_states_read_back_bit_for_bit(tmp_path):
    store = ClientStateStore(memory_bytes=2000, spill_root=tmp_path)
    ids = list(range(0, 3000, 7))
    for i in ids:
        store.put(i, odd_state(i))
    assert store.memory_in_use <= 2000 and store.spilled_writes > 0
    assert len(store) == len(ids) and list(store.clients()) == ids
    for i in ids:
        got, want = store.get(i), odd_state(i)
        assert got.keys() == want.keys() and all(same_bits(got[k], want[k]) for k in want)
    assert store.get(1) is None and 1 not in store and 7 in store
    store.close()
    assert not list(tmp_path.iterdir())  # the private spill folder is gone


def test_recently_used_states_stay_in_memory():
    one = {"c": torch.zeros(100)}  # 400 bytes
    store = ClientStateStore(memory_bytes=1000)
    for i in range(4):
        store.put(i, one)
    store.get(2)  # 2 becomes the most recently used
    store.put(9, {"c": torch.ones(100)})
    assert set(store._mem) == {2, 9}  # 0, 1, 3 spilled, least recently used first
    store.put(0, {"c": torch.full((100,), 5.0)})  # an update of a spilled client wins over its slot
    assert torch.equal(store.get(0)["c"], torch.full((100,), 5.0))
    assert store.memory_in_use <= 1000 and len(store) == 5
    store.close()


@pytest.mark.parametrize("to_folder", [True, False], ids=["folder", "mapping"])
def test_snapshot_and_restore_round_trip(tmp_path, to_folder):
    store = ClientStateStore(memory_bytes=1500)
    for i in range(0, 200, 3):
        store.put(i, odd_state(i))
    store.put(500, {"other": torch.arange(4)})  # a second layout
    if to_folder:
        assert store.snapshot(tmp_path / "snap") is None
        assert len(json.loads((tmp_path / "snap" / "index.json").read_text())["files"]) == 2
        snap = tmp_path / "snap"
    else:
        snap = store.snapshot()
    restored = ClientStateStore(memory_bytes=0)  # restore straight to disk
    restored.restore(snap)
    assert list(restored.clients()) == list(store.clients())
    for c, state in store.items():
        assert all(same_bits(restored.get(c)[k], v) for k, v in state.items())
    store.close()
    restored.close()


@pytest.mark.slow
def test_100k_clients_small_budget_exact_and_memory_bounded(tmp_path):
    # 100,000 clients × 4 KiB = 391 MiB of state under a 16 MiB budget.
    n, d, budget = 100_000, 1024, 16 * MiB
    base = torch.randn(d, generator=torch.Generator().manual_seed(0))
    store = ClientStateStore(memory_bytes=budget, spill_root=tmp_path)
    proc = psutil.Process()
    rss0, peak = proc.memory_info().rss, 0
    for i in range(n):
        store.put(i, {"c": base + i})
        if i % 5000 == 0:
            peak = max(peak, proc.memory_info().rss - rss0)
    peak = max(peak, proc.memory_info().rss - rss0)
    assert store.memory_in_use <= budget and len(store) == n
    assert peak < budget + 48 * MiB, f"resident memory grew by {peak / MiB:.0f} MiB"
    assert all(same_bits(store.get(i)["c"], base + i) for i in range(n))
    store.close()


def test_a_run_keeps_state_only_for_reporting_clients_and_spilling_changes_nothing(tmp_path):
    # 40 clients, 3 per round, 4 rounds: at most 12 ever report. A budget of ~2 states forces spills.
    cfg = quadratic_config(
        strategy={"name": "scaffold_m", "beta": 0.5},
        data={"num_clients": 40},
        protocol={"name": "sync", "clients_per_round": 3},
        run={"rounds": 4, "eval_every": 4, "log_events": True},
    )
    spilled = run_config(cfg, tmp_path / "spilled", overrides=("run.state_memory_mb=0.0001",))
    unbounded = run_config(cfg, tmp_path / "unbounded", overrides=("run.state_memory_mb=null",))
    reported = {e["client"] for e in map(json.loads, (tmp_path / "spilled" / "events.jsonl").open())
                if e["kind"] == "arrival"}
    assert 3 <= len(reported) <= 12
    assert spilled.ctx.store.spilled_writes > 0 and spilled.ctx.store.spill_root == tmp_path / "spilled"
    assert unbounded.ctx.store.spilled_writes == 0 and set(unbounded.ctx.store.clients()) == reported
    assert not list(Path(tmp_path / "spilled").glob("client-state-*"))  # removed at the end of the run
    assert torch.equal(spilled.protocol.eval_params(spilled.ctx, spilled.final_state),
                       unbounded.protocol.eval_params(unbounded.ctx, unbounded.final_state))


def test_put_of_empty_state_stores_nothing():
    store = ClientStateStore(memory_bytes=0)
    store.put(3, {})
    assert len(store) == 0 and store.get(3) is None
    with pytest.raises(ValueError):
        store.put(-1, {"c": torch.zeros(1)})


def test_checkpoint_carries_spilled_client_state(tmp_path):
    # SCAFFOLD-M's c_i live (mostly on disk) in the store; a run resumed from an early
    # checkpoint must end exactly like the uninterrupted one, so the checkpoint holds them.
    from fedsim.checkpoint import list_checkpoints
    from fedsim.runner import resume

    cfg = quadratic_config(
        strategy={"name": "scaffold_m", "beta": 0.5},
        data={"num_clients": 40},
        protocol={"name": "sync", "clients_per_round": 3},
        run={"rounds": 12, "eval_every": 2, "checkpoint_every": 1, "keep_checkpoints": 10,
             "state_memory_mb": 0.0001},
    )
    ref = run_config(cfg, tmp_path / "ref")
    out = tmp_path / "run"
    run_config(cfg, out)
    stores = sorted((out / "checkpoints").glob("store-*"))
    assert [p.name.removeprefix("store-") for p in stores] == [
        p.name.removeprefix("ckpt-").removesuffix(".pt") for p in list_checkpoints(out)[1:]
    ]  # streamed beside every checkpoint once something has spilled (round 0 has no state yet)
    for late in list_checkpoints(out)[2:]:  # keep the checkpoints of rounds 0 and 2
        late.unlink()
    resumed = resume(out, progress=False)
    assert resumed.ctx.store.spilled_writes > 0
    assert torch.equal(resumed.protocol.eval_params(resumed.ctx, resumed.final_state),
                       ref.protocol.eval_params(ref.ctx, ref.final_state))


@pytest.mark.parametrize("budget_rows", [None, 3])  # 3: rows spill while the batch is stored
def test_put_many_stores_what_put_one_by_one_stores(tmp_path, budget_rows):
    g = torch.Generator().manual_seed(0)
    stacked = {"c": torch.randn((6, 5), generator=g), "n": torch.arange(6, dtype=torch.int64)[:, None] * 3}
    clients = [4, 1, 7, 1, 0, 9]  # client 1 twice: its last row is its state
    row_bytes = 5 * 4 + 8
    stores = [ClientStateStore(None if budget_rows is None else budget_rows * row_bytes, tmp_path / name)
              for name in ("one", "many")]
    for s in stores:
        s.put(2, {"c": torch.ones(5), "n": torch.tensor([1])})  # an older entry, first to spill
    for i, client in enumerate(clients):
        stores[0].put(client, {k: v[i] for k, v in stacked.items()})
    stores[1].put_many(clients, stacked)
    one, many = stores
    assert len(one) == len(many) == 6
    assert list(one.clients()) == list(many.clients()) == [0, 1, 2, 4, 7, 9]
    assert list(one._mem) == list(many._mem) and one.memory_in_use == many.memory_in_use  # the same stay in memory
    for (ca, sa), (cb, sb) in zip(one.items(), many.items()):
        assert ca == cb and sa.keys() == sb.keys() and all(same_bits(sa[k], sb[k]) for k in sa)
    if budget_rows is not None:
        assert one.spilled and many.spilled and many.memory_in_use <= budget_rows * row_bytes
    # each row owns its storage: a stored state does not pin the whole stack
    assert many.get(9)["c"].untyped_storage().nbytes() == 5 * 4
    for s in stores:
        s.close()
