"""What an envoy's training produced, checked twice: on the envoy before its weights leave it, and on the director
before an update enters the aggregate (UpdateChecks, in medfl.aggregator.SelectingAggregator). One broken node,
whether its training diverged, its data or accelerator is faulty, or it sends a huge update on purpose (model
replacement, Bagdasaryan et al. 2020), then costs its own contribution and nothing else.

On the director, an update (the envoy's trained weights) is checked, in this order:
- count: the training-set size it claims, by which OpenFL weights it in the average, above 0 and at most what its
  shard registered with the director (an envoy claiming 10^9 samples would otherwise become the global model);
- structure: the same tensor names and shapes as the global model, and float32 values (OpenFL's wire format);
- finite: no NaN or infinity;
- state: model state that has a meaning no update may change: BatchNorm's running variances never negative, and its
  step counters never below the global model's (each envoy adds the batches it ran);
- norm: its distance from the round's global model at most `max_update_ratio` times the median of that round's
  distances, once a round has three or more updates (with two, the median is their mean: nothing stands out).
A validation metric that is not finite is that envoy's failed task; one outside its range (METRIC_RANGES: an ACC or
AUC of 5, a negative loss) is a lie that would pick the "best" model, and is left out of that round's aggregate.

What is not caught: a subtle, bounded poisoning (an update within the bound that pulls the model somewhere else).
The median and geometric-median aggregations (medfl.algorithms) and DP-SGD (medfl.privacy) are for that.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .events import REJECTED

# PyTorch's BatchNorm step counters: model state, but not weights; an update's distance leaves them out (they grow
# by the number of batches an envoy ran, which says nothing about where its weights went).
COUNTERS = ("num_batches_tracked",)
# How OpenFL's PyTorch adapter names the optimizer state it sends with the weights (only with opt_treatment
# CONTINUE_GLOBAL, openfl_adjustments.transport): checked for finite values, not against the model's structure.
OPTIMIZER_STATE = "__opt_"
# BatchNorm's running variances: an average of squares, never negative (a negative one makes the layer divide by the
# square root of a negative number: NaN for every image from then on).
VARIANCES = ("running_var",)
WIRE_ROUNDING = 2.0 ** -7  # bfloat16's rounding of a change, with a margin: medfl.wire
# What each of the tasks' metrics can be: an envoy reporting AUC 5.0 (or a loss of -1e30 under best_metric "loss")
# would otherwise make its round's model the best.
METRIC_RANGES = {"acc": (0.0, 1.0), "auc": (0.0, 1.0), "loss": (0.0, math.inf), "train_loss": (0.0, math.inf)}
MAX_UPDATE_RATIO = 10.0
MAX_REJECTIONS = 2
# ...in how many of the last rounds: an envoy that lies every other round is dropped as one that lies every round is.
REJECTION_WINDOW = 5
MIN_FOR_NORMS = 3  # updates a round needs before one can stand out from their median


class NonFiniteWeights(RuntimeError):
    """Training on this envoy left weights that are not finite; they are not sent."""


def check_trained(model: torch.nn.Module) -> None:
    """Raise NonFiniteWeights, naming this envoy, if training left a weight or buffer that is NaN or infinite."""
    state = model.state_dict()
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        envoy = os.environ.get("ENVOY_NAME", "this envoy")
        raise NonFiniteWeights(f"{envoy}'s trained weights are not finite ({len(bad)} of {len(state)} tensors, "
                               f"{bad[0]} first): training diverged, and they are not sent. Lower the learning rate, "
                               "or check this node's data and accelerator")


@dataclass
class Rejection:
    """An update left out of a round's aggregate: whose, which round (from 1, as the notebook counts), which check
    failed, a sentence saying how, and the numbers behind it."""

    envoy: str
    round: int
    check: str
    detail: str
    numbers: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"its update failed the {self.check} check: {self.detail}"


def structure_problem(update: dict[str, np.ndarray], model: dict[str, np.ndarray]) -> str | None:
    """How `update`'s tensors differ from the global model's in names, shapes or dtype; None if they do not."""
    update = {name: value for name, value in update.items() if not name.startswith(OPTIMIZER_STATE)}
    missing, extra = sorted(set(model) - set(update)), sorted(set(update) - set(model))
    if missing or extra:
        parts = ([f"{len(missing)} missing ({missing[0]} first)"] if missing else []) + \
                ([f"{len(extra)} unknown ({extra[0]} first)"] if extra else [])
        return f"its tensors do not match the global model's: {', '.join(parts)}"
    for name, value in update.items():
        if value.shape != model[name].shape:
            return f"{name} has shape {list(value.shape)}, the global model's {list(model[name].shape)}"
        if value.dtype != np.float32:
            return f"{name} is {value.dtype}, not float32"
    return None


def non_finite(update: dict[str, np.ndarray]) -> dict:
    """{tensors: how many hold NaN or infinity, first: the first one, of: how many there are}; empty if none do."""
    bad = [name for name, value in update.items() if not np.isfinite(value).all()]
    return {"tensors": len(bad), "first": bad[0], "of": len(update)} if bad else {}


def out_of_range(metrics: dict[str, float]) -> dict:
    """The first metric, by name, outside its METRIC_RANGES: {metric, value, low, high}; empty if none is."""
    for name in sorted(metrics):
        low, high = METRIC_RANGES.get(name, (-math.inf, math.inf))
        if not low <= metrics[name] <= high:
            return {"metric": name, "value": metrics[name], "low": low, "high": high}
    return {}


def invalid_state(update: dict[str, np.ndarray], model: dict[str, np.ndarray]) -> dict:
    """The first tensor of `update`, by name, whose values no training could give: a negative running variance, or
    a step counter below the global model's. {tensor, what, value, bound}; empty if there is none."""
    for name in sorted(update):
        value = np.asarray(update[name], dtype=np.float64)
        if name.endswith(VARIANCES) and value.size:
            # A half-precision wire rounds each change to 8 (bfloat16) or 11 (float16) significant bits: a variance
            # that fell to about 0 may arrive a hair below it. Below that rounding, no training got there.
            change = np.abs(value - np.asarray(model.get(name, 0.0), dtype=np.float64))
            if (value < -change * WIRE_ROUNDING).any():
                return {"tensor": name, "what": "a negative running variance", "value": float(value.min()),
                        "bound": 0.0}
        if name.endswith(COUNTERS) and name in model and value.size:
            # The global counter is the envoys' weighted mean; an envoy's model holds its whole part (an integer
            # buffer), to which training adds the batches it ran: zero batches leave exactly that.
            floor = float(np.floor(np.asarray(model[name], dtype=np.float64).max()))
            if value.min() < floor:
                return {"tensor": name, "what": "a step counter below the global model's", "value": float(value.min()),
                        "bound": floor}
    return {}


def distance(update: dict[str, np.ndarray], model: dict[str, np.ndarray]) -> float:
    """The L2 norm of update - model over the model's tensors but COUNTERS (in float64)."""
    total = 0.0
    for name, value in update.items():
        if name in model and not name.endswith(COUNTERS):
            difference = np.asarray(value, dtype=np.float64) - np.asarray(model[name], dtype=np.float64)
            total += float(np.dot(difference.ravel(), difference.ravel()))
    return math.sqrt(total)


def outsized(distances: dict[str, float], max_ratio: float) -> dict[str, dict]:
    """The envoys whose distance exceeds max_ratio times the median of all, once there are MIN_FOR_NORMS or more:
    {envoy: {norm, median, ratio, max_update_ratio}}."""
    if len(distances) < MIN_FOR_NORMS:
        return {}
    median = statistics.median(distances.values())
    if not median > 0:
        return {}
    return {envoy: {"norm": norm, "median": median, "ratio": norm / median, "max_update_ratio": max_ratio}
            for envoy, norm in distances.items() if norm > max_ratio * median}


def check_settings(max_update_ratio, max_rejections, rejection_window=REJECTION_WINDOW) -> None:
    """Raise ValueError, saying what to give, for a bound or a count that cannot work."""
    if isinstance(max_update_ratio, bool) or not isinstance(max_update_ratio, (int, float)) or \
            not max_update_ratio > 1:
        raise ValueError(f"max_update_ratio={max_update_ratio!r}: give a number above 1 (the default is "
                         f"{MAX_UPDATE_RATIO:g}: an update ten times farther from the global model than the median)")
    if isinstance(max_rejections, bool) or not isinstance(max_rejections, int) or max_rejections < 1:
        raise ValueError(f"max_rejections={max_rejections!r}: give a whole number of rounds of at least 1 (the "
                         f"default is {MAX_REJECTIONS})")
    if isinstance(rejection_window, bool) or not isinstance(rejection_window, int) or \
            rejection_window < max_rejections:
        raise ValueError(f"rejection_window={rejection_window!r}: give a whole number of rounds of at least "
                         f"max_rejections={max_rejections} (the default is {REJECTION_WINDOW}: {MAX_REJECTIONS} "
                         f"rejections within the last {REJECTION_WINDOW} rounds drop an envoy)")


class UpdateChecks:
    """The director's checks, mixed into the experiment's aggregator (medfl.aggregator.SelectingAggregator): each
    round's updates are checked before they are aggregated; one that fails is left out of that round's aggregate (the
    others re-weighted by their sample counts) and streamed as an event (REJECTED). An envoy rejected in
    `max_rejections` of the last `rejection_window` rounds, or whose validation metric is not finite, is dropped
    (medfl.dropouts). A round whose every update was rejected keeps the global model as it was.

    Needs of the aggregator: OpenFL's Aggregator, its _global_model, and _event, _drop, _judge and _remaining
    (medfl.dropouts)."""

    def _start_checks(self, max_update_ratio: float, max_rejections: int,
                      rejection_window: int = REJECTION_WINDOW) -> None:
        check_settings(max_update_ratio, max_rejections, rejection_window)
        self.max_update_ratio, self.max_rejections = float(max_update_ratio), max_rejections
        self.rejection_window = rejection_window
        self.rejected: list[Rejection] = []
        self._left_out: dict[str, set[str]] = {}  # this round's task: the envoys whose results stay out of it
        self._rejected_in: dict[str, list[int]] = {}  # envoy: the rounds (from 0) in which its update was rejected
        self._failed_metrics: dict[str, str] = {}  # envoy: which metric of this round was not finite
        self._training_tasks: set[str] = set()  # tasks whose results carry trained weights
        self._checks_lock = threading.Lock()

    _registered = None  # see registered_samples

    def registered_samples(self, samples) -> None:
        """From now on, samples() gives each envoy's registered training-set size (the director's
        openfl_adjustments.contract.ChecksCounts)."""
        self._registered = samples

    def send_local_task_results(self, collaborator_name, round_number, task_name, data_size, named_tensors):
        weights = [t for t in named_tensors if not t.report and "trained" in t.tags]
        if weights and round_number == self.round_number:
            self._training_tasks.add(task_name)
            if bad := self._claimed_count(collaborator_name, data_size):
                self._reject_update(collaborator_name, round_number, task_name, "count", bad.pop("detail"), bad)
                named_tensors = [t for t in named_tensors if t.report]
            elif problem := self._structure(weights, round_number):  # unreadable by OpenFL too: the metrics go on
                self._reject_update(collaborator_name, round_number, task_name, "structure", problem)
                named_tensors = [t for t in named_tensors if t.report]
        super().send_local_task_results(collaborator_name, round_number, task_name, data_size, named_tensors)

    def _claimed_count(self, envoy: str, claimed: int) -> dict:
        """What is wrong with the training-set size an update claims: {detail, claimed, registered}; empty if
        nothing (or if the director has no registered size for this envoy to compare with)."""
        registered = (self._registered() if self._registered else {}).get(envoy)
        if claimed <= 0:
            detail = f"it claims {claimed} training samples, where an update weighs by a count above 0"
        elif registered is not None and claimed > registered:
            detail = (f"it claims {claimed} training samples, more than the {registered} its shard registered with "
                      "the director")
        else:
            return {}
        return {"detail": detail, "claimed": claimed, "registered": registered}

    def _decode(self, named_tensor) -> np.ndarray:
        """A received tensor's values, decoded as OpenFL's _process_named_tensor decodes them (a change of the
        weights, for delta updates)."""
        from openfl.utilities import TensorKey

        key = TensorKey(named_tensor.name, self.uuid, named_tensor.round_number, named_tensor.report,
                        tuple(named_tensor.tags))
        metadata = [{"int_to_float": m.int_to_float, "int_list": m.int_list, "bool_list": m.bool_list}
                    for m in named_tensor.transformer_metadata]
        return self.tensor_codec.decompress(key, named_tensor.data_bytes, metadata,
                                            require_lossless="compressed" in named_tensor.tags)[1]

    def _structure(self, weights, round_number: int) -> str | None:
        """What is wrong with the structure of an arriving update, or None."""
        try:
            update = {t.name: self._decode(t) for t in weights}
        except Exception as exc:  # bytes that do not make the tensor their metadata describes
            return f"unreadable: {type(exc).__name__}: {exc}"
        return structure_problem(update, self._global_model(round_number))

    def _reject_update(self, envoy: str, round_number: int, task_name: str, check: str, detail: str,
                       numbers: dict | None = None) -> None:
        """Leave envoy's update of this round (counted from 0) out of task_name's aggregate, naming the check."""
        rejection = Rejection(envoy, round_number + 1, check, detail, numbers or {})
        with self._checks_lock:
            self.rejected.append(rejection)
            self._left_out.setdefault(task_name, set()).add(envoy)
        self.logger.warning("Rejected %s's update in round %d: %s", envoy, rejection.round, rejection.line())
        event = self._event(envoy, REJECTED, "")
        event["metric_name"] = json.dumps({"check": check, "detail": detail, "numbers": rejection.numbers})
        self.metric_queue.put(event)

    def _check_round(self, r: int) -> None:
        """Before round r is aggregated: leave out the updates that are not finite or stand out from the round's
        median distance, and the results of tasks whose metrics are not finite. Called with self.lock held."""
        from openfl.utilities import TaskResultKey

        done = [c for c in self.collaborators_done if c not in self.dropped]
        model = self._global_model(r)
        for task in self.assigner.get_all_tasks_for_round(r):
            distances = {}
            for envoy in done:
                keys = self.collaborator_tasks_results.get(TaskResultKey(task, envoy, r))
                if keys is None or envoy in self._left_out.get(task, ()):
                    continue
                values = {k: self.tensor_db.get_tensor_from_cache(k) for k in keys}
                bad_metric = next((k for k, v in values.items() if k.report and not np.isfinite(v).all()), None)
                if bad_metric is not None:
                    self._failed_metrics[envoy] = (f"its {task} task reported {bad_metric.tensor_name} = "
                                                   f"{float(values[bad_metric])}")
                    self._left_out.setdefault(task, set()).add(envoy)
                    continue
                if bad := out_of_range({k.tensor_name: float(np.asarray(v).reshape(-1)[0]) for k, v in values.items()
                                        if k.report and np.size(v) == 1}):
                    self._reject_update(envoy, r, task, "metric", f"its {task} task reported {bad['metric']} = "
                                        f"{bad['value']:.6g}, outside [{bad['low']:g}, {bad['high']:g}]", bad)
                    continue
                update = {k.tensor_name: v for k, v in values.items() if not k.report and "trained" in k.tags}
                if not update:
                    continue
                if bad := non_finite(update):
                    self._reject_update(envoy, r, task, "finite", f"NaN or infinity in {bad['tensors']} of "
                                        f"{bad['of']} tensors ({bad['first']} first)", bad)
                elif bad := invalid_state(update, model):
                    self._reject_update(envoy, r, task, "state", f"{bad['tensor']} holds {bad['what']}: "
                                        f"{bad['value']:.6g}, where it cannot go below {bad['bound']:g}", bad)
                else:
                    distances[envoy] = distance(update, model)
            for envoy, numbers in outsized(distances, self.max_update_ratio).items():
                self._reject_update(envoy, r, task, "norm", f"its distance from the global model, "
                                    f"{numbers['norm']:.4g}, is {numbers['ratio']:.1f} times the round's median "
                                    f"({numbers['median']:.4g}); the bound is max_update_ratio="
                                    f"{self.max_update_ratio:g}", numbers)

    def _compute_validation_related_task_metrics(self, task_name: str) -> None:
        left_out = self._left_out.get(task_name, set())
        if not left_out:
            return super()._compute_validation_related_task_metrics(task_name)
        done = self.collaborators_done
        self.collaborators_done = [c for c in done if c not in left_out]
        try:
            if any(c in self.collaborators_done for c in self.assigner.get_collaborators_for_task(
                    task_name, self.round_number)):
                super()._compute_validation_related_task_metrics(task_name)
            elif task_name in self._training_tasks:  # every update rejected: the global model stays as it was
                self.logger.warning("Round %d: every update was rejected; the global model stays as it was",
                                    self.round_number)
                for name, value in self._global_model(self.round_number).items():
                    self._prepare_trained(name, self.uuid, self.round_number, False, value)
        finally:
            self.collaborators_done = done

    def _act_on_checks(self, ended: int) -> None:
        """After round `ended`: drop the envoys rejected in max_rejections of the last rejection_window rounds, and
        those whose metrics were not finite (a failed task); then the min_envoys rule decides. Called with self.lock
        held."""
        rejected_now = {e for task in self._training_tasks for e in self._left_out.get(task, ())
                        if e not in self._failed_metrics}
        for envoy in rejected_now:
            self._rejected_in.setdefault(envoy, []).append(ended)
        failed, self._failed_metrics, self._left_out = self._failed_metrics, {}, {}
        drops = {envoy: f"its task failed: {why}" for envoy, why in failed.items()}
        for envoy, rounds in self._rejected_in.items():
            count = sum(1 for r in rounds if r > ended - self.rejection_window)
            if count >= self.max_rejections and envoy not in drops and envoy in rejected_now:
                last = next(r for r in reversed(self.rejected) if r.envoy == envoy)
                drops[envoy] = (f"its update was rejected in {count} of the last {self.rejection_window} rounds "
                                f"(max_rejections={self.max_rejections}); last: {last.line()}")
        for envoy, why in drops.items():
            if envoy not in self.dropped:
                self._drop(envoy, why, ended)
        if drops:
            self._judge()
