"""`make baseline`: the same model, optimizer and budget trained centrally on the pooled data.

It answers "what does federation cost?": rounds x epochs epochs over all nodes' training data in one process, the
best model chosen by the same rule on the pooled val split, then tested on the pooled test split and on each node's
test shard, as `make demo` reports them. The model, the data interface and the tasks are the notebook's own
(localfed.notebook): a model cell changed in the notebook trains here too.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from medfl import Best, task_type
from medfl.aggregator import AGGREGATED, VALIDATE_GLOBAL
from medmnist_shard import MedMNISTShardDescriptor

from .data import resolve
from .notebook import definitions
from .settings import Settings


def baseline(settings: Settings, run_dir: Path | None = None) -> int:
    """Train centrally, write runs/<id>-baseline/ (or `run_dir`) with results.json and the models; 0 on success."""
    started = time.monotonic()
    s = settings
    flag, size, task = s.dataset, int(s.size), task_type(s.dataset)
    data_dir, data_source = resolve(flag, size, s.data, s.data_dir, command="baseline")
    pooled = MedMNISTShardDescriptor(flag, size, data_dir, "1,1", download=False)
    nodes = {f"envoy_{r}": MedMNISTShardDescriptor(flag, size, data_dir, f"{r},{s.envoys}", s.partition, s.alpha,
                                                   s.seed, download=False)
             for r in range(1, s.envoys + 1)}
    print(f"data: {data_source} ({data_dir}); pooled: {pooled.setup.summary()['text']}")
    notebook = definitions(s.notebook, **s.notebook_parameters())  # the model as its cell builds it, seeded
    model = notebook.model
    optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate)

    def _data(descriptor, split: str):
        data = notebook.MedMNISTData(train_batch_size=s.train_batch_size, eval_batch_size=s.eval_batch_size,
                                     eval_split=split, seed=s.seed)
        data.shard_descriptor = descriptor
        return data

    train, validate = notebook.train, notebook.validate
    data = _data(pooled, "val")
    best, best_state, rounds = Best(notebook.run["best_metric"], notebook.run["best_mode"]), None, []
    for r in range(s.rounds + 1):
        entry = {"round": r, "aggregated": {}, "envoys": {}}
        if r:  # a "round" is EPOCHS epochs: the same number of passes over the same samples as federated
            entry["aggregated"]["train_loss"] = train(model, data.get_train_loader(), optimizer, "cpu", task=task,
                                                      epochs=s.epochs)["train_loss"]
        scores = validate(model, data.get_valid_loader(), "cpu", task=task)
        entry["aggregated"].update({f"val_{k}": v for k, v in scores.items()})
        rounds.append(entry)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in entry["aggregated"].items())
        print(f"  after {r}/{s.rounds} rounds' worth: {shown}", flush=True)
        # The federated rule, fed as the aggregator is: the metric, and the loss that breaks its ties.
        for name in ("loss", best.metric):
            if best.consider({"metric_origin": AGGREGATED, "task_name": VALIDATE_GLOBAL, "metric_name": name,
                              "metric_value": scores[name], "round": r}):
                best_state = copy.deepcopy(model.state_dict())
    last_state = model.state_dict()
    model.load_state_dict(best_state)
    test = validate(model, _data(pooled, "test").get_valid_loader(), "cpu", task=task)
    per_envoy = {}
    for name, descriptor in nodes.items():
        shard = _data(descriptor, "test")
        per_envoy[name] = {"samples": shard.get_valid_data_size(),
                           **validate(model, shard.get_valid_loader(), "cpu", task=task)}
    run_dir = run_dir or Path(s.runs) / f"{time.strftime('%Y%m%d-%H%M%S')}-{flag}-{size}-baseline"
    run_dir.mkdir(parents=True)
    torch.save(best_state, run_dir / "best_model.pt")
    torch.save(last_state, run_dir / "last_model.pt")
    summary = pooled.setup.summary()
    results = {
        "kind": "centralized baseline", "dataset": flag, "size": size, "data_source": data_source,
        "synthetic": summary["synthetic"],
        "partition": {"strategy": s.partition, "alpha": s.alpha, "seed": s.seed},
        "envoys": [{"name": n, **d.setup.summary()["samples"]} for n, d in nodes.items()],
        "rounds": rounds,
        "best": {"metric": best.metric, "mode": best.mode, "round": best.round, "value": best.value, "loss": best.loss,
                 "tie": best.tie},
        "test": {"model": "best", "round": best.round, **test, "per_envoy": per_envoy},
        "wall_seconds": round(time.monotonic() - started, 2),
        "params": {"rounds": s.rounds, "epochs": s.epochs, "learning_rate": s.learning_rate,
                   "train_batch_size": s.train_batch_size, "eval_batch_size": s.eval_batch_size, "seed": s.seed,
                   "notebook": s.notebook},
        "best_model": str(run_dir / "best_model.pt"), "last_model": str(run_dir / "last_model.pt"),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print("\ncentralized baseline" + (" on SYNTHETIC data" if results["synthetic"] else "")
          + f": best after {best.round} rounds' worth; test ACC {test['acc']:.4f}, AUC {test['auc']:.4f}")
    print(f"results: {run_dir}")
    return 0
