"""What runs on the director: this project's aggregator and the experiment's task schedule.

tests/test_openfl_contract.py checks that the pinned OpenFL still does what this relies on. Both are built on the
director from the experiment's plan, so they arrive with the workspace like the rest of this package.

- OpenFL keeps as "best" whichever global model raised *any* aggregated validation metric, loss
  included, compared against one shared score. Here the best model is the one with the best value
  of one named metric (`auc` by default, higher is better), ties broken by validation loss, then by the later round.
- OpenFL waits forever for an envoy that has gone. Here an envoy is dropped from the experiment when the director
  stops hearing from it, when it registers again after a restart (its state in the experiment is gone), or when it
  has not finished a round `round_timeout` seconds after the round began. The round then ends with the envoys that
  remain, if at least `min_envoys` do (a number, or a share of the experiment's envoys); otherwise the experiment
  fails, naming them. Both are streamed to the notebook as events (DROPPED, FAILED) among the metrics. The director
  learns of lost and restarted envoys; it tells the aggregator through the methods of
  openfl_adjustments.contract.EnvoyAwareAggregator (watch_envoys, drop, has_dropped, failure), which
  SelectingAggregator implements.
- OpenFL puts every update into the average. Here each is checked first (medfl.checks: structure, finite values,
  distance from the global model against the round's median); one that fails is left out of that round's
  aggregate, the others re-weighted by their sample counts, and streamed as an event (REJECTED). An envoy
  rejected in `max_rejections` rounds in a row, or whose validation metric is not finite, is dropped as a lost
  envoy is. A round whose every update was rejected keeps the global model as it was.
- When an envoy reports an error, OpenFL stops the aggregator and, on paper, every collaborator,
  whose envoys then retry forever against an aggregator that has gone. Here the director drops that envoy,
  naming its error (openfl_adjustments.faults), and the run goes on while `min_envoys` remain; an aggregator
  that stops keeps running until each remaining collaborator has been told to quit (or has been lost).
"""
from __future__ import annotations

import json
import math
import queue
import threading
import time

import numpy as np
from openfl.component.aggregator.aggregator import Aggregator
from openfl.utilities import LocalTensor, TaskResultKey, TensorKey

from . import checks, secure
from .checks import Rejection

VALIDATE_GLOBAL = "aggregated_model_validate"
VALIDATE_LOCAL = "locally_tuned_model_validate"
AGGREGATED = "aggregator"
# Events streamed with the metrics; metric_name carries the reason, metric_value the seconds into the round.
DROPPED = "envoy_dropped"  # metric_origin is the envoy
# A dropped envoy's reason begins with this when its own policy refused or stopped the experiment
# (openfl_adjustments.contract.REFUSED, on the nodes; tests/test_policy.py keeps the two equal).
REFUSED = "refused: "
FAILED = "experiment_failed"  # metric_origin is the aggregator
HELD = "envoy_held"  # metric_origin is the envoy, waiting for its operator to approve the experiment's code
REJECTED = "update_rejected"  # metric_origin is the envoy; metric_name is JSON: check, detail, numbers
# What a round cost on the wire, streamed by the aggregator when the round ends, for all envoys (metric_origin is the
# aggregator) and for each: received_bytes (the envoys' results) and sent_bytes (the tensors they fetched), tensor
# data only, and connections, the new connections the envoys opened to the aggregator in the round.
TRAFFIC = "traffic"
TRAFFIC_COUNTS = ("received_bytes", "sent_bytes", "connections")
SECURE_STEP = "secagg/"  # the task and tensor names of secure aggregation's messages (security.secagg.STEP)
# A run's checkpoint needs, beside the last global model, the round it is the model after and the aggregation's
# state (a server optimizer's moments): both come with the last model (get_last_model), the state's float64
# arrays viewed as float32, so that they cross OpenFL's float32 wire bit for bit (medfl.researcher.checkpoint).
ROUND_KEY = "__round__"
STATE_PREFIX = "__aggregation_state__/"


def pack(array) -> np.ndarray:
    """A float64 array as the float32 array of its bytes (flattened), for OpenFL's float32 wire."""
    return np.ascontiguousarray(array, dtype=np.float64).reshape(-1).view(np.float32)


def unpack(array) -> np.ndarray:
    """pack()'s float64 values back, flattened."""
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.float64)


# Values of the chosen metric this close count as a tie. Validation ACC and AUC over a few hundred to a few thousand
# images do not resolve differences below 1e-3 (one image in a thousand), and on easy data several rounds reach the
# same 1.0: then the lower validation loss, and after that the later round, picks the model.
TIE = 1e-3


class Best:
    """The running best global model: the best aggregated validation `metric` in one direction; values within
    `tie` of each other are a tie, which the lower validation loss breaks, and after it the later round.

    Metrics arrive one at a time, a round's loss before or after its metric: a tie waits for the loss of the round
    that challenges the best (a validate task that reports no loss leaves ties with the earlier round). The director
    (SelectingAggregator) and the notebook (follow) feed it the same stream, so they choose the same model.
    """

    def __init__(self, metric: str = "auc", mode: str = "max", tie: float = TIE):
        if mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', not {mode!r}")
        self.metric, self.mode, self.tie = metric, mode, tie
        self.value = self.round = self.loss = None
        self._rounds: dict[int, dict] = {}  # round: its metric and loss as they arrive
        self._judged: set[int] = set()

    def consider(self, metric: dict) -> bool:
        """Take a streamed metric; True if it makes its global model the best so far."""
        name = metric["metric_name"]
        if (metric["metric_origin"], metric["task_name"]) != (AGGREGATED, VALIDATE_GLOBAL) or \
                name not in (self.metric, "loss"):
            return False
        r = metric["round"]
        seen = self._rounds.setdefault(r, {})
        seen[name] = metric["metric_value"]
        if r == self.round and "loss" in seen:
            self.loss = seen["loss"]  # the best round's loss, arrived after its metric
        if r in self._judged or self.metric not in seen:
            return False
        value = seen[self.metric]
        if value != value:  # NaN is never best
            self._judged.add(r)
            return False
        if self.value is not None:
            gain = value - self.value if self.mode == "max" else self.value - value
            if gain < -self.tie:
                self._judged.add(r)
                return False
            if gain <= self.tie:  # a tie: the loss decides, then the later round
                if "loss" not in seen or self.loss is None:
                    return False  # decided when the loss arrives
                self._judged.add(r)
                if seen["loss"] > self.loss or r < self.round:
                    return False
        self._judged.add(r)
        self.value, self.round, self.loss = value, r, seen.get("loss")
        return True

    def describe(self, rounds: int) -> str:
        """One line naming the chosen model, or saying that none could be chosen."""
        if self.round is None:
            return f"no global model had a finite validation {self.metric}: the last model stands in for the best"
        loss = f", loss {self.loss:.4f}" if self.loss is not None and self.metric != "loss" else ""
        return f"best model: after {self.round} of {rounds} rounds, validation {self.metric} {self.value:.4f}{loss}"

    def pick(self, metrics: list[dict]) -> Best:
        """Replay a metric stream through this rule: the choice the aggregator made."""
        for metric in metrics:
            self.consider(metric)
        return self


class _Never:
    """A best score nothing beats: switches off OpenFL's own any-metric choice."""

    def __lt__(self, other) -> bool:
        return False


class _Tap(queue.Queue):
    """The aggregator's metric queue, which also shows each metric to a callback as it is put."""

    def __init__(self, callback):
        super().__init__()
        self._callback = callback

    def put(self, item, block=True, timeout=None):
        self._callback(item)
        super().put(item, block, timeout)


def quorum(min_envoys, envoys: int) -> int:
    """How many of `envoys` must remain: min_envoys is a number (int) or a share of them (float)."""
    if isinstance(min_envoys, float) and 0 < min_envoys <= 1:
        return max(1, math.ceil(min_envoys * envoys - 1e-9))
    if isinstance(min_envoys, int) and not isinstance(min_envoys, bool) and min_envoys >= 1:
        return min_envoys
    raise ValueError("give a number of envoys (an int of at least 1) or a share of them (a float above 0 and "
                     "at most 1, e.g. 0.5)")


class SelectingAggregator(Aggregator):
    """OpenFL's Aggregator, keeping as best the global model with the best `best_metric`, and going on
    without envoys that are lost or too slow while at least `min_envoys` remain."""

    _local_names: frozenset = frozenset()  # the tensors that stay on the envoys; see __init__

    def __init__(self, *args, best_metric: str = "auc", best_mode: str = "max", min_envoys=0.5,
                 round_timeout: float = 0, max_update_ratio: float = checks.MAX_UPDATE_RATIO,
                 max_rejections: int = checks.MAX_REJECTIONS, secure_aggregation: bool = False,
                 secure_threshold: int = 0, max_update_norm: float = secure.MAX_UPDATE_NORM, local_tensors=(),
                 **kwargs):
        checks.check_settings(max_update_ratio, max_rejections)
        super().__init__(*args, **kwargs)
        # Tensors the envoys keep (medfl.algorithms.local_plan: FedBN's normalization layers; every tensor when each
        # envoy fine-tunes its own model): no update carries them, and the global model keeps the values it has, round
        # after round, so that it stays a whole model.
        self._local_names = set(local_tensors or ())
        self._model_names = [tensor.name for tensor in self.model.tensors if tensor.name not in self._local_names]
        # medfl.secure: the envoys mask their updates; the director sees only their weighted mean. When the envoys
        # keep every tensor, nothing is sent, and there is nothing to sum.
        self._secure = (secure.SecureRounds(self, secure_threshold, max_update_norm)
                        if secure_aggregation and self._model_names else None)
        self.best = Best(best_metric, best_mode)
        self.best_model_score = _Never()
        # OpenFL puts each aggregated metric on this queue right where it would judge "best".
        self.metric_queue = _Tap(self._consider)
        self._traffic: dict[int, dict[str, dict[str, int]]] = {}  # round: envoy: TRAFFIC_COUNTS
        self._peers: dict[str, set[str]] = {}  # envoy: the connections it called on
        self._traffic_lock = threading.Lock()
        self._policy(min_envoys, round_timeout, max_update_ratio, max_rejections)
        threading.Thread(target=self._watch, name="envoy-watch", daemon=True).start()

    def _policy(self, min_envoys, round_timeout: float, max_update_ratio: float = checks.MAX_UPDATE_RATIO,
                max_rejections: int = checks.MAX_REJECTIONS) -> None:
        self.min_envoys, self.round_timeout = min_envoys, float(round_timeout or 0)
        self.max_update_ratio, self.max_rejections = float(max_update_ratio), max_rejections
        self.rejected: list[Rejection] = []
        self._left_out: dict[str, set[str]] = {}  # this round's task: the envoys whose results stay out of it
        self._in_a_row: dict[str, int] = {}  # envoy: rounds in a row its update was rejected
        self._failed_metrics: dict[str, str] = {}  # envoy: which metric of this round was not finite
        self._training_tasks: set[str] = set()  # tasks whose results carry trained weights
        self._checks_lock = threading.Lock()
        self.dropped: dict[str, str] = {}  # envoy: why
        self._failure = None  # why the experiment stopped, if it did so here
        self.stopped = False
        self._silent = None  # see watch_envoys
        self._round_started: dict[int, float] = {}
        self._held: set[str] = set()  # envoys waiting for their operator's approval: round_timeout waits for them

    # --- tasks and results: a dropped envoy gets no more work and its late results are ignored ----------
    def get_tasks(self, collaborator_name):
        if collaborator_name in self.dropped:
            self.quit_job_sent_to.append(collaborator_name)
            return None, self.round_number, 0, True
        self._held.discard(collaborator_name)  # approved: it runs
        tasks, round_number, sleep_time, time_to_quit = super().get_tasks(collaborator_name)
        if tasks:
            self._round_started.setdefault(round_number, time.monotonic())
        return tasks, round_number, sleep_time, time_to_quit

    def send_local_task_results(self, collaborator_name, round_number, task_name, data_size, named_tensors):
        if collaborator_name in self.dropped:
            self.logger.warning("Ignored %s's %s results: it was dropped from the experiment", collaborator_name,
                                task_name)
            return
        self._count(round_number, collaborator_name, "received_bytes", sum(len(t.data_bytes) for t in named_tensors))
        if task_name.startswith(SECURE_STEP):  # a message of secure aggregation's protocol (medfl.secure)
            if self._secure is not None:
                self._secure.receive(collaborator_name, round_number, task_name[len(SECURE_STEP):], named_tensors)
            return
        weights = [t for t in named_tensors if not t.report and "trained" in t.tags]
        if weights and self._secure is not None:  # a node without secure aggregation: its update is not used
            self._reject(Rejection(collaborator_name, round_number + 1, "secure", "its update arrived unmasked: "
                                   "its node does not run this project's secure aggregation (security.secagg)"),
                         task_name)
            named_tensors = [t for t in named_tensors if t.report]
            weights = []
        if weights and round_number == self.round_number:
            self._training_tasks.add(task_name)
            problem = self._structure(weights, round_number)
            if problem:  # unreadable by OpenFL's own code too: only the metrics go on
                self._reject(Rejection(collaborator_name, round_number + 1, "structure", problem), task_name)
                named_tensors = [t for t in named_tensors if t.report]
        super().send_local_task_results(collaborator_name, round_number, task_name, data_size, named_tensors)

    def get_aggregated_tensor(self, collaborator_name, tensor_name, round_number, report, tags, require_lossless):
        if tensor_name.startswith(SECURE_STEP):  # a request in secure aggregation's protocol: held until ready
            from openfl.protocols import base_pb2

            answer = (self._secure.answer(collaborator_name, round_number, tensor_name[len(SECURE_STEP):])
                      if self._secure is not None else b'{"error": "this experiment has no secure aggregation"}')
            named_tensor = base_pb2.NamedTensor(name=tensor_name, round_number=round_number, lossless=True,
                                                data_bytes=answer)
        else:
            named_tensor = super().get_aggregated_tensor(collaborator_name, tensor_name, round_number, report, tags,
                                                         require_lossless)
        self._count(round_number, collaborator_name, "sent_bytes", len(named_tensor.data_bytes))
        return named_tensor

    def connected(self, envoy: str, peer: str) -> None:
        """Count envoy's connection `peer` (address and port) in this round if it is new (the director's
        openfl_adjustments.contract.CountsConnections)."""
        with self._traffic_lock:
            seen = self._peers.setdefault(envoy, set())
            if peer in seen:
                return
            seen.add(peer)
        self._count(self.round_number, envoy, "connections", 1)

    def _count(self, round_number: int, envoy: str, what: str, amount: int) -> None:
        with self._traffic_lock:  # envoys' calls arrive on several threads
            counts = self._traffic.setdefault(round_number, {}).setdefault(envoy, dict.fromkeys(TRAFFIC_COUNTS, 0))
            counts[what] += amount

    def _end_of_round_check(self) -> None:
        ending = self.round_number
        if self._end_of_round_check_done[ending]:
            return
        self._check_round(ending)
        super()._end_of_round_check()
        if self.round_number > ending:
            self._act_on_checks(ending)
            with self._traffic_lock:
                per_envoy = self._traffic.pop(ending, {})
            for origin, counts in [(AGGREGATED, {what: sum(c[what] for c in per_envoy.values())
                                                 for what in TRAFFIC_COUNTS}), *sorted(per_envoy.items())]:
                for what, amount in counts.items():
                    self.metric_queue.put({"round": ending, "metric_origin": origin, "task_name": TRAFFIC,
                                           "metric_name": what, "metric_value": float(amount)})

    # --- checking updates before they are aggregated (medfl.checks) -----------------------------------------
    def _decode(self, named_tensor) -> np.ndarray:
        """A received tensor's values, decoded as OpenFL's _process_named_tensor decodes them (a change of the
        weights, for delta updates)."""
        key = TensorKey(named_tensor.name, self.uuid, named_tensor.round_number, named_tensor.report,
                        tuple(named_tensor.tags))
        metadata = [{"int_to_float": m.int_to_float, "int_list": m.int_list, "bool_list": m.bool_list}
                    for m in named_tensor.transformer_metadata]
        return self.tensor_codec.decompress(key, named_tensor.data_bytes, metadata,
                                            require_lossless="compressed" in named_tensor.tags)[1]

    def _global_model(self, round_number: int) -> dict:
        return {name: self.tensor_db.get_tensor_from_cache(TensorKey(name, self.uuid, round_number, False, ("model",)))
                for name in self._model_names}

    def _structure(self, weights, round_number: int) -> str | None:
        """What is wrong with the structure of an arriving update, or None."""
        try:
            update = {t.name: self._decode(t) for t in weights}
        except Exception as exc:  # bytes that do not make the tensor their metadata describes
            return f"unreadable: {type(exc).__name__}: {exc}"
        return checks.structure_problem(update, self._global_model(round_number))

    def _reject(self, rejection: Rejection, task_name: str) -> None:
        with self._checks_lock:
            self.rejected.append(rejection)
            self._left_out.setdefault(task_name, set()).add(rejection.envoy)
        self.logger.warning("Rejected %s's update in round %d: %s", rejection.envoy, rejection.round, rejection.line())
        event = self._event(rejection.envoy, REJECTED, "")
        event["metric_name"] = json.dumps({"check": rejection.check, "detail": rejection.detail,
                                           "numbers": rejection.numbers})
        self.metric_queue.put(event)

    def _check_round(self, r: int) -> None:
        """Before round r is aggregated: leave out the updates that are not finite or stand out from the round's
        median distance, and the results of tasks whose metrics are not finite. Called with self.lock held."""
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
                update = {k.tensor_name: v for k, v in values.items() if not k.report and "trained" in k.tags}
                if not update:
                    continue
                if bad := checks.non_finite(update):
                    self._reject(Rejection(envoy, r + 1, "finite", f"NaN or infinity in {bad['tensors']} of "
                                           f"{bad['of']} tensors ({bad['first']} first)", bad), task)
                else:
                    distances[envoy] = checks.distance(update, model)
            for envoy, numbers in checks.outsized(distances, self.max_update_ratio).items():
                self._reject(Rejection(envoy, r + 1, "norm", f"its distance from the global model, "
                                       f"{numbers['norm']:.4g}, is {numbers['ratio']:.1f} times the round's median "
                                       f"({numbers['median']:.4g}); the bound is max_update_ratio="
                                       f"{self.max_update_ratio:g}", numbers), task)

    def _compute_validation_related_task_metrics(self, task_name: str) -> None:
        self._aggregate_metrics(task_name)
        if self._secure is not None and "train" in task_name and not self.stopped:
            self._aggregate_securely(task_name)
        if self._local_names and "train" in task_name:
            self._carry_local_tensors(self.round_number)

    def _carry_local_tensors(self, r: int) -> None:
        """The tensors that stay on the envoys keep their values in the next round's global model."""
        for name in sorted(self._local_names):
            key = TensorKey(name, self.uuid, r, False, ("model",))
            value = self.tensor_db.get_tensor_from_cache(key)
            if value is not None and self.tensor_db.get_tensor_from_cache(key._replace(round_number=r + 1)) is None:
                self._prepare_trained(name, self.uuid, r, False, value)

    def _aggregate_securely(self, task_name: str) -> None:
        """The round's new global model from the secure sum (the envoys sent no weights in the clear)."""
        r = self.round_number
        try:
            weights, report = self._secure.mean(r, self._global_model(r))
        except Exception as exc:  # below the threshold, or inputs of another size
            self._fail(f"round {r + 1}: {exc}")
            return
        self.metric_queue.put({"round": r, "metric_origin": AGGREGATED, "task_name": secure.SECURE,
                               "metric_name": json.dumps(report), "metric_value": report["seconds"]})
        if weights is None:  # the sum failed its check: the global model stays as it was
            self.logger.warning("Round %d: %s; the global model stays as it was", r + 1, report["rejected"])
            weights = self._global_model(r)
        function = self.assigner.get_aggregation_type_for_task(task_name)
        for name, value in weights.items():
            mean = function.call([LocalTensor(col_name="secure sum", tensor=value, weight=1.0)], None, name, r,
                                 ("trained",))
            self._prepare_trained(name, self.uuid, r, False, mean)

    def fail_securely(self, why: str) -> None:
        """Secure aggregation cannot go on (below its threshold): the experiment fails with that line."""
        with self.lock:
            if not self.stopped:
                self._fail(why)

    def _aggregate_metrics(self, task_name: str) -> None:
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
        """After round `ended`: drop the envoys rejected max_rejections rounds in a row, and those whose metrics were
        not finite (a failed task); then the min_envoys rule decides. Called with self.lock held."""
        rejected_now = {e for task in self._training_tasks for e in self._left_out.get(task, ())
                        if e not in self._failed_metrics}
        for envoy in self._remaining():
            self._in_a_row[envoy] = self._in_a_row.get(envoy, 0) + 1 if envoy in rejected_now else 0
        failed, self._failed_metrics, self._left_out = self._failed_metrics, {}, {}
        drops = {envoy: f"its task failed: {why}" for envoy, why in failed.items()}
        for envoy, count in self._in_a_row.items():
            if count >= self.max_rejections and envoy not in drops:
                last = next(r for r in reversed(self.rejected) if r.envoy == envoy)
                drops[envoy] = (f"its update was rejected in {count} rounds in a row (max_rejections="
                                f"{self.max_rejections}); last: {last.line()}")
        for envoy, why in drops.items():
            if envoy not in self.dropped:
                self._drop(envoy, why, ended)
        if drops:
            self._judge()

    def _end_of_round_with_stragglers_check(self) -> None:
        # Called under self.lock after each envoy's results, and by the watcher after a drop.
        remaining = self._remaining()
        if remaining and all(c in self.collaborators_done for c in remaining):
            self._end_of_round_check()

    def _remaining(self) -> list[str]:
        return [c for c in self.authorized_cols if c not in self.dropped]

    # --- the watcher ------------------------------------------------------------------------------------
    def _watch(self, period: float = 0.5) -> None:
        while not self.all_quit_jobs_sent():
            time.sleep(period)
            with self.lock:
                self.check_envoys()

    # --- the director's side of openfl_adjustments.contract.EnvoyAwareAggregator ---------------------------
    def watch_envoys(self, silent) -> None:
        """Drop, from now on, the envoys that silent() names: {envoy: seconds since the director heard it}."""
        self._silent = silent

    def has_dropped(self, name: str) -> bool:
        """True if envoy `name` left this experiment."""
        return name in self.dropped

    def failure(self) -> str | None:
        """Why this aggregator stopped the experiment, or None."""
        return self._failure

    def hold(self, name: str, why: str) -> None:
        """Envoy `name` waits for its operator to approve the experiment's code: the notebook is told `why`, and
        round_timeout does not count for it until it asks for its first task (it refuses, if not approved)."""
        with self.lock:
            if name in self.authorized_cols and name not in self.dropped:
                self._held.add(name)
                self.metric_queue.put(self._event(name, HELD, why))

    def drop(self, name: str, why: str) -> None:
        """Drop envoy `name` now, for a reason the director knows (it registered again after a restart)."""
        with self.lock:
            if name in self.authorized_cols and name not in self.dropped:
                self._drop(name, why)
                self._judge()  # not check_envoys: dropping the last envoys makes every quit "sent"

    def check_envoys(self) -> None:
        """Drop the envoys the director lost and, past round_timeout, those still busy; then end the
        round with the rest, or fail if too few remain. Called with self.lock held."""
        if self.all_quit_jobs_sent():
            return
        silent = self._silent() if self._silent else {}
        for name in self._remaining():
            if name in silent:
                self._drop(name, f"the director has not heard from it for {silent[name]:.0f} s")
        self._judge()

    def _judge(self) -> None:
        """While the experiment runs: drop envoys past round_timeout, then fail below min_envoys, or end the
        round with the envoys that remain."""
        if self._time_to_quit():  # stopped, or every round done: nothing left to cut short
            return
        started = self._round_started.get(self.round_number)
        if self.round_timeout and started and time.monotonic() - started > self.round_timeout:
            for name in self._remaining():
                if name not in self.collaborators_done and name not in self._held:
                    self._drop(name, f"it had not finished the round {self.round_timeout:g} s after it began "
                                     "(round_timeout)")
        needed = quorum(self.min_envoys, len(self.authorized_cols))
        remaining = self._remaining()
        if len(remaining) < needed:
            lost = "; ".join(why[len(REFUSED):] if why.startswith(REFUSED) else f"{name}: {why}"
                             for name, why in self.dropped.items())
            self._fail(f"only {len(remaining)} of {len(self.authorized_cols)} envoys remain, fewer than the {needed} "
                       f"that min_envoys={self.min_envoys!r} requires. Lost: {lost}")
        elif self.dropped:
            self._end_of_round_with_stragglers_check()

    def _drop(self, name: str, why: str, round_number: int | None = None) -> None:
        """Drop envoy `name`; the event names `round_number` (default: the current round)."""
        self.dropped[name] = why
        if self._secure is not None:
            self._secure.notify()  # requests waiting for its protocol messages look again
        self.quit_job_sent_to.append(name)  # the experiment may end without its goodbye
        self.logger.warning("Dropped envoy %s in round %d: %s", name, self.round_number, why)
        if not self._time_to_quit():
            self.metric_queue.put(self._event(name, DROPPED, why, round_number))

    def _fail(self, why: str) -> None:
        self._failure = why
        self.logger.error("The experiment stops: %s", why)
        self.metric_queue.put(self._event(AGGREGATED, FAILED, why))
        self.stopped = True
        if self._secure is not None:
            self._secure.notify()  # envoys waiting in the protocol hear it

    def _event(self, origin: str, kind: str, why: str, round_number: int | None = None) -> dict:
        r = self.round_number if round_number is None else round_number
        started = self._round_started.get(r)
        return {"round": r, "metric_origin": origin, "task_name": kind, "metric_name": why,
                "metric_value": time.monotonic() - started if started else 0.0}

    # --- stopping -----------------------------------------------------------------------------------------
    def stop(self, failed_collaborator: str = None) -> None:
        """Stop the experiment: the failed envoy is done with; every other one is told to quit when it next
        asks for tasks (OpenFL would mark them all as told at once, and stop answering them)."""
        self.logger.info("Stopping the experiment; the remaining envoys are told to quit as they ask for tasks.")
        if failed_collaborator:
            self.quit_job_sent_to.append(failed_collaborator)
            if not self.stopped:
                self._fail(f"{failed_collaborator} reported an error in its task; its envoy's log shows it")
        self.stopped = True

    def _time_to_quit(self) -> bool:
        return self.stopped or super()._time_to_quit()

    def _save_model(self, round_number, file_path) -> None:
        before = self.last_tensor_dict
        super()._save_model(round_number, file_path)
        if self.last_tensor_dict is not before:  # a new last model (none after a validation-only round)
            self.last_tensor_dict = {**self.last_tensor_dict, **self._resumable(round_number)}

    def _resumable(self, round_number: int) -> dict:
        """The round the last model is after, and the aggregation function's state if it keeps one."""
        extra = {ROUND_KEY: np.array([round_number], dtype=np.float32)}
        for function in getattr(self.assigner, "agg_functions_by_task_name", {}).values():
            if hasattr(function, "state"):
                extra.update({STATE_PREFIX + name: pack(value) for name, value in function.state().items()})
        return extra

    def _consider(self, metric: dict) -> None:
        if self.best.consider(metric):
            # The deciding metric may be the round's loss, breaking a tie: log the chosen metric's value.
            self.logger.info("Round %s: best model so far by %s (%.4f)", metric["round"], self.best.metric,
                             self.best.value)
            self._save_model(metric["round"], self.best_state_path)


class Schedule:
    """Task assignment: `train_rounds` rounds of validate-train-validate, then one validation round.

    OpenFL validates each global model at the start of the next round, so the model left by the
    last training round would never be validated; the extra round validates it, which lets it be
    chosen as the best. With train_rounds=0 this is a validation-only experiment (the test run).
    """

    def __init__(self, tasks: dict, train_rounds: int):
        self.tasks, self.train_rounds = tasks, train_rounds

    def __call__(self, collaborators, round_number, **kwargs):
        names = [VALIDATE_GLOBAL]
        if round_number < self.train_rounds:
            names += ["train", VALIDATE_LOCAL]
        return {c: [self.tasks[n] for n in names] for c in collaborators}
