"""A node's privacy budget: every DP-SGD step ever taken on its training data, in one ledger the node keeps.

The ledger holds the accountant's history, (noise multiplier, sample rate, steps) per round trained, for every
experiment: its epsilon is one RDP accountant over all of it (Rényi DP adds up per order across experiments, which
is tighter than adding epsilons and still sound). It lives in the node's state folder (MEDFL_ENVOY_STATE), one file
per dataset and size the node serves, named by neither the researcher nor the run. A round is written to it, and
to disk (temporary file, fsync, rename), before the round trains: a round that trained counts even if the node or
its director went down before using it.

The node computes what an experiment will spend from what its plan declares (medfl.privacy.declared: rounds,
epochs, batch size, noise or target epsilon) and its own training-set size, with the same formula as the
experiment's DP-SGD (medfl.privacy.DPSGD), so that a declaration the policy admits is one its ledger can hold.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

# Rényi orders; the same as medfl.privacy.ALPHAS (tests/test_policy.py keeps them equal), so that the node's and
# the experiment's epsilons agree.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 192, 256, 384, 512, 1024]
Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class LedgerError(RuntimeError):
    """A ledger that cannot be read: the node cannot know what its data has spent."""


def epsilon(history: list[Step], delta: float) -> float:
    """Epsilon at `delta` of one RDP accountant over `history` (0 for none)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(step) for step in history]
    return float(accountant.get_epsilon(delta, alphas=ALPHAS))


def round_step(dp: dict, batch_size: int, n: int) -> Step:
    """What one round of DP-SGD with the declared settings `dp` (medfl.privacy.DPSGD's arguments) takes on a
    training set of n: (noise, rate, steps), as DPSGD computes it (the noise from target_epsilon over the run's
    rounds x epochs, unless the declaration fixes it)."""
    from opacus.accountants.utils import get_noise_multiplier

    rate, steps = min(1.0, batch_size / n), max(1, math.ceil(n / batch_size)) * int(dp["epochs_per_round"])
    noise = float(dp.get("noise_multiplier") or 0.0)
    if not noise:
        noise = get_noise_multiplier(target_epsilon=float(dp["target_epsilon"]),
                                     target_delta=float(dp.get("delta") or 0.0) or 1 / (10 * n), sample_rate=rate,
                                     steps=steps * int(dp["rounds"]), accountant="rdp", alphas=ALPHAS)
    return (float(noise), rate, steps)


@dataclass
class Ledger:
    """The DP-SGD history of one node's data; `path` is its file."""

    path: Path
    history: list
    unbounded: list = field(default_factory=list)  # experiments that trained on this data without DP-SGD

    @classmethod
    def of(cls, state: Path, dataset: str) -> Path:
        """The ledger file of `dataset` (e.g. bloodmnist-28) in the node's state folder."""
        return Path(state) / f"privacy-ledger-{dataset}.json"

    @classmethod
    def load(cls, path: Path, must_exist: bool) -> Ledger:
        """The ledger at `path`; empty if there is none and none was ever made (`must_exist` False).
        LedgerError, in one line, if it is damaged, or missing where one was made."""
        if not path.is_file():
            if must_exist:
                raise LedgerError(f"its privacy ledger {path} is missing, but its audit log shows one was kept: "
                                  "restore it from a backup; until then this node counts what its data has spent "
                                  "as unknown")
            return cls(path, [])
        try:
            saved = json.loads(path.read_text())
            history = [(float(noise), float(rate), int(steps)) for noise, rate, steps in saved["history"]]
            if any(not (noise > 0 and 0 < rate <= 1 and steps > 0) for noise, rate, steps in history):
                raise ValueError("a step out of range")
            unbounded = [str(name) for name in saved.get("unbounded", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"its privacy ledger {path} is damaged ({type(exc).__name__}: {exc}): restore it from a "
                              "backup; until then this node counts what its data has spent as unknown") from None
        return cls(path, history, unbounded)

    def add(self, step: Step) -> None:
        """Append one round's DP-SGD step and write the ledger."""
        self.history.append(tuple(step))
        self._write()

    def mark_unbounded(self, experiment: str) -> None:
        """Note that `experiment` trained on this data without DP-SGD, and write the ledger."""
        if experiment not in self.unbounded:
            self.unbounded.append(experiment)
            self._write()

    def _write(self) -> None:
        """Temporary file, fsync, rename, fsync of the folder: the old ledger or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with open(temporary, "w") as out:
            json.dump({"history": [list(s) for s in self.history], "unbounded": self.unbounded}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
