"""Following a submitted experiment: its metrics as they arrive, who dropped out, and how it ended."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from tqdm.auto import tqdm

from ..events import (
    AGGREGATED,
    CLIPPED,
    DROPPED,
    FAILED,
    HELD,
    REFUSED,
    REJECTED,
    SECURE,
    TRAFFIC,
    TRAFFIC_COUNTS,
    VALIDATE_GLOBAL,
)
from ..intervals import HIGH, LOW
from ..selection import Best

TASK_NAMES = {"train": "train", "locally_tuned_model_validate": "local val", VALIDATE_GLOBAL: "global val",
              TRAFFIC: "traffic"}
# The metrics each of medfl's tasks reports: a progress line is printed once all have arrived. A task edited to
# report more gets them added here as they are seen, so from its second report on they share its line.
TASK_METRICS = {"train": {"train_loss", "train_seconds"},
                "locally_tuned_model_validate": {"loss", "acc", "auc", "seconds"},
                VALIDATE_GLOBAL: {"loss", "acc", "auc", "seconds"},
                TRAFFIC: {"received_bytes", "sent_bytes", "connections"}}


@dataclass
class Followed:
    """What arrived from one experiment: its metrics, who dropped out, and why it failed if it did.

    For a training run, `best` is the best-model rule replayed on the metrics and `best_model` the model it chose,
    fetched as soon as it became the best (so a lost director does not take it along); None if none arrived.
    """

    name: str
    metrics: list = field(default_factory=list)
    dropouts: list = field(default_factory=list)
    rejected: list = field(default_factory=list)  # updates the director left out of a round's aggregate
    clipped: list = field(default_factory=list)  # updates it clipped to max_update_size, then aggregated
    secure: list = field(default_factory=list)  # secure aggregation: who was summed each round, who dropped out
    held: list = field(default_factory=list)  # envoys that held the experiment for their operator's review
    error: str | None = None
    best: Best | None = None
    best_model: torch.nn.Module | None = None
    ended: float | None = None  # time.time() when its metric stream ended


def round_label(metric: dict, rounds: int) -> str:
    """Which model a metric is about: validation of the global model after r rounds, or training in round r."""
    r = metric["round"]
    if metric["task_name"] == VALIDATE_GLOBAL:
        return "initial model" if r == 0 else f"model after {r}/{rounds}"
    return _round_of(r, rounds)


def follow(experiment, rounds: int, best: Best | None = None, on_new_best: Callable | None = None,
           label: str = "", echo: Callable[[str], None] | None = None, checkpoints=None) -> Followed:
    """Follow an experiment until it ends, fails or its director is lost; never raises for those.

    Shows a progress bar over the global models validated, and one line per envoy task as its metrics arrive and
    per envoy dropped. With `best`, calls `on_new_best()` (the experiment's get_best_model) each time a model becomes
    the best, and keeps what it returns. `label` replaces the round label (the test run uses 'test').
    `checkpoints` (a medfl.researcher.Checkpointer) is called at the end of each round; when it resumes a run, the
    run's earlier metrics, dropouts, rejections and best model come first, and this experiment's rounds count on
    from the checkpoint's.
    """
    run, pending = Followed(experiment.experiment_name, best=best), {}
    resumed = getattr(checkpoints, "resumed", None)
    offset = resumed.round if resumed else 0  # rounds the run had trained before this experiment
    if resumed:
        run.metrics, run.dropouts, run.rejected = list(resumed.metrics), list(resumed.dropouts), list(resumed.rejected)
        run.secure, run.clipped = list(resumed.secure), list(resumed.clipped)
        if best is not None:
            best.pick(run.metrics)
            run.best_model = checkpoints.best_model()
    if not experiment.experiment_submitted:
        run.error = "the director refused the experiment; its log says why"
        return run
    expected = {task: set(names) for task, names in TASK_METRICS.items()}
    bar, finish = _progress(rounds + 1 if rounds and not label else 1, label or "global models validated")
    echo = echo or bar.write
    if offset:
        bar.update(offset)
        echo(f"resumed: {offset} of {rounds} rounds were trained before; training goes on from the model after "
             f"{offset}")
    seen_rounds = set()
    try:
        for m in experiment.federation.dir_client.stream_metrics(experiment.experiment_name):
            m = {**m, "round": m["round"] + offset, "time": time.time()}
            if m["task_name"] == DROPPED:
                _dropped(run, m, label or _round_of(m["round"], rounds), echo)
                continue
            if m["task_name"] in (REJECTED, CLIPPED):
                _rejected(run, m, label or _round_of(m["round"], rounds), echo)
                continue
            if m["task_name"] == HELD:  # an envoy waits for its operator to approve the experiment's code
                run.held.append({"envoy": m["metric_origin"], "experiment": run.name, "line": m["metric_name"]})
                echo(f"{label or 'waiting':<16} {m['metric_origin']:<11} HELD: {m['metric_name']}")
                continue
            if m["task_name"] == SECURE:
                _secured(run, m, label or _round_of(m["round"], rounds), echo)
                continue
            if m["task_name"] == FAILED:
                run.error = m["metric_name"]
                break  # the aggregator still tells the other envoys to quit; nothing more is coming
            run.metrics.append(m)
            if (m["metric_origin"], m["task_name"]) == (AGGREGATED, VALIDATE_GLOBAL) and m["round"] not in seen_rounds:
                seen_rounds.add(m["round"])
                bar.update(1)
            if m["task_name"] == TRAFFIC and m["metric_origin"] != AGGREGATED:
                continue  # each envoy's share of the round's traffic: in results.json, not on the page
            if m["task_name"] == TRAFFIC and checkpoints is not None and m["metric_name"] == TRAFFIC_COUNTS[-1]:
                checkpoints(m["round"], run)  # the round is over and its model saved on the director
            key = (m["round"], m["metric_origin"], m["task_name"])
            # One task's metrics arrive together: another task of the same origin means this one's are all in.
            for done in [k for k in pending if k[1] == key[1] and k != key]:
                _flush(done, pending, expected, rounds, label, echo)
            pending.setdefault(key, {})[m["metric_name"]] = m["metric_value"]
            if set(pending[key]) >= expected.get(key[2], set(pending[key])):
                _flush(key, pending, expected, rounds, label, echo)
            if best is not None and best.consider(m):
                bar.set_postfix_str(f"best val {best.metric} {best.value:.4f} (model after {best.round})")
                if on_new_best is not None:
                    run.best_model = on_new_best()
        if run.error is None and experiment.get_experiment_status() == "failed":
            run.error = "the director reports the experiment as failed; its log says why"
    except grpc.RpcError as exc:
        run.error = f"lost the director ({exc.code().name}: {exc.details()}): it stopped, or the network to it failed"
    finally:
        run.ended = time.time()
        finish()
    for key in list(pending):
        _flush(key, pending, expected, rounds, label, echo)
    if run.error:
        echo(f"FAILED: {run.error}")
    return run


def _progress(total: int, desc: str):
    """(bar, finish): a progress bar over the global models validated, and what to call when the run ends.

    In a notebook it is a widget, which finish() replaces by its last state as text: a saved notebook keeps text,
    but not a widget's state, and would show the bar at 0% when opened again. Elsewhere it is a text bar.
    """
    from tqdm import notebook

    if not issubclass(tqdm, notebook.tqdm):
        bar = tqdm(total=total, desc=desc, unit="model")
        return bar, bar.close
    from IPython.display import Pretty, display

    bar = tqdm(total=total, desc=desc, unit="model", display=False)
    shown = display(bar.container, display_id=True)

    def finish():
        bar.close()
        shown.update(Pretty(str(bar)))

    return bar, finish


def _flush(key: tuple, pending: dict, expected: dict, rounds: int, label: str, echo) -> None:
    """Print the line of one task's metrics, and expect the same metrics of that task from now on."""
    r, origin, task = key
    group = pending.pop(key)
    expected.setdefault(task, set()).update(group)
    echo(_line(label or round_label({"round": r, "task_name": task}, rounds),
               {"metric_origin": origin, "task_name": task}, group))


def _round_of(r: int, rounds: int) -> str:
    return f"round {r + 1}/{rounds}" if r < rounds else "final validation"


def _dropped(run: Followed, m: dict, where: str, echo) -> None:
    run.dropouts.append({"envoy": m["metric_origin"], "experiment": run.name, "round": m["round"] + 1,
                         "time": round(m["time"], 3), "reason": m["metric_name"]})
    refused = m["metric_name"].startswith(REFUSED)
    echo(f"{where:<16} {m['metric_origin']:<11} {'REFUSED' if refused else 'DROPPED'}: "
         f"{m['metric_name'][len(REFUSED):] if refused else m['metric_name']}; the experiment goes on without it")


def _rejected(run: Followed, m: dict, where: str, echo) -> None:
    what, clipped = json.loads(m["metric_name"]), m["task_name"] == CLIPPED
    (run.clipped if clipped else run.rejected).append({"envoy": m["metric_origin"], "experiment": run.name,
                                                       "round": m["round"] + 1, **what})
    if clipped:
        echo(f"{where:<16} {m['metric_origin']:<11} CLIPPED: {what['detail']}")
    else:
        echo(f"{where:<16} {m['metric_origin']:<11} REJECTED: its update failed the {what['check']} check: "
             f"{what['detail']}; left out of this round's average")


def _secured(run: Followed, m: dict, where: str, echo) -> None:
    what = {**json.loads(m["metric_name"]), "round": m["round"] + 1, "experiment": run.name}
    run.secure.append(what)
    lost = [f"{', '.join(what[k])} dropped out {k[8:].replace('_', ' ')}" for k in
            ("dropped_before_sending", "dropped_after_sending") if what[k]]
    line = (f"{where:<16} {AGGREGATED:<11} secure sum of {len(what['summed'])} of {len(what['envoys'])} envoys' "
            f"updates (threshold {what['threshold']})" + (f"; {'; '.join(lost)}" if lost else "")
            + "; the director saw no single update")
    echo(line if "rejected" not in what else f"{line}. REJECTED: {what['rejected']}; the model stays as it was")


def _line(where: str, m: dict, values: dict) -> str:
    shown = "  ".join(_shown(name, value, values) for name, value in values.items() if not name.endswith(HIGH))
    return f"{where:<16} {m['metric_origin']:<11} {TASK_NAMES.get(m['task_name'], m['task_name']):<11} {shown}"


def _shown(name: str, value: float, values: dict) -> str:
    if name.endswith(LOW):  # a test metric's interval (medfl.intervals)
        high = values.get(name[:-len(LOW)] + HIGH, float("nan"))
        return f"{name[:-len(LOW)]} 95% CI {value:.4f}-{high:.4f}"
    if name.endswith("_bytes"):
        return f"{name[:-6]} {value / 1e6:.2f} MB"
    if name == "connections":
        return f"new connections {value:.0f}"
    return f"{name} {value:.1f}" if "seconds" in name else f"{name} {value:.4f}"
