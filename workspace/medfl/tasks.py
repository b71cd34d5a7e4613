"""The federated tasks: local training and evaluation, for every MedMNIST task type.

The notebook's task cells show train and validate as written here, under TaskInterface's decorators
(tools/notebooks.py copies them); build_tasks registers them the same way for the baseline, benchmark and tests,
and personalizing makes the test run's fine-tuning tasks from them.
"""
from __future__ import annotations

import copy
import time

import torch
from openfl.interface.interactive_api.experiment import TaskInterface
from torch import nn

from .checks import check_trained
from .device import REQUESTS, step_barrier, to_device
from .metrics import evaluate
from .model import task_type


def train(model, train_loader, optimizer, device, task: str, epochs: int = 1, device_request: str = "auto",
          bf16: bool = False, privacy=None, distill=None):
    """Train for `epochs` passes over the shard; report the last pass's mean loss per sample and the time, and
    with DP-SGD (`privacy`, a medfl.privacy.DPSGD) the privacy this envoy has spent so far. `distill` adds a loss
    term from this round's global model (FedNTD: a medfl.algorithms.NotTrueDistillation)."""
    started = time.perf_counter()
    # This envoy's HPU, CUDA GPU or CPU (medfl.device), with the model and the optimizer's parameters on it
    dev = to_device(model, device_request, str(device), optimizer)
    mark_step = step_barrier(dev)  # lazy-mode Gaudi runs the graph built so far; a no-op elsewhere
    amp = bf16 and dev.type in ("hpu", "cuda")  # bfloat16 autocast; the weights stay float32
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
    multi_label = task == "multi-label, binary-class"  # ChestMNIST: each finding present or not; else one class
    criterion = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
    for _ in range(epochs):
        loss_sum, seen = torch.zeros((), device=dev), 0
        for images, labels in train_loader:
            # Pinned batches (CUDA) copy while the device works; uint8 crosses the bus, floats are made there:
            # (N, H, W, C) in 0..255 to (N, C, H, W) in [-1, 1], as ToTensor then Normalize(0.5, 0.5) would
            x = images.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
            y = labels.to(dev, non_blocking=True)
            y = y.float() if multi_label else y[:, 0].long()  # BCE takes float rows, cross-entropy class indices
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                logits = model(x)
                loss = fit = criterion(logits, y)  # fit: the loss train_loss reports, whatever the algorithm
                if distill is not None:
                    loss = fit + distill(logits, x, y)
            loss.backward()
            mark_step()
            optimizer.step()
            mark_step()
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
def validate(model, val_loader, device, task: str, device_request: str = "auto", bf16: bool = False,
             resamples: int = 0, seed: int = 0):
    """Mean loss, ACC and AUC of the model on the shard's evaluation split, and the time it took; with `resamples`
    (the test), each of them on that many bootstrap resamples of the split, for their intervals."""
    started = time.perf_counter()
    dev = to_device(model, device_request, str(device))
    mark_step = step_barrier(dev)
    amp = bf16 and dev.type in ("hpu", "cuda")
    model.eval()
    multi_label = task == "multi-label, binary-class"
    # Each image's loss (multi-label: the mean over its labels), for the mean and for its bootstrap
    criterion = nn.BCEWithLogitsLoss(reduction="none") if multi_label else nn.CrossEntropyLoss(reduction="none")
    all_losses, all_scores, all_labels = [], [], []
    for images, labels in val_loader:
        x = images.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            logits = model(x).float()
        y = labels.to(dev, non_blocking=True)
        losses = criterion(logits, y.float() if multi_label else y[:, 0].long())
        all_losses.append(losses.mean(dim=1) if multi_label else losses)
        mark_step()
        # Per-class probabilities, medmnist.evaluator's y_score; kept on the device: one copy back at the end
        all_scores.append(torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1))
        all_labels.append(labels)
    y_score, y_true = torch.cat(all_scores).cpu().numpy(), torch.cat(all_labels).numpy()
    losses = torch.cat(all_losses).cpu().numpy()
    # With resamples (the test), also loss, ACC and AUC of bootstrap resamples, for their intervals: those values
    # leave this envoy, its predictions do not
    return {"loss": float(losses.mean()), **evaluate(task, y_true, y_score, losses, resamples, seed),
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


def bootstrapping(tasks: TaskInterface, resamples: int, seed: int) -> TaskInterface:
    """A copy of `tasks` whose validate task also scores `resamples` bootstrap resamples of its split (seeded by
    `seed`), for the test's confidence intervals (docs/experiment.md); `tasks` itself if resamples is 0."""
    return _with_settings(tasks, "validate", resamples=resamples, seed=seed) if resamples else tasks


def personalizing(tasks: TaskInterface, epochs: int) -> TaskInterface:
    """A copy of `tasks` whose train task fine-tunes for `epochs` epochs on the plain loss (no DP-SGD, no
    distillation): each envoy's own model, which never leaves it (medfl.algorithms.local_plan's personalize), so that
    only its test scores do."""
    return _with_settings(tasks, "train", epochs=epochs, privacy=None, distill=None)


def _with_settings(tasks: TaskInterface, task: str, **changes) -> TaskInterface:
    """A copy of `tasks` with some of one task's add_kwargs settings changed; `tasks` stays as it is."""
    copied = copy.copy(tasks)
    copied.task_settings = copy.copy(tasks.task_settings)
    copied.task_settings[task] = {**tasks.task_settings[task], **changes}
    return copied
