"""MedMNIST's official ACC and AUC (computed by medmnist.evaluator). The loss, its targets and the scores per task type
are written out in the tasks (medfl.tasks), where a reader sees them."""
from __future__ import annotations

import warnings

import numpy as np
from medmnist.evaluator import getACC, getAUC

from .model import MULTI_LABEL


def evaluate(task: str, y_true: np.ndarray, y_score: np.ndarray, losses: np.ndarray | None = None,
             resamples: int = 0, seed: int = 0) -> dict:
    """ACC and AUC as MedMNIST defines them, for labels (N, width) and scores (N, classes); with `resamples` (and
    each sample's loss), also the bootstrap values of loss, ACC and AUC (`<name>_replicates`, see bootstrap()).

    A shard may lack a class in a split (small or skewed shards); its one-vs-rest AUC is then
    undefined, so AUC is averaged over the classes (or labels) where it is defined, and is NaN
    only when it is defined for none.
    """
    acc = float(getACC(y_true, y_score, task))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns, then answers NaN, for an absent class
        try:
            auc = float(getAUC(y_true, y_score, task))
        except ValueError:  # older sklearn raises instead
            auc = float("nan")
        if not np.isfinite(auc):
            auc = _auc_over_defined_columns(task, y_true, y_score)
    if not resamples:
        return {"acc": acc, "auc": auc}
    values = bootstrap(task, y_true, y_score, losses, resamples, seed)
    return {"acc": acc, "auc": auc, **{name + REPLICATES: v for name, v in values.items()}}


def _auc_over_defined_columns(task: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    # Each defined column goes through the library's binary AUC, so the definition stays theirs.
    values = [getAUC(t, s, "binary-class") for t, s in _auc_columns(task, y_true, y_score) if 0 < t.sum() < len(t)]
    return float(np.mean(values)) if values else float("nan")


# Confidence intervals: a percentile bootstrap over the test samples, on each envoy (docs/experiment.md).
RESAMPLES = 1000  # the default number of resamples (run["bootstrap"]); 0: no intervals
LEVEL = 0.95
REPLICATES = "_replicates"  # a metric's bootstrap values travel under its name with this suffix
CI_NAMES = ("acc", "auc", "loss")


def correct(task: str, y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Each sample's share in MedMNIST's ACC: 1 or 0 (multi-label: the fraction of its labels right), so that ACC is
    their mean, as medmnist.evaluator.getACC computes it."""
    if task == MULTI_LABEL:
        return ((y_score > 0.5) == y_true).mean(axis=1)
    if task == "binary-class":
        return ((y_score[:, -1] > 0.5) == y_true[:, 0]).astype(float)
    return (np.argmax(y_score, axis=1) == y_true[:, 0]).astype(float)


def _auc_columns(task: str, y_true: np.ndarray, y_score: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labels 0/1, scores) of each one-vs-rest column that MedMNIST's AUC averages."""
    if task == MULTI_LABEL:
        return [(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])]
    if task == "binary-class":
        return [(y_true[:, 0], y_score[:, -1])]
    return [((y_true[:, 0] == i).astype(int), y_score[:, i]) for i in range(y_score.shape[1])]


def _weighted_aucs(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ROC AUC of one column for each row of `counts` (how often each sample was drawn): the Mann-Whitney
    statistic with ties counted half, which is what sklearn's roc_auc_score computes; NaN where a resample holds one
    class only."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # groups of tied scores
    positive = labels[order].astype(bool)
    drawn = counts[:, order]
    pos = np.add.reduceat(np.where(positive, drawn, 0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0, drawn), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored below each group
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg), np.nan)


def bootstrap(task: str, y_true: np.ndarray, y_score: np.ndarray, losses: np.ndarray, resamples: int = RESAMPLES,
              seed: int = 0, chunk: int = 100) -> dict[str, np.ndarray]:
    """ACC, AUC and mean loss of `resamples` resamples (with replacement, of the split's size) of the samples:
    {"acc": (resamples,), "auc": ..., "loss": ...}, each as evaluate() and the validate task compute it on a resample.
    An AUC the resample leaves undefined in every column is NaN. Seeded by `seed` and the split itself, so that the
    same model on the same data gives the same values, and envoys of one federation draw differently."""
    n = len(y_true)
    rng = np.random.default_rng([seed, n, int(np.asarray(y_true, dtype=np.int64).sum())])
    per_sample = {"acc": correct(task, y_true, y_score), "loss": np.asarray(losses, dtype=np.float64)}
    columns = _auc_columns(task, y_true, y_score)
    values = {name: np.empty(resamples) for name in CI_NAMES}
    for first in range(0, resamples, chunk):
        rows = range(first, min(first + chunk, resamples))
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in rows]).astype(np.float64)
        for name, x in per_sample.items():
            values[name][first:first + len(rows)] = counts @ x / n
        aucs = np.stack([_weighted_aucs(t, s, counts) for t, s in columns])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no column is defined: NaN
            values["auc"][first:first + len(rows)] = np.nanmean(aucs, axis=0)
    return values


def interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """The percentile interval [low, high] of bootstrap values (NaN ones left out); None if none is finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(low), float(high)]


def pooled(replicates: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The pooled metric's bootstrap values: per resample, the envoys' values weighted by their sample counts, as
    the pooled value is their weighted mean; an envoy whose value is NaN in a resample (an undefined AUC) is left
    out of that resample's mean, as it is of the point value's."""
    names = sorted(replicates)
    values = np.stack([np.asarray(replicates[k], dtype=np.float64) for k in names])
    w = np.array([weights[k] for k in names], dtype=np.float64)[:, None] * np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w.sum(axis=0) > 0, (np.nan_to_num(values) * w).sum(axis=0) / w.sum(axis=0), np.nan)


def with_intervals(scores: dict, level: float = LEVEL) -> dict:
    """A validate task's scores with its bootstrap values (`<name>_replicates`) replaced by their percentile
    intervals, `ci: {name: [low, high]}`, as results.json holds them (for a run without a director: make baseline)."""
    kept = {k: v for k, v in scores.items() if not k.endswith(REPLICATES)}
    ci = {k[:-len(REPLICATES)]: interval(v, level) for k, v in scores.items() if k.endswith(REPLICATES)}
    return {**kept, "ci": ci or None}
