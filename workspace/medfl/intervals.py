"""The test's confidence intervals, made on the director from the envoys' bootstrap values (docs/experiment.md).

Each envoy scores every test metric on resamples of its own split (medfl.metrics.bootstrap, in the validate task)
and sends those values, never a prediction; they arrive as a tensor of the validation (openfl_adjustments.transport).
Here, once the round's metrics are aggregated, each envoy's interval is the percentile interval of its values, and
the pooled one that of the pooled values: per resample, the envoys' values weighted by their sample counts, as the
pooled metric is their weighted mean. Both are streamed as metrics `<name>_ci_low` and `<name>_ci_high`.

A lying envoy controls its own values and so its own interval; values of the wrong number, or outside the metric's
range, are left out with a warning, and the pooled interval with them (it would leave that envoy out).
"""
from __future__ import annotations

import numpy as np

from .checks import METRIC_RANGES
from .events import AGGREGATED
from .metrics import REPLICATES, interval, pooled

LOW, HIGH = "_ci_low", "_ci_high"


def problem(name: str, values: np.ndarray, resamples: int) -> str | None:
    """What is wrong with an envoy's bootstrap values of one metric, or None."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != resamples:
        return f"{len(values)} values, where the others sent {resamples}"
    finite = values[np.isfinite(values)]
    if len(finite) < len(values) and name != "auc":  # only an AUC can be undefined on a resample
        return "values that are not finite"
    low, high = METRIC_RANGES.get(name, (-np.inf, np.inf))
    if len(finite) and not (low <= finite.min() and finite.max() <= high):
        return f"values outside [{low:g}, {high:g}]"
    return None


class PooledIntervals:
    """The aggregator's part: each validation's intervals, per envoy and pooled, streamed after its metrics."""

    def _compute_validation_related_task_metrics(self, task_name: str) -> None:
        super()._compute_validation_related_task_metrics(task_name)
        self._stream_intervals(task_name, self.round_number)

    def _stream_intervals(self, task: str, r: int) -> None:
        from openfl.utilities import TaskResultKey

        left_out = getattr(self, "_left_out", {}).get(task, set())
        used = [e for e in self.collaborators_done if e not in self.dropped and e not in left_out
                and TaskResultKey(task, e, r) in self.collaborator_tasks_results]
        values: dict[str, dict[str, np.ndarray]] = {}
        for envoy in used:
            for key in self.collaborator_tasks_results[TaskResultKey(task, envoy, r)]:
                if not key.report and key.tensor_name.endswith(REPLICATES):
                    found = self.tensor_db.get_tensor_from_cache(key)
                    if found is not None:
                        values.setdefault(key.tensor_name[:-len(REPLICATES)], {})[envoy] = np.asarray(found)
        weights = {e: self.collaborator_task_weight[TaskResultKey(task, e, r)] for e in used}
        for name, by_envoy in sorted(values.items()):
            resamples = int(np.median([np.size(v) for v in by_envoy.values()]))
            good = {}
            for envoy, replicates in sorted(by_envoy.items()):
                if bad := problem(name, replicates, resamples):
                    self.logger.warning("Round %d: %s's bootstrap values of %s hold %s: no interval from them",
                                        r + 1, envoy, name, bad)
                else:
                    good[envoy] = replicates.reshape(-1)
                    self._stream_interval(envoy, task, r, name, interval(good[envoy]))
            if len(good) == len(used):  # the pooled metric weighs every envoy used: its interval needs them all
                self._stream_interval(AGGREGATED, task, r, name, interval(pooled(good, weights)))
            else:
                self.logger.warning("Round %d: no pooled interval of %s: %d of %d envoys sent usable values",
                                    r + 1, name, len(good), len(used))

    def _stream_interval(self, origin: str, task: str, r: int, name: str, bounds: list[float] | None) -> None:
        for suffix, value in zip((LOW, HIGH), bounds or (np.nan, np.nan), strict=True):
            self.metric_queue.put({"metric_origin": origin, "task_name": task, "metric_name": name + suffix,
                                   "metric_value": float(value), "round": r})
