"""The federated tasks: local training and evaluation, for every MedMNIST task type.

The notebook's task cells show train and validate as written here, under TaskInterface's decorators
(tools/notebooks.py copies them); build_tasks registers them the same way for the baseline, benchmark and tests.
"""
from __future__ import annotations

import time

import torch
from openfl.interface.interactive_api.experiment import TaskInterface

from .checks import check_trained
from .data import to_float_chw
from .device import REQUESTS, autocast, bind_optimizer, pick_device, step_barrier
from .metrics import evaluate, loss_fn, loss_target, scores
from .model import task_type


def train(model, train_loader, optimizer, device, task: str, epochs: int = 1, device_request: str = "auto",
          bf16: bool = False, privacy=None, distill=None):
    """Train for `epochs` passes over the shard; report the last pass's mean loss per sample and the time, and
    with DP-SGD (`privacy`, a medfl.privacy.DPSGD) the privacy this envoy has spent so far. `distill` adds a loss
    term from this round's global model (FedNTD: a medfl.algorithms.NotTrueDistillation)."""
    started = time.perf_counter()
    dev = pick_device(device_request, str(device))
    model.to(dev)
    bind_optimizer(optimizer, model)
    model.train()
    # OpenFL 1.6's RESET treatment hands back the same optimizer object every round, so its
    # moments would carry over; FedAvg starts each round's local training from a clean state.
    optimizer.state.clear()
    if hasattr(optimizer, "set_old_weights"):
        # FedProx: the proximal term pulls the local weights towards this round's global model, which the model
        # holds now. (OpenFL's FedProxAdam pairs them by position among the parameters that got a gradient: every
        # parameter of Net gets one.)
        optimizer.set_old_weights([p.detach().clone() for p in model.parameters()])
    if distill is not None:  # FedNTD: a frozen copy of this round's global model teaches the not-true classes
        distill.start(model)
    if privacy is not None:  # DP-SGD: Poisson batches; each sample's gradient clipped, noise added to their sum
        model, optimizer, train_loader = privacy.attach(model, optimizer, train_loader)
    criterion, barrier = loss_fn(task), step_barrier(dev)
    for _ in range(epochs):
        loss_sum, seen = torch.zeros((), device=dev), 0
        for images, labels in train_loader:
            # Pinned batches (CUDA) copy while the device works; uint8 crosses the bus, floats are made there.
            x = to_float_chw(images.to(dev, non_blocking=True))
            y = loss_target(task, labels.to(dev, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            with autocast(dev, bf16):
                logits = model(x)
                loss = fit = criterion(logits, y)  # fit: the loss train_loss reports, whatever the algorithm
                if distill is not None:
                    loss = fit + distill(logits, x, y)
            loss.backward()
            barrier()
            optimizer.step()
            barrier()
            loss_sum += fit.detach() * len(x)  # stays on the device: no sync per step
            seen += len(x)
    train_loss = loss_sum.item() / max(seen, 1)  # .item() waits for the device, so the time is honest
    check_trained(model)  # weights that diverged to NaN or infinity stop here, naming this envoy, and are not sent
    if distill is not None:
        distill.stop()
    spent = {}
    if privacy is not None:
        privacy.detach()
        spent = privacy.commit()  # epsilon at delta, over every round of the run so far (kept on this envoy)
    return {"train_loss": train_loss, **spent, "train_seconds": time.perf_counter() - started}


@torch.no_grad()
def validate(model, val_loader, device, task: str, device_request: str = "auto", bf16: bool = False):
    """Mean loss, ACC and AUC of the model on the shard's evaluation split, and the time it took."""
    started = time.perf_counter()
    dev = pick_device(device_request, str(device))
    model.to(dev)
    model.eval()
    criterion, barrier = loss_fn(task), step_barrier(dev)
    loss_sum, all_scores, all_labels = torch.zeros((), device=dev), [], []
    for images, labels in val_loader:
        with autocast(dev, bf16):
            logits = model(to_float_chw(images.to(dev, non_blocking=True))).float()
        loss_sum += criterion(logits, loss_target(task, labels.to(dev, non_blocking=True))) * len(images)
        barrier()
        all_scores.append(scores(task, logits))  # kept on the device: one copy back at the end, not one per batch
        all_labels.append(labels)
    y_score, y_true = torch.cat(all_scores).cpu().numpy(), torch.cat(all_labels).numpy()
    return {"loss": loss_sum.item() / len(y_true), **evaluate(task, y_true, y_score),
            "seconds": time.perf_counter() - started}


def build_tasks(flag: str, epochs_per_round: int = 1, device: str = "auto", bf16: bool = False,
                privacy=None, aggregation=None, distill=None) -> TaskInterface:
    """Register train and validate for a flag's task type, as OpenFL's TaskInterface.

    `device` is resolved on each envoy (see medfl.device); `bf16` autocasts on HPU and CUDA; `aggregation` is how
    the director combines the trained weights (medfl.algorithms.aggregation_function), OpenFL's weighted mean if None;
    `distill` is FedNTD's loss term (medfl.algorithms.NotTrueDistillation), or None.
    """
    if not isinstance(epochs_per_round, int) or epochs_per_round < 1:
        raise ValueError(f"epochs_per_round must be a positive integer, not {epochs_per_round!r}")
    task = task_type(flag)
    tasks = TaskInterface()
    if device not in REQUESTS:  # refused here rather than on every node
        raise ValueError(f"device must be one of {', '.join(REQUESTS)}, not {device!r}")
    if aggregation is not None:
        tasks.set_aggregation_function(aggregation)(train)
    tasks.add_kwargs(task=task, epochs=epochs_per_round, device_request=device, bf16=bf16, privacy=privacy,
                    distill=distill)(train)
    tasks.register_fl_task(model="model", data_loader="train_loader", device="device", optimizer="optimizer")(train)
    tasks.add_kwargs(task=task, device_request=device, bf16=bf16)(validate)
    tasks.register_fl_task(model="model", data_loader="val_loader", device="device")(validate)
    return tasks
