"""The experiment's task schedule, built on the director from the plan (the notebook passes it to FLExperiment)."""
from __future__ import annotations

from .events import VALIDATE_GLOBAL, VALIDATE_LOCAL


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
