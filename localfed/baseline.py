"""`make baseline`: the same model, optimizer and budget trained centrally on the pooled data.

It answers "what does federation cost?": rounds x epochs epochs over all nodes' training data in one process, the
best model chosen by the same rule on the pooled val split, then tested on the pooled test split and on each node's
test shard, as `make demo` reports them; with `local=1` (LOCAL=1) also each envoy's own model, trained on its data
alone with the same budget: what a hospital gets without the federation. The model, the data interface and the
tasks are the notebook's own (localfed.notebook): a model cell changed in the notebook trains here too.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from medfl import Best, task_type
from medfl.events import AGGREGATED, VALIDATE_GLOBAL
from medfl.metrics import REPLICATES, interval, pooled, with_intervals
from medfl.researcher.report import with_interval
from medmnist_shard import MedMNISTShardDataset, MedMNISTShardDescriptor

from .notebook import definitions
from .run import data_for, shard_params
from .settings import Settings


class Pooled:
    """Every envoy's data as the envoys serve it, pooled, split by split: for data the envoys own (data_dirs) or
    transform (the scanner partition), which no single file holds."""

    def __init__(self, nodes: dict):
        self.splits = {}
        for split in ("train", "val", "test"):
            parts = [d.get_dataset(split) for d in nodes.values()]
            served = [part[np.arange(len(part))] for part in parts]  # (images, labels) as each envoy serves them
            self.splits[split] = MedMNISTShardDataset(np.concatenate([images for images, _ in served]),
                                                      np.concatenate([labels for _, labels in served]))

    def get_dataset(self, split: str):
        return self.splits[split]


def _served(descriptor) -> str:
    return ", ".join(f"{split} {len(descriptor.get_dataset(split))}" for split in ("train", "val", "test"))


def baseline(settings: Settings, run_dir: Path | None = None) -> int:
    """Train centrally, write runs/<id>-baseline/ (or `run_dir`) with results.json and the models; 0 on success.
    With `local`, also train each envoy's model on its own data alone, with the same budget."""
    started = time.monotonic()
    s = settings
    flag, size, task = s.dataset, int(s.size), task_type(s.dataset)
    data_dir, data_source = data_for(s)
    nodes = {name: MedMNISTShardDescriptor(**params) for name, params in shard_params(s, data_dir).items()}
    if s.data_dirs or s.partition == "scanner":
        pooled = Pooled(nodes)
    else:
        pooled = MedMNISTShardDescriptor(flag, size, data_dir, "1,1", download=False)
    synthetic = any(d.setup.synthetic for d in nodes.values())
    print(f"data: {data_source} ({data_dir or s.data_dirs}); pooled: {_served(pooled)}")
    notebook = definitions(s.notebook, **s.notebook_parameters())  # the model as its cell builds it, seeded
    model = notebook.model
    initial = copy.deepcopy(model.state_dict())

    def _data(descriptor, split: str):
        data = notebook.MedMNISTData(train_batch_size=s.train_batch_size, eval_batch_size=s.eval_batch_size,
                                     eval_split=split, seed=s.seed)
        data.shard_descriptor = descriptor
        return data

    def _test(descriptor, replicates: dict | None = None) -> dict:
        """The test scores of `model` on one descriptor's test split, with their 95 % intervals; its bootstrap
        values go to `replicates`, if given."""
        shard = _data(descriptor, "test")
        scores = notebook.validate(model, shard.get_valid_loader(), "cpu", task=task, resamples=s.bootstrap,
                                   seed=s.seed)
        if replicates is not None:
            replicates.update({k: v for k, v in scores.items() if k.endswith(REPLICATES)})
        return {"samples": shard.get_valid_data_size(), **with_intervals(scores)}

    def _trained(descriptor, who: str):
        """Train `model` from the initial weights on one descriptor's train split for the budget; leave the best
        model by its val split in `model`. (best, best state, last state, rounds)"""
        model.load_state_dict(initial)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate)
        data = _data(descriptor, "val")
        best, best_state, rounds = Best(notebook.run["best_metric"], notebook.run["best_mode"]), None, []
        for r in range(s.rounds + 1):
            entry = {"round": r, "aggregated": {}, "envoys": {}}
            if r:  # a "round" is EPOCHS epochs: the same number of passes over the same samples as federated
                entry["aggregated"]["train_loss"] = notebook.train(model, data.get_train_loader(), optimizer, "cpu",
                                                                   task=task, epochs=s.epochs)["train_loss"]
            scores = notebook.validate(model, data.get_valid_loader(), "cpu", task=task)
            entry["aggregated"].update({f"val_{k}": v for k, v in scores.items()})
            rounds.append(entry)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in entry["aggregated"].items())
            print(f"  {who}after {r}/{s.rounds} rounds' worth: {shown}", flush=True)
            # The federated rule, fed as the aggregator is: the metric, and the loss that breaks its ties.
            for name in ("loss", best.metric):
                if best.consider({"metric_origin": AGGREGATED, "task_name": VALIDATE_GLOBAL, "metric_name": name,
                                  "metric_value": scores[name], "round": r}):
                    best_state = copy.deepcopy(model.state_dict())
        last_state = copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        return best, best_state, last_state, rounds

    best, best_state, last_state, rounds = _trained(pooled, "")
    test = _test(pooled)
    test.pop("samples")
    per_envoy = {name: _test(descriptor) for name, descriptor in nodes.items()}
    local = None
    if s.local:  # each envoy alone: what a hospital gets without the federation
        print("each envoy alone, with the same budget:", flush=True)
        alone, replicates = {}, {}
        for name, descriptor in nodes.items():
            own_best = _trained(descriptor, f"{name} alone, ")[0]
            alone[name] = {"best_round": own_best.round, **_test(descriptor, replicates.setdefault(name, {}))}
        local = {**_weighted(alone, replicates), "per_envoy": alone}
    run_dir = run_dir or Path(s.runs) / f"{time.strftime('%Y%m%d-%H%M%S')}-{flag}-{size}-baseline"
    run_dir.mkdir(parents=True)
    torch.save(best_state, run_dir / "best_model.pt")
    torch.save(last_state, run_dir / "last_model.pt")
    results = {
        "kind": "centralized baseline", "dataset": flag, "size": size, "data_source": data_source,
        "synthetic": synthetic,
        "partition": {"strategy": "own" if s.data_dirs else s.partition, "alpha": s.alpha, "seed": s.seed},
        "envoys": [{"name": n, **d.setup.summary()["samples"]} for n, d in nodes.items()],
        "rounds": rounds,
        "best": {"metric": best.metric, "mode": best.mode, "round": best.round, "value": best.value, "loss": best.loss,
                 "tie": best.tie},
        "test": {"model": "best", "round": best.round, **test, "per_envoy": per_envoy},
        # local: each envoy's model trained on its own data alone, tested on its own test split
        "local": local,
        "wall_seconds": round(time.monotonic() - started, 2),
        "params": {"rounds": s.rounds, "epochs": s.epochs, "learning_rate": s.learning_rate,
                   "train_batch_size": s.train_batch_size, "eval_batch_size": s.eval_batch_size, "seed": s.seed,
                   "notebook": s.notebook},
        "best_model": str(run_dir / "best_model.pt"), "last_model": str(run_dir / "last_model.pt"),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print("\ncentralized baseline" + (" on SYNTHETIC data" if results["synthetic"] else "")
          + f": best after {best.round} rounds' worth; test ACC {with_interval(test, 'acc')}, AUC "
          f"{with_interval(test, 'auc')}")
    if local:
        print("each envoy alone: test ACC " + ", ".join(f"{n} {e['acc']:.4f}" for n, e in local["per_envoy"].items())
              + f"; all envoys' test images {local['acc']:.4f}")
    print(f"results: {run_dir}")
    return 0


def _weighted(per_envoy: dict, replicates: dict) -> dict:
    """ACC and AUC over every envoy's test images: their means weighted by the envoys' test samples, with the
    intervals of their bootstrap values pooled the same way (medfl.metrics.pooled, as the director pools them)."""
    weights = {name: e["samples"] for name, e in per_envoy.items()}
    total = sum(weights.values())
    ci = {name: interval(pooled({e: replicates[e][name + REPLICATES] for e in per_envoy}, weights))
          for name in ("acc", "auc") if all(name + REPLICATES in replicates[e] for e in per_envoy)}
    return {**{k: sum(e[k] * e["samples"] for e in per_envoy.values()) / total for k in ("acc", "auc")},
            "ci": ci or None}
