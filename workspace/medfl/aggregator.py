"""The one place where this project adjusts OpenFL 1.6's aggregator (tests/test_openfl_contract.py
checks that the pinned OpenFL still does what this relies on). The aggregator is built on the
director from the experiment's plan, so it arrives with the workspace like the rest of this package.

- OpenFL keeps as "best" whichever global model raised *any* aggregated validation metric, loss
  included, compared against one shared score. Here the best model is the one with the best value
  of one named metric (`auc` by default, higher is better).
- When an envoy reports an error, OpenFL stops the aggregator but keeps handing tasks to the other
  envoys, whose collaborators then wait forever for an aggregator that has gone. Here a stopped
  aggregator tells every collaborator to quit.
"""
from __future__ import annotations

import queue

from openfl.component.aggregator.aggregator import Aggregator

VALIDATE_GLOBAL = "aggregated_model_validate"
AGGREGATED = "aggregator"


class Best:
    """The running best of one aggregated validation metric, in one direction."""

    def __init__(self, metric: str = "auc", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', not {mode!r}")
        self.metric, self.mode = metric, mode
        self.value = self.round = None

    def consider(self, metric: dict) -> bool:
        """Take a streamed metric; True if it is this metric of a global model and the best so far."""
        if (metric["metric_origin"], metric["task_name"], metric["metric_name"]) != \
                (AGGREGATED, VALIDATE_GLOBAL, self.metric):
            return False
        value = metric["metric_value"]
        if value != value:  # NaN is never best
            return False
        if self.value is None or (value > self.value if self.mode == "max" else value < self.value):
            self.value, self.round = value, metric["round"]
            return True
        return False

    def describe(self, rounds: int) -> str:
        """One line naming the chosen model, or saying that none could be chosen."""
        if self.round is None:
            return f"no global model had a finite validation {self.metric}: the last model stands in for the best"
        return f"best model: after {self.round} of {rounds} rounds, validation {self.metric} {self.value:.4f}"

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


class SelectingAggregator(Aggregator):
    """OpenFL's Aggregator, keeping as best the global model with the best `best_metric`."""

    def __init__(self, *args, best_metric: str = "auc", best_mode: str = "max", **kwargs):
        super().__init__(*args, **kwargs)
        self.best = Best(best_metric, best_mode)
        self.best_model_score = _Never()
        # OpenFL puts each aggregated metric on this queue right where it would judge "best".
        self.metric_queue = _Tap(self._consider)

    def stop(self, failed_collaborator: str = None) -> None:
        self.stopped = True
        super().stop(failed_collaborator)

    def _time_to_quit(self) -> bool:
        return getattr(self, "stopped", False) or super()._time_to_quit()

    def _consider(self, metric: dict) -> None:
        if self.best.consider(metric):
            self.logger.info("Round %s: best model so far by %s (%.4f)", metric["round"], self.best.metric,
                             metric["metric_value"])
            self._save_model(metric["round"], self.best_state_path)
