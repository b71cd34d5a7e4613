"""Runs in MLflow (run["tracking"] = "mlflow"), where researchers list and compare their experiments.

One MLflow run per federated run, in the MLflow experiment `medfl-<dataset>-<size>`: its parameters (results.json's
params, the algorithm's settings, the data and its partition), each round's aggregated and per-envoy metrics at
step = round (per envoy as `<envoy>/<name>`), the test block with its intervals (`test_acc`, `test_acc_ci_low`, ...;
per envoy `<envoy>/test_acc`), and the run's files: results.json, metrics.csv, the plots and the models. make compare
puts each algorithm's run under one parent run (run["tracking_parent"]).

The store is the folder `mlruns` in the runs' folder (runs/mlruns; browse it with the full `mlflow` package:
`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/mlruns`), or run["tracking_uri"] (a tracking server,
or a database such as sqlite:///mlflow.db). MLflow is imported only here, only when a run is tracked.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .parameters import ParameterError

FILES = ("results.json", "metrics.csv", "curves.png", "partition.png", "best_model.pt", "last_model.pt")


def store(run: dict) -> str:
    """The tracking URI: run["tracking_uri"], or the folder mlruns in the runs' folder."""
    return run.get("tracking_uri") or (Path(run["output_dir"]).expanduser().resolve() / "mlruns").as_uri()


def client(uri: str):
    """MLflow's client for `uri`; ParameterError, in one line, if MLflow is not installed."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ParameterError("tracking=\"mlflow\" needs MLflow: pip install mlflow-skinny (requirements.txt lists "
                             "it; make venv installs it)") from None
    if uri.startswith("file:"):
        # MLflow 3.x keeps its folder store working only on request (it prefers a database, which needs SQLAlchemy);
        # a folder beside the runs is what this project offers by default
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow_client.create_experiment(name)


def params_of(results: dict) -> dict[str, str]:
    """The run's parameters as MLflow keeps them: flat, as text."""
    flat = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = json.dumps(value) if not isinstance(value, str) else value

    add("", {k: v for k, v in results["params"].items() if k not in ("algorithm_options",)})
    add("algorithm", results["algorithm"])
    add("partition", results["partition"])
    add("", {"data_source": results["data_source"], "envoys": len(results["envoys"]), "tls": results["tls"]})
    return {k: v[:6000] for k, v in flat.items()}


def metrics_of(results: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) of every round's metric, aggregated and per envoy, and of the test block."""
    rows = []
    for entry in results["rounds"]:
        for origin, values in [("", entry["aggregated"]), *entry["envoys"].items()]:
            rows += [(f"{origin}/{name}" if origin else name, value, entry["round"]) for name, value in values.items()
                     if isinstance(value, (int, float))]
    step = results["best"]["round"] or 0
    for prefix, block in (("test", results["test"]), ("personalized_test", results["test"].get("personalized"))):
        for origin, entry in [("", block or {}), *((block or {}).get("per_envoy") or {}).items()]:
            key = f"{origin}/{prefix}" if origin else prefix
            for name in ("acc", "auc", "loss"):
                if isinstance(entry.get(name), (int, float)):
                    rows.append((f"{key}_{name}", entry[name], step))
                ci = (entry.get("ci") or {}).get(name)
                if ci:
                    rows += [(f"{key}_{name}_ci_low", ci[0], step), (f"{key}_{name}_ci_high", ci[1], step)]
    return [(k, float(v), int(s)) for k, v, s in rows]


def track(run_dir, results: dict, run: dict) -> dict:
    """Log the run to MLflow; what results.json records of it: {uri, experiment, run_id}."""
    from mlflow.entities import Metric, Param

    uri = store(run)
    mlflow_client = client(uri)
    name = f"medfl-{results['dataset']}-{results['size']}"
    tags = {"mlflow.runName": results["params"].get("experiment", Path(run_dir).name),
            "synthetic": str(results["synthetic"]), "status": results["status"]}
    if run["tracking_parent"]:
        tags["mlflow.parentRunId"] = run["tracking_parent"]
    tracked = mlflow_client.create_run(experiment_id(mlflow_client, name), tags=tags)
    run_id, now = tracked.info.run_id, int(time.time() * 1000)
    params = [Param(k, v) for k, v in params_of(results).items()]
    metrics = [Metric(k, v, now, s) for k, v, s in metrics_of(results)]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters and 1000 metrics per call
        mlflow_client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for file in FILES:
        if (Path(run_dir) / file).is_file():
            mlflow_client.log_artifact(run_id, str(Path(run_dir) / file))
    mlflow_client.set_terminated(run_id, "FAILED" if results["status"] == "failed" else "FINISHED")
    return {"uri": uri, "experiment": name, "run_id": run_id}


def start_parent(run: dict, name: str, dataset: str, size: int) -> str:
    """An MLflow run for make compare's algorithms to go under; its id."""
    mlflow_client = client(store(run))
    parent = mlflow_client.create_run(experiment_id(mlflow_client, f"medfl-{dataset}-{size}"),
                                      tags={"mlflow.runName": name, "kind": "make compare"})
    return parent.info.run_id


def end_parent(run: dict, run_id: str, failed: bool) -> None:
    client(store(run)).set_terminated(run_id, "FAILED" if failed else "FINISHED")
