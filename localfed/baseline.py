"""`make baseline`: the same model, optimizer and budget trained centrally on the pooled data.

It answers "what does federation cost?": ROUNDS x EPOCHS epochs over all nodes' training data in
one process, the best model chosen by the same rule on the pooled val split, then tested on the
pooled test split and on each node's test shard, as `make demo` reports them.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from medfl import Best, MedMNISTData, build_model, task_type, train, validate
from medfl.aggregator import AGGREGATED, VALIDATE_GLOBAL
from medfl.researcher import DEFAULTS
from medmnist_shard import MedMNISTShardDescriptor

from .data import resolve

LR, TRAIN_BATCH, EVAL_BATCH = (DEFAULTS[k] for k in ("learning_rate", "train_batch_size", "eval_batch_size"))


def _data(descriptor, split: str, seed: int) -> MedMNISTData:
    data = MedMNISTData(train_batch_size=TRAIN_BATCH, eval_batch_size=EVAL_BATCH, eval_split=split, seed=seed)
    data.shard_descriptor = descriptor
    return data


def baseline(args, run_dir: Path | None = None) -> int:
    """Train centrally, write runs/<id>-baseline/ (or `run_dir`) with results.json and the models; 0 on success."""
    started = time.monotonic()
    flag, size, task = args.dataset, int(args.size), task_type(args.dataset)
    data_dir, data_source = resolve(flag, size, args.data, args.data_dir, command="baseline")
    pooled = MedMNISTShardDescriptor(flag, size, data_dir, "1,1", download=False)
    nodes = {f"envoy_{r}": MedMNISTShardDescriptor(flag, size, data_dir, f"{r},{args.envoys}", args.partition,
                                                   args.alpha, args.seed, download=False)
             for r in range(1, args.envoys + 1)}
    print(f"data: {data_source} ({data_dir}); pooled: {pooled.setup.summary()['text']}")
    torch.manual_seed(args.seed)
    model = build_model(flag, size)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    data = _data(pooled, "val", args.seed)
    best, best_state, rounds = Best(DEFAULTS["best_metric"], DEFAULTS["best_mode"]), None, []
    for r in range(args.rounds + 1):
        entry = {"round": r, "aggregated": {}, "envoys": {}}
        if r:  # a "round" is EPOCHS epochs: the same number of passes over the same samples as federated
            entry["aggregated"]["train_loss"] = train(model, data.get_train_loader(), optimizer, "cpu", task=task,
                                                      epochs=args.epochs)["train_loss"]
        scores = validate(model, data.get_valid_loader(), "cpu", task=task)
        entry["aggregated"].update({f"val_{k}": v for k, v in scores.items()})
        rounds.append(entry)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in entry["aggregated"].items())
        print(f"  after {r}/{args.rounds} rounds' worth: {shown}", flush=True)
        # The federated rule, fed as the aggregator is: the metric, and the loss that breaks its ties.
        for name in ("loss", best.metric):
            if best.consider({"metric_origin": AGGREGATED, "task_name": VALIDATE_GLOBAL, "metric_name": name,
                              "metric_value": scores[name], "round": r}):
                best_state = copy.deepcopy(model.state_dict())
    last_state = model.state_dict()
    model.load_state_dict(best_state)
    test = validate(model, _data(pooled, "test", args.seed).get_valid_loader(), "cpu", task=task)
    per_envoy = {}
    for name, descriptor in nodes.items():
        shard = _data(descriptor, "test", args.seed)
        per_envoy[name] = {"samples": shard.get_valid_data_size(),
                           **validate(model, shard.get_valid_loader(), "cpu", task=task)}
    run_dir = run_dir or Path(args.runs).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{flag}-{size}-baseline"
    run_dir.mkdir(parents=True)
    torch.save(best_state, run_dir / "best_model.pt")
    torch.save(last_state, run_dir / "last_model.pt")
    summary = pooled.setup.summary()
    results = {
        "kind": "centralized baseline", "dataset": flag, "size": size, "data_source": data_source,
        "synthetic": summary["synthetic"],
        "partition": {"strategy": args.partition, "alpha": args.alpha, "seed": args.seed},
        "envoys": [{"name": n, **d.setup.summary()["samples"]} for n, d in nodes.items()],
        "rounds": rounds,
        "best": {"metric": best.metric, "mode": best.mode, "round": best.round, "value": best.value, "loss": best.loss,
                 "tie": best.tie},
        "test": {"model": "best", "round": best.round, **test, "per_envoy": per_envoy},
        "wall_seconds": round(time.monotonic() - started, 2),
        "params": {"rounds": args.rounds, "epochs_per_round": args.epochs, "learning_rate": LR,
                   "train_batch_size": TRAIN_BATCH, "eval_batch_size": EVAL_BATCH, "seed": args.seed},
        "best_model": str(run_dir / "best_model.pt"), "last_model": str(run_dir / "last_model.pt"),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print("\ncentralized baseline" + (" on SYNTHETIC data" if results["synthetic"] else "")
          + f": best after {best.round} rounds' worth; test ACC {test['acc']:.4f}, AUC {test['auc']:.4f}")
    print(f"results: {run_dir}")
    return 0
