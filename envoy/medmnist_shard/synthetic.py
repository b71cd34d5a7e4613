"""Synthetic MedMNIST-format files: same keys, shapes, dtypes and label layout, learnable classes.

For tests, offline machines and benchmarks. Every file carries a `synthetic` flag so that results
made from it can be labelled as such.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import write_npz
from .spec import MULTI_LABEL, SPLITS, check_size, file_name, info, n_channels

GRID = 4  # class patterns are drawn on a 4x4 grid and blown up, so every size gets the same task
SIGNAL, NOISE = 12.0, 60.0  # grey levels: pattern amplitude and per-pixel noise


def split_sizes(flag: str, scale: float = 0.1, minimum: int = 8) -> dict[str, int]:
    """MedMNIST's own split sizes for the flag, scaled down (at least `minimum` each)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    return {s: max(minimum, round(n * scale)) for s, n in info(flag)["n_samples"].items() if s in SPLITS}


def _labels(rng: np.random.Generator, flag: str, n: int) -> np.ndarray:
    meta = info(flag)
    classes = len(meta["label"])
    if meta["task"] == MULTI_LABEL:
        return (rng.random((n, classes)) < 0.25).astype(np.uint8)
    # Cycle through the classes so even a tiny split sees every class, then shuffle.
    return rng.permutation(np.arange(n) % classes).astype(np.uint8).reshape(n, 1)


def _image_blocks(rng: np.random.Generator, patterns: np.ndarray, labels: np.ndarray, multi_label: bool, size: int):
    if multi_label:
        active = labels.astype(np.float32)
        mix = active @ patterns.reshape(len(patterns), -1) / np.sqrt(np.maximum(active.sum(1, keepdims=True), 1))
    else:
        mix = patterns.reshape(len(patterns), -1)[labels[:, 0]]
    coarse = mix.reshape(len(labels), GRID, GRID, patterns.shape[-1])
    scale = size // GRID
    # A faint class pattern under strong pixel noise and a per-image brightness shift: a CNN
    # needs a few epochs to find it, so learning curves rise instead of saturating at once.
    for start in range(0, len(labels), 512):  # blocks keep memory small at 224 px: they are written as made
        block = np.repeat(np.repeat(coarse[start:start + 512], scale, axis=1), scale, axis=2)
        block = 128.0 + SIGNAL * block + rng.normal(0.0, 20.0, (len(block), 1, 1, 1))
        block += rng.normal(0.0, NOISE, block.shape)
        block = np.clip(block, 0, 255).astype(np.uint8)
        yield block[..., 0] if block.shape[-1] == 1 else block


def make_synthetic(flag: str, size: int, out_dir: Path, sizes: dict[str, int] | None = None,
                   seed: int = 0, overwrite: bool = False) -> Path:
    """Write a synthetic `{flag}[_{size}].npz` into out_dir and return its path."""
    size = check_size(size)
    meta = info(flag)
    sizes = sizes or split_sizes(flag)
    out_dir = Path(out_dir)
    target = out_dir / file_name(flag, size)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    rng = np.random.default_rng(seed)
    channels = n_channels(flag)
    patterns = rng.uniform(-1.0, 1.0, (len(meta["label"]), GRID, GRID, channels)).astype(np.float32)

    def members():
        # Lazily, in this order, so the random draws (and the data) stay those of earlier versions.
        yield "synthetic", np.array(True)
        for split in SPLITS:
            labels = _labels(rng, flag, sizes[split])
            shape = (len(labels), size, size) + ((channels,) if channels > 1 else ())  # grayscale: (N, H, W)
            blocks = _image_blocks(rng, patterns, labels, meta["task"] == MULTI_LABEL, size)
            yield f"{split}_images", (shape, np.uint8, blocks)
            yield f"{split}_labels", labels

    return write_npz(target, members())


def is_synthetic(path: Path) -> bool:
    """True if the file was written by make_synthetic."""
    with np.load(path) as npz:
        return "synthetic" in npz.files and bool(npz["synthetic"])
