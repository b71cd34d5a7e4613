"""`make compare`: which algorithm for non-IID hospitals, and at what cost.

The same data, partition, seed, model and budget (rounds x epochs), trained once per algorithm of `algorithms`
through the notebook, then once centrally (make baseline, with the notebook's model) and once per envoy on its own
data alone (make baseline local=1), one after another on this machine. One director and its envoys
serve every algorithm's experiments in turn, so their start-up is paid once. It writes runs/compare-<id>/: one
folder per algorithm (the notebook's run folder), centralized/ (make baseline's), compare.json, compare.png, and
prints one table.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from medfl.algorithms import describe

from .baseline import baseline
from .run import RunError, compared, data_for, local_federation, run_notebook, shard_params, tracking_uri
from .settings import Settings

CENTRALIZED = "centralized"
ALONE = "each envoy alone"


def compare(settings: Settings) -> int:
    """Train every algorithm of `algorithms` and the centralized baseline; write compare.json and compare.png; 0 if
    all ran."""
    s = settings
    started = time.monotonic()
    deadline = started + settings.timeout
    algorithms = compared(settings)
    data_dir, data_source = data_for(s)
    print(f"data: {data_source} ({data_dir or s.data_dirs})")
    shards = shard_params(settings, data_dir)
    out = Path(settings.runs) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    federation = local_federation(settings, out, shards)
    steps = len(algorithms) + 1
    print(f"comparing {', '.join(algorithms)} and a centralized baseline: {s.rounds} rounds x {s.epochs} epochs, "
          f"{spread(partition(s))}, {s.envoys} envoys, seed {s.seed}; results in {out}")
    print(f"starting a director and {s.envoys} envoys on {federation.host}:{federation.port} ...", flush=True)
    runs: dict[str, dict] = {}
    tracked = {}  # tracking=mlflow: every algorithm's run goes under one parent run
    if settings.tracking == "mlflow":
        from medfl.researcher.tracking import start_parent

        store = {"tracking_uri": tracking_uri(settings)}
        tracked = {"run": {**store, "tracking_parent": start_parent(store, out.name, s.dataset, int(s.size))}}
        print(f"MLflow: every algorithm's run under the parent run {out.name} ({store['tracking_uri']})")
    with federation:
        for i, algorithm in enumerate(algorithms, 1):
            print(f"\n[{i}/{steps}] {algorithm}", flush=True)
            run_dir = out / algorithm
            (run_dir / "logs").mkdir(parents=True)
            began = time.monotonic()
            try:
                run_notebook(run_dir, federation, settings, data_source, deadline, algorithm=algorithm, **tracked)
                runs[algorithm] = summarize(json.loads((run_dir / "results.json").read_text()), run_dir)
            except RunError as exc:  # the others still run; the table says which failed
                print(f"  {algorithm} FAILED: {str(exc).splitlines()[0]}", flush=True)
                runs[algorithm] = {"status": "failed", "error": str(exc).splitlines()[0], "run": str(run_dir)}
            runs[algorithm]["notebook_seconds"] = round(time.monotonic() - began, 1)
    if tracked:
        from medfl.researcher.tracking import end_parent

        end_parent(tracked["run"], tracked["run"]["tracking_parent"],
                   failed=any(run["status"] != "completed" for run in runs.values()))
    (out / "latest").unlink(missing_ok=True)  # the notebook's link to its newest run; compare.json names them all
    print(f"\n[{steps}/{steps}] centralized baseline, and each envoy alone", flush=True)
    baseline(settings.replace(local=True), run_dir=out / CENTRALIZED)  # and each envoy alone
    central = summarize(json.loads((out / CENTRALIZED / "results.json").read_text()), out / CENTRALIZED)
    report = build(settings, algorithms, runs, central, data_source, out)
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    plot(out / "compare.png", report)
    print()
    print(table(report))
    print(f"\ndone in {time.monotonic() - started:.0f} s; compare.json and compare.png in {out}")
    return 0 if all(run["status"] == "completed" for run in runs.values()) else 1


def summarize(results: dict, run_dir: Path) -> dict:
    """What compare.json keeps of one run's results.json."""
    test = results["test"]
    rounds = results["rounds"]
    training = [t for t in results.get("traffic", []) if t["round"] < len(rounds) - 1]  # not the final validation
    return {
        "status": results.get("status", "completed"),
        "error": results.get("error"),
        "settings": results.get("algorithm"),
        "test": _scores(test),
        **({"personalized": {"epochs": test["personalized"]["epochs"], **_scores(test["personalized"])}}
           if test.get("personalized") else {}),
        "best": {k: results["best"].get(k) for k in ("metric", "round", "value", "loss")},
        "val_auc": [e["aggregated"].get("val_auc") for e in rounds],
        "wall_seconds": results["wall_seconds"],
        **({"local": results["local"]} if results.get("local") else {}),
        "bytes_per_round": {
            "envoys_to_director": _mean([t.get("received_bytes", 0) for t in training]),
            "director_to_envoys": _mean([t.get("sent_bytes", 0) for t in training]),
        } if training else None,
        "run": str(run_dir),
    }


def _scores(block: dict) -> dict:
    """What compare.json keeps of a test block: ACC and AUC with their 95 % intervals, pooled and per envoy."""
    def kept(entry: dict) -> dict:
        return {"acc": entry["acc"], "auc": entry["auc"], "ci": entry.get("ci"), "samples": entry.get("samples")}

    return {**kept(block), "per_envoy": {name: kept(e) for name, e in sorted(block["per_envoy"].items())}}


def _mean(values: list) -> int | None:
    return round(sum(values) / len(values)) if values else None


def build(settings: Settings, algorithms: list[str], runs: dict, central: dict, data_source: str, out: Path) -> dict:
    """compare.json: the setting, every algorithm's run, the centralized baseline, and how much of FedAvg's gap to
    it the best algorithm closed."""
    synthetic = json.loads((out / CENTRALIZED / "results.json").read_text())["synthetic"]
    report = {
        "id": out.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "system": platform.platform()},
        "dataset": settings.dataset, "size": int(settings.size), "data_source": data_source, "synthetic": synthetic,
        "envoys": settings.envoys,
        "partition": partition(settings),
        "bootstrap": settings.bootstrap,
        "rounds": settings.rounds, "epochs": settings.epochs, "seed": settings.seed,
        "algorithms": {name: runs[name] for name in algorithms},
        CENTRALIZED: central,
    }
    report["gap"] = gap(report)
    return report


def gap(report: dict) -> dict | None:
    """How much of FedAvg's test-ACC gap to the centralized model the best other algorithm closed."""
    done = {name: run for name, run in report["algorithms"].items() if run["status"] == "completed"}
    if "fedavg" not in done:
        return None
    fedavg, central = done["fedavg"]["test"]["acc"], report[CENTRALIZED]["test"]["acc"]
    best = max(done, key=lambda name: done[name]["test"]["acc"])
    closed = (done[best]["test"]["acc"] - fedavg) / (central - fedavg) if central > fedavg else None
    return {"metric": "test acc", "fedavg": fedavg, CENTRALIZED: central, "best_algorithm": best,
            "best": done[best]["test"]["acc"], "closed": closed}


def _label(name: str, run: dict) -> str:
    return describe(run["settings"]) if run.get("settings") else name


def partition(settings: Settings) -> dict:
    """How the data was spread over the envoys, as it was run: with data_dirs each envoy serves its own whole file,
    and no partition was applied."""
    if settings.data_dirs:
        return {"strategy": "own files", "alpha": None, "seed": None}
    return {"strategy": settings.partition, "alpha": settings.alpha, "seed": settings.seed}


def spread(partition: dict) -> str:
    """A partition in words."""
    return {"dirichlet": f"dirichlet label skew, alpha {partition['alpha']}", "iid": "iid shards",
            "scanner": "scanner shift (each envoy's own acquisition)",
            "own files": "each envoy's own file, no partition applied"}.get(partition["strategy"],
                                                                         str(partition["strategy"]))


def describe_setting(report: dict) -> str:
    """What was compared, as it was run: the data, how it was spread over the envoys, the budget."""
    source = "SYNTHETIC data" if report["synthetic"] else "MedMNIST"
    return (f"{source}: {report['dataset']} {report['size']}px, {report['envoys']} envoys, "
            f"{spread(report['partition'])}, {report['rounds']} rounds x {report['epochs']} epochs, "
            f"seed {report['seed']}")


def _with_ci(entry: dict, name: str) -> str:
    ci = (entry.get("ci") or {}).get(name)
    return f"{entry[name]:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{entry[name]:.4f}"


def table(report: dict) -> str:
    """The comparison as a text table, headed by what was compared; each column says what it measured."""
    envoys = sorted(report[CENTRALIZED]["test"]["per_envoy"])
    per_width = 7 * len(envoys)
    lines = [describe_setting(report),
             f"test ACC and AUC of each run's chosen model on all envoys' test splits, [95 % bootstrap interval] "
             f"({report.get('bootstrap', 0)} resamples); traffic: mean per training round, all envoys together",
             f"{'algorithm':<28} {'test ACC [95% CI]':>24} {'test AUC [95% CI]':>24}  "
             f"{'test ACC per envoy':<{per_width}} {'best round':>10} {'wall s':>7} {'MB up':>7} {'MB down':>7}"]
    rows = [(_label(name, run), run) for name, run in report["algorithms"].items()]
    for label, run in [*rows, (CENTRALIZED, report[CENTRALIZED])]:
        if run["status"] != "completed":
            lines.append(f"{label:<28} FAILED: {run['error']}")
            continue
        per = " ".join(f"{run['test']['per_envoy'][e]['acc']:6.3f}" for e in envoys)
        traffic = run.get("bytes_per_round")
        up, down = (f"{traffic['envoys_to_director'] / 1e6:7.2f}", f"{traffic['director_to_envoys'] / 1e6:7.2f}") \
            if traffic else (f"{'-':>7}", f"{'-':>7}")
        lines.append(f"{label:<28} {_with_ci(run['test'], 'acc'):>24} {_with_ci(run['test'], 'auc'):>24}  "
                     f"{per:<{per_width}} {run['best']['round']:>10} {run['wall_seconds']:7.1f} {up} {down}")
        personal = run.get("personalized")
        if personal:  # each envoy's own fine-tuned model
            per = " ".join(f"{personal['per_envoy'][e]['acc']:6.3f}" for e in envoys)
            lines.append(f"{'  + ' + str(personal['epochs']) + ' epochs on each envoy':<28} "
                         f"{_with_ci(personal, 'acc'):>24} {_with_ci(personal, 'auc'):>24}  {per:<{per_width}}")
    alone = report[CENTRALIZED].get("local")
    if alone:  # each envoy's own model on its own test split; overall: over every envoy's test images
        per = " ".join(f"{alone['per_envoy'][e]['acc']:6.3f}" for e in envoys)
        lines.append(f"{ALONE:<28} {_with_ci(alone, 'acc'):>24} {_with_ci(alone, 'auc'):>24}  {per:<{per_width}}")
    found = report.get("gap")
    if found and found["closed"] is not None:
        lines.append(f"FedAvg's test ACC gap to centralized: {found[CENTRALIZED] - found['fedavg']:.4f}; the best, "
                     f"{found['best_algorithm']} ({found['best']:.4f}), closes {found['closed']:.0%} of it")
    elif found:
        lines.append("FedAvg is not behind the centralized model here: there is no gap to close")
    return "\n".join(lines)


def plot(path: Path, report: dict) -> None:
    """Validation AUC per round, one line per algorithm, the centralized model's as a reference line; and a bar
    chart of each envoy's test ACC per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(15, 4.6))
    done = {name: run for name, run in report["algorithms"].items() if run["status"] == "completed"}
    central = report[CENTRALIZED]
    for name, run in done.items():
        points = [(r, v) for r, v in enumerate(run["val_auc"]) if v is not None]
        curves.plot(*zip(*points, strict=True), marker="o", label=_label(name, run))
    reference = central["best"]["value"]
    curves.axhline(reference, color="black", linestyle="--",
                   label=f"centralized ({reference:.3f}, pooled val, best epoch)")
    curves.set(title="validation AUC of the global model", xlabel="rounds trained", ylabel="AUC")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    envoys = sorted(central["test"]["per_envoy"])
    series = [(_label(name, run), run) for name, run in done.items()] + [(CENTRALIZED, central)]
    if central.get("local"):
        series.append((ALONE, {"test": central["local"]}))
    width = 0.8 / len(series)
    for i, (label, run) in enumerate(series):
        values = [run["test"]["per_envoy"][e]["acc"] for e in envoys]
        bars.bar(np.arange(len(envoys)) + (i - (len(series) - 1) / 2) * width, values, width, label=label,
                 color={CENTRALIZED: "black", ALONE: "grey"}.get(label))
    bars.set_xticks(np.arange(len(envoys)), envoys)
    bars.set(title="test ACC of the chosen model, per envoy", ylabel="ACC", ylim=(0, 1))
    bars.grid(alpha=0.3, axis="y")
    bars.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    fig.suptitle(describe_setting(report))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
