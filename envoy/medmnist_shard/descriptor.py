"""OpenFL shard descriptor that serves one node's share of a MedMNIST 2D dataset."""
from __future__ import annotations

import base64
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from openfl.interface.interactive_api.shard_descriptor import ShardDataset, ShardDescriptor

from .cache import cache_path, check_cache_dir, default_cache_dir, is_complete, mapped_images
from .files import ensure_file, inspect, load_image_rows, load_labels, size_text
from .partition import label_histogram, make_shards, parse_rank_worldsize
from .scanner import Acquisition, acquisition
from .spec import SPLITS, DataError, check_flag, check_size, info, sample_shape, target_shape
from .synthetic import is_synthetic

logger = logging.getLogger(__name__)

# Shards with more image bytes than this are served from memory-mapped cache files rather than held
# in memory. 4 GB in memory is affordable for a training node; a quarter of PathMNIST at 224 px (4.03 GB)
# stays resident, a third of it (5.4 GB) is mapped.
MEMORY_MAP_ABOVE_MB = 4096
SAMPLE_PX = 64  # the scanner partition describes its node with one training image, at most this size


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
    memory_map_above_mb: float = MEMORY_MAP_ABOVE_MB
    cache_dir: Path | None = None  # where memory-mapped shards are written; None: default_cache_dir()

    @property
    def cache_folder(self) -> Path:
        """The folder that holds this shard's cache files when it is memory-mapped."""
        return self.cache_dir or default_cache_dir()

    @property
    def image_bytes(self) -> int:
        """Bytes of this shard's images, all three splits together."""
        return sum(map(len, self.indices.values())) * math.prod(sample_shape(self.flag, self.size))

    @property
    def memory_mapped(self) -> bool:
        """True if the shard is served from memory-mapped cache files rather than held in memory."""
        return self.image_bytes > self.memory_map_above_mb * 1e6

    @property
    def shard_tag(self) -> str:
        """Rank and world size, as cache file names carry them."""
        return f"{self.rank}of{self.world_size}"

    @property
    def acquisition(self) -> Acquisition | None:
        """With the scanner partition, this node's own acquisition (scanner.py), which all its images pass."""
        if self.partition != "scanner":
            return None
        return acquisition(self.seed, self.rank, sample_shape(self.flag, self.size)[2])

    def cache_files(self) -> dict[str, Path]:
        """split -> the cache file that serves it when the shard is memory-mapped."""
        key = self.acquisition.cache_key if self.acquisition else ""
        return {s: cache_path(self.cache_folder, self.path, s, self.indices[s], self.shard_tag, key) for s in SPLITS}

    def summary(self) -> dict:
        """What the node serves, in a form the notebook can read back from the director."""
        n_classes = len(info(self.flag)["label"])
        skew = {"dirichlet": f", alpha {self.alpha}", "scanner": f", seed {self.seed}"}.get(
            self.partition, "")
        sizes = ", ".join(f"{s} {len(self.indices[s])}" for s in SPLITS)
        own = self.partition == "own"
        origin = "SYNTHETIC data" if self.synthetic else "its own data" if own else "MedMNIST data"
        mapped = f"; memory-mapped from {self.cache_folder}" if self.memory_mapped else ""
        served = "its own file" if own else f"shard {self.rank}/{self.world_size} ({self.partition}{skew})"
        return {
            "text": (f"{self.flag} {self.size}px, {served}: {sizes}; {origin} from {self.path.name}; "
                     f"{size_text(self.image_bytes)} of images{mapped}"),
            "flag": self.flag, "size": self.size, "rank": self.rank, "world_size": self.world_size,
            "partition": self.partition, "alpha": self.alpha, "seed": self.seed, "synthetic": self.synthetic,
            "samples": {s: len(self.indices[s]) for s in SPLITS},
            "label_histogram": {s: label_histogram(self.labels[s], n_classes) for s in SPLITS},
            "image_bytes": self.image_bytes, "memory_mapped": self.memory_mapped,
            **({"acquisition": self.acquisition.describe()} if self.acquisition else {}),
        }


def _megabytes(value) -> float:
    if not isinstance(value, bool):
        try:
            megabytes = float(value)
        except (TypeError, ValueError):
            megabytes = math.nan
        if megabytes >= 0:
            return megabytes
    raise DataError(f"memory_map_above_mb {value!r} must be a number of megabytes, 0 or more: for example 4096 "
                    "(0 memory-maps every shard, .inf none)")


def _folder(value) -> Path | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return Path(value).expanduser()
    raise DataError(f"cache_dir {value!r} must be a folder path, or left out for {default_cache_dir()}")


def prepare(flag="bloodmnist", size=28, data_dir="data", rank_worldsize=None, partition="iid", alpha=0.5,
            seed=0, download=True, memory_map_above_mb=MEMORY_MAP_ABOVE_MB, cache_dir=None) -> ShardSetup:
    """Check a shard configuration and choose its samples, reading labels but no pixels.

    Without rank_worldsize the file is the node's own (a hospital's data, not a shard of a public file): every row
    is served, and there is nothing to partition.

    Downloads the file first if it is missing and `download` is true. A shard above
    memory_map_above_mb also has its cache folder checked: writable, with room for what is not cached yet.
    """
    flag, size = check_flag(flag), check_size(size)
    if rank_worldsize is None:
        if partition not in ("iid", "own"):
            raise DataError(f"partition {partition!r} without rank_worldsize: a node's own file is served whole; "
                            "a partition cuts one shared file into shards (give rank_worldsize, e.g. '1,3')")
        rank, world_size, partition = 1, 1, "own"
    else:
        rank, world_size = parse_rank_worldsize(rank_worldsize)
    try:
        seed, alpha = int(seed), float(alpha)
    except (TypeError, ValueError):
        raise DataError(f"seed {seed!r} must be an integer and alpha {alpha!r} a number") from None
    memory_map_above_mb, cache_dir = _megabytes(memory_map_above_mb), _folder(cache_dir)
    path = ensure_file(flag, size, Path(data_dir), allow_download=bool(download))
    inspect(path, flag, size)
    labels = {split: load_labels(path, split, flag) for split in SPLITS}
    mine = {split: shards[rank - 1] for split, shards in
            make_shards(labels, world_size, "iid" if partition == "own" else partition, alpha, seed).items()}
    setup = ShardSetup(flag, size, path, rank, world_size, partition, alpha, seed, is_synthetic(path), mine,
                       {split: labels[split][mine[split]] for split in SPLITS}, memory_map_above_mb, cache_dir)
    if setup.memory_mapped:
        sample = tuple(sample_shape(flag, size))
        missing = [s for s, file in setup.cache_files().items() if not is_complete(file, len(mine[s]), sample)]
        if missing:  # complete caches are only read: a read-only cache folder then does
            check_cache_dir(setup.cache_folder, sum(len(mine[s]) for s in missing) * math.prod(sample))
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
        images = self.images[index]
        if not images.flags.writeable:
            images = images.copy()  # a view into a read-only memory map: torch wants memory it may write
        return images, self.labels[index]


class MedMNISTShardDescriptor(ShardDescriptor):
    """Serves `train`, `val` and `test`: this node's share of each of MedMNIST's own splits."""

    def __init__(self, flag="bloodmnist", size=28, data_dir="data", rank_worldsize=None,
                 partition="iid", alpha=0.5, seed=0, download=True, memory_map_above_mb=MEMORY_MAP_ABOVE_MB,
                 cache_dir=None):
        self.setup = prepare(flag, size, data_dir, rank_worldsize, partition, alpha, seed, download,
                             memory_map_above_mb, cache_dir)
        self._datasets = {}
        for split in SPLITS:
            # Either way the split is streamed once and only this node's rows are kept, each image through the
            # scanner partition's acquisition once (not every time a batch is served: it is the same every time).
            indices, scanner = self.setup.indices[split], self.setup.acquisition
            if self.setup.memory_mapped:
                images = mapped_images(self.setup.path, split, indices, self.setup.cache_folder,
                                       self.setup.shard_tag, scanner)
            else:
                images = load_image_rows(self.setup.path, split, indices, scanner)
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
        """JSON (see ShardSetup.summary): the director shows it, the notebook parses it. With the scanner partition
        (a simulation on a public or synthetic file) it also carries one training image as this node sees it."""
        summary = self.setup.summary()
        if self.setup.acquisition is not None and len(self._datasets["train"]):
            image = self._datasets["train"][0][0]
            step = max(1, image.shape[0] // SAMPLE_PX)
            image = np.ascontiguousarray(image[::step, ::step])
            summary["sample"] = {"shape": list(image.shape), "uint8": base64.b64encode(image.tobytes()).decode()}
        return json.dumps(summary)
