"""The CNN of MedMNIST's tutorial, sized for any flag and image size.

The notebook's model cell shows conv_block and Net as written here (tools/notebooks.py copies them), so the
baseline, the benchmark and the tests train the very network the notebook defines.
"""
from __future__ import annotations

import medmnist
import torch
from torch import nn

MULTI_LABEL = "multi-label, binary-class"
# The 12 2D datasets; INFO also describes the 3D ones, whose flags end in "3d".
FLAGS = tuple(flag for flag in medmnist.INFO if not flag.endswith("3d"))
SIZES = (28, 64, 128, 224)  # the image sizes MedMNIST publishes
STEMS = ("patch", "full")  # how Net meets images above 28 px: a patch embedding, or the plain network
NORMS = ("batch", "group")  # BatchNorm, or GroupNorm where BatchNorm cannot be used (DP-SGD)


def norm_layer(channels: int, norm: str = "batch") -> nn.Module:
    """BatchNorm, or GroupNorm in groups of up to 8 channels: DP-SGD needs each sample's gradient on its own, and
    BatchNorm mixes the samples of a batch."""
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(max(1, channels // 8), channels)


def conv_block(c_in: int, c_out: int, pool: bool = False, padding: int = 0, norm: str = "batch") -> nn.Sequential:
    """A 3x3 convolution, normalization and ReLU, then optionally a 2x2 max pool."""
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=padding), norm_layer(c_out, norm), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class Net(nn.Module):
    """Five 3x3 conv blocks with BatchNorm (GroupNorm with norm="group"), then three fully connected layers.

    With stem="patch", above 28 px a learned patch embedding (a conv with kernel and stride size // 28) first
    brings the image down to 28-32 px with 16 channels, so every size costs about what 28 px costs: on CPU the
    plain network at 224 px needs ~150x the compute and ~45 MB of activations per image. stem="full" runs the
    plain network at full resolution, for accelerators.
    """

    def __init__(self, in_channels: int, num_classes: int, size: int = 28, stem: str = "patch", norm: str = "batch"):
        super().__init__()
        patch = size // 28 if stem == "patch" else 1
        embedding = [] if patch == 1 else [nn.Conv2d(in_channels, 16, kernel_size=patch, stride=patch),
                                           norm_layer(16, norm), nn.ReLU()]
        self.features = nn.Sequential(
            *embedding,
            conv_block(in_channels if patch == 1 else 16, 16, norm=norm),
            conv_block(16, 16, pool=True, norm=norm),
            conv_block(16, 64, norm=norm),
            conv_block(64, 64, norm=norm),
            conv_block(64, 64, pool=True, padding=1, norm=norm),
            # 28 px images leave exactly 4x4 here; larger ones are pooled down to it, so the
            # classifier (and the weights that travel each round) stay the same size at 224 px.
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
            nn.Linear(128, 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def task_type(flag: str) -> str:
    """MedMNIST's task type for a flag, e.g. 'multi-class' or 'multi-label, binary-class'."""
    if flag not in FLAGS:
        raise ValueError(f"unknown MedMNIST 2D dataset {flag!r}: choose one of {', '.join(FLAGS)}")
    return medmnist.INFO[flag]["task"]


def build_model(flag: str, size: int = 28, stem: str = "patch", norm: str = "batch") -> Net:
    """The network for a MedMNIST flag: input channels and outputs from medmnist.INFO.

    Load trained weights with (the stem the run used, in its results.json's params):
        model = build_model("bloodmnist", 28)
        model.load_state_dict(torch.load("runs/latest/best_model.pt"))
        model.eval()
    """
    if size not in SIZES:
        raise ValueError(f"unsupported image size {size}: MedMNIST has 28, 64, 128 and 224")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}: use {' or '.join(STEMS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use {' or '.join(NORMS)}")
    task_type(flag)  # rejects unknown flags with a clear message
    meta = medmnist.INFO[flag]
    return Net(meta["n_channels"], len(meta["label"]), size, stem, norm)
