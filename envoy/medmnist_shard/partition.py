"""Which samples of a split belong to which node: disjoint shards that together cover the split."""
from __future__ import annotations

import numpy as np

from .spec import DataError

STRATEGIES = ("iid",)


def parse_rank_worldsize(value) -> tuple[int, int]:
    """Parse '1,2' (shard 1 of 2, ranks count from 1) into (1, 2), or raise DataError."""
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    parts = [p.strip() for p in text.split(",")]
    try:
        rank, world_size = (int(p) for p in parts)
    except ValueError:
        raise DataError(f"rank_worldsize {value!r} is malformed: write 'RANK,WORLD_SIZE', for example '1,2'") from None
    if world_size < 1:
        raise DataError(f"rank_worldsize {value!r}: the world size must be at least 1")
    if not 1 <= rank <= world_size:
        raise DataError(f"rank_worldsize {value!r}: the rank must be between 1 and {world_size} (ranks count from 1)")
    return rank, world_size


def shard_indices(n: int, rank: int, world_size: int, strategy: str = "iid", seed: int = 0) -> np.ndarray:
    """Sorted indices of shard `rank` (1-based) of `world_size` over a split of n samples."""
    if strategy not in STRATEGIES:
        raise DataError(f"unknown partition {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if world_size > n:
        raise DataError(f"cannot cut {n} samples into {world_size} shards: use fewer nodes or more data")
    # Every node draws the same permutation from the shared seed, so the shards never overlap.
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(np.array_split(order, world_size)[rank - 1])
