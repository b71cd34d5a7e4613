"""Federated MedMNIST 2D: what runs on the nodes (model, data interface, tasks, metrics, device, federated
algorithms, and the aggregator the director builds from the plan: medfl.aggregator, which this does not import).

This package sits beside the notebooks and travels with every experiment (OpenFL zips the notebook's code), so the
director and the envoys run exactly this code. `medfl.researcher` runs only beside the notebook (parameter checks,
submitting and following experiments, reports); the nodes never import it.
"""
from .algorithms import ALGORITHMS, NotTrueDistillation, aggregation_function
from .data import MedMNISTData, batch_loader, loader_settings, to_float_chw
from .device import autocast, bind_optimizer, pick_device, step_barrier
from .metrics import evaluate
from .model import FLAGS, SIZES, Net, build_model, conv_block, norm_layer, task_type
from .privacy import DPSGD
from .schedule import Schedule
from .selection import Best
from .tasks import build_tasks, train, validate

__all__ = [
    "ALGORITHMS", "DPSGD", "FLAGS", "SIZES", "Best", "MedMNISTData", "Net", "NotTrueDistillation", "Schedule",
    "aggregation_function", "autocast", "batch_loader", "bind_optimizer", "build_model",
    "build_tasks", "conv_block",
    "evaluate", "loader_settings", "norm_layer", "pick_device", "step_barrier",
    "task_type", "to_float_chw", "train", "validate",
]
