"""A run that survives its director: a checkpoint in the run's folder after every round, and resuming from it.

After each round the notebook fetches the last global model, which the director sends with the round it is the
model after and the aggregation's state (medfl.events: a server optimizer's moments, bit for bit), and writes
`checkpoint.pt` atomically beside results.json: that model, the rounds done, the aggregation's state, every metric
so far (the best model's rule replays them), the best model, dropouts and rejected updates, the parameters and the
envoys. `run = {"resume_from": "runs/<id>"}` (make demo resume_from=runs/<id>) starts a new experiment from it, on
the same or a restarted director, for the rounds that remain; a checkpoint of another run (dataset, model,
algorithm, envoys, ...) or a damaged one is refused in one line, and nothing is overwritten.
"""
from __future__ import annotations

import copy
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..events import REJECTED_DROP, ROUND_KEY, STATE_PREFIX, unpack
from .logs import log_to
from .parameters import ParameterError, training_parameters

FILE = "checkpoint.pt"
FORMAT = 1
# What a resumed run must share with the run it continues (the training parameters, as results.json records them):
# what it trains, and how the director aggregates and checks the envoys' updates.
MUST_MATCH = ("dataset", "size", "epochs", "train_batch_size", "eval_batch_size", "learning_rate", "algorithm",
              "algorithm_options", "dp", "dp_options", "seed", "stem", "wire_dtype", "secure_aggregation",
              "max_update_ratio", "max_rejections", "rejection_window", "max_update_size", "min_update_cosine")


@dataclass
class Checkpoint:
    """What a run's checkpoint.pt holds."""

    round: int  # training rounds done: `model` is the global model after them
    model: dict  # its state_dict
    aggregation: dict  # the aggregation function's state (a server optimizer's; float64 tensors), empty for none
    best_model: dict | None  # the best model so far, as a state_dict
    metrics: list  # every metric received, with the run's round numbers
    dropouts: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    clipped: list = field(default_factory=list)  # updates clipped to max_update_size
    secure: list = field(default_factory=list)  # secure aggregation's rounds so far
    params: dict = field(default_factory=dict)
    envoys: list = field(default_factory=list)  # the envoys' names
    shards: dict = field(default_factory=dict)  # {envoy: what its shard descriptor said it serves}
    restarts: list = field(default_factory=list)  # each resume so far (results.json's restarts)
    experiments: list = field(default_factory=list)  # OpenFL's experiments of the run so far
    saved: float = 0.0

    def restore(self, model: torch.nn.Module, aggregation=None) -> None:
        """Give the notebook's model the checkpoint's global weights, and the aggregation function its state (a
        server optimizer's moments) where it keeps one; ParameterError, in one line, if the model differs."""
        mine = model.state_dict()
        differs = [f"{name} {tuple(mine[name].shape) if name in mine else 'missing'} here, "
                   f"{tuple(value.shape)} in the checkpoint" for name, value in self.model.items()
                   if name not in mine or mine[name].shape != value.shape]
        differs += [f"{name} is not in the checkpoint" for name in mine if name not in self.model]
        if differs:
            raise ParameterError(f"the checkpoint's model is not this notebook's ({differs[0]}"
                                 f"{f', and {len(differs) - 1} more' if len(differs) > 1 else ''}): resume with the "
                                 "model cell the run started with")
        model.load_state_dict(self.model)
        if self.aggregation and hasattr(aggregation, "load_state"):
            aggregation.load_state({name: value.numpy() for name, value in self.aggregation.items()})


def attempt_name(run_name: str, checkpoint: Checkpoint | None) -> str:
    """OpenFL's name for this attempt's experiment: the run's name, or for a resume the run's name and the time (a
    director that was not restarted still knows the earlier attempts' experiments)."""
    return run_name if checkpoint is None else f"{run_name}-resumed-{time.strftime('%Y%m%d-%H%M%S')}"


def _differences(saved: dict, given: dict) -> list[str]:
    names = MUST_MATCH + (("rounds",) if saved.get("dp") else ())  # DP's noise was set for the planned rounds
    return [f"{name}={saved.get(name)!r} (now {given.get(name)!r})" for name in names
            if saved.get(name) != given.get(name)]


def load_checkpoint(resume_from: str, params: dict, envoys: list[dict]) -> Checkpoint | None:
    """The checkpoint in the run folder `resume_from` (None for ""), checked against these parameters and the
    envoys online; ParameterError, in one line, for one that is missing, damaged or of another run."""
    if not resume_from:
        return None
    path = Path(resume_from)
    path = path / FILE if path.is_dir() else path
    if not path.is_file():
        raise ParameterError(f"resume_from={resume_from!r}: no {FILE} there; a run writes one in its folder after each "
                             "round it completes")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"not a format-{FORMAT} checkpoint")
        checkpoint = Checkpoint(**{k: v for k, v in saved.items() if k != "format"})
    except Exception as exc:
        raise ParameterError(f"resume_from={resume_from!r}: {path.name} is damaged ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); nothing was changed: "
                             "resume from another copy, or start the run again") from None
    differences = _differences(checkpoint.params, params)
    if differences:
        raise ParameterError(f"resume_from={resume_from!r} is a checkpoint of another run: {'; '.join(differences)}: "
                             "resume with the run's parameters")
    if params["rounds"] < checkpoint.round:
        raise ParameterError(f"resume_from={resume_from!r}: the run has done {checkpoint.round} rounds, more than "
                             f"rounds={params['rounds']}")
    kept_out = set(kept_out_of(checkpoint))
    online = sorted(e["envoy"] for e in envoys if e.get("online") and e["envoy"] not in kept_out)
    dropped = {d["envoy"] for d in checkpoint.dropouts}
    if online not in (sorted(set(checkpoint.envoys) - kept_out), sorted(set(checkpoint.envoys) - dropped)):
        raise ParameterError(f"resume_from={resume_from!r}: the run's envoys are {', '.join(checkpoint.envoys)}"
                             + (f" ({', '.join(sorted(dropped))} dropped out)" if dropped else "")
                             + f", online now: {', '.join(online) or 'none'}. An envoy re-registers with a restarted "
                             "director within its health-check period: wait, or start the missing ones; stop others")
    changed = []
    for e in envoys:
        was = checkpoint.shards.get(e["envoy"])
        if e.get("online") and was is not None and e["envoy"] not in kept_out:
            now = _shard(e)
            changed += [f"{e['envoy']}'s {key} {was.get(key)!r} (now {now.get(key)!r})"
                        for key in sorted(set(now) | set(was)) if now.get(key) != was.get(key)]
    if changed:
        raise ParameterError(f"resume_from={resume_from!r}: an envoy serves other data than in the run: "
                             f"{'; '.join(changed[:3])}: resume with the envoys' shards as they were, or start a new "
                             "run")
    return checkpoint


def _shard(envoy: dict) -> dict:
    """What an envoy table's row says of its shard, without whether it is online now."""
    return {k: v for k, v in envoy.items() if k not in ("envoy", "online", "kept_out")}


def kept_out_of(checkpoint: Checkpoint | None) -> dict[str, str]:
    """{envoy: why} for the envoys a resumed run keeps out: those dropped for their rejected updates (a liar does not
    come back with a clean count). An envoy that was lost, and is back, takes part again."""
    return {d["envoy"]: d["reason"] for d in (checkpoint.dropouts if checkpoint else [])
            if d.get("reason", "").startswith(REJECTED_DROP)}


def keep_out(federation, envoys: list[dict], kept_out: dict[str, str]) -> list[dict]:
    """The envoy table with the kept-out envoys offline, and the federation's registry showing them so, which is
    where OpenFL's experiment.start takes the envoys it sends the experiment to."""
    registry = federation.get_shard_registry

    def without_them():
        return {name: {**entry, "is_online": False} if name in kept_out else entry
                for name, entry in registry().items()}

    federation.get_shard_registry = without_them
    for name, why in sorted(kept_out.items()):
        print(f"resumed: {name} stays out of this run ({why})")
    return [{**e, "online": False, "kept_out": kept_out[e["envoy"]]} if e["envoy"] in kept_out else e
            for e in envoys]


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to path so that a reader (a resume, the launcher) finds the old file or the new one, never half
    of one, whenever the kernel or the host stops: a temporary file beside it, flushed to disk, renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to path atomically (write_atomically)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **checkpoint.__dict__}, buffer)
    write_atomically(path, buffer.getvalue())


class Checkpointer:
    """follow()'s hand at each round's end: fetch the last global model with the director's state and write the
    run's checkpoint. `record` is the notebook's (params, envoys, restarts); `resumed` the checkpoint this attempt
    goes on from, if any."""

    def __init__(self, run_dir: Path, experiment, model: torch.nn.Module, record: dict,
                 resumed: Checkpoint | None = None):
        self.path = Path(run_dir) / FILE
        self.experiment, self.model, self.record, self.resumed = experiment, model, record, resumed
        self.first_round = resumed.round if resumed else 0

    def best_model(self) -> torch.nn.Module | None:
        """The resumed run's best model so far, as a model like the notebook's."""
        if self.resumed is None or self.resumed.best_model is None:
            return None
        best = copy.deepcopy(self.model)
        best.load_state_dict(self.resumed.best_model)
        return best

    def __call__(self, ended: int, run) -> bool:
        """Round `ended` (counted in the run, from 0) is over: checkpoint the model after it; False if the director's
        last model is not that one (it has moved on already, or the round only validated)."""
        raw = self.experiment.federation.dir_client.get_last_model(self.experiment.experiment_name)
        if ROUND_KEY not in raw or self.first_round + int(raw[ROUND_KEY][0]) != ended + 1:
            return False
        model = {name: torch.from_numpy(np.array(raw[name])).reshape(t.shape).to(t.dtype)
                 for name, t in self.model.state_dict().items()}
        aggregation = {name[len(STATE_PREFIX):]: torch.from_numpy(unpack(value)) for name, value in raw.items()
                       if name.startswith(STATE_PREFIX)}
        earlier = self.resumed.experiments if self.resumed else []
        save(self.path, Checkpoint(
            round=ended + 1, model=model, aggregation=aggregation,
            best_model=copy.deepcopy(run.best_model.state_dict()) if run.best_model is not None else None,
            metrics=[m for m in run.metrics if m["round"] <= ended], dropouts=list(run.dropouts),
            rejected=list(run.rejected), clipped=list(run.clipped), secure=list(run.secure),
            params=self.record["params"],
            envoys=sorted(e["envoy"] for e in self.record["envoys"] if e.get("online")),
            shards={e["envoy"]: _shard(e) for e in self.record["envoys"] if e.get("online")},
            restarts=list(self.record.get("restarts", [])),
            experiments=[*earlier, self.experiment.experiment_name], saved=time.time()))
        return True


def restarts(run_dir: Path, checkpoint: Checkpoint | None, attempt: str) -> list[dict]:
    """results.json's `restarts`: each resume of the run, this one last, with the rounds trained before it, when,
    and why the attempt before had stopped (the error its results.json recorded)."""
    if checkpoint is None:
        return []
    previous, why, earlier = Path(run_dir) / "results.json", None, list(checkpoint.restarts)
    try:  # written by the last attempt that could still write before it stopped
        stopped = json.loads(previous.read_text()) if previous.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # written by an older version, or damaged
        why = f"not recorded: its results.json could not be read ({type(exc).__name__}: {exc})"
        stopped = None
    if isinstance(stopped, dict):
        if stopped.get("status") == "failed" and stopped.get("attempt"):
            why = f"{stopped['attempt']}: {stopped['error']}"
        known = {r["experiment"] for r in earlier}  # and resumes that stopped before their first checkpoint
        earlier += [r for r in stopped.get("restarts", []) if r["experiment"] not in known]
    return [*earlier, {
        "after_round": checkpoint.round, "experiment": attempt, "time": time.time(),
        "checkpoint_saved": checkpoint.saved,
        "why": why or "not recorded: the notebook stopped before it could say (its kernel or host went down)"}]


class OpenedRun(NamedTuple):
    """What open_run returns."""

    dir: Path  # the run's folder: results, models, plots, logs and its checkpoint
    name: str  # the run's name: run["experiment_name"], medmnist-<dataset>-<date>-<time>, or the resumed run's
    attempt: str  # OpenFL's name for this attempt's experiment (attempt_name)
    checkpoint: Checkpoint | None  # the resumed run's last checkpoint; None for a new run
    record: dict  # what results.json and the checkpoints record of the run, but `started` (the submission's time)


def open_run(namespace: dict, envoys: list[dict]) -> OpenedRun:
    """Open this run's folder from the notebook's parameters (`namespace`: its globals) and the envoys online:
    `run["output_dir"]/<name>`, or with `run["resume_from"]` the earlier run's folder, name and last checkpoint
    (load_checkpoint refuses one that is damaged or of another run, in one line). OpenFL's log goes to the folder's
    logs/openfl.log, not to the page (log_to). The record holds the parameters results.json keeps, the envoys, the data
    source and the run's restarts."""
    run = namespace["run"]
    name = run["experiment_name"] or f"medmnist-{namespace['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(run["output_dir"]) / name
    if run["resume_from"]:  # go on with an earlier run, in its folder and under its name
        folder = Path(run["resume_from"])
        name = folder.name
    log_to(folder / "logs" / "openfl.log", run["verbose"])
    params = training_parameters(namespace)
    checkpoint = load_checkpoint(run["resume_from"], params, envoys)
    if kept_out := kept_out_of(checkpoint):
        envoys = keep_out(namespace["federation"], envoys, kept_out)
    attempt = attempt_name(name, checkpoint)
    record = {"params": {**params, "experiment": name, "tls": bool(run["ca_cert"])}, "envoys": envoys,
              "data_source": run["data_source"], "restarts": restarts(folder, checkpoint, attempt),
              # where finish_run also logs the run (MLflow), if anywhere
              "tracking": {k: run[k] for k in ("tracking", "tracking_uri", "tracking_parent", "output_dir")}}
    return OpenedRun(folder, name, attempt, checkpoint, record)
