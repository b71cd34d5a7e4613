"""What a run leaves behind: results.json, metrics.csv, plots, TensorBoard logs and the models."""
from __future__ import annotations

import base64
import csv
import json
import os
import resource
import time
from pathlib import Path

import medmnist
import numpy as np
import torch

from .. import algorithms
from ..events import AGGREGATED, REFUSED, TRAFFIC, VALIDATE_GLOBAL, VALIDATE_LOCAL
from ..intervals import HIGH, LOW
from ..metrics import CI_NAMES
from .checkpoint import write_atomically
from .federation import is_synthetic
from .follow import Followed
from .parameters import NotebookError


class ExperimentFailed(NotebookError):
    """An experiment ended without its result; the message says why and where what arrived was kept."""


VAL_NAMES = {"loss": "val_loss", "acc": "val_acc", "auc": "val_auc", "seconds": "val_seconds"}


def _by_round(metrics: list[dict]) -> dict:
    """{round: {origin: {name: value}}}: train metrics of round r, validation of the model after r rounds."""
    table: dict = {}
    for m in metrics:
        if m["task_name"] == "train":
            r, name = m["round"] + 1, m["metric_name"]
        elif m["task_name"] == VALIDATE_GLOBAL:
            r, name = m["round"], VAL_NAMES.get(m["metric_name"], f"val_{m['metric_name']}")
        else:
            continue
        table.setdefault(r, {}).setdefault(m["metric_origin"], {})[name] = m["metric_value"]
    return dict(sorted(table.items()))


# Privacy spent is not averaged: what counts is the most any envoy spent.
PRIVACY = ("epsilon", "delta")


def rounds_entries(metrics: list[dict]) -> list[dict]:
    """One entry per round r (0 = the untrained model): aggregated and per-envoy train and val metrics. Under DP
    the aggregate's epsilon and delta are the envoys' maximum, not OpenFL's sample-weighted mean."""
    entries = []
    for r, origins in _by_round(metrics).items():
        envoys = {k: v for k, v in sorted(origins.items()) if k != AGGREGATED}
        aggregated = dict(origins.get(AGGREGATED, {}))
        for name in PRIVACY:
            spent = [values[name] for values in envoys.values() if name in values]
            if spent:
                aggregated[name] = max(spent)
        entries.append({"round": r, "aggregated": aggregated, "envoys": envoys})
    return entries


def privacy_block(rounds: list[dict], params: dict) -> dict | None:
    """What DP-SGD spent: each envoy's epsilon after its last training round, the maximum, and delta."""
    if not params.get("dp"):
        return None
    spent = {}
    for entry in rounds:
        for name, values in entry["envoys"].items():
            if "epsilon" in values:
                spent[name] = {key: values[key] for key in ("epsilon", "delta", "epsilon_before") if key in values}
    if not spent:
        return {"dp": True, "per_envoy": {}, "epsilon": None, "delta": None, "summary": "no envoy finished a round"}
    epsilon, delta = max(v["epsilon"] for v in spent.values()), max(v["delta"] for v in spent.values())
    before = max((v.get("epsilon_before", 0.0) for v in spent.values()), default=0.0)
    summary = f"each envoy spent at most epsilon = {epsilon:.2f} at delta = {delta:.2g}"
    if before:  # the envoys' ledgers held an earlier attempt of this run (medfl.privacy)
        summary += f" over all attempts of this run (up to {before:.2f} before its last experiment)"
    return {"dp": True, "per_envoy": spent, "epsilon": epsilon, "delta": delta, "summary": summary}


def traffic(metrics: list[dict]) -> list[dict]:
    """Per round, the tensor bytes the director received from the envoys and sent to them, and the new connections
    they opened to it: in all, and for each envoy under `per_envoy`."""
    rounds: dict = {}
    for m in metrics:
        if m["task_name"] == TRAFFIC:
            entry = rounds.setdefault(m["round"], {"round": m["round"], "per_envoy": {}})
            if m["metric_origin"] != AGGREGATED:
                entry = entry["per_envoy"].setdefault(m["metric_origin"], {})
            entry[m["metric_name"]] = int(m["metric_value"])
    return [rounds[r] for r in sorted(rounds)]


def algorithm_settings(params: dict) -> dict:
    """The run's algorithm and the settings it used, from the notebook's parameters."""
    return algorithms.settings(params.get("algorithm", "fedavg"), params.get("algorithm_options"))


def test_block(metrics: list[dict], samples: dict[str, int], task: str = VALIDATE_GLOBAL) -> dict:
    """Sample-weighted overall test ACC, AUC and loss, and each envoy's, from a test run's metrics: of the model the
    envoys were sent (VALIDATE_GLOBAL), or of each envoy's fine-tuned one (VALIDATE_LOCAL, personalize_epochs)."""
    block: dict = {"per_envoy": {}}
    for m in metrics:
        if m["task_name"] != task:
            continue
        if m["metric_origin"] == AGGREGATED:
            block[m["metric_name"]] = m["metric_value"]
        else:
            entry = block["per_envoy"].setdefault(m["metric_origin"], {"samples": samples.get(m["metric_origin"])})
            entry[m["metric_name"]] = m["metric_value"]
    for entry in (block, *block["per_envoy"].values()):
        _fold_intervals(entry)
    return block


def _fold_intervals(entry: dict) -> None:
    """<name>_ci_low and <name>_ci_high (medfl.intervals) become entry["ci"][name] = [low, high] (None where the
    interval is undefined); entry["ci"] is None without intervals (bootstrap 0)."""
    ci = {}
    for name in CI_NAMES:
        low, high = entry.pop(name + LOW, None), entry.pop(name + HIGH, None)
        if low is not None:
            ci[name] = [low, high] if np.isfinite(low) and np.isfinite(high) else None
    entry["ci"] = ci or None


def with_interval(entry: dict, name: str) -> str:
    """`0.9123 (95 % CI 0.8975-0.9262)`: a test metric and its interval, if it has one."""
    value, ci = entry.get(name), (entry.get("ci") or {}).get(name)
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" (95 % CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")


def test_rows(block: dict) -> list[dict]:
    """The test table: one row per envoy and one pooled, each metric with its 95 % interval."""
    def row(name: str, entry: dict, samples) -> dict:
        return {"envoy": name, "samples": samples, "ACC": with_interval(entry, "acc"),
                "AUC": with_interval(entry, "auc"), "loss": with_interval(entry, "loss")}

    rows = [row(name, e, e.get("samples")) for name, e in sorted(block.get("per_envoy", {}).items())]
    return [*rows, row("pooled", block, sum(r["samples"] or 0 for r in rows) or None)]


def build_results(*, params: dict, envoys: list[dict], training: Followed, testing: Followed | None = None,
                  started: float, data_source: str, restarts: list | None = None) -> dict:
    """The run's summary: what was trained on which shards, per-round metrics, the test of the best model,
    who dropped out, and whether and why the run failed. `started` is the time.time() of submission; `restarts`
    lists the run's resumes (medfl.researcher.restarts)."""
    synthetic = is_synthetic(envoys)
    first = envoys[0] if envoys else {}
    nodes = [{"name": e["envoy"], **e.get("samples", {}), "label_histogram": e.get("label_histogram", {}),
              **{k: e[k] for k in ("acquisition", "sample") if k in e}} for e in envoys]
    test_samples = {n["name"]: n.get("test") for n in nodes}
    best = training.best
    failed = _failed(training, testing)
    return {
        "status": "failed" if failed else "completed",
        "error": failed.error if failed else None,
        "attempt": training.name,  # OpenFL's experiment of this attempt (a resumed run's: <run>-resumed-<time>)
        "restarts": list(restarts or []),
        "dataset": params["dataset"], "size": params["size"],
        "data_source": data_source or ("synthetic" if synthetic else "medmnist"), "synthetic": synthetic,
        "partition": {"strategy": first.get("partition"), "alpha": first.get("alpha"), "seed": first.get("seed")},
        "algorithm": algorithm_settings(params),
        "envoys": nodes,
        "rounds": (rounds := rounds_entries(training.metrics)),
        "traffic": traffic(training.metrics),
        "privacy": privacy_block(rounds, params),
        "dropouts": (dropouts := training.dropouts + (testing.dropouts if testing else [])),
        # Envoys whose own policy refused the experiment, or stopped their part in it (security.policy)
        "refusals": [{**d, "reason": d["reason"][len(REFUSED):]} for d in dropouts if d["reason"].startswith(REFUSED)],
        # Envoys that held an experiment until their operator approved its code (security.review)
        "held": training.held + (testing.held if testing else []),
        "rejected_updates": training.rejected + (testing.rejected if testing else []),
        "clipped_updates": training.clipped,  # clipped to max_update_size, then aggregated
        # What the director learned: with secure aggregation, per round, whose updates it summed without seeing
        "secure_aggregation": {"rounds": training.secure} if params.get("secure_aggregation") else None,
        "best": {"metric": best.metric, "mode": best.mode, "round": best.round, "value": best.value, "loss": best.loss,
                 "tie": best.tie},
        "test": {"model": "best", "round": best.round,
                 **test_block(testing.metrics if testing else [], test_samples),
                 # personalize_epochs: each envoy's own model, the best one fine-tuned on its own train split
                 "personalized": ({"epochs": params["personalize_epochs"],
                                   **test_block(testing.metrics, test_samples, VALIDATE_LOCAL)}
                                  if testing and params.get("personalize_epochs") else None)},
        "wall_seconds": round(time.time() - started, 2),
        "timing": {"submitted": started, "trained": training.ended, "tested": testing.ended if testing else None,
                   "notebook_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "tls": bool(params.get("tls")),
        "params": params,
    }


def _failed(training: Followed, testing: Followed | None) -> Followed | None:
    return next((run for run in (training, testing) if run is not None and run.error), None)


def stop_if_failed(run_dir: Path, *, training: Followed, testing: Followed | None = None, **record) -> None:
    """If either experiment failed, save what arrived (results.json says why) and raise ExperimentFailed."""
    failed = _failed(training, testing)
    if failed is None:
        return
    finish_run(run_dir, training=training, testing=testing, best_model=training.best_model, **record)
    kept = "the best model so far" if training.best_model is not None else "no model (none had arrived)"
    resume = ""
    if failed is training and (Path(run_dir) / "checkpoint.pt").is_file():
        resume = (f"; it can go on from its last checkpoint: run = {{\"resume_from\": \"{run_dir}\"}} (make demo "
                  f"resume_from={Path(run_dir).resolve()})")
    raise ExperimentFailed(f"experiment {failed.name} failed: {failed.error}. Kept the metrics so far and "
                           f"{kept} in {Path(run_dir).resolve()}{resume}")


def finish_run(run_dir: Path, *, training: Followed, testing: Followed | None = None,
               best_model: torch.nn.Module | None = None, last_model: torch.nn.Module | None = None,
               tracking: dict | None = None, **record) -> dict:
    """The run's results (build_results), written with the models given to its folder (save_run); returned. With
    `tracking` (the run's settings, run["tracking"] "mlflow"), also logged to MLflow (medfl.researcher.tracking)."""
    results = build_results(training=training, testing=testing, **record)
    save_run(run_dir, results, training, testing, best_model=best_model, last_model=last_model)
    if tracking and tracking["tracking"] == "mlflow":
        from .tracking import track  # imports MLflow: only for a tracked run

        written = json.loads((Path(run_dir) / "results.json").read_text())  # with the models' paths
        written["tracking"] = results["tracking"] = {"tracking": "mlflow", **track(run_dir, written, tracking)}
        write_atomically(Path(run_dir) / "results.json", json.dumps(written, indent=1, default=str).encode())
    return results


def write_metrics_csv(path: Path, streams: dict[str, list[dict]]) -> None:
    """Every streamed metric as a row: experiment, time, round, origin, task, metric, value."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["experiment", "time", "round", "origin", "task", "metric", "value"])
        for kind, metrics in streams.items():
            for m in metrics:
                writer.writerow([kind, f"{m['time']:.3f}", m["round"], m["metric_origin"], m["task_name"],
                                 m["metric_name"], m["metric_value"]])


def write_tensorboard(folder: Path, results: dict) -> None:
    """Per-round curves for the aggregate and each envoy, and the test scores, for TensorBoard."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for entry in results["rounds"]:
            for origin, values in [("aggregated", entry["aggregated"]), *entry["envoys"].items()]:
                for name, value in values.items():
                    writer.add_scalar(f"{name}/{origin}", value, entry["round"])
        for name in ("acc", "auc", "loss"):
            if name in results["test"]:
                writer.add_scalar(f"test_{name}/aggregated", results["test"][name], results["best"]["round"])


def plot_curves(path: Path, results: dict) -> None:
    """Aggregated val ACC, val AUC and train loss per round, each envoy as a fainter line; under DP, the privacy
    spent (the aggregate line is the envoys' maximum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("val_acc", "validation ACC"), ("val_auc", "validation AUC"), ("train_loss", "training loss")]
    if results.get("privacy"):
        panels.append(("epsilon", f"privacy spent, epsilon (delta {results['privacy']['delta'] or 0:.2g})"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    envoys = sorted({name for entry in results["rounds"] for name in entry["envoys"]})
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in envoys:
            points = [(e["round"], e["envoys"][name][key]) for e in results["rounds"]
                      if key in e["envoys"].get(name, {})]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", alpha=0.35, linewidth=1, label=name)
        points = [(e["round"], e["aggregated"][key]) for e in results["rounds"] if key in e["aggregated"]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color="black", linewidth=2, label="aggregated")
        if key.startswith("val") and results["best"]["round"] is not None:
            ax.axvline(results["best"]["round"], color="tab:green", linestyle=":", label="best model")
        for d in results["dropouts"]:
            if not d["experiment"].endswith("-test"):  # not the test run's
                # Lost during training round r: between the models after r - 1 and r rounds.
                ax.axvline(d["round"] - 0.5, color="tab:red", linestyle="--", label=f"{d['envoy']} dropped out")
        for restart in results.get("restarts", []):
            ax.axvline(restart["after_round"], color="tab:purple", linestyle="-.",
                       label=f"resumed after round {restart['after_round']}")
        for envoy in sorted({r["envoy"] for r in results.get("rejected_updates", [])}):
            rounds = [r["round"] for r in results["rejected_updates"] if r["envoy"] == envoy]
            # Left out of round r's average: the model after r rounds was made without it.
            ax.plot(rounds, [ax.get_ylim()[0]] * len(rounds), "x", color="tab:red", markersize=9, clip_on=False,
                    label=f"{envoy}'s update rejected")
        ax.set_title(title)
        ax.set_xlabel("rounds trained")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    failed = " -- the run FAILED: results.json says why" if results["status"] == "failed" else ""
    fig.suptitle(_headline(results) + failed)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_partition(path: Path, results: dict) -> None:
    """Training labels per envoy: how the data is spread over the nodes; with the scanner partition, under them one
    training image per envoy as that envoy sees it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = medmnist.INFO[results["dataset"]]["label"]
    envoys = [e for e in results["envoys"] if e["label_histogram"].get("train")]
    samples = [e for e in envoys if e.get("sample")]
    width = max(6, 1.2 * len(envoys) + 4)
    fig = plt.figure(figsize=(width, 6.5 if samples else 4))
    grid = fig.add_gridspec(2 if samples else 1, max(1, len(samples)), height_ratios=[2, 1.3] if samples else [1])
    ax = fig.add_subplot(grid[0, :])
    bottom = [0] * len(envoys)
    colors = plt.get_cmap("tab20")
    for k in range(len(labels)):
        counts = [e["label_histogram"]["train"][k] for e in envoys]
        ax.bar([e["name"] for e in envoys], counts, bottom=bottom, color=colors(k % 20),
               label=_short(labels[str(k)]))
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    multi = medmnist.INFO[results["dataset"]]["task"].startswith("multi-label")
    ax.set_ylabel("positive findings (train)" if multi else "training samples")
    partition = results["partition"]
    skew = f", alpha {partition['alpha']}" if partition["strategy"] == "dirichlet" else ""
    ax.set_title(f"{_headline(results)}\npartition: {partition['strategy']}{skew}")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    for i, envoy in enumerate(samples):
        shown = fig.add_subplot(grid[1, i])
        image = np.frombuffer(base64.b64decode(envoy["sample"]["uint8"]), dtype=np.uint8)
        image = image.reshape(envoy["sample"]["shape"])
        shown.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        a = envoy.get("acquisition", {})
        shown.set_title(f"{envoy['name']}\ncontrast {a.get('contrast', 1):.2f}, gamma {a.get('gamma', 1):.2f}\n"
                        f"blur {a.get('blur', 0):.2f}, noise {a.get('noise', 0):.3f}", fontsize=7)
        shown.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(label: str) -> str:
    label = label.split("(")[0].strip()  # "immature granulocytes(myelocytes, ...)": the name, not the list
    return label if len(label) <= 28 else label[:26] + "..."


def _headline(results: dict) -> str:
    source = "SYNTHETIC data" if results["synthetic"] else "MedMNIST"
    algorithm = f", {algorithms.describe(results['algorithm'])}" if results.get("algorithm") else ""
    return f"{results['dataset']} {results['size']}px, {len(results['envoys'])} envoys ({source}){algorithm}"


def save_run(run_dir: Path, results: dict, training: Followed, testing: Followed | None = None,
             best_model: torch.nn.Module | None = None, last_model: torch.nn.Module | None = None) -> Path:
    """Write the models given, results.json, metrics.csv, plots and TensorBoard logs; point `latest` here."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    for name, model in (("best_model", best_model), ("last_model", last_model)):
        results[name] = str(run_dir / f"{name}.pt") if model is not None else None
        if model is not None:
            torch.save(model.state_dict(), results[name])
    write_metrics_csv(run_dir / "metrics.csv", {"train": training.metrics, "test": testing.metrics if testing else []})
    plot_curves(run_dir / "curves.png", results)
    plot_partition(run_dir / "partition.png", results)
    write_tensorboard(run_dir / "tensorboard", results)
    write_atomically(run_dir / "results.json", json.dumps(results, indent=1, default=str).encode())
    latest = run_dir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = run_dir.parent / f".latest-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)  # atomic: readers never see a missing link
    return run_dir
