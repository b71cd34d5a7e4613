"""Federated MedMNIST 2D: model, data interface, tasks, metrics, device helper and run plumbing.

This package sits beside the notebooks and travels with every experiment (OpenFL zips the
notebook's folder), so the director and envoys run exactly this code.
"""
# Every submodule is imported here: a node keeps the package cached between experiments while
# the folder it came from is deleted, so a submodule first imported later would not be found.
from . import aggregator, data, device, metrics, model, report, run, tasks
from .aggregator import Best
from .data import MedMNISTData, batch_loader, to_float_chw
from .device import pick_device, step_barrier
from .metrics import evaluate, loss_fn
from .model import FLAGS, Net, build_model, task_type
from .tasks import build_tasks, train, validate

__all__ = [
    "FLAGS", "Best", "MedMNISTData", "Net", "aggregator", "batch_loader", "build_model", "build_tasks", "data",
    "device", "evaluate", "loss_fn", "metrics", "model", "pick_device", "report", "run", "step_barrier",
    "task_type", "tasks", "to_float_chw", "train", "validate",
]
