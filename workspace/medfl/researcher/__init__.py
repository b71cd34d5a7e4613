"""What runs only beside the notebook: parameter checks, a look at the federation, submitting and following
experiments, and the run's report. The nodes never import this subpackage.

It needs this repository's openfl_adjustments (its notebook-side part) and security (signing experiments): `make venv`
makes the repository importable from its environment.
"""
try:
    from openfl_adjustments import client
except ImportError as exc:  # a kernel from another environment
    raise ImportError("medfl.researcher needs this repository's openfl_adjustments: run the notebook in the "
                      "environment `make venv` makes (it puts the repository on its path)") from exc
from ..tasks import bootstrapping, personalizing  # the test run's tasks; at home with the tasks, found here too
from .checkpoint import Checkpoint, Checkpointer, OpenedRun, attempt_name, load_checkpoint, open_run, restarts
from .evaluation import SavedModel
from .federation import check_dataset, check_envoys, check_quorum, envoy_table, is_synthetic, show_samples
from .follow import Followed, follow
from .logs import log_to
from .parameters import (
    DEFAULTS,
    RULES,
    RUN,
    RUN_CHOICES,
    NotebookError,
    ParameterError,
    check_algorithm,
    check_parameters,
    training_parameters,
)
from .report import ExperimentFailed, build_results, finish_run, save_run, stop_if_failed, test_rows, with_interval
from .submit import submission

client.install()

__all__ = [
    "DEFAULTS", "RULES", "RUN", "RUN_CHOICES", "Checkpoint", "Checkpointer", "ExperimentFailed", "Followed",
    "NotebookError", "OpenedRun", "ParameterError", "attempt_name", "bootstrapping", "build_results", "check_algorithm",
    "check_dataset", "check_envoys", "check_parameters", "check_quorum", "envoy_table", "finish_run", "follow",
    "is_synthetic", "load_checkpoint", "log_to", "open_run", "personalizing", "restarts", "save_run",
    "SavedModel", "show_samples", "stop_if_failed", "submission", "test_rows", "training_parameters", "with_interval",
]
