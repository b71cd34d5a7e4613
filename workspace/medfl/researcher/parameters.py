"""The notebook's parameters: their defaults (one home for them) and the checks that refuse impossible ones."""
from __future__ import annotations

from pathlib import Path

import medmnist

from ..aggregator import quorum
from ..algorithms import ALGORITHMS, NTD_BETA, NTD_TAU, SERVER_BETAS, SERVER_TAU
from ..checks import MAX_REJECTIONS, MAX_UPDATE_RATIO, check_settings
from ..device import REQUESTS
from ..model import FLAGS, MULTI_LABEL, SIZES, STEMS, task_type
from ..privacy import DPSGD, PrivacyError
from ..wire import WIRE_DTYPES

# The notebook's parameters cell is written from these (tools/notebooks.py); make demo, make baseline and
# make bench take their training settings from here too.
DEFAULTS = {
    "dataset": "bloodmnist",
    "size": 28,
    "rounds_to_train": 3,
    "epochs_per_round": 1,
    "train_batch_size": 64,
    "eval_batch_size": 256,
    "learning_rate": 1e-3,
    "algorithm": "fedavg",
    "mu": 0.01,
    "ntd_beta": NTD_BETA,
    "ntd_tau": NTD_TAU,
    "server_learning_rate": None,
    "server_beta1": SERVER_BETAS[0],
    "server_beta2": SERVER_BETAS[1],
    "server_tau": SERVER_TAU,
    "best_metric": "auc",
    "best_mode": "max",
    "min_envoys": 0.5,
    "round_timeout": 0,
    "max_update_ratio": MAX_UPDATE_RATIO,
    "max_rejections": MAX_REJECTIONS,
    "wire_dtype": "float32",
    "device": "auto",
    "bf16": False,
    "stem": "patch",
    "dp": False,
    "dp_max_grad_norm": 1.0,
    "dp_noise_multiplier": 0.0,
    "dp_target_epsilon": 8.0,
    "dp_delta": 0.0,
    "director_host": "localhost",
    "director_port": 50051,
    "aggregator_port": 0,
    "ca_cert": "",
    "api_cert": "",
    "api_key": "",
    "experiment_name": "",
    "output_dir": "../runs",
    "preview_dir": "../data",
    "data_source": "",
    "verbose": False,
    "seed": 0,
}
# What results.json records of a run's parameters (with the experiment's name and whether it used TLS).
TRAINING = ("dataset", "size", "rounds_to_train", "epochs_per_round", "train_batch_size", "eval_batch_size",
            "learning_rate", "algorithm", "mu", "ntd_beta", "ntd_tau", "server_learning_rate", "server_beta1",
            "server_beta2", "server_tau", "best_metric", "best_mode", "min_envoys", "round_timeout", "max_update_ratio",
            "max_rejections", "wire_dtype",
            "device", "bf16", "stem", "dp", "dp_max_grad_norm", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta",
            "seed")


class NotebookError(RuntimeError):
    """An error the notebook shows as its one-line message, without a traceback (IPython's hook)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ParameterError(NotebookError, ValueError):
    """A notebook parameter or dataset choice that cannot work; the message says what to change."""


def training_parameters(namespace: dict) -> dict:
    """The parameters that shape training, taken from the notebook's variables."""
    return {name: namespace[name] for name in TRAINING}


def check_parameters(*, dataset, size, rounds_to_train, epochs_per_round, train_batch_size, eval_batch_size,
                     learning_rate, device, best_metric, best_mode, min_envoys=DEFAULTS["min_envoys"],
                     round_timeout=DEFAULTS["round_timeout"], wire_dtype=DEFAULTS["wire_dtype"],
                     max_update_ratio=DEFAULTS["max_update_ratio"], max_rejections=DEFAULTS["max_rejections"],
                     algorithm=DEFAULTS["algorithm"], mu=DEFAULTS["mu"],
                     ntd_beta=DEFAULTS["ntd_beta"], ntd_tau=DEFAULTS["ntd_tau"],
                     server_learning_rate=DEFAULTS["server_learning_rate"], server_beta1=DEFAULTS["server_beta1"],
                     server_beta2=DEFAULTS["server_beta2"], server_tau=DEFAULTS["server_tau"], ca_cert="",
                     api_cert="", api_key="", stem=DEFAULTS["stem"], bf16=DEFAULTS["bf16"], dp=DEFAULTS["dp"],
                     dp_max_grad_norm=DEFAULTS["dp_max_grad_norm"], dp_noise_multiplier=DEFAULTS["dp_noise_multiplier"],
                     dp_target_epsilon=DEFAULTS["dp_target_epsilon"], dp_delta=DEFAULTS["dp_delta"], **_) -> None:
    """Refuse impossible parameters before anything is submitted, one clear line each."""
    if dataset not in FLAGS:
        raise ParameterError(f"dataset={dataset!r} is not a MedMNIST 2D dataset: use one of {', '.join(FLAGS)}")
    if size not in SIZES:
        raise ParameterError(f"size={size!r} is not a MedMNIST size: use 28, 64, 128 or 224")
    for name, value in (("rounds_to_train", rounds_to_train), ("epochs_per_round", epochs_per_round),
                        ("train_batch_size", train_batch_size), ("eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{name}={value!r}: it must be a whole number of at least 1")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ParameterError(f"learning_rate={learning_rate!r}: it must be a positive number, e.g. 1e-3")
    check_algorithm(algorithm, mu, server_learning_rate, server_beta1, server_beta2, server_tau, ntd_beta, ntd_tau,
                    dataset)
    if device not in REQUESTS:
        raise ParameterError(f"device={device!r}: use one of {', '.join(REQUESTS)}")
    if stem not in STEMS:
        raise ParameterError(f"stem={stem!r}: use \"patch\" (a patch embedding: every size costs about what 28 px "
                             "costs) or \"full\" (the plain network at full resolution, for accelerators)")
    if best_metric not in ("auc", "acc", "loss") or best_mode not in ("max", "min"):
        raise ParameterError(f"best_metric={best_metric!r}, best_mode={best_mode!r}: use auc, acc or loss, "
                             "with max or min")
    try:
        quorum(min_envoys, 1)
    except ValueError as exc:
        raise ParameterError(f"min_envoys={min_envoys!r}: {exc}") from None
    if isinstance(round_timeout, bool) or not isinstance(round_timeout, (int, float)) or not round_timeout >= 0:
        raise ParameterError(f"round_timeout={round_timeout!r}: give seconds (0 for no limit)")
    try:
        check_settings(max_update_ratio, max_rejections)
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
    if wire_dtype not in WIRE_DTYPES:
        raise ParameterError(f"wire_dtype={wire_dtype!r}: use \"float32\" (the weights, lossless), or \"float16\" or "
                             "\"bfloat16\" (their change each round, in half the bytes)")
    check_certificates(ca_cert, api_cert, api_key)
    if dp not in (True, False):
        raise ParameterError(f"dp={dp!r}: True (DP-SGD on every envoy) or False")
    if dp:
        if bf16:
            raise ParameterError("dp=True with bf16=True: DP-SGD's per-sample gradients run in float32; "
                                 "set bf16 = False")
        try:
            DPSGD(dp_max_grad_norm, dp_noise_multiplier, dp_target_epsilon, dp_delta, rounds_to_train, epochs_per_round)
        except (PrivacyError, TypeError) as exc:
            raise ParameterError(str(exc)) from None


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value


def check_algorithm(algorithm, mu=DEFAULTS["mu"], server_learning_rate=None, server_beta1=DEFAULTS["server_beta1"],
                    server_beta2=DEFAULTS["server_beta2"], server_tau=DEFAULTS["server_tau"],
                    ntd_beta=DEFAULTS["ntd_beta"], ntd_tau=DEFAULTS["ntd_tau"], dataset=None) -> None:
    """Refuse an unknown algorithm, settings it cannot run with, or (given) a dataset it cannot train, in one line."""
    if algorithm not in ALGORITHMS:
        raise ParameterError(f"algorithm={algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    if not _number(mu) or mu < 0:
        raise ParameterError(f"mu={mu!r}: FedProx's proximal weight must be a number of at least 0 (0 is FedAvg)")
    if not _number(ntd_beta) or ntd_beta < 0:
        raise ParameterError(f"ntd_beta={ntd_beta!r}: FedNTD's distillation weight must be a number of at least 0 "
                             "(0 is FedAvg)")
    if not _number(ntd_tau) or not ntd_tau > 0:
        raise ParameterError(f"ntd_tau={ntd_tau!r}: FedNTD's temperature must be a positive number, e.g. 1")
    if algorithm == "fedntd" and dataset in FLAGS:
        task, outputs = task_type(dataset), len(medmnist.INFO[dataset]["label"])
        if task == MULTI_LABEL or outputs < 3:
            raise ParameterError(f"algorithm='fedntd' distils the classes an image is not, so it needs one label of "
                                 f"three or more classes; {dataset} is {task} with {outputs} outputs: use fedavg or "
                                 "fedprox")
    if server_learning_rate is not None and (not _number(server_learning_rate) or not server_learning_rate > 0):
        raise ParameterError(f"server_learning_rate={server_learning_rate!r}: it must be a positive number, or None "
                             "for the FedOpt paper's choice")
    for name, value in (("server_beta1", server_beta1), ("server_beta2", server_beta2)):
        if not _number(value) or not 0 <= value < 1:
            raise ParameterError(f"{name}={value!r}: it must be at least 0 and below 1, e.g. 0.9")
    if not _number(server_tau) or not server_tau > 0:
        raise ParameterError(f"server_tau={server_tau!r}: it must be a positive number, e.g. 1e-3")


def check_certificates(ca_cert: str, api_cert: str, api_key: str) -> None:
    """Refuse a TLS set-up the director would refuse: all three files or none, from one CA, a researcher's."""
    from security.certs import CertError, check

    given = {"ca_cert": ca_cert, "api_cert": api_cert, "api_key": api_key}
    if any(given.values()) and not all(given.values()):
        missing = ", ".join(name for name, value in given.items() if not value)
        raise ParameterError(f"{missing} empty: mutual TLS needs ca_cert, api_cert and api_key (make certs writes "
                             "them to certs/), plaintext needs all three empty")
    if all(given.values()):
        try:
            check(None, Path(api_cert), Path(api_key), Path(ca_cert), role="researcher")
        except CertError as exc:
            raise ParameterError(f"api_cert={api_cert!r}: {exc}") from None
