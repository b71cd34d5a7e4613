"""Model shapes for every flag and size, losses per task type, and metrics against medmnist's evaluator."""
import medmnist
import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC

from medfl import MedMNISTData, build_model, to_float_chw, validate
from medfl.metrics import evaluate
from medmnist_shard import FLAGS, SIZES, MedMNISTShardDataset


@pytest.mark.parametrize("flag", FLAGS)
def test_model_output_per_flag_and_size(flag):
    meta = medmnist.INFO[flag]
    for size in SIZES:
        model = build_model(flag, size).eval()
        x = torch.zeros(2, meta["n_channels"], size, size)
        assert model(x).shape == (2, len(meta["label"]))


def test_28px_is_the_tutorial_network_and_larger_sizes_add_only_a_stem():
    plain = build_model("bloodmnist", 28)
    assert sum(p.numel() for p in plain.parameters()) == 235_096  # 5 conv blocks + 3 FC layers, no stem
    for size, patch in ((64, 2), (128, 4), (224, 8)):
        stem = build_model("bloodmnist", size).features[0]
        assert stem.kernel_size == (patch, patch) and stem.stride == (patch, patch)


def test_build_model_rejects_bad_flag_and_size():
    with pytest.raises(ValueError, match="unknown MedMNIST 2D dataset 'organmnist3d'"):
        build_model("organmnist3d", 28)
    with pytest.raises(ValueError, match="unsupported image size 32"):
        build_model("bloodmnist", 32)


def test_to_float_chw_matches_totensor_then_normalize():
    images = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # (1, H=1, W=1, C=3)
    out = to_float_chw(images)
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32
    expected = (torch.tensor([0, 128, 255]) / 255.0 - 0.5) / 0.5
    assert torch.allclose(out.flatten(), expected)


@pytest.mark.parametrize("flag,loss", [("chestmnist", torch.nn.BCEWithLogitsLoss),
                                       ("bloodmnist", torch.nn.CrossEntropyLoss),
                                       ("pneumoniamnist", torch.nn.CrossEntropyLoss),
                                       ("retinamnist", torch.nn.CrossEntropyLoss)])
def test_loss_per_task_type(flag, loss):
    from test_tasks import loss_fn  # the reference the tasks are held to, bit for bit

    assert isinstance(loss_fn(medmnist.INFO[flag]["task"]), loss)


class Oracle(torch.nn.Module):
    """Returns fixed logits for each sample; the sample's index is encoded in its first pixel."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, x):
        index = torch.round((x[:, 0, 0, 0] + 1) * 127.5).long()
        return self.logits[index]


def _multi_label_case(n=16, width=14, flips=5):
    labels = np.random.default_rng(0).integers(0, 2, (n, width))
    labels[0], labels[1] = 0, 1  # every finding has positives and negatives
    logits = np.where(labels == 1, 2.0, -2.0)
    logits.flat[[3, 40, 77, 100, 200][:flips]] *= -1
    return labels, logits, 1 - flips / (n * width)


# Labels and logits with a known answer per task type: (flag, labels, logits, expected ACC).
CASES = {
    "multi-class": ("bloodmnist", [[0], [1], [2], [3], [4], [5], [6], [7]],
                    np.eye(8)[[0, 1, 2, 0, 0, 5, 6, 1]] * 3 + np.linspace(0, 1, 8), 5 / 8),
    "binary-class": ("pneumoniamnist", [[0], [1], [1], [0], [1]],
                     [[2, 0], [0, 2], [2, 0], [0, 2], [0, 3]], 3 / 5),
    "ordinal-regression": ("retinamnist", [[0], [1], [2], [3], [4]],
                           np.eye(5)[[0, 1, 2, 4, 4]] * 2, 4 / 5),
    "multi-label, binary-class": ("chestmnist", *_multi_label_case()),
}


@pytest.mark.parametrize("task", CASES)
def test_validate_reports_medmnists_metrics(task):
    flag, labels, logits, expected_acc = CASES[task]
    labels, logits = np.asarray(labels), np.asarray(logits, np.float32)
    assert medmnist.INFO[flag]["task"] == task
    n = len(labels)
    images = np.zeros((n, 28, 28, medmnist.INFO[flag]["n_channels"]), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    loader = _loader(images, labels, batch_size=2)  # several batches, one partial
    # About numbers, not devices: on the CPU, where the stand-in model's logits are.
    result = validate(Oracle(logits), loader, "cpu", task=task, device_request="cpu")

    torch_logits, torch_labels = torch.tensor(logits), torch.tensor(labels)
    if task.startswith("multi-label"):
        y_score = torch.sigmoid(torch_logits).numpy()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(torch_logits, torch_labels.float())
    else:
        y_score = torch.softmax(torch_logits, 1).numpy()
        loss = torch.nn.functional.cross_entropy(torch_logits, torch_labels[:, 0])
    assert result["acc"] == pytest.approx(expected_acc)
    assert result["acc"] == pytest.approx(getACC(labels, y_score, task))
    assert result["auc"] == pytest.approx(getAUC(labels, y_score, task))
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert 0 <= result["acc"] <= 1 and 0 <= result["auc"] <= 1


def _loader(images, labels, batch_size):
    data = MedMNISTData(eval_batch_size=batch_size, device="cpu")

    class Shard:
        def get_dataset(self, split):
            return MedMNISTShardDataset(images, labels)

    data.shard_descriptor = Shard()
    return data.get_valid_loader()


def test_auc_is_averaged_over_classes_present_when_a_shard_lacks_one():
    labels = np.array([[0], [0], [1], [1]])  # no class 2 in this split
    scores = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    result = evaluate("multi-class", labels, scores)
    assert result["acc"] == 1.0 and result["auc"] == pytest.approx(1.0)
    binary = evaluate("binary-class", np.array([[1], [1]]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert np.isnan(binary["auc"]) and binary["acc"] == 0.5
