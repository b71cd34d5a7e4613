"""The notebook's plumbing: show the federation, follow an experiment, keep its results."""
from __future__ import annotations

import json
import time
from pathlib import Path

import medmnist
import torch

from .model import MULTI_LABEL, build_model

AGGREGATED = "aggregator"


def registry_rows(federation) -> list[dict]:
    """One row per registered envoy: name, online, shapes and what its shard holds."""
    rows = []
    for name, entry in sorted(federation.get_shard_registry().items()):
        info = entry["shard_info"]
        rows.append({
            "envoy": name,
            "online": entry["is_online"],
            "sample_shape": list(info.sample_shape),
            "target_shape": list(info.target_shape),
            "shard": info.shard_description,
        })
    return rows


def is_synthetic(rows: list[dict]) -> bool:
    """True if any envoy serves synthetic data (its description says so)."""
    return any("SYNTHETIC" in row["shard"] for row in rows)


def check_shapes(federation, flag: str, size: int) -> None:
    """Raise ValueError if the director's sample/target shapes are not those of flag at size."""
    build_model(flag, size)  # validates flag and size
    meta = medmnist.INFO[flag]
    sample = [str(size), str(size), str(meta["n_channels"])]
    target = [str(len(meta["label"]) if meta["task"] == MULTI_LABEL else 1)]
    served = (list(federation.sample_shape), list(federation.target_shape))
    if served != (sample, target):
        raise ValueError(
            f"the federation serves samples {served[0]} with labels {served[1]}, but {flag} at {size} px "
            f"needs {sample} and {target}: set `dataset` and `size` to what the envoys serve"
        )


def format_metric(m: dict, rounds: int) -> str:
    """One progress line for a streamed metric."""
    return (f"round {m['round'] + 1}/{rounds}  {m['metric_origin']:<12} {m['task_name']:<28} "
            f"{m['metric_name']:<10} {m['metric_value']:.4f}")


def stream(experiment, rounds: int, echo=print) -> list[dict]:
    """Follow an experiment until it ends, echoing each metric; return them all, timestamped."""
    metrics = []
    for m in experiment.federation.dir_client.stream_metrics(experiment.experiment_name):
        m = {**m, "time": time.time()}
        metrics.append(m)
        echo(format_metric(m, rounds))
    return metrics


def aggregated(metrics: list[dict], task_name: str = "aggregated_model_validate") -> dict[int, dict]:
    """{round: {metric: value}} of the aggregator's sample-weighted metrics for one task."""
    table: dict[int, dict] = {}
    for m in metrics:
        if m["metric_origin"] == AGGREGATED and m["task_name"] == task_name:
            table.setdefault(m["round"], {})[m["metric_name"]] = m["metric_value"]
    return dict(sorted(table.items()))


def save_run(run_dir: Path, experiment, metrics: list[dict], params: dict) -> Path:
    """Write best_model.pt, last_model.pt (state_dicts), metrics.json and params.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(experiment.get_best_model().state_dict(), run_dir / "best_model.pt")
    torch.save(experiment.get_last_model().state_dict(), run_dir / "last_model.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (run_dir / "params.json").write_text(json.dumps(params, indent=1, default=str))
    return run_dir
