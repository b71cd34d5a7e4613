"""One process, no federation: the tasks train and evaluate on a shard; devices resolve as documented."""
import cloudpickle
import pytest
import torch
from torch import nn

from medfl import MedMNISTData, build_model, build_tasks, task_type, train, validate
from medfl.data import to_float_chw
from medfl.metrics import evaluate
from medfl.model import MULTI_LABEL
from medmnist_shard import MedMNISTShardDescriptor


# The reference the tasks are held to, as medfl defined each step before the tasks wrote them out in PyTorch.
def loss_fn(task: str) -> nn.Module:
    """BCE-with-logits for multi-label; cross-entropy for multi-class, binary and ordinal tasks."""
    return nn.BCEWithLogitsLoss() if task == MULTI_LABEL else nn.CrossEntropyLoss()


def loss_target(task: str, labels: torch.Tensor) -> torch.Tensor:
    """Labels (N, width) as the loss expects them: float rows for BCE, class indices for CE."""
    return labels.float() if task == MULTI_LABEL else labels[:, 0].long()


def scores(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities, the y_score that medmnist.evaluator expects."""
    return torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=1)


@pytest.mark.parametrize("flag", ["bloodmnist", "chestmnist", "pneumoniamnist", "retinamnist"])
def test_training_on_a_synthetic_shard_lowers_the_loss(tiny_file, flag):
    sizes = {"train": 96, "val": 48, "test": 8}
    shard = MedMNISTShardDescriptor(flag, 28, tiny_file(flag, 28, sizes).parent, "1,1")
    data = MedMNISTData(train_batch_size=16, eval_batch_size=32)
    data.shard_descriptor = shard
    assert (data.get_train_data_size(), data.get_valid_data_size()) == (96, 48)
    torch.manual_seed(0)
    model = build_model(flag, 28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    task = {"bloodmnist": "multi-class", "chestmnist": "multi-label, binary-class",
            "pneumoniamnist": "binary-class", "retinamnist": "ordinal-regression"}[flag]
    first = train(model, data.get_train_loader(), optimizer, "cpu", task=task)["train_loss"]
    for _ in range(4):
        last = train(model, data.get_train_loader(), optimizer, "cpu", task=task)["train_loss"]
    assert last < first
    result = validate(model, data.get_valid_loader(), "cpu", task=task)
    assert set(result) == {"loss", "acc", "auc", "seconds"}
    assert 0 <= result["acc"] <= 1 and 0 <= result["auc"] <= 1


def _reference_train(model, loader, optimizer, task):
    """One epoch as medfl's helpers define each step: the loss per task type, its targets, uint8 HWC to float CHW."""
    criterion, loss_sum, seen = loss_fn(task), torch.zeros(()), 0
    model.train()
    optimizer.state.clear()
    for images, labels in loader:
        x, y = to_float_chw(images), loss_target(task, labels)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(x)
        seen += len(x)
    return loss_sum.item() / seen


@torch.no_grad()
def _reference_validate(model, loader, task):
    """Evaluation as medfl's helpers define it: the loss per task type, and the scores medmnist.evaluator takes."""
    model.eval()
    criterion, loss_sum, all_scores, all_labels = loss_fn(task), torch.zeros(()), [], []
    for images, labels in loader:
        logits = model(to_float_chw(images)).float()
        loss_sum += criterion(logits, loss_target(task, labels)) * len(images)
        all_scores.append(scores(task, logits))
        all_labels.append(labels)
    y_score, y_true = torch.cat(all_scores).numpy(), torch.cat(all_labels).numpy()
    return {"loss": loss_sum.item() / len(y_true), **evaluate(task, y_true, y_score)}


@pytest.mark.parametrize("flag", ["bloodmnist", "chestmnist", "pneumoniamnist", "retinamnist"])
def test_the_tasks_compute_what_the_loss_target_and_image_helpers_define(tiny_file, flag):
    """train and validate spell the loss, its targets and the image conversion out in PyTorch: the same numbers, bit
    for bit, for every task type, colour and grayscale (chestmnist and pneumoniamnist are one-channel)."""
    shard = MedMNISTShardDescriptor(flag, 28, tiny_file(flag).parent)
    task = task_type(flag)
    results = []
    for run in ("tasks", "reference"):
        data = MedMNISTData(train_batch_size=8, eval_batch_size=16, seed=3)
        data.shard_descriptor = shard
        torch.manual_seed(0)
        model = build_model(flag, 28)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if run == "tasks":
            loss = train(model, data.get_train_loader(), optimizer, "cpu", task=task)["train_loss"]
            scored = validate(model, data.get_valid_loader(), "cpu", task=task)
        else:
            loss = _reference_train(model, data.get_train_loader(), optimizer, task)
            scored = _reference_validate(model, data.get_valid_loader(), task)
        results.append((loss, {k: scored[k] for k in ("loss", "acc", "auc")}, model.state_dict()))
    (loss, scored, weights), (expected_loss, expected, expected_weights) = results
    assert loss == expected_loss and scored["acc"] == expected["acc"] and scored["auc"] == expected["auc"]
    # validate averages each image's loss (for its bootstrap), the reference the batches' mean losses
    assert scored["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert all(torch.equal(weights[name], value) for name, value in expected_weights.items())


def test_each_round_reshuffles_but_a_seed_repeats_the_order(tiny_file):
    shard = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist").parent)

    def orders(seed):
        data = MedMNISTData(train_batch_size=24, seed=seed)
        data.shard_descriptor = shard
        return [next(iter(data.get_train_loader()))[0].sum((1, 2, 3)).tolist() for _ in range(2)]

    first, second = orders(0)
    assert first != second and orders(0) == [first, second]


def test_build_tasks_registers_train_and_validate_with_settings():
    tasks = build_tasks("chestmnist", epochs_per_round=2, device="cpu")
    assert set(tasks.get_registered_tasks()) == {"train", "locally_tuned_model_validate", "aggregated_model_validate"}
    assert tasks.task_settings["train"] == {"task": "multi-label, binary-class", "epochs": 2, "device_request": "cpu",
                                            "bf16": False, "privacy": None, "distill": None}
    # Shipped by reference to the medfl package, which travels with the experiment.
    assert b"medfl.tasks" in cloudpickle.dumps(tasks)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_build_tasks_rejects_bad_epochs(bad):
    with pytest.raises(ValueError, match="epochs_per_round must be a positive integer"):
        build_tasks("bloodmnist", epochs_per_round=bad)
