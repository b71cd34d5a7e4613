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
- When an envoy reports an error, OpenFL stops the aggregator and, on paper, every collaborator,
  whose envoys then retry forever against an aggregator that has gone. Here a stopped aggregator
  keeps running until each remaining collaborator has been told to quit (or has been lost).
"""
from __future__ import annotations

import math
import queue
import threading
import time

from openfl.component.aggregator.aggregator import Aggregator

VALIDATE_GLOBAL = "aggregated_model_validate"
AGGREGATED = "aggregator"
# Events streamed with the metrics; metric_name carries the reason, metric_value the seconds into the round.
DROPPED = "envoy_dropped"  # metric_origin is the envoy
FAILED = "experiment_failed"  # metric_origin is the aggregator
# What a round cost on the wire, streamed by the aggregator when the round ends, for all envoys (metric_origin is the
# aggregator) and for each: received_bytes (the envoys' results) and sent_bytes (the tensors they fetched), tensor
# data only, and connections, the new connections the envoys opened to the aggregator in the round.
TRAFFIC = "traffic"
TRAFFIC_COUNTS = ("received_bytes", "sent_bytes", "connections")


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

    def __init__(self, *args, best_metric: str = "auc", best_mode: str = "max", min_envoys=0.5,
                 round_timeout: float = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.best = Best(best_metric, best_mode)
        self.best_model_score = _Never()
        # OpenFL puts each aggregated metric on this queue right where it would judge "best".
        self.metric_queue = _Tap(self._consider)
        self._traffic: dict[int, dict[str, dict[str, int]]] = {}  # round: envoy: TRAFFIC_COUNTS
        self._peers: dict[str, set[str]] = {}  # envoy: the connections it called on
        self._traffic_lock = threading.Lock()
        self._policy(min_envoys, round_timeout)
        threading.Thread(target=self._watch, name="envoy-watch", daemon=True).start()

    def _policy(self, min_envoys, round_timeout: float) -> None:
        self.min_envoys, self.round_timeout = min_envoys, float(round_timeout or 0)
        self.dropped: dict[str, str] = {}  # envoy: why
        self._failure = None  # why the experiment stopped, if it did so here
        self.stopped = False
        self._silent = None  # see watch_envoys
        self._round_started: dict[int, float] = {}

    # --- tasks and results: a dropped envoy gets no more work and its late results are ignored ----------
    def get_tasks(self, collaborator_name):
        if collaborator_name in self.dropped:
            self.quit_job_sent_to.append(collaborator_name)
            return None, self.round_number, 0, True
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
        super().send_local_task_results(collaborator_name, round_number, task_name, data_size, named_tensors)

    def get_aggregated_tensor(self, collaborator_name, tensor_name, round_number, report, tags, require_lossless):
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
        super()._end_of_round_check()
        if self.round_number > ending:
            with self._traffic_lock:
                per_envoy = self._traffic.pop(ending, {})
            for origin, counts in [(AGGREGATED, {what: sum(c[what] for c in per_envoy.values())
                                                 for what in TRAFFIC_COUNTS}), *sorted(per_envoy.items())]:
                for what, amount in counts.items():
                    self.metric_queue.put({"round": ending, "metric_origin": origin, "task_name": TRAFFIC,
                                           "metric_name": what, "metric_value": float(amount)})

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
                if name not in self.collaborators_done:
                    self._drop(name, f"it had not finished the round {self.round_timeout:g} s after it began "
                                     "(round_timeout)")
        needed = quorum(self.min_envoys, len(self.authorized_cols))
        remaining = self._remaining()
        if len(remaining) < needed:
            lost = "; ".join(f"{name}: {why}" for name, why in self.dropped.items())
            self._fail(f"only {len(remaining)} of {len(self.authorized_cols)} envoys remain, fewer than the {needed} "
                       f"that min_envoys={self.min_envoys!r} requires. Lost: {lost}")
        elif self.dropped:
            self._end_of_round_with_stragglers_check()

    def _drop(self, name: str, why: str) -> None:
        self.dropped[name] = why
        self.quit_job_sent_to.append(name)  # the experiment may end without its goodbye
        self.logger.warning("Dropped envoy %s in round %d: %s", name, self.round_number, why)
        if not self._time_to_quit():
            self.metric_queue.put(self._event(name, DROPPED, why))

    def _fail(self, why: str) -> None:
        self._failure = why
        self.logger.error("The experiment stops: %s", why)
        self.metric_queue.put(self._event(AGGREGATED, FAILED, why))
        self.stopped = True

    def _event(self, origin: str, kind: str, why: str) -> dict:
        started = self._round_started.get(self.round_number)
        return {"round": self.round_number, "metric_origin": origin, "task_name": kind, "metric_name": why,
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
            names += ["train", "locally_tuned_model_validate"]
        return {c: [self.tasks[n] for n in names] for c in collaborators}
