"""Federated algorithms: which optimizer the envoys train with, and how the director combines their weights.

- fedavg: Adam on every envoy, the director averages the weights by sample count (McMahan et al. 2017).
- fedprox: the envoys train with OpenFL's FedProxAdam, Adam plus a proximal term mu/2 ||w - w_global||^2 that keeps
  each envoy near the round's global model (Li et al. 2020); the director averages as in FedAvg.
- fedntd: the envoys train with Adam on cross-entropy plus FedNTD's not-true distillation from the round's global
  model (Lee et al. 2022; NotTrueDistillation below), made for label skew; the director averages as in FedAvg.
- fedadam, fedyogi, fedadagrad: the envoys train as in FedAvg; the director treats the averaged change of the weights
  as a gradient and steps a server optimizer with it (Reddi et al. 2021, "Adaptive Federated Optimization", FedOpt).
- fedbn: for hospitals whose images differ (scanner, staining): each envoy's normalization layers (BatchNorm's weight,
  bias and running statistics) never leave it, and the rest is averaged as in FedAvg (Li et al. 2021). The layers
  stay by OpenFL's own mechanism for tensors an envoy keeps (openfl_adjustments.local_tensors, named in the plan by
  local_plan below); each envoy validates and tests the shared weights with its own normalization.
- median, geomedian: robust aggregation: the coordinate-wise median (OpenFL's Median) or the geometric median of the
  envoys' weights, which a minority of wildly wrong envoys cannot drag far.

The aggregation functions run on the director (TaskInterface.set_aggregation_function on the train task); only the
train task's weights go through them, OpenFL averages every metric.

OpenFL 1.6's own FedOpt aggregations (AdamAdaptiveAggregation, YogiAdaptiveAggregation, AdagradAdaptiveAggregation)
and GeometricMedian are not used, because for this project they are wrong (tests/test_algorithms.py shows each):
- built from a model, their server optimizer steps every entry of the state dict, BatchNorm's integer
  num_batches_tracked included: numpy refuses to subtract floats from it in place, so the first round fails;
- their class is a singleton (SingletonABCMeta): building a second one, say when the notebook runs again in the same
  kernel, silently returns the first, with its settings and the previous experiment's weights and moments;
- NumPyYogi's second moment is beta2 * v + (1 - beta2) * sign(g^2 - v) * g^2, which is not Yogi's
  v - (1 - beta2) * sign(v - g^2) * g^2; and NumPyAdam adds bias correction that the FedOpt algorithm does not have;
- they return the optimizer's own array, which the next round changes in place inside the tensor store's cache;
- GeometricMedian's Weiszfeld iteration multiplies each iteration's weights into the next (it reweights the
  reweighted weights instead of the envoys' own) and stops after 4 iterations, so it ends near one envoy's weights,
  not at the geometric median.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from openfl.interface.aggregation_functions import AggregationFunction, Median, WeightedAverage
from torch.nn import functional as F

from .checks import OPTIMIZER_STATE

ALGORITHMS = ("fedavg", "fedprox", "fedntd", "fedbn", "fedadam", "fedyogi", "fedadagrad", "median", "geomedian")
SERVER_OPTIMIZERS = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
# Reddi et al. 2021 fix beta1 = 0.9, beta2 = 0.99 and the adaptivity tau = 1e-3; their tuned server learning rates on
# CIFAR-10, the image task nearest this one, are 1e-2 for FedAdam and FedYogi and 1e-1 for FedAdagrad.
SERVER_LEARNING_RATES = {"fedadam": 1e-2, "fedyogi": 1e-2, "fedadagrad": 1e-1}
SERVER_BETAS = (0.9, 0.99)
SERVER_TAU = 1e-3
# FedNTD's official settings (Lee et al. 2022, its repository's config/fedntd.json): beta 1, tau 1.
NTD_BETA, NTD_TAU = 1.0, 1.0
# The notebook's algorithm_options, with their defaults: FedProx's proximal weight, FedNTD's distillation weight and
# temperature, the FedOpt server optimizer's learning rate (None: the paper's for the algorithm), betas and tau, and
# local_norms: FedBN's idea with any algorithm (each envoy keeps its BatchNorm layers; fedbn is fedavg with it).
OPTIONS = {"mu": 0.01, "ntd_beta": NTD_BETA, "ntd_tau": NTD_TAU, "server_learning_rate": None,
           "server_beta1": SERVER_BETAS[0], "server_beta2": SERVER_BETAS[1], "server_tau": SERVER_TAU,
           "local_norms": False}


class _NotSingleton(type(AggregationFunction)):
    """OpenFL makes every AggregationFunction a singleton; a server optimizer has state, so each one is its own."""

    def __call__(cls, *args, **kwargs):
        return type.__call__(cls, *args, **kwargs)


def _in_order(local_tensors) -> list:
    # OpenFL lists the envoys in the order they registered, which changes from run to run; a floating-point sum in
    # another order differs in its last bits, and training amplifies that into results a few points apart.
    return sorted(local_tensors, key=lambda t: t.col_name)


def _weighted_mean(local_tensors) -> np.ndarray:
    local_tensors = _in_order(local_tensors)
    return np.average(np.stack([np.asarray(t.tensor, dtype=np.float64) for t in local_tensors]), axis=0,
                      weights=[t.weight for t in local_tensors])


class WeightedMean(WeightedAverage):
    """FedAvg's aggregation: OpenFL's WeightedAverage, over the envoys in a fixed order, so a run repeats."""

    def __repr__(self) -> str:
        return "WeightedMean()"

    def call(self, local_tensors, *args) -> np.ndarray:
        """The sample-weighted mean of one tensor (an OpenFL AggregationFunction)."""
        return super().call(_in_order(local_tensors), *args)


class ServerOptimizer(AggregationFunction, metaclass=_NotSingleton):
    """FedAdam, FedYogi or FedAdagrad on the director: Algorithm 2 of Reddi et al. 2021.

    Each round, for every trainable parameter x: delta = (sample-weighted mean of the envoys' x) - x,
    m = beta1 m + (1 - beta1) delta, v by the optimizer's rule (v starts at tau^2), x += lr m / (sqrt(v) + tau).
    BatchNorm's running statistics and counter, and the optimizer state the envoys send, are not trained by
    gradients: they are averaged as in FedAvg.
    """

    def __init__(self, kind: str, model, learning_rate: float, betas=SERVER_BETAS, tau: float = SERVER_TAU):
        super().__init__()
        if kind not in ("adam", "yogi", "adagrad"):
            raise ValueError(f"unknown server optimizer {kind!r}: use adam, yogi or adagrad")
        if not learning_rate > 0 or not tau > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"server learning rate {learning_rate!r} and tau {tau!r} must be positive, betas "
                             f"{betas!r} in [0, 1)")
        self.kind, self.learning_rate, self.betas, self.tau = kind, float(learning_rate), tuple(betas), float(tau)
        # The global model x_t, kept here in float64; the director's tensor store holds what the envoys receive.
        self.x = {name: p.detach().cpu().double().numpy().copy() for name, p in model.named_parameters()}
        self.m = {name: np.zeros_like(x) for name, x in self.x.items()}
        self.v = {name: np.full_like(x, self.tau ** 2) for name, x in self.x.items()}
        self.steps: dict[str, int] = {}
        self._answered: dict[str, tuple] = {}  # tensor: (round, result), so a repeated call never steps twice

    def __repr__(self) -> str:
        return (f"ServerOptimizer({self.kind!r}, learning_rate={self.learning_rate:g}, betas={self.betas}, "
                f"tau={self.tau:g})")

    def state(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps of this optimizer: x, m and v per parameter (float64), and each one's steps."""
        names = list(self.x)
        return {**{f"{part}/{name}": getattr(self, part)[name] for part in ("x", "m", "v") for name in names},
                "steps": np.array([self.steps.get(name, 0) for name in names], dtype=np.float64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Go on from a checkpoint's state() (resume_from); the parameters must be the same, shape for shape."""
        names = list(self.x)
        for part in ("x", "m", "v"):
            for name in names:
                value = np.asarray(state[f"{part}/{name}"], dtype=np.float64).reshape(self.x[name].shape)
                getattr(self, part)[name] = value.copy()
        self.steps = {name: int(n) for name, n in zip(names, state["steps"], strict=True) if n}
        self._answered = {}

    def call(self, local_tensors, db_iterator, tensor_name, fl_round, tags) -> np.ndarray:
        """The new global value of one tensor from the envoys' trained values (an OpenFL AggregationFunction)."""
        if tensor_name not in self.x:
            return _weighted_mean(local_tensors)
        answered = self._answered.get(tensor_name)
        if answered and answered[0] == fl_round:
            return answered[1].copy()
        beta1, beta2 = self.betas
        x = self.x[tensor_name]
        delta = _weighted_mean(local_tensors) - x
        self.m[tensor_name] = m = beta1 * self.m[tensor_name] + (1 - beta1) * delta
        v, square = self.v[tensor_name], delta ** 2
        if self.kind == "adam":
            v = beta2 * v + (1 - beta2) * square
        elif self.kind == "yogi":
            v = v - (1 - beta2) * square * np.sign(v - square)
        else:
            v = v + square
        self.v[tensor_name] = v
        x += self.learning_rate * m / (np.sqrt(v) + self.tau)
        self.steps[tensor_name] = self.steps.get(tensor_name, 0) + 1
        # The weights' dtype on the wire, float32 (the secure sum hands over a float64 mean); a copy, so that nobody
        # else's array changes with ours.
        result = x.astype(np.float32)
        self._answered[tensor_name] = (fl_round, result)
        return result.copy()


class NotTrueDistillation:
    """FedNTD's local loss term (Lee et al. 2022, "Preservation of the Global Knowledge by Not-True Distillation in
    Federated Learning"), for envoys that see a few classes much more than others.

    On such an envoy, local training pushes every image's logits towards the envoy's own common classes, and forgets
    what the global model knew about the rest: averaging those forgetful models is FedAvg's trouble under label skew.
    FedNTD keeps that knowledge where it does not conflict with the envoy's labels: for each image it takes the logits
    of the classes the image is NOT (its labelled class removed), softens them by `tau`, and adds `beta` times
    KL(global || local) between the frozen global model's and the local model's softmax over them. The labelled
    class is left to cross-entropy alone. beta 0 is FedAvg. Single-label tasks with three or more classes only:
    with two classes the not-true distribution has one class and nothing to distil.

    train() calls start(model) with the round's global model before the first step and stop() after the last; the
    frozen copy costs one more model in memory and one more forward pass per batch on each envoy.
    """

    def __init__(self, beta: float = NTD_BETA, tau: float = NTD_TAU):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"FedNTD's beta {beta!r} must be a number of at least 0 (0 is FedAvg)")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"FedNTD's tau {tau!r} must be a positive number, e.g. 1")
        self.beta, self.tau, self.teacher = float(beta), float(tau), None

    def __repr__(self) -> str:
        return f"NotTrueDistillation(beta={self.beta:g}, tau={self.tau:g})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "teacher": None}  # what travels is the settings, never a model

    def start(self, model: torch.nn.Module) -> None:
        """Freeze a copy of this round's global model (as it is now, on its device) as the teacher, in eval mode:
        BatchNorm normalizes with the global model's statistics, and nothing the teacher sees changes it."""
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def stop(self) -> None:
        """Drop the teacher until the next round."""
        self.teacher = None

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """beta * tau-softened KL(teacher || student) over each image's not-true classes, averaged over the batch."""
        if self.teacher is None:
            raise RuntimeError("NotTrueDistillation: call start(model) with the round's global model first")
        if target.dim() != 1 or logits.shape[1] < 3:
            raise ValueError("FedNTD needs a single-label task with three or more classes")
        with torch.no_grad():
            teacher = self.teacher(images)
        not_true = ~F.one_hot(target, logits.shape[1]).bool()
        rows = (len(target), logits.shape[1] - 1)
        student = F.log_softmax(logits.float()[not_true].view(rows) / self.tau, dim=1)
        teacher = F.softmax(teacher.float()[not_true].view(rows) / self.tau, dim=1)
        return self.beta * F.kl_div(student, teacher, reduction="batchmean")


def geometric_median(points: np.ndarray, weights, iterations: int = 500, tolerance: float = 1e-7) -> np.ndarray:
    """The weighted geometric median of the rows of `points` (Weiszfeld's algorithm, from the weighted mean).

    It stops when a step moves the estimate by less than `tolerance` times its size (or its distance to the nearest
    row, if that is larger). From a mean that a far outlier dragged away, each step about halves the distance to the
    others: 500 steps are plenty. A row the estimate lands on is kept at a small distance, not divided by zero.
    """
    points = np.asarray(points, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    z = weights @ points
    for _ in range(iterations):
        distances = np.linalg.norm(points - z, axis=1)
        scale = max(float(np.linalg.norm(z)), float(distances.min()), np.finfo(float).tiny)
        step = weights / np.maximum(distances, 1e-12 * scale)
        moved = step @ points / step.sum()
        done = np.linalg.norm(moved - z) <= tolerance * scale
        z = moved
        if done:
            break
    return z


class GeometricMedian(AggregationFunction, metaclass=_NotSingleton):
    """The sample-weighted geometric median of the envoys' weights, tensor by tensor.

    Integer counters, and the optimizer state the envoys send back (each round starts from a fresh one, so it is
    never used), are averaged: Weiszfeld's iterations on them would only cost the director time.
    """

    def __repr__(self) -> str:
        return "GeometricMedian()"

    def call(self, local_tensors, db_iterator, tensor_name, fl_round, tags) -> np.ndarray:
        """The new global value of one tensor (an OpenFL AggregationFunction)."""
        first = np.asarray(local_tensors[0].tensor)
        if not np.issubdtype(first.dtype, np.floating) or tensor_name.startswith(OPTIMIZER_STATE):
            return _weighted_mean(local_tensors)
        local_tensors = _in_order(local_tensors)
        points = np.stack([np.asarray(t.tensor, dtype=np.float64).ravel() for t in local_tensors])
        median = geometric_median(points, [t.weight for t in local_tensors])
        return median.reshape(first.shape).astype(first.dtype)


def aggregation_function(algorithm: str, model, options: dict | None = None) -> AggregationFunction:
    """How the director combines the envoys' trained weights for `algorithm`; `model` holds the initial weights,
    `options` the notebook's algorithm_options (missing ones: OPTIONS)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    o = {**OPTIONS, **(options or {})}
    if algorithm in SERVER_OPTIMIZERS:
        return ServerOptimizer(SERVER_OPTIMIZERS[algorithm], model, server_lr(algorithm, o["server_learning_rate"]),
                               (o["server_beta1"], o["server_beta2"]), o["server_tau"])
    if algorithm == "median":
        return Median()  # OpenFL's: the coordinate-wise median, as the papers define it; the envoys' order is moot
    if algorithm == "geomedian":
        return GeometricMedian()
    return WeightedMean()  # fedavg; fedprox and fedntd change only how the envoys train, fedbn what they send


def local_layers(model: torch.nn.Module) -> list[str]:
    """The state-dict names of the model's BatchNorm layers (weights, biases, running statistics, counters): what
    FedBN keeps on each envoy."""
    return [f"{prefix}.{name}" for prefix, module in model.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]


def local_plan(algorithm: str, model: torch.nn.Module, run: str, first_round: int | None = 0,
               start_round: int | None = None, personalize: bool = False, local_norms: bool = False) -> dict:
    """FLExperiment.start's override_config entries for tensors that stay on the envoys (none if nothing stays):

    - fedbn, or any algorithm with `local_norms` (algorithm_options): each envoy holds back its normalization
      layers and keeps them per round of `run` on its own disk, the rounds counted from `first_round` (a resumed
      run's; None: keep nothing, e.g. the test); an experiment that does not start from the beginning (a resumed run
      from round `start_round`, the test of round `start_round`'s model) starts each envoy from its own of that
      round;
    - personalize: every tensor stays: each envoy fine-tunes the model for itself and sends only metrics.
    """
    keeps_norms = algorithm == "fedbn" or local_norms
    names = local_layers(model) if keeps_norms else []
    if keeps_norms and not names:
        raise ValueError("fedbn and local_norms keep each envoy's BatchNorm layers at home, and this model has none "
                         "(DP-SGD's GroupNorm is not one): choose another algorithm, or local_norms False")
    held = list(model.state_dict()) if personalize else names
    if not held:
        return {}
    return {"task_runner.settings.local_tensors": held, "aggregator.settings.local_tensors": held,
            **({"task_runner.settings.local_run": run, "task_runner.settings.local_first_round": first_round,
                "task_runner.settings.local_start_round": start_round} if names else {})}


def server_lr(algorithm: str, server_learning_rate: float | None) -> float:
    """The server learning rate given, or for None the FedOpt paper's for this algorithm."""
    return SERVER_LEARNING_RATES[algorithm] if server_learning_rate is None else server_learning_rate


def settings(algorithm: str, options: dict | None = None) -> dict:
    """The algorithm and the settings of algorithm_options it uses, as results.json records them."""
    o = {**OPTIONS, **(options or {})}
    chosen: dict = {"name": algorithm}
    if algorithm == "fedprox":
        chosen["mu"] = o["mu"]
    if algorithm == "fedntd":
        chosen.update(ntd_beta=o["ntd_beta"], ntd_tau=o["ntd_tau"])
    if o["local_norms"] and algorithm != "fedbn":
        chosen["local_norms"] = True
    if algorithm in SERVER_OPTIMIZERS:
        chosen["server_learning_rate"] = server_lr(algorithm, o["server_learning_rate"])
        # FedAdagrad sums squared changes instead of averaging them: it has no beta2.
        betas = [o["server_beta1"], o["server_beta2"]]
        chosen.update({"beta1": betas[0]} if algorithm == "fedadagrad" else {"betas": betas}, tau=o["server_tau"])
    return chosen


def describe(chosen: dict) -> str:
    """A short label of an algorithm and its settings, for titles and tables."""
    names = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedntd": "FedNTD", "fedadam": "FedAdam", "fedyogi": "FedYogi",
             "fedadagrad": "FedAdagrad", "fedbn": "FedBN", "median": "median", "geomedian": "geometric median"}
    label = names.get(chosen["name"], chosen["name"])
    if "mu" in chosen:
        label += f" (mu {chosen['mu']:g})"
    if "ntd_beta" in chosen:
        label += f" (beta {chosen['ntd_beta']:g}, tau {chosen['ntd_tau']:g})"
    if "server_learning_rate" in chosen:
        label += f" (server lr {chosen['server_learning_rate']:g})"
    if chosen.get("local_norms"):
        label += " + local norms"
    return label
