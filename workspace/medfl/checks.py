"""What an envoy's training produced, checked twice: on the envoy before its weights leave it, and on the director
before an update enters the aggregate (UpdateChecks, in medfl.aggregator.SelectingAggregator). One broken node,
whether its training diverged, its data or accelerator is faulty, or it sends a huge update on purpose (model
replacement, Bagdasaryan et al. 2020), then costs its own contribution and nothing else.

On the director, an update (the envoy's trained weights) is checked, in this order:
- count: the training-set size it claims, by which OpenFL weights it in the average, above 0 and at most what its
  shard registered with the director (an envoy claiming 10^9 samples would otherwise become the global model); and
  a validation's count, by which OpenFL weighs its metrics, the size of its val or test split as registered;
- structure: the same tensor names and shapes as the global model, and float32 values (OpenFL's wire format);
- finite: no NaN or infinity;
- state: model state that has a meaning no update may change: BatchNorm's running variances never negative, and its
  step counters never below the global model's (each envoy adds the batches it ran);
- norm: its distance from the round's global model at most `max_update_ratio` times the median of that round's
  distances, once a round has three or more updates (with two, the median is their mean: nothing stands out);
- direction: its change of the weights at least `min_update_cosine` (0) in cosine to the same envoy's last accepted
  change: an update turned around, which every size check passes, points against where the same data took the
  model a round before. The director holds no data, so there is no clean reference (FLTrust, Cao et al. 2021); the
  round's median or the federation's last step are no reference under label skew either, where honest envoys point
  apart (docs/faults.md has the numbers); an envoy's own history is (FLDetector, Zhang et al. 2022, judges the
  consistency of each client's updates over rounds);
- size: an update that passed is clipped to `max_update_size` times the global model's norm (Sun et al. 2019), at any
  number of envoys, and the clipping recorded: with two envoys, the only bound a huge update meets.
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

from .events import CLIPPED, REJECTED, REJECTED_DROP

# PyTorch's BatchNorm step counters: model state, but not weights; an update's distance leaves them out (they grow
# by the number of batches an envoy ran, which says nothing about where its weights went).
COUNTERS = ("num_batches_tracked",)
# BatchNorm's running statistics: model state that follows the data, not the loss; a direction leaves them out.
STATISTICS = ("running_mean", "running_var", *COUNTERS)
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
# Metrics a split can leave undefined: AUC, where a split holds one class. NaN then means missing, not a failure.
UNDEFINED = ("auc",)
MAX_UPDATE_RATIO = 10.0
# An update's distance from the global model, at most this times the global model's norm (clipped beyond): honest
# updates measured 0.045 to 0.515 of it (docs/faults.md).
MAX_UPDATE_SIZE = 1.0
# The least cosine between an update's change of the weights and the same envoy's last accepted change (from its
# second round in an experiment): docs/faults.md has what honest and turned-around updates measured; -1: no check.
MIN_UPDATE_COSINE = 0.0
# ...less what two unrelated directions reach by chance: their cosine over n weights has a spread of 1/sqrt(n), and
# falls below -6/sqrt(n) with a probability under 1e-9. Under DP-SGD an update is mostly noise: honest ones measured
# cosines of 0.000 to 0.008, where 1/sqrt(n) was 0.002 (docs/faults.md).
CHANCE_Z = 6.0
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


def cosine(update: dict[str, np.ndarray], model: dict[str, np.ndarray], step: dict[str, np.ndarray]) -> float | None:
    """The cosine between update - model and step (another change of the weights) over the weights (not
    STATISTICS), in float64; None when either is zero (nothing moved, so no direction)."""
    dot = ours = theirs = 0.0
    for name, moved in step.items():
        if name in update and not name.endswith(STATISTICS):
            change = (np.asarray(update[name], dtype=np.float64) - np.asarray(model[name], dtype=np.float64)).ravel()
            moved = np.asarray(moved, dtype=np.float64).ravel()
            dot, ours, theirs = dot + float(change @ moved), ours + float(change @ change), \
                theirs + float(moved @ moved)
    return dot / math.sqrt(ours * theirs) if ours > 0 and theirs > 0 else None


def clipped(update: dict[str, np.ndarray], model: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """update's tensors moved towards the model, model + (update - model) * scale, in float32; COUNTERS as they are."""
    return {name: value if name.endswith(COUNTERS) or name not in model else
            (model[name] + (np.asarray(value, np.float64) - model[name]) * scale).astype(np.float32)
            for name, value in update.items()}


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


def check_settings(max_update_ratio, max_rejections, rejection_window=REJECTION_WINDOW,
                   max_update_size=MAX_UPDATE_SIZE, min_update_cosine=MIN_UPDATE_COSINE) -> None:
    """Raise ValueError, saying what to give, for a bound or a count that cannot work."""
    def number(value):
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    if not number(max_update_size) or not max_update_size > 0:
        raise ValueError(f"max_update_size={max_update_size!r}: give a number above 0 (the default is "
                         f"{MAX_UPDATE_SIZE:g}: an update is clipped to the global model's own norm)")
    if not number(min_update_cosine) or not -1 <= min_update_cosine < 1:
        raise ValueError(f"min_update_cosine={min_update_cosine!r}: give a number from -1 (no direction check) to "
                         f"below 1 (the default is {MIN_UPDATE_COSINE:g}: an update pointing against its envoy's "
                         "last one is rejected)")
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

    def _start_checks(self, max_update_ratio: float = MAX_UPDATE_RATIO, max_rejections: int = MAX_REJECTIONS,
                      rejection_window: int = REJECTION_WINDOW,
                      max_update_size: float = MAX_UPDATE_SIZE, min_update_cosine: float = MIN_UPDATE_COSINE) -> None:
        check_settings(max_update_ratio, max_rejections, rejection_window, max_update_size, min_update_cosine)
        self.max_update_ratio, self.max_rejections = float(max_update_ratio), max_rejections
        self.rejection_window = rejection_window
        self.max_update_size, self.min_update_cosine = float(max_update_size), float(min_update_cosine)
        self.rejected: list[Rejection] = []
        self.clipped: list[Rejection] = []  # updates clipped to max_update_size, as they were
        self._left_out: dict[str, set[str]] = {}  # this round's task: the envoys whose results stay out of it
        self._rejected_in: dict[str, list[int]] = {}  # envoy: the rounds (from 0) in which its update was rejected
        self._failed_metrics: dict[str, str] = {}  # envoy: which metric of this round was not finite
        self._training_tasks: set[str] = set()  # tasks whose results carry trained weights
        self._last_changes: dict[str, dict] = {}  # envoy: its last accepted change of the weights (the direction check)
        self._checks_lock = threading.Lock()

    _registered = None  # see registered_samples

    def registered_samples(self, samples) -> None:
        """From now on, samples() gives each envoy's registered training-set size (the director's
        openfl_adjustments.contract.ChecksCounts)."""
        self._registered = samples

    def send_local_task_results(self, collaborator_name, round_number, task_name, data_size, named_tensors):
        weights = [t for t in named_tensors if not t.report and "trained" in t.tags]
        if not weights and "valid" in task_name and round_number == self.round_number and \
                (bad := self._claimed_validation(collaborator_name, data_size)):  # its metrics' weight
            self._reject_update(collaborator_name, round_number, task_name, "count", bad.pop("detail"), bad)
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
        registered = (self._registered() if self._registered else {}).get(envoy, {}).get("train")
        if claimed <= 0:
            detail = f"it claims {claimed} training samples, where an update weighs by a count above 0"
        elif registered is not None and claimed > registered:
            detail = (f"it claims {claimed} training samples, more than the {registered} its shard registered with "
                      "the director")
        else:
            return {}
        return {"detail": detail, "claimed": claimed, "registered": registered}

    def _claimed_validation(self, envoy: str, claimed: int) -> dict:
        """What is wrong with the number of samples a validation claims, by which OpenFL weighs its metrics in the
        round's: {detail, claimed, registered}; empty if it is the size of a split it validates on (val, or test
        in the test run) as its shard registered it, or if the director has none to compare with."""
        registered = (self._registered() if self._registered else {}).get(envoy)
        if registered is None or claimed in (registered["val"], registered["test"]):
            return {}
        return {"detail": f"it claims {claimed} validation samples, where its shard registered {registered['val']} "
                          f"(val) and {registered['test']} (test)", "claimed": claimed,
                "registered": [registered["val"], registered["test"]]}

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
        """Before round r is aggregated: leave out the updates that are not finite, hold impossible state, stand out
        from the round's median distance or point against their envoy's last accepted change, and the results of
        tasks whose metrics are not finite or out of range; clip the others to max_update_size. Called with
        self.lock held."""
        from openfl.utilities import TaskResultKey

        done = [c for c in self.collaborators_done if c not in self.dropped]
        model = self._global_model(r)
        for task in self.assigner.get_all_tasks_for_round(r):
            passed = {}  # envoy: (its update's keys, its update)
            undefined = []  # (envoy, key) of a metric its split leaves undefined
            for envoy in done:
                keys = self.collaborator_tasks_results.get(TaskResultKey(task, envoy, r))
                if keys is None or envoy in self._left_out.get(task, ()):
                    continue
                values = {k: self.tensor_db.get_tensor_from_cache(k) for k in keys}
                # An AUC that a split with one class leaves undefined (NaN) is missing, not a failure (undefined)
                for k in [k for k, v in values.items() if k.report and k.tensor_name in UNDEFINED and
                          np.isnan(v).all()]:
                    undefined.append((envoy, k))
                    del values[k]
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
                keys = {k.tensor_name: k for k in values if not k.report and "trained" in k.tags}
                update = {name: values[k] for name, k in keys.items()}
                if not update:
                    continue
                if bad := non_finite(update):
                    self._reject_update(envoy, r, task, "finite", f"NaN or infinity in {bad['tensors']} of "
                                        f"{bad['of']} tensors ({bad['first']} first)", bad)
                elif bad := invalid_state(update, model):
                    self._reject_update(envoy, r, task, "state", f"{bad['tensor']} holds {bad['what']}: "
                                        f"{bad['value']:.6g}, where it cannot go below {bad['bound']:g}", bad)
                else:
                    passed[envoy] = (keys, update)
            self._judge_updates(r, task, passed, model)
            self._leave_undefined_out(r, task, undefined)

    def _leave_undefined_out(self, r: int, task: str, undefined: list) -> None:
        """Give each undefined metric the weighted mean of the envoys' defined ones, so that OpenFL's weighted mean
        over all of them is the mean over those that are defined; NaN stays where none is."""
        from openfl.utilities import TaskResultKey

        for envoy, key in undefined:
            defined = []
            for other in self.collaborators_done:
                if other in self.dropped or other in self._left_out.get(task, ()):
                    continue
                theirs = self.tensor_db.get_tensor_from_cache(key._replace(
                    tags=tuple(other if tag == envoy else tag for tag in key.tags)))
                if theirs is not None and np.isfinite(theirs).all():
                    defined.append((self.collaborator_task_weight[TaskResultKey(task, other, r)], float(theirs)))
            if defined:
                mean = sum(w * v for w, v in defined) / sum(w for w, _ in defined)
                self.tensor_db.replace_tensors({key: np.array(mean, dtype=np.float32)})
            self.logger.info("Round %d: %s's %s is undefined on its split (one class): left out of the mean", r + 1,
                             envoy, key.tensor_name)

    def _judge_updates(self, r: int, task: str, passed: dict, model: dict) -> None:
        """The checks that weigh an update against the others', its envoy's last one, and the model's norm."""
        distances = {envoy: distance(update, model) for envoy, (_, update) in passed.items()}
        outliers = outsized(distances, self.max_update_ratio)
        for envoy, numbers in outliers.items():
            self._reject_update(envoy, r, task, "norm", f"its distance from the global model, "
                                f"{numbers['norm']:.4g}, is {numbers['ratio']:.1f} times the round's median "
                                f"({numbers['median']:.4g}); the bound is max_update_ratio="
                                f"{self.max_update_ratio:g}", numbers)
        size = distance(model, dict.fromkeys(model, 0.0))  # the global model's norm
        for envoy, (keys, update) in passed.items():
            if envoy in outliers:
                continue
            last = self._last_changes.get(envoy)
            turn = cosine(update, model, last) if last is not None else None
            self.logger.info("Round %d: %s's update is %.4g of the global model's norm, at cosine %s to its last",
                             r + 1, envoy, distances[envoy] / size if size else math.inf,
                             "-" if turn is None else f"{turn:.4f}")
            chance = CHANCE_Z / math.sqrt(sum(np.size(v) for v in last.values())) if last else 0.0
            if turn is not None and turn < self.min_update_cosine - chance:
                self._reject_update(envoy, r, task, "direction", f"its change of the weights points against its own "
                                    f"last accepted one: cosine {turn:.3f}, below min_update_cosine="
                                    f"{self.min_update_cosine:g} less what chance reaches ({chance:.3g})",
                                    {"cosine": turn, "min_update_cosine": self.min_update_cosine, "chance": chance})
                continue
            self._last_changes[envoy] = {name: (np.asarray(value, np.float64) - model[name]).astype(np.float32)
                                         for name, value in update.items()
                                         if name in model and not name.endswith(STATISTICS)}
            if size and distances[envoy] > self.max_update_size * size:
                scale = self.max_update_size * size / distances[envoy]
                self._clip_update(envoy, r, keys, clipped(update, model, scale), {
                    "norm": distances[envoy], "model_norm": size, "bound": self.max_update_size * size,
                    "scale": scale, "max_update_size": self.max_update_size})

    def _clip_update(self, envoy: str, r: int, keys: dict, update: dict, numbers: dict) -> None:
        """Put envoy's clipped update in place of what it sent, and say so."""
        # The director's store (openfl_adjustments.tensor_store) replaces; OpenFL's own would keep what was sent.
        self.tensor_db.replace_tensors({keys[name]: value for name, value in update.items()})
        clipping = Rejection(envoy, r + 1, "size", f"its distance from the global model, {numbers['norm']:.4g}, is "
                             f"{numbers['norm'] / numbers['model_norm']:.3g} times the global model's norm; clipped "
                             f"to max_update_size={self.max_update_size:g} times it", numbers)
        with self._checks_lock:
            self.clipped.append(clipping)
        self.logger.warning("Clipped %s's update in round %d: %s", envoy, clipping.round, clipping.detail)
        event = self._event(envoy, CLIPPED, "")
        event["metric_name"] = json.dumps({"check": "size", "detail": clipping.detail, "numbers": numbers})
        self.metric_queue.put(event)

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
                drops[envoy] = (f"{REJECTED_DROP} in {count} of the last {self.rejection_window} rounds "
                                f"(max_rejections={self.max_rejections}); last: {last.line()}")
        for envoy, why in drops.items():
            if envoy not in self.dropped:
                self._drop(envoy, why, ended)
        if drops:
            self._judge()
