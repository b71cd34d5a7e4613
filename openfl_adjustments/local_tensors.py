"""Tensors that never leave an envoy (FedBN's normalization layers), kept across experiments on the envoy's disk.

OpenFL 1.6 can already hold tensors back: the task runner's `holdout_tensor_names` are neither sent nor fetched;
from the second round on, the envoy's collaborator finds them in its own store, where training left them, and in
the first it takes the global model's. But only its optimizer's state is ever held back, and a new experiment (the
test of the best model, a resumed run) starts from the global model's. Here an experiment's plan can name more:

- `task_runner.settings.local_tensors`: tensor names held back on every envoy, as OpenFL holds back its own;
- `task_runner.settings.local_run` and `local_first_round`: each round, the envoy writes the held-back tensors it
  trained to `$MEDFL_ENVOY_STATE/<local_run>/local-tensors/round-<n>.npz`, n counting the run's training rounds
  (a resumed run's experiment starts at `local_first_round`; None: it writes nothing);
- `task_runner.settings.local_start_round`: a new experiment starts from those of round n (or the latest before
  it: an envoy absent then uses what it last trained), instead of the global model's.

Only envoys apply this (the notebook's task runner sends the whole initial model, which the first round needs).
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from .patching import replace

logger = logging.getLogger("openfl_adjustments")
STATE_ENV = "MEDFL_ENVOY_STATE"  # start_envoy.sh: the envoy's own folder for what outlives an experiment


def folder(run: str) -> Path | None:
    """Where this envoy keeps run `run`'s held-back tensors, or None without an envoy state folder."""
    base = os.environ.get(STATE_ENV)
    return Path(base) / run / "local-tensors" if base else None


def save(run: str, round_number: int, tensors: dict[str, np.ndarray]) -> Path | None:
    """Write run `run`'s held-back tensors after training round `round_number`, atomically."""
    where = folder(run)
    if where is None or not tensors:
        return None
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"round-{round_number}.npz"
    with tempfile.NamedTemporaryFile(dir=where, suffix=".tmp", delete=False) as handle:
        np.savez(handle, **tensors)
    os.replace(handle.name, path)
    return path


def load(run: str, round_number: int) -> tuple[int, dict[str, np.ndarray]] | None:
    """Run `run`'s held-back tensors of round `round_number`, or of the latest round before it: (round, tensors),
    or None if this envoy kept none."""
    where = folder(run)
    if where is None or not where.is_dir():
        return None
    kept = sorted((int(p.stem.split("-")[1]), p) for p in where.glob("round-*.npz")
                  if p.stem.split("-")[1].isdigit())
    found = [(n, p) for n, p in kept if n <= round_number]
    if not found:
        return None
    n, path = found[-1]
    with np.load(path) as data:
        return n, {name: data[name] for name in data.files}


def holding_back(init):
    """CoreTaskRunner.__init__ that also holds back the plan's `local_tensors`."""

    def wrapper(self, **kwargs):
        init(self, **kwargs)
        names = list(kwargs.get("local_tensors") or ())
        if names:
            held = self.tensor_dict_split_fn_kwargs.setdefault("holdout_tensor_names", [])
            self.tensor_dict_split_fn_kwargs["holdout_tensor_names"] = [*held, *names]
        first_round = kwargs.get("local_first_round")
        self.local_tensors = {"names": set(names), "run": kwargs.get("local_run"),
                              "first_round": None if first_round is None else int(first_round),
                              "start_round": kwargs.get("local_start_round"), "lock": threading.Lock()}

    return wrapper


def keeping_on_disk(prepare):
    """CoreTaskRunner._prepare_tensorkeys_for_agggregation that writes the held-back tensors a training task left
    to the envoy's disk, under the run's round."""

    def wrapper(self, metric_dict, validation_flag, col_name, round_num):
        to_send, local = prepare(self, metric_dict, validation_flag, col_name, round_num)
        kept = getattr(self, "local_tensors", None)
        if kept and kept["names"] and kept["run"] and kept["first_round"] is not None and not validation_flag:
            tensors = {k.tensor_name: v for k, v in local.items()
                       if k.tensor_name in kept["names"] and k.round_number == round_num and "trained" in k.tags}
            save(kept["run"], kept["first_round"] + round_num + 1, tensors)
        return to_send, local

    return wrapper


def starting_from_disk(get_data_for_tensorkey):
    """Collaborator.get_data_for_tensorkey that starts a held-back tensor from the envoy's disk (local_start_round)
    when this experiment has none of it yet, instead of from the global model."""

    def wrapper(self, tensor_key):
        kept = getattr(self.task_runner, "local_tensors", None)
        name, origin, round_number, report, tags = tensor_key
        if (kept and kept["start_round"] is not None and kept["run"] and name in kept["names"]
                and origin == self.collaborator_name and tags == ("model",)
                and not any(self.tensor_db.get_tensor_from_cache(tensor_key._replace(round_number=r)) is not None
                            for r in range(round_number, -1, -1))):
            with kept["lock"]:  # the model's tensors are fetched on many threads at once
                if "loaded" not in kept:  # once per experiment: every held-back tensor comes from one file
                    kept["loaded"] = load(kept["run"], int(kept["start_round"]))
                    if kept["loaded"] is None:
                        logger.warning("%s has no held-back tensors of run %s up to round %s on its disk: it starts "
                                       "them from the global model's", self.collaborator_name, kept["run"],
                                       kept["start_round"])
                    else:
                        logger.info("%s starts its held-back tensors from its own, of round %d of run %s",
                                    self.collaborator_name, kept["loaded"][0], kept["run"])
            if kept["loaded"] is not None and name in kept["loaded"][1]:
                return kept["loaded"][1][name]
        return get_data_for_tensorkey(self, tensor_key)

    return wrapper


def install() -> None:
    """Hold back the plan's local tensors on envoys, and keep them on the envoy's disk between experiments."""
    from openfl.component.collaborator.collaborator import Collaborator
    from openfl.federated.task.task_runner import CoreTaskRunner

    replace(CoreTaskRunner, "__init__", holding_back)
    replace(CoreTaskRunner, "_prepare_tensorkeys_for_agggregation", keeping_on_disk)
    replace(Collaborator, "get_data_for_tensorkey", starting_from_disk)
