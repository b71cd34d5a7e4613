"""Federated MedMNIST 2D: model, data interface, tasks, metrics and device helper.

This package sits beside the notebooks and travels with every experiment (OpenFL zips the
notebook's folder), so the envoys run exactly this code.
"""
# Every submodule is imported here: an envoy keeps the package cached between experiments while
# the folder it came from is deleted, so a submodule first imported later would not be found.
from . import data, device, metrics, model, run, tasks
from .data import MedMNISTData, batch_loader, to_float_chw
from .device import pick_device, step_barrier
from .metrics import evaluate, loss_fn
from .model import Net, build_model, task_type
from .tasks import build_tasks, train, validate

__all__ = [
    "MedMNISTData", "Net", "batch_loader", "build_model", "build_tasks", "data", "device", "evaluate",
    "loss_fn", "metrics", "model", "pick_device", "run", "step_barrier", "task_type", "tasks",
    "to_float_chw", "train", "validate",
]
