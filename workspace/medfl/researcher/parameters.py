"""The notebook's parameters: their defaults (one home for each) and the checks that refuse impossible ones.

The parameters cell holds what a researcher chooses (DEFAULTS) and three dicts: `algorithm_options` (the
algorithm's settings; defaults in medfl.algorithms.OPTIONS), `dp_options` (DP-SGD's; medfl.privacy.OPTIONS) and
`run` (how and where this run runs: the director, the certificates, where results go, the federation's rules;
RUN below). A dict lists only what differs from its defaults; check_parameters returns each one complete.
make demo and its siblings take every name of these, and docs/settings.md lists them, from here.
"""
from __future__ import annotations

from pathlib import Path

import medmnist

from security.secagg import MAX_UPDATE_NORM

from ..algorithms import ALGORITHMS
from ..algorithms import OPTIONS as ALGORITHM_OPTIONS
from ..checks import (
    MAX_REJECTIONS,
    MAX_UPDATE_RATIO,
    MAX_UPDATE_SIZE,
    MIN_UPDATE_COSINE,
    REJECTION_WINDOW,
    check_settings,
)
from ..device import REQUESTS
from ..metrics import RESAMPLES
from ..model import FLAGS, MULTI_LABEL, SIZES, STEMS, task_type
from ..privacy import DPSGD, PrivacyError
from ..privacy import OPTIONS as DP_OPTIONS
from ..selection import quorum
from ..wire import WIRE_DTYPES

# The parameters cell, in its order (tools/notebooks.py writes it from these).
DEFAULTS = {
    "dataset": "bloodmnist",
    "size": 28,
    "rounds": 3,
    "epochs": 1,
    "train_batch_size": 64,
    "eval_batch_size": 256,
    "learning_rate": 1e-3,
    "algorithm": "fedavg",
    "algorithm_options": {},
    "personalize_epochs": 0,
    "device": "auto",
    "bf16": False,
    "dp": False,
    "dp_options": {},
    "secure_aggregation": False,
    "seed": 0,
    "run": {},
}
# How and where a run runs; a runner (make demo) sets the connection, a researcher may set the rules.
RUN = {
    "director_host": "localhost",
    "director_port": 50051,
    "aggregator_port": 0,  # 0: OpenFL derives one per experiment (49152-60999); fix it for firewalls
    "ca_cert": "",  # mutual TLS: the CA, and the researcher's certificate and key (which also sign experiments);
    "api_cert": "",  # all three empty: plaintext, for a director on loopback
    "api_key": "",
    "experiment_name": "",  # empty: medmnist-<dataset>-<date>-<time>
    "output_dir": "../runs",  # outside workspace/, which travels with the experiment
    "resume_from": "",  # a run's folder: go on from its checkpoint, in that folder (its name is the run's)
    "preview_dir": "../data",  # a local copy of the public dataset to show samples from
    "data_source": "",  # recorded in results.json; empty: "synthetic" or "medmnist" from the envoys
    "verbose": False,  # True: OpenFL's log on the page too (it always goes to the run's logs/openfl.log)
    "stem": "patch",  # above 28 px: "patch" embeds patches first (CPU speed); "full": full resolution
    "best_metric": "auc",  # the best model: the global model with the best aggregated validation AUC...
    "best_mode": "max",  # ...highest ("min" for loss)
    "min_envoys": 0.5,  # envoys lost mid-run are dropped; the run goes on while this share or number remain
    "round_timeout": 0.0,  # seconds; envoys still busy this long into a round are dropped (0: no limit)
    "max_update_ratio": MAX_UPDATE_RATIO,  # an update this many times farther from the global model than the
    "max_rejections": MAX_REJECTIONS,  # round's median is left out; rejected this many times within the last...
    "rejection_window": REJECTION_WINDOW,  # ...this many rounds: dropped
    "max_update_size": MAX_UPDATE_SIZE,  # an update is clipped to this times the global model's norm
    "min_update_cosine": MIN_UPDATE_COSINE,  # an update this far against its envoy's last one is rejected
    "wire_dtype": "float32",  # "float16", "bfloat16": each round's weight changes in half the bytes
    "secure_threshold": 0,  # secure aggregation: shares needed to unmask a round (0: more than half the envoys)
    "max_update_norm": MAX_UPDATE_NORM,  # ...and the norm each envoy clips its update to, since nobody else sees it
    "bootstrap": RESAMPLES,  # the test's 95 % intervals: bootstrap resamples on each envoy (0: no intervals)
    "tracking": "",  # "mlflow": the run's parameters, metrics and files also go to MLflow (medfl.researcher.tracking)
    "tracking_uri": "",  # MLflow's store; empty: the folder mlruns beside the runs (browse: mlflow ui)
    "tracking_parent": "",  # an MLflow run this one goes under (make compare's)
    "evaluate_model": "",  # a saved state_dict: section 9 tests it on every envoy (make evaluate model=...)
    "evaluate_split": "test",  # ...on their "test" or "val" split
}
# The federation's rules: the keys of `run` that the director's aggregator (medfl.aggregator.SelectingAggregator)
# takes as its settings, from the plan that the notebook's start cell writes.
RULES = ("best_metric", "best_mode", "min_envoys", "round_timeout", "max_update_ratio", "max_rejections",
         "rejection_window", "max_update_size", "min_update_cosine")
# The keys of `run` that shape the experiment, the rules among them: a researcher chooses them (make demo takes each
# by name), and results.json records them with the parameters. The others say where it runs and where results go.
RUN_CHOICES = ("stem", *RULES, "wire_dtype", "secure_threshold", "max_update_norm", "bootstrap")
# Each dict parameter's defaults.
DICTS = {"algorithm_options": ALGORITHM_OPTIONS, "dp_options": DP_OPTIONS, "run": RUN}


class NotebookError(RuntimeError):
    """An error the notebook shows as its one-line message, without a traceback (IPython's hook)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ParameterError(NotebookError, ValueError):
    """A notebook parameter or dataset choice that cannot work; the message says what to change."""


def training_parameters(namespace: dict) -> dict:
    """What results.json records of a run's parameters: all but the connection and bookkeeping in `run`."""
    kept = {name: namespace[name] for name in DEFAULTS if name != "run"}
    return {**kept, **{name: namespace["run"][name] for name in RUN_CHOICES}}


def completed(name: str, given) -> dict:
    """Dict parameter `name` with its defaults filled in; ParameterError for a key it does not have."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ParameterError(f"{name}={given!r}: give a dict, e.g. {{}} for the defaults")
    unknown = sorted(set(given) - set(DICTS[name]))
    if unknown:
        raise ParameterError(f"{name} has no {', '.join(map(repr, unknown))}: its keys are "
                             f"{', '.join(DICTS[name])}")
    return {**DICTS[name], **given}


def _whole(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name}={value!r}: it must be a whole number of at least 1")


def check_parameters(*, dataset, size, rounds, epochs, train_batch_size, eval_batch_size, learning_rate,
                     algorithm=DEFAULTS["algorithm"], algorithm_options=None,
                     personalize_epochs=DEFAULTS["personalize_epochs"], device=DEFAULTS["device"],
                     bf16=DEFAULTS["bf16"], dp=DEFAULTS["dp"], dp_options=None,
                     secure_aggregation=DEFAULTS["secure_aggregation"], seed=DEFAULTS["seed"], run=None,
                     **_) -> tuple[dict, dict, dict]:
    """Refuse impossible parameters before anything is submitted, one clear line each; return algorithm_options,
    dp_options and run, each complete with its defaults."""
    algorithm_options, dp_options, run = (completed(name, value) for name, value in
                                          (("algorithm_options", algorithm_options), ("dp_options", dp_options),
                                           ("run", run)))
    if dataset not in FLAGS:
        raise ParameterError(f"dataset={dataset!r} is not a MedMNIST 2D dataset: use one of {', '.join(FLAGS)}")
    if size not in SIZES:
        raise ParameterError(f"size={size!r} is not a MedMNIST size: use 28, 64, 128 or 224")
    for name, value in (("rounds", rounds), ("epochs", epochs), ("train_batch_size", train_batch_size),
                        ("eval_batch_size", eval_batch_size)):
        _whole(name, value)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ParameterError(f"learning_rate={learning_rate!r}: it must be a positive number, e.g. 1e-3")
    check_algorithm(algorithm, algorithm_options, dataset)
    if isinstance(personalize_epochs, bool) or not isinstance(personalize_epochs, int) or personalize_epochs < 0:
        raise ParameterError(f"personalize_epochs={personalize_epochs!r}: give a whole number of epochs, 0 (no "
                             "per-hospital model) or more")
    if device not in REQUESTS:
        raise ParameterError(f"device={device!r}: use one of {', '.join(REQUESTS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ParameterError(f"seed={seed!r}: give a whole number")
    check_run(run)
    if dp not in (True, False):
        raise ParameterError(f"dp={dp!r}: True (DP-SGD on every envoy) or False")
    if dp:
        if algorithm == "fedbn" or algorithm_options["local_norms"]:
            what = "algorithm='fedbn'" if algorithm == "fedbn" else "local_norms=True"
            raise ParameterError(f"{what} with dp=True: FedBN keeps each envoy's BatchNorm layers, and DP-SGD's "
                                 "network has GroupNorm instead (BatchNorm mixes the images of a batch): use fedavg "
                                 "or fedprox with dp, without local_norms")
        if bf16:
            raise ParameterError("dp=True with bf16=True: DP-SGD's per-sample gradients run in float32; "
                                 "set bf16 = False")
        try:
            DPSGD(**dp_options, rounds=rounds, epochs_per_round=epochs)
        except (PrivacyError, TypeError) as exc:
            raise ParameterError(str(exc)) from None
    check_secure(secure_aggregation, algorithm, run)
    return algorithm_options, dp_options, run


def check_secure(secure_aggregation, algorithm: str, run: dict) -> None:
    """Refuse secure aggregation where it cannot work, in one line."""
    from security.secagg import LARGEST_BOUND

    if secure_aggregation not in (True, False):
        raise ParameterError(f"secure_aggregation={secure_aggregation!r}: True (the director sees only the envoys' "
                             "sum) or False")
    threshold, bound = run["secure_threshold"], run["max_update_norm"]
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold == 1 or threshold < 0:
        raise ParameterError(f"secure_threshold={threshold!r}: give the number of envoys whose shares unmask a "
                             "round, at least 2 (0: more than half of them)")
    if not _number(bound) or not 0 < bound <= LARGEST_BOUND:
        raise ParameterError(f"max_update_norm={bound!r}: give a positive number up to {LARGEST_BOUND:.0f} (the "
                             "norm each envoy clips its update to under secure aggregation)")
    if not secure_aggregation:
        return
    if algorithm in ("median", "geomedian"):
        raise ParameterError(f"algorithm={algorithm!r} needs each envoy's update, which secure aggregation hides "
                             "from the director: use fedavg, fedprox, fedntd or a FedOpt algorithm, or "
                             "secure_aggregation = False")
    if run["wire_dtype"] != "float32":
        raise ParameterError(f"secure_aggregation with wire_dtype={run['wire_dtype']!r}: masked updates travel as "
                             "64-bit ring elements, not as half-precision changes; use wire_dtype \"float32\"")


def check_run(run: dict) -> None:
    """Refuse a `run` entry that cannot work (the dict complete, as completed() returns it)."""
    if run["stem"] not in STEMS:
        raise ParameterError(f"stem={run['stem']!r}: use \"patch\" (a patch embedding: every size costs about what "
                             "28 px costs) or \"full\" (the plain network at full resolution, for accelerators)")
    if run["best_metric"] not in ("auc", "acc", "loss") or run["best_mode"] not in ("max", "min"):
        raise ParameterError(f"best_metric={run['best_metric']!r}, best_mode={run['best_mode']!r}: use auc, acc or "
                             "loss, with max or min")
    try:
        quorum(run["min_envoys"], 1)
    except ValueError as exc:
        raise ParameterError(f"min_envoys={run['min_envoys']!r}: {exc}") from None
    timeout = run["round_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ParameterError(f"round_timeout={timeout!r}: give seconds (0 for no limit)")
    try:
        check_settings(run["max_update_ratio"], run["max_rejections"], run["rejection_window"], run["max_update_size"],
                       run["min_update_cosine"])
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
    if run["wire_dtype"] not in WIRE_DTYPES:
        raise ParameterError(f"wire_dtype={run['wire_dtype']!r}: use \"float32\" (the weights, lossless), or "
                             "\"float16\" or \"bfloat16\" (their change each round, in half the bytes)")
    if not isinstance(run["resume_from"], str):
        raise ParameterError(f"resume_from={run['resume_from']!r}: give a run's folder, e.g. \"../runs/<id>\", "
                             "or \"\" to start a new run")
    port = run["director_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ParameterError(f"director_port={port!r}: give the director's TCP port, e.g. 50051")
    check_certificates(run["ca_cert"], run["api_cert"], run["api_key"])
    resamples = run["bootstrap"]
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not (resamples == 0 or resamples >= 100):
        raise ParameterError(f"bootstrap={resamples!r}: give the number of resamples for the test's intervals, at "
                             f"least 100 (default {RESAMPLES}), or 0 for none")
    if run["tracking"] not in ("", "mlflow"):
        raise ParameterError(f"tracking={run['tracking']!r}: use \"mlflow\" (the run also goes to MLflow) or \"\"")
    if run["evaluate_split"] not in ("test", "val"):
        raise ParameterError(f"evaluate_split={run['evaluate_split']!r}: use \"test\" or \"val\"")
    if not isinstance(run["evaluate_model"], str):
        raise ParameterError(f"evaluate_model={run['evaluate_model']!r}: give the path of a saved state_dict, e.g. "
                             "\"../runs/latest/best_model.pt\"")


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value


def check_algorithm(algorithm, options: dict | None = None, dataset=None) -> None:
    """Refuse an unknown algorithm, settings it cannot run with, or (given) a dataset it cannot train, in one line."""
    options = completed("algorithm_options", options)
    if algorithm not in ALGORITHMS:
        raise ParameterError(f"algorithm={algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    mu, ntd_beta, ntd_tau = options["mu"], options["ntd_beta"], options["ntd_tau"]
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
    if options["local_norms"] not in (True, False):
        raise ParameterError(f"local_norms={options['local_norms']!r}: True (each envoy keeps its BatchNorm layers, "
                             "as FedBN does) or False")
    server_learning_rate = options["server_learning_rate"]
    if server_learning_rate is not None and (not _number(server_learning_rate) or not server_learning_rate > 0):
        raise ParameterError(f"server_learning_rate={server_learning_rate!r}: it must be a positive number, or None "
                             "for the FedOpt paper's choice")
    for name in ("server_beta1", "server_beta2"):
        if not _number(options[name]) or not 0 <= options[name] < 1:
            raise ParameterError(f"{name}={options[name]!r}: it must be at least 0 and below 1, e.g. 0.9")
    if not _number(options["server_tau"]) or not options["server_tau"] > 0:
        raise ParameterError(f"server_tau={options['server_tau']!r}: it must be a positive number, e.g. 1e-3")


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
