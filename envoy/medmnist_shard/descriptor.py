"""OpenFL shard descriptor that serves one node's share of a MedMNIST 2D dataset."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from openfl.interface.interactive_api.shard_descriptor import ShardDataset, ShardDescriptor

from .files import ensure_file, inspect, load_split
from .partition import parse_rank_worldsize, shard_indices
from .spec import SPLITS, DataError, check_flag, check_size, sample_shape, target_shape
from .synthetic import is_synthetic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSetup:
    """A checked shard configuration: the file exists and is well formed, the shard is non-empty."""

    flag: str
    size: int
    path: Path
    rank: int
    world_size: int
    partition: str
    seed: int
    split_sizes: dict
    synthetic: bool

    def indices(self, split: str) -> np.ndarray:
        """Indices of this node's samples within MedMNIST's split."""
        return shard_indices(self.split_sizes[split], self.rank, self.world_size, self.partition, self.seed)

    def describe(self) -> str:
        """One line naming the dataset, the shard and where the data came from."""
        sizes = ", ".join(f"{s} {len(self.indices(s))}" for s in SPLITS)
        origin = "SYNTHETIC data" if self.synthetic else "MedMNIST data"
        return (f"{self.flag} {self.size}px, shard {self.rank}/{self.world_size} ({self.partition}): "
                f"{sizes}; {origin} from {self.path.name}")


def prepare(flag="bloodmnist", size=28, data_dir="data", rank_worldsize="1,1", partition="iid",
            seed=0, download=True) -> ShardSetup:
    """Check a shard configuration without reading pixels; download the file if it is missing."""
    flag, size = check_flag(flag), check_size(size)
    rank, world_size = parse_rank_worldsize(rank_worldsize)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise DataError(f"seed {seed!r} is not an integer") from None
    path = ensure_file(flag, size, Path(data_dir), allow_download=bool(download))
    setup = ShardSetup(flag, size, path, rank, world_size, partition, seed, inspect(path, flag, size),
                       is_synthetic(path))
    for split in SPLITS:
        setup.indices(split)  # raises DataError for an unknown partition or too many shards
    return setup


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
                 partition="iid", seed=0, download=True):
        self.setup = prepare(flag, size, data_dir, rank_worldsize, partition, seed, download)
        self._datasets = {}
        for split in SPLITS:
            images, labels = load_split(self.setup.path, split, self.setup.flag)
            keep = self.setup.indices(split)
            # Fancy indexing copies just this shard, so the full split is freed on return.
            self._datasets[split] = MedMNISTShardDataset(images[keep], labels[keep])
        logger.info("Serving %s", self.setup.describe())

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
        return self.setup.describe()
