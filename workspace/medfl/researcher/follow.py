"""The notebook's plumbing: read the federation, start and follow experiments."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import grpc
import medmnist
import torch
from openfl.interface.interactive_api.experiment import FLExperiment, ModelInterface

from .aggregator import DROPPED, FAILED, VALIDATE_GLOBAL, Best, quorum
from .data import MedMNISTData
from .device import REQUESTS
from .model import FLAGS, MULTI_LABEL, SIZES

PYTORCH_ADAPTER = "openfl.plugins.frameworks_adapters.pytorch_adapter.FrameworkAdapterPlugin"


def registry(federation) -> list[dict]:
    """One entry per registered envoy: name, online, and what its shard descriptor says it serves."""
    envoys = []
    for name, entry in sorted(federation.get_shard_registry().items()):
        description = entry["shard_info"].shard_description
        try:
            served = json.loads(description)
        except ValueError:  # a shard descriptor other than this project's
            served = {"text": description}
        envoys.append({"envoy": name, "online": entry["is_online"], **served})
    return envoys


def is_synthetic(envoys: list[dict]) -> bool:
    """True if any envoy serves synthetic data."""
    return any(e.get("synthetic") or "SYNTHETIC" in e.get("text", "") for e in envoys)


class NotebookError(RuntimeError):
    """An error the notebook shows as its one-line message, without a traceback (IPython's hook)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ParameterError(NotebookError, ValueError):
    """A notebook parameter or dataset choice that cannot work; the message says what to change."""


class ExperimentFailed(NotebookError):
    """An experiment ended without its result; the message says why and where what arrived was kept."""


def check_parameters(*, dataset, size, rounds_to_train, epochs_per_round, train_batch_size, eval_batch_size,
                     learning_rate, device, best_metric, best_mode, min_envoys=1, round_timeout=0, **_) -> None:
    """Refuse impossible parameters before anything is submitted, one clear line each."""
    if dataset not in FLAGS:
        raise ParameterError(f"dataset={dataset!r} is not a MedMNIST 2D dataset: use one of {', '.join(FLAGS)}")
    if size not in SIZES:
        raise ParameterError(f"size={size!r} is not a MedMNIST size: use 28, 64, 128 or 224")
    for name, value in (("rounds_to_train", rounds_to_train), ("epochs_per_round", epochs_per_round),
                        ("train_batch_size", train_batch_size), ("eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{name}={value!r}: it must be a whole number of at least 1")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ParameterError(f"learning_rate={learning_rate!r}: it must be a positive number, e.g. 1e-3")
    if device not in REQUESTS:
        raise ParameterError(f"device={device!r}: use one of {', '.join(REQUESTS)}")
    if best_metric not in ("auc", "acc", "loss") or best_mode not in ("max", "min"):
        raise ParameterError(f"best_metric={best_metric!r}, best_mode={best_mode!r}: use auc, acc or loss, "
                             "with max or min")
    try:
        quorum(min_envoys, 1)
    except ValueError as exc:
        raise ParameterError(f"min_envoys={min_envoys!r}: {exc}") from None
    if isinstance(round_timeout, bool) or not isinstance(round_timeout, (int, float)) or not round_timeout >= 0:
        raise ParameterError(f"round_timeout={round_timeout!r}: give seconds (0 for no limit)")


def check_quorum(envoys: list[dict], min_envoys) -> None:
    """Raise ParameterError if fewer envoys are online than min_envoys asks to keep."""
    online = [e["envoy"] for e in envoys if e["online"]]
    if len(online) < quorum(min_envoys, len(online)):
        raise ParameterError(f"min_envoys={min_envoys!r}, but only {len(online)} envoys are online "
                             f"({', '.join(online) or 'none'}): start more envoys or lower min_envoys")


def check_dataset(federation, flag: str, size: int, envoys: list[dict] = ()) -> None:
    """Raise ParameterError unless the director and every envoy serve flag at size, naming the envoys."""
    served_by = {}
    for envoy in envoys:
        if "flag" in envoy:
            served_by.setdefault(f"{envoy['flag']} {envoy['size']}px", []).append(envoy["envoy"])
    if len(served_by) > 1:
        mix = "; ".join(f"{what}: {', '.join(names)}" for what, names in served_by.items())
        raise ParameterError(f"the envoys serve different datasets ({mix}): give them all the same flag and size")
    if served_by and f"{flag} {size}px" not in served_by:
        (what, names), = served_by.items()
        raise ParameterError(f"the envoys ({', '.join(names)}) serve {what}, not {flag} {size}px: "
                             "set `dataset` and `size` to what they serve")
    meta = medmnist.INFO[flag]
    sample = [str(size), str(size), str(meta["n_channels"])]
    target = [str(len(meta["label"]) if meta["task"] == MULTI_LABEL else 1)]
    served = (list(federation.sample_shape), list(federation.target_shape))
    if served != (sample, target):
        raise ParameterError(
            f"the federation serves samples {served[0]} with labels {served[1]}, but {flag} at {size} px "
            f"needs {sample} and {target}: set `dataset` and `size` to what the envoys serve"
        )


class Schedule:
    """Task assignment: `train_rounds` rounds of validate-train-validate, then one validation round.

    OpenFL validates each global model at the start of the next round, so the model left by the
    last training round would never be validated; the extra round validates it, which lets it be
    chosen as the best. With train_rounds=0 this is a validation-only experiment (the test run).
    """

    def __init__(self, tasks: dict, train_rounds: int):
        self.tasks, self.train_rounds = tasks, train_rounds

    def __call__(self, collaborators, round_number, **kwargs):
        names = ["aggregated_model_validate"]
        if round_number < self.train_rounds:
            names += ["train", "locally_tuned_model_validate"]
        return {c: [self.tasks[n] for n in names] for c in collaborators}


def _aggregator(aggregator_port: int, min_envoys, round_timeout: float) -> dict:
    """Plan overrides: this project's aggregator, how it goes on without envoys, and its port (0 keeps
    OpenFL's, derived per experiment from 49152-60999)."""
    settings = {"aggregator.template": "medfl.aggregator.SelectingAggregator",
                "aggregator.settings.min_envoys": min_envoys, "aggregator.settings.round_timeout": round_timeout}
    return {**settings, **({"network.settings.agg_port": int(aggregator_port)} if aggregator_port else {})}


def start_training(experiment: FLExperiment, model, optimizer, tasks, data: MedMNISTData, rounds: int,
                   best_metric: str = "auc", best_mode: str = "max", min_envoys=0.5, round_timeout: float = 0,
                   aggregator_port: int = 0) -> None:
    """Submit `rounds` rounds of federated training; the best model is chosen on `best_metric`. A round
    goes on without envoys that are lost or pass `round_timeout` while `min_envoys` remain."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds_to_train must be a positive integer, not {rounds!r}")
    experiment.start(
        model_provider=ModelInterface(model=model, optimizer=optimizer, framework_plugin=PYTORCH_ADAPTER),
        task_keeper=tasks, data_loader=data, rounds_to_train=rounds + 1,
        task_assigner=Schedule(tasks.get_registered_tasks(), rounds), opt_treatment="RESET",
        # An envoy whose config lists cuda_devices gets 'cuda:N' for its tasks; others get 'cpu',
        # which medfl.device.pick_device still turns into the node's HPU or GPU under device="auto".
        device_assignment_policy="CUDA_PREFERRED",
        override_config={"aggregator.settings.best_metric": best_metric, "aggregator.settings.best_mode": best_mode,
                         **_aggregator(aggregator_port, min_envoys, round_timeout)},
    )
    _check_submitted(experiment)


def start_test(experiment: FLExperiment, model, tasks, eval_batch_size: int = 256, device: str = "auto",
               min_envoys=0.5, round_timeout: float = 0, aggregator_port: int = 0) -> None:
    """Submit a validation-only experiment that evaluates `model` on every envoy's test split."""
    experiment.start(
        model_provider=ModelInterface(model=model, optimizer=torch.optim.Adam(model.parameters()),
                                      framework_plugin=PYTORCH_ADAPTER),
        task_keeper=tasks,
        data_loader=MedMNISTData(eval_batch_size=eval_batch_size, eval_split="test", device=device),
        rounds_to_train=1, task_assigner=Schedule(tasks.get_registered_tasks(), 0),
        device_assignment_policy="CUDA_PREFERRED",
        override_config=_aggregator(aggregator_port, min_envoys, round_timeout),
    )
    _check_submitted(experiment)


def _check_submitted(experiment: FLExperiment) -> None:
    if not experiment.experiment_submitted:
        raise RuntimeError(f"the director refused experiment {experiment.experiment_name}; its log says why")


TASK_NAMES = {"train": "train", "locally_tuned_model_validate": "local val", VALIDATE_GLOBAL: "global val"}
# The metrics each of medfl's tasks reports: a progress line is printed once all have arrived.
TASK_METRICS = {"train": {"train_loss", "train_seconds"},
                "locally_tuned_model_validate": {"loss", "acc", "auc", "seconds"},
                VALIDATE_GLOBAL: {"loss", "acc", "auc", "seconds"}}


def round_label(metric: dict, rounds: int) -> str:
    """Which model a metric is about: validation of the global model after r rounds, or training in round r."""
    r = metric["round"]
    if metric["task_name"] == VALIDATE_GLOBAL:
        return "initial model" if r == 0 else f"model after {r}/{rounds}"
    return f"round {r + 1}/{rounds}"


@dataclass
class Followed:
    """What arrived from one experiment: its metrics, who dropped out, and why it failed if it did.

    For a training run, `best` is the best-model rule replayed on the metrics, and `best_model` the
    model it chose (fetched as soon as it became the best, so a lost director does not take it along)
    and `last_model` the final global model; either is None if it never arrived.
    """

    name: str
    metrics: list = field(default_factory=list)
    dropouts: list = field(default_factory=list)
    error: str | None = None
    best: Best | None = None
    best_model: torch.nn.Module | None = None
    last_model: torch.nn.Module | None = None


def follow(experiment: FLExperiment, rounds: int, best: Best | None = None, echo=print, label: str = "") -> Followed:
    """Follow an experiment until it ends, fails or its director is lost; never raises for those.

    Echoes one line per envoy task as its metrics arrive, and one per envoy dropped. With `best`,
    keeps the best model so far and, at the end, the last one. `label` replaces the round label
    (the test run uses 'test').
    """
    run, pending = Followed(experiment.experiment_name, best=best), {}
    client = experiment.federation.dir_client
    try:
        for m in client.stream_metrics(experiment.experiment_name):
            m = {**m, "time": time.time()}
            if m["task_name"] == DROPPED:
                _dropped(run, m, label or _round_of(m["round"], rounds), echo)
                continue
            if m["task_name"] == FAILED:
                run.error = m["metric_name"]
                break  # the aggregator still tells the other envoys to quit; nothing more is coming
            run.metrics.append(m)
            key = (m["round"], m["metric_origin"], m["task_name"])
            group = pending.setdefault(key, {})
            group[m["metric_name"]] = m["metric_value"]
            if set(group) >= TASK_METRICS.get(m["task_name"], set(group)):
                echo(_line(label or round_label(m, rounds), m, pending.pop(key)))
            if best is not None and best.consider(m):
                run.best_model = experiment.get_best_model()
        if run.error is None and experiment.get_experiment_status() == "failed":
            run.error = "the director reports the experiment as failed; its log says why"
        if best is not None:
            run.last_model = experiment.get_last_model()
    except grpc.RpcError as exc:
        run.error = f"lost the director ({exc.code().name}: {exc.details()}): it stopped, or the network to it failed"
    for (r, origin, task), group in pending.items():
        echo(_line(label or round_label({"round": r, "task_name": task}, rounds),
                   {"metric_origin": origin, "task_name": task}, group))
    if best is not None and best.round is None:
        run.best_model = run.last_model  # no finite validation score: the last model stands in
    if run.error:
        echo(f"FAILED: {run.error}")
    return run


def _round_of(r: int, rounds: int) -> str:
    return f"round {r + 1}/{rounds}" if r < rounds else "final validation"


def _dropped(run: Followed, m: dict, where: str, echo) -> None:
    run.dropouts.append({"envoy": m["metric_origin"], "experiment": run.name, "round": m["round"] + 1,
                         "time": round(m["time"], 3), "reason": m["metric_name"]})
    echo(f"{where:<16} {m['metric_origin']:<11} DROPPED: {m['metric_name']}; the experiment goes on without it")


def _line(where: str, m: dict, values: dict) -> str:
    shown = "  ".join(f"{name} {value:.1f}" if "seconds" in name else f"{name} {value:.4f}"
                      for name, value in values.items())
    return f"{where:<16} {m['metric_origin']:<11} {TASK_NAMES.get(m['task_name'], m['task_name']):<11} {shown}"
