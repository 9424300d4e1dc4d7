"""A plain Flower ServerApp (flwr.serverapp.strategy.FedAvg); the initial model is fedsim's
initial logreg, so the run can be compared with `fedsim run fedsim.yaml`."""
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedsim.config import load_config
from fedsim.flower.records import vector_to_record
from fedsim.runner import build

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    task = build(load_config(Path(__file__).with_name("fedsim.yaml"))).ctx.task
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=vector_to_record(task.initial_params(), task.layout),
                            num_rounds=int(context.run_config["num-server-rounds"]))
    out = Path(str(context.run_config["out"]))
    torch.save({"model": result.arrays.to_torch_state_dict(),
                "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}}, out)
