"""Differential privacy on the envoys: DP-SGD with Opacus, and the privacy each envoy spends.

Weights leave a hospital every round, and a model trained on a few hundred images can give individual patients
away. DP-SGD bounds what the updates and the final model can reveal about any one image of a node's training split:
each batch is drawn by Poisson sampling, each image's gradient is clipped to `max_grad_norm`, and Gaussian noise
(`noise_multiplier` x `max_grad_norm`) is added to their sum. An accountant adds up the privacy spent, epsilon at a
given delta, over every step of every round. The train task gets the same DPSGD object every round of an
experiment (OpenFL unpickles the task settings once per experiment on each envoy), so it is that object that keeps
the envoy's accountant over the experiment's rounds.

A run can take more than one experiment: one that resumes after its director went down, or one started again
under the same name. With `ledger` (the notebook passes the run's name) each envoy also keeps the accountant's
history on its own disk, under MEDFL_ENVOY_STATE (start_envoy.sh sets it beside the envoy's config), and adds it
up before training: the epsilon it reports is what the run's data has spent over every attempt. A round an envoy
trained counts even if the director went down before it used the result: the update may have left the node.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

# Rényi orders for the accountant: OpenFL-sized runs (few steps, epsilon of a few units) need orders beyond
# Opacus's default range (up to 63) for a tight bound.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 192, 256, 384, 512, 1024]


class PrivacyError(ValueError):
    """Settings or a model with which DP-SGD cannot give its guarantee; the message says what to change."""


class PoissonBatches(torch.utils.data.Sampler):
    """`steps` draws in which every sample joins the batch independently with probability `rate` (what DP-SGD's
    accounting assumes): sizes vary around rate x N. A draw that comes out empty is not yielded but reported to
    `on_empty`, so that the accountant still counts its step."""

    def __init__(self, n: int, rate: float, steps: int, generator: torch.Generator, on_empty=lambda: None):
        self.n, self.rate, self.steps, self.generator, self.on_empty = n, rate, steps, generator, on_empty

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            batch = torch.nonzero(torch.rand(self.n, generator=self.generator) < self.rate).flatten().tolist()
            if batch:
                yield batch
            else:
                self.on_empty()


# The notebook's dp_options, with their defaults: each image's gradient clipping norm, the noise (0: computed to spend
# target_epsilon over the planned run), the run's privacy budget per envoy, and delta (0: 1 / (10 x the envoy's
# training-set size)).
OPTIONS = {"max_grad_norm": 1.0, "noise_multiplier": 0.0, "target_epsilon": 8.0, "delta": 0.0}
# Where an envoy keeps its state across experiments (start_envoy.sh sets it); privacy ledgers go in privacy/.
STATE_ENV = "MEDFL_ENVOY_STATE"


def ledger_path(ledger: str) -> Path:
    """The file of this envoy's privacy ledger `ledger` (a run's name)."""
    state = os.environ.get(STATE_ENV) or Path.home() / ".local" / "state" / "medfl" / os.environ.get("ENVOY_NAME",
                                                                                                     "envoy")
    return Path(state) / "privacy" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', ledger)}.json"


class DPSGD:
    """One envoy's DP-SGD: the settings, and once training starts, its noise and accountant for the experiment."""

    def __init__(self, max_grad_norm: float = 1.0, noise_multiplier: float = 0.0, target_epsilon: float = 8.0,
                 delta: float = 0.0, rounds: int = 1, epochs_per_round: int = 1, ledger: str = ""):
        if not max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm={max_grad_norm!r} (dp_options): give the per-sample clipping norm, "
                               "e.g. 1.0")
        if noise_multiplier < 0 or (noise_multiplier == 0 and not target_epsilon > 0):
            raise PrivacyError("dp_options: give noise_multiplier > 0, or noise_multiplier = 0 and a target_epsilon "
                               "> 0 (the noise is then computed for the whole planned run)")
        if not 0 <= delta < 1:
            raise PrivacyError(f"delta={delta!r} (dp_options): give a probability below 1 over the node's training set "
                               "size, or 0 for 1 / (10 x that size)")
        self.max_grad_norm, self.noise_multiplier, self.target_epsilon = max_grad_norm, noise_multiplier, target_epsilon
        self.delta, self.rounds, self.epochs_per_round = delta, rounds, epochs_per_round
        self.ledger, self.before = ledger, []  # the run's ledger, and its history before this experiment
        self.accountant = self._hooked = self._rate = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader):
        """This round's (model, optimizer, loader) under DP-SGD: per-sample gradients, clipping and noise, Poisson
        batches of the loader's expected size. The first call sets the noise and starts the accountant."""
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise PrivacyError("DP-SGD cannot privatize BatchNorm, whose statistics mix the samples of a batch: "
                               "build the model with norm=\"group\" (the notebook does when dp = True)")
        dataset, batch_size = loader.dataset, loader.sampler.batch_size
        n = len(dataset)
        rate, steps = min(1.0, batch_size / n), max(1, math.ceil(n / batch_size))
        if self.accountant is None:
            self.delta = self.delta or 1 / (10 * n)
            if not self.noise_multiplier:
                self.noise_multiplier = get_noise_multiplier(
                    target_epsilon=self.target_epsilon, target_delta=self.delta, sample_rate=rate,
                    steps=steps * self.epochs_per_round * self.rounds, accountant="rdp", alphas=ALPHAS)
            self.accountant = RDPAccountant()
            self.before = self._read_ledger(self.delta)
            self.accountant.history = list(self.before)
        generator = getattr(loader.sampler.sampler, "generator", None) or torch.Generator()
        sampler = PoissonBatches(n, rate, steps, generator, on_empty=self._count_empty)
        batches = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=0, pin_memory=loader.pin_memory)
        # Opacus hooks the first layer too, whose input (the images) needs no gradient; PyTorch warns about that
        # combination, which is exactly what per-sample gradients of the weights need.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs since no inputs require gradients")
        private = GradSampleModule(model)
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                                   expected_batch_size=batch_size)
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=rate))
        self._hooked, self._rate = private, rate
        return private, dp_optimizer, batches

    def _count_empty(self) -> None:
        # An empty draw releases nothing; counting it anyway keeps the accounting on the safe side.
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self._rate)

    def detach(self) -> None:
        """Remove this round's per-sample gradient hooks from the model."""
        if self._hooked is not None:
            self._hooked._close()
            self._hooked = None

    def spent(self) -> dict[str, float]:
        """The privacy this envoy has spent so far in the run: epsilon at delta, and with a ledger that holds earlier
        attempts, the part they spent (epsilon_before)."""
        spent = {"epsilon": self.accountant.get_epsilon(self.delta, alphas=ALPHAS), "delta": self.delta}
        if self.before:
            earlier = type(self.accountant)()
            earlier.history = list(self.before)
            spent["epsilon_before"] = earlier.get_epsilon(self.delta, alphas=ALPHAS)
        return spent

    def commit(self) -> dict[str, float]:
        """After each round's training: write the accountant's history to the ledger (atomically), then spent()."""
        if self.ledger:
            path = ledger_path(self.ledger)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            temporary.write_text(json.dumps({"ledger": self.ledger, "delta": self.delta,
                                             "history": [list(step) for step in self.accountant.history]}))
            os.replace(temporary, path)
        return self.spent()

    def _read_ledger(self, delta: float) -> list[tuple]:
        """The history of the steps this envoy took in the run before this experiment ([] without a ledger)."""
        if not self.ledger:
            return []
        path = ledger_path(self.ledger)
        if not path.is_file():
            return []
        try:
            saved = json.loads(path.read_text())
            history = [(float(noise), float(rate), int(steps)) for noise, rate, steps in saved["history"]]
        except (ValueError, KeyError, TypeError) as exc:
            # Forgetting spent privacy would understate it: refuse to train instead.
            raise PrivacyError(f"the privacy ledger {path} is damaged ({type(exc).__name__}): this envoy cannot "
                               "add up what the run has spent; restore it, or start the run under a new name") from None
        if saved.get("delta") != delta:
            raise PrivacyError(f"the privacy ledger {path} was kept at delta={saved.get('delta')}, this run asks "
                               f"delta={delta}: resume with the run's dp_options")
        return history


def declared(train_rounds: int, privacy: DPSGD | None, envoys: list[dict]) -> dict:
    """FLExperiment.start's override_config entries that declare what the experiment will do on each envoy: its
    training rounds, DP-SGD's settings (`enabled` false without), and the envoys it federates (the online ones of
    `envoys`, medfl.researcher.envoy_table's rows). Each envoy's own policy (security.policy, on the node) reads them
    from the plan before it unpacks anything, and holds the experiment to them while it runs."""
    settings = {name: getattr(privacy, name, None) for name in (*OPTIONS, "rounds", "epochs_per_round")}
    return {"declared.settings.train_rounds": int(train_rounds),
            "declared.settings.envoys": sorted(e["envoy"] for e in envoys if e["online"]),
            "declared.settings.dp.enabled": privacy is not None,
            **{f"declared.settings.dp.{name}": value for name, value in settings.items()}}
