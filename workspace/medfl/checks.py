"""What an envoy's training produced, checked twice: on the envoy before its weights leave it, and on the director
before an update enters the aggregate (medfl.aggregator.SelectingAggregator). One broken node, whether its training
diverged, its data or accelerator is faulty, or it sends a huge update on purpose (model replacement, Bagdasaryan
et al. 2020), then costs its own contribution and nothing else.

On the director, an update (the envoy's trained weights) is checked, in this order:
- structure: the same tensor names and shapes as the global model, and float32 values (OpenFL's wire format);
- finite: no NaN or infinity;
- norm: its distance from the round's global model at most `max_update_ratio` times the median of that round's
  distances, once a round has three or more updates (with two, the median is their mean: nothing stands out).
A validation metric that is not finite is that envoy's failed task.

What is not caught: a subtle, bounded poisoning (an update within the bound that pulls the model somewhere else).
The median and geometric-median aggregations (medfl.algorithms) and DP-SGD (medfl.privacy) are for that.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

# PyTorch's BatchNorm step counters: model state, but not weights; an update's distance leaves them out (they grow
# by the number of batches an envoy ran, which says nothing about where its weights went).
COUNTERS = ("num_batches_tracked",)
# How OpenFL's PyTorch adapter names the optimizer state it sends with the weights (only with opt_treatment
# CONTINUE_GLOBAL, openfl_adjustments.transport): checked for finite values, not against the model's structure.
OPTIMIZER_STATE = "__opt_"
MAX_UPDATE_RATIO = 10.0
MAX_REJECTIONS = 2
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


def check_settings(max_update_ratio, max_rejections) -> None:
    """Raise ValueError, saying what to give, for a bound or a count that cannot work."""
    if isinstance(max_update_ratio, bool) or not isinstance(max_update_ratio, (int, float)) or \
            not max_update_ratio > 1:
        raise ValueError(f"max_update_ratio={max_update_ratio!r}: give a number above 1 (the default is "
                         f"{MAX_UPDATE_RATIO:g}: an update ten times farther from the global model than the median)")
    if isinstance(max_rejections, bool) or not isinstance(max_rejections, int) or max_rejections < 1:
        raise ValueError(f"max_rejections={max_rejections!r}: give a whole number of rounds of at least 1 (the "
                         f"default is {MAX_REJECTIONS})")
