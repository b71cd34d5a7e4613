"""Which global model is the best, and how many envoys must remain: the rules that the director (the aggregator)
and the notebook (its follower, its parameter checks) and the launcher apply alike, so that they agree.
"""
from __future__ import annotations

import math

from .events import AGGREGATED, VALIDATE_GLOBAL

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


def quorum(min_envoys, envoys: int) -> int:
    """How many of `envoys` must remain: min_envoys is a number (int) or a share of them (float)."""
    if isinstance(min_envoys, float) and 0 < min_envoys <= 1:
        return max(1, math.ceil(min_envoys * envoys - 1e-9))
    if isinstance(min_envoys, int) and not isinstance(min_envoys, bool) and min_envoys >= 1:
        return min_envoys
    raise ValueError("give a number of envoys (an int of at least 1) or a share of them (a float above 0 and "
                     "at most 1, e.g. 0.5)")
