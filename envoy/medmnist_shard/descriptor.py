"""OpenFL shard descriptor that serves one node's share of a MedMNIST 2D dataset."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from openfl.interface.interactive_api.shard_descriptor import ShardDataset, ShardDescriptor

from .files import ensure_file, inspect, load_images, load_labels
from .partition import label_histogram, make_shards, parse_rank_worldsize
from .spec import SPLITS, DataError, check_flag, check_size, info, sample_shape, target_shape
from .synthetic import is_synthetic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSetup:
    """A checked shard: the file exists and is well formed, and this node's samples are chosen."""

    flag: str
    size: int
    path: Path
    rank: int
    world_size: int
    partition: str
    alpha: float
    seed: int
    synthetic: bool
    indices: dict  # split -> this node's sample indices within MedMNIST's split
    labels: dict  # split -> this node's labels, int64 (N, label width)

    def summary(self) -> dict:
        """What the node serves, in a form the notebook can read back from the director."""
        n_classes = len(info(self.flag)["label"])
        skew = f", alpha {self.alpha}" if self.partition == "dirichlet" else ""
        sizes = ", ".join(f"{s} {len(self.indices[s])}" for s in SPLITS)
        origin = "SYNTHETIC data" if self.synthetic else "MedMNIST data"
        return {
            "text": (f"{self.flag} {self.size}px, shard {self.rank}/{self.world_size} ({self.partition}{skew}): "
                     f"{sizes}; {origin} from {self.path.name}"),
            "flag": self.flag, "size": self.size, "rank": self.rank, "world_size": self.world_size,
            "partition": self.partition, "alpha": self.alpha, "seed": self.seed, "synthetic": self.synthetic,
            "samples": {s: len(self.indices[s]) for s in SPLITS},
            "label_histogram": {s: label_histogram(self.labels[s], n_classes) for s in SPLITS},
        }


def prepare(flag="bloodmnist", size=28, data_dir="data", rank_worldsize="1,1", partition="iid", alpha=0.5,
            seed=0, download=True) -> ShardSetup:
    """Check a shard configuration and choose its samples, reading labels but no pixels.

    Downloads the file first if it is missing and `download` is true.
    """
    flag, size = check_flag(flag), check_size(size)
    rank, world_size = parse_rank_worldsize(rank_worldsize)
    try:
        seed, alpha = int(seed), float(alpha)
    except (TypeError, ValueError):
        raise DataError(f"seed {seed!r} must be an integer and alpha {alpha!r} a number") from None
    path = ensure_file(flag, size, Path(data_dir), allow_download=bool(download))
    inspect(path, flag, size)
    labels = {split: load_labels(path, split, flag) for split in SPLITS}
    mine = {split: shards[rank - 1] for split, shards in
            make_shards(labels, world_size, partition, alpha, seed).items()}
    return ShardSetup(flag, size, path, rank, world_size, partition, alpha, seed, is_synthetic(path), mine,
                      {split: labels[split][mine[split]] for split in SPLITS})


class MedMNISTShardDataset(ShardDataset):
    """One split of one shard: uint8 images (N, H, W, C) and integer label rows, indexable in batches."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        # An int gives one sample; a list or array of indices gives a whole batch in one copy.
        return self.images[index], self.labels[index]


class MedMNISTShardDescriptor(ShardDescriptor):
    """Serves `train`, `val` and `test`: this node's share of each of MedMNIST's own splits."""

    def __init__(self, flag="bloodmnist", size=28, data_dir="data", rank_worldsize="1,1",
                 partition="iid", alpha=0.5, seed=0, download=True):
        self.setup = prepare(flag, size, data_dir, rank_worldsize, partition, alpha, seed, download)
        self._datasets = {}
        for split in SPLITS:
            # Fancy indexing copies just this shard, so the full split is freed on return.
            images = load_images(self.setup.path, split)[self.setup.indices[split]]
            self._datasets[split] = MedMNISTShardDataset(images, self.setup.labels[split])
        logger.info("Serving %s", self.setup.summary()["text"])

    def get_dataset(self, dataset_type: str = "train") -> MedMNISTShardDataset:
        """The shard's `train`, `val` or `test` split."""
        if dataset_type not in self._datasets:
            raise ValueError(f"unknown split {dataset_type!r}: choose one of {', '.join(SPLITS)}")
        return self._datasets[dataset_type]

    @property
    def sample_shape(self) -> list[str]:
        return [str(d) for d in sample_shape(self.setup.flag, self.setup.size)]

    @property
    def target_shape(self) -> list[str]:
        return [str(d) for d in target_shape(self.setup.flag)]

    @property
    def dataset_description(self) -> str:
        """JSON (see ShardSetup.summary): the director shows it, the notebook parses it."""
        return json.dumps(self.setup.summary())
