"""Where an envoy trains, and the step barrier that accelerators with graph capture need."""
from __future__ import annotations

from collections.abc import Callable

import torch

REQUESTS = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """A node cannot provide the device that the experiment asked for."""


def pick_device(request: str = "auto", assigned: str = "cpu", node: str = "this node") -> torch.device:
    """Resolve the notebook's device request against this node's hardware.

    `assigned` is what OpenFL hands the task: 'cpu', or 'cuda:N' when the experiment uses the
    CUDA_PREFERRED policy and the envoy lists `cuda_devices`. `auto` takes CUDA when present.
    """
    if request not in REQUESTS:
        raise DeviceError(f"unknown device {request!r}: choose one of {', '.join(REQUESTS)}")
    if request == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device(assigned if assigned.startswith("cuda") else "cuda")
    if request == "cuda":
        raise DeviceError(f"{node} has no CUDA device, but the experiment asked for device='cuda'")
    return torch.device("cpu")


def step_barrier(device: torch.device) -> Callable[[], None]:
    """A call to make after backward, after optimizer.step and per evaluation batch.

    A no-op on CPU and CUDA; the hook where a lazily executing device flushes its graph.
    """
    return _no_op


def _no_op() -> None:
    pass
