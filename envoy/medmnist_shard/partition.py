"""Which samples of each split belong to which node: disjoint shards that together cover the split.

`iid` deals samples out at random. `dirichlet` skews labels the way hospitals differ: each class is
spread over the nodes in proportions drawn from Dirichlet(alpha), the same proportions for train,
val and test, so a node's val and test look like its train. Small alpha means strong skew. `scanner` deals samples
out as `iid` does; the shift is in the images instead (scanner.py: each node's own acquisition).
"""
from __future__ import annotations

import numpy as np

from .spec import DataError

STRATEGIES = ("iid", "dirichlet", "scanner")
DRAWS = 100  # dirichlet: proportions are redrawn (deterministically) until every node gets data


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


def skew_classes(labels: np.ndarray) -> np.ndarray:
    """The class each sample counts as for skewing: its label, or for multi-label rows the first
    positive finding (rows without findings form a class of their own)."""
    if labels.shape[1] == 1:
        return labels[:, 0]
    return np.where(labels.any(1), labels.argmax(1), labels.shape[1])


def make_shards(labels: dict[str, np.ndarray], world_size: int, strategy: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Sorted sample indices of every shard of every split: {split: [shard 1, ..., shard N]}."""
    if strategy not in STRATEGIES:
        raise DataError(f"unknown partition {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    for split, y in labels.items():
        if world_size > len(y):
            raise DataError(f"cannot cut {len(y)} {split} samples into {world_size} shards: "
                            "use fewer nodes or more data")
    # Every node draws from the same seed, so all compute the same partition and shards never overlap.
    rng = np.random.default_rng(seed)
    if strategy in ("iid", "scanner"):
        return {split: [np.sort(s) for s in np.array_split(rng.permutation(len(y)), world_size)]
                for split, y in labels.items()}
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be positive, not {alpha!r}: 0.1 is strong skew, 100 nearly IID")
    classes = {split: skew_classes(y) for split, y in labels.items()}
    n_classes = 1 + max(int(c.max()) for c in classes.values())
    for _ in range(DRAWS):
        shares = rng.dirichlet(np.full(world_size, float(alpha)), size=n_classes)
        shards = {split: _split_by_class(c, shares, rng) for split, c in classes.items()}
        if all(len(s) for parts in shards.values() for s in parts):
            return shards
    raise DataError(
        f"dirichlet partition with alpha={alpha} leaves a node without samples in {DRAWS} draws "
        f"({world_size} nodes): raise alpha, use fewer nodes, or use more data"
    )


def _split_by_class(classes: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    parts = [[] for _ in range(shares.shape[1])]
    for c in np.unique(classes):
        members = rng.permutation(np.flatnonzero(classes == c))
        cuts = np.round(np.cumsum(shares[c])[:-1] * len(members)).astype(int)
        for node, chunk in enumerate(np.split(members, cuts)):
            parts[node].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def label_histogram(labels: np.ndarray, n_classes: int) -> list[int]:
    """Samples per class, or for multi-label rows positives per finding."""
    if labels.shape[1] == 1:
        return np.bincount(labels[:, 0], minlength=n_classes).tolist()
    return labels.sum(0).astype(int).tolist()
