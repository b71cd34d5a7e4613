"""MedMNIST's official ACC and AUC (computed by medmnist.evaluator). The loss, its targets and the scores per task type
are written out in the tasks (medfl.tasks), where a reader sees them."""
from __future__ import annotations

import warnings

import numpy as np
from medmnist.evaluator import getACC, getAUC

from .model import MULTI_LABEL


def evaluate(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """ACC and AUC as MedMNIST defines them, for labels (N, width) and scores (N, classes).

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
    return {"acc": acc, "auc": auc}


def _auc_over_defined_columns(task: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    if task == MULTI_LABEL:
        columns = [(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])]
    elif task == "binary-class":
        columns = [(y_true[:, 0], y_score[:, -1])]
    else:
        columns = [((y_true[:, 0] == i).astype(int), y_score[:, i]) for i in range(y_score.shape[1])]
    # Each defined column goes through the library's binary AUC, so the definition stays theirs.
    values = [getAUC(t, s, "binary-class") for t, s in columns if 0 < t.sum() < len(t)]
    return float(np.mean(values)) if values else float("nan")
