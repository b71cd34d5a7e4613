"""Where an envoy trains (CPU, CUDA or Habana Gaudi HPU), and the step barrier lazy HPUs need: what the tasks call
(to_device, step_barrier) and what they build on.

Each envoy resolves the notebook's device request against its own hardware when a task runs, so
the notebook's machine needs no accelerator. Habana's modules are imported only when present.
"""
from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Callable

import torch

REQUESTS = ("auto", "cpu", "cuda", "hpu")


class DeviceError(RuntimeError):
    """A node cannot provide the device that the experiment asked for."""


def node_name() -> str:
    """The envoy's name (start_envoy.sh exports it), else the host name."""
    return os.environ.get("ENVOY_NAME") or socket.gethostname()


def hpu_available() -> bool:
    """True if Habana's PyTorch bridge is installed and sees a Gaudi device."""
    if importlib.util.find_spec("habana_frameworks") is None:
        return False
    import habana_frameworks.torch.core  # noqa: F401  registers the hpu device with torch

    return bool(getattr(torch, "hpu", None) and torch.hpu.is_available())


def pick_device(request: str = "auto", assigned: str = "cpu") -> torch.device:
    """Resolve a device request on this node: `auto` takes HPU, then CUDA, then CPU.

    `assigned` is what OpenFL hands the task: 'cpu', or 'cuda:N' when the experiment uses the
    CUDA_PREFERRED policy and the envoy config lists `cuda_devices`.
    """
    if request not in REQUESTS:
        raise DeviceError(f"unknown device {request!r}: choose one of {', '.join(REQUESTS)}")
    if request == "cpu":
        return torch.device("cpu")
    if request in ("auto", "hpu") and hpu_available():
        return torch.device("hpu")
    if request in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(assigned if assigned.startswith("cuda") else "cuda")
    if request != "auto":
        raise DeviceError(f"envoy {node_name()} has no {request.upper()} device, but the experiment "
                          f"asked for device={request!r}: use 'auto' or run this envoy where it has one")
    return torch.device("cpu")


def to_device(model, request: str = "auto", assigned: str = "cpu", optimizer=None) -> torch.device:
    """Move the model to the device this node resolves `request` to (pick_device), point the optimizer, if given,
    at the parameters there (bind_optimizer), and return that device."""
    device = pick_device(request, assigned)
    model.to(device)
    if optimizer is not None:
        bind_optimizer(optimizer, model)
    return device


def bind_optimizer(optimizer, model) -> None:
    """Point the optimizer at the model's parameters. The optimizer was built in the notebook, on CPU;
    moving the model keeps its parameter objects on CPU and CUDA, but a backend that replaces them
    (Habana asks to move the model before building the optimizer) would leave the optimizer behind."""
    params = list(model.parameters())
    if [id(p) for group in optimizer.param_groups for p in group["params"]] != [id(p) for p in params]:
        for group in optimizer.param_groups:
            count = len(group["params"])
            group["params"], params = params[:count], params[count:]


def step_barrier(device: torch.device) -> Callable[[], None]:
    """What to call after backward, after optimizer.step and per evaluation batch.

    On HPU, Habana's mark_step: in lazy mode it runs the graph built so far (in eager mode, the
    default since Intel Gaudi 1.21, it returns at once). Elsewhere a no-op.
    """
    if device.type == "hpu":
        import habana_frameworks.torch.core as htcore

        return htcore.mark_step
    return _no_op


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on HPU and CUDA when asked; a disabled context elsewhere."""
    enabled = bf16 and device.type in ("hpu", "cuda")
    return torch.autocast(device_type=device.type if enabled else "cpu", dtype=torch.bfloat16, enabled=enabled)


def _no_op() -> None:
    pass
