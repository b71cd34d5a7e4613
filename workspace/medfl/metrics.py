"""MedMNIST's official ACC and AUC (computed by medmnist.evaluator), and the loss, its targets and the scores per task
type, which the tasks (medfl.tasks) write out in PyTorch where a reader sees them; tests/test_tasks.py holds the tasks
to these."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from medmnist.evaluator import getACC, getAUC
from torch import nn

from .model import MULTI_LABEL


def loss_fn(task: str) -> nn.Module:
    """BCE-with-logits for multi-label; cross-entropy for multi-class, binary and ordinal tasks."""
    return nn.BCEWithLogitsLoss() if task == MULTI_LABEL else nn.CrossEntropyLoss()


def loss_target(task: str, labels: torch.Tensor) -> torch.Tensor:
    """Labels (N, width) as the loss expects them: float rows for BCE, class indices for CE."""
    return labels.float() if task == MULTI_LABEL else labels[:, 0].long()


def scores(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities, the y_score that medmnist.evaluator expects."""
    return torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=1)


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
