"""The experiment's aggregator, built on the director from the experiment's plan: OpenFL's Aggregator with this
project's rules, one concern per module. tests/test_openfl_contract.py checks that the pinned OpenFL still does what
they rely on; the aggregator arrives with the workspace like the rest of this package.

SelectingAggregator itself does the choosing: OpenFL keeps as "best" whichever global model raised *any* aggregated
validation metric, loss included, compared against one shared score; here the best model is the one with the best
value of one named metric (medfl.selection.Best: `auc` by default, higher is better; ties broken by validation loss,
then by the later round). It also keeps the tensors that stay on the envoys (FedBN's layers) in the global model, and
the round and aggregation state a checkpoint needs with the last model (medfl.events.ROUND_KEY). The rest it mixes in:

- medfl.dropouts.EnvoyRules: envoys lost, restarted, too slow, refused or held; the min_envoys rule and failing;
- medfl.checks.UpdateChecks: each update checked before it is aggregated, and envoys rejected too often dropped;
- medfl.traffic.TrafficCounts: what each round cost on the wire;
- medfl.intervals.PooledIntervals: the test's confidence intervals, per envoy and pooled, from their bootstrap values;
- security.secagg_director.SecureAggregation: the director's half of secure aggregation, which routes the
  protocol's messages (installed on the director, not shipped with the experiment).

Each envoy call goes through them in this order (the class's bases): a dropped envoy's results are ignored, then
counted, then routed (secure aggregation's messages), then checked, then OpenFL's.
"""
from __future__ import annotations

import queue

import numpy as np
from openfl.component.aggregator.aggregator import Aggregator
from openfl.utilities import TensorKey

from security.secagg import MAX_UPDATE_NORM
from security.secagg_director import SecureAggregation

from .checks import MAX_REJECTIONS, MAX_UPDATE_RATIO, MAX_UPDATE_SIZE, MIN_UPDATE_COSINE, REJECTION_WINDOW, UpdateChecks
from .dropouts import EnvoyRules
from .events import ROUND_KEY, SECURE, STATE_PREFIX, pack
from .intervals import PooledIntervals
from .selection import Best
from .traffic import TrafficCounts


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


class SelectingAggregator(PooledIntervals, SecureAggregation, EnvoyRules, UpdateChecks, TrafficCounts, Aggregator):
    """OpenFL's Aggregator, keeping as best the global model with the best `best_metric`, and going on
    without envoys that are lost, too slow or rejected while at least `min_envoys` remain."""

    SECURE_EVENT = SECURE
    _local_names: frozenset = frozenset()  # the tensors that stay on the envoys; see __init__

    def __init__(self, *args, best_metric: str = "auc", best_mode: str = "max", min_envoys=0.5,
                 round_timeout: float = 0, max_update_ratio: float = MAX_UPDATE_RATIO,
                 max_rejections: int = MAX_REJECTIONS, rejection_window: int = REJECTION_WINDOW,
                 max_update_size: float = MAX_UPDATE_SIZE, min_update_cosine: float = MIN_UPDATE_COSINE,
                 secure_aggregation: bool = False, secure_threshold: int = 0,
                 max_update_norm: float = MAX_UPDATE_NORM, local_tensors=(), **kwargs):
        # settings first: an impossible one stops here, in one line
        self._policy(min_envoys, round_timeout, max_update_ratio, max_rejections, rejection_window, max_update_size,
                     min_update_cosine)
        super().__init__(*args, **kwargs)
        # Tensors the envoys keep (medfl.algorithms.local_plan: FedBN's normalization layers; every tensor when each
        # envoy fine-tunes its own model): no update carries them, and the global model keeps the values it has, round
        # after round, so that it stays a whole model.
        self._local_names = set(local_tensors or ())
        self._model_names = [tensor.name for tensor in self.model.tensors if tensor.name not in self._local_names]
        # The envoys mask their updates; the director sees only their weighted mean. When the envoys keep every
        # tensor, nothing is sent, and there is nothing to sum.
        self._start_secure(bool(secure_aggregation and self._model_names), secure_threshold, max_update_norm)
        self.best = Best(best_metric, best_mode)
        self.best_model_score = _Never()
        # OpenFL puts each aggregated metric on this queue right where it would judge "best".
        self.metric_queue = _Tap(self._consider)
        self._start_counting()
        self._start_watching()

    def _policy(self, min_envoys, round_timeout: float, *checks) -> None:
        self._start_checks(*checks)
        self._start_rules(min_envoys, round_timeout)

    # --- each envoy call: ignored from a dropped envoy, counted, then routed and checked by the bases -----------
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

    def _end_of_round_check(self) -> None:
        ending = self.round_number
        if self._end_of_round_check_done[ending]:
            return
        try:
            self._check_round(ending)
        except Exception as exc:  # a fault in the checks stops the run, named, rather than leave every envoy waiting
            self.logger.exception("The director's update checks failed in round %d", ending + 1)
            self._fail(f"the director's update checks failed in round {ending + 1}: {type(exc).__name__}: {exc}")
            return
        super()._end_of_round_check()
        if self.round_number > ending:
            self._act_on_checks(ending)
            self._report_traffic(ending)

    def _compute_validation_related_task_metrics(self, task_name: str) -> None:
        super()._compute_validation_related_task_metrics(task_name)
        if self._local_names and "train" in task_name:
            self._carry_local_tensors(self.round_number)

    def _carry_local_tensors(self, r: int) -> None:
        """The tensors that stay on the envoys keep their values in the next round's global model."""
        for name in sorted(self._local_names):
            key = TensorKey(name, self.uuid, r, False, ("model",))
            value = self.tensor_db.get_tensor_from_cache(key)
            if value is not None and self.tensor_db.get_tensor_from_cache(key._replace(round_number=r + 1)) is None:
                self._prepare_trained(name, self.uuid, r, False, value)

    def _global_model(self, round_number: int) -> dict:
        return {name: self.tensor_db.get_tensor_from_cache(TensorKey(name, self.uuid, round_number, False, ("model",)))
                for name in self._model_names}

    # --- the best model, and the last one with what a checkpoint needs ---------------------------------------
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
