"""Shards are disjoint, cover the split, are deterministic, and bad settings are refused."""
import numpy as np
import pytest

from medmnist_shard.partition import parse_rank_worldsize, shard_indices
from medmnist_shard.spec import DataError


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (1712, 2), (7, 7), (1000, 8)])
def test_iid_shards_are_disjoint_and_cover(n, world):
    shards = [shard_indices(n, r, world, seed=3) for r in range(1, world + 1)]
    joined = np.concatenate(shards)
    assert len(joined) == n and len(np.unique(joined)) == n
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_iid_is_deterministic_per_seed_and_shuffled():
    a = shard_indices(100, 1, 2, seed=0)
    assert np.array_equal(a, shard_indices(100, 1, 2, seed=0))
    assert not np.array_equal(a, shard_indices(100, 1, 2, seed=1))
    assert not np.array_equal(a, np.arange(50))  # not simply the first half


@pytest.mark.parametrize("text,expected", [("1,2", (1, 2)), (" 2 , 2 ", (2, 2)), ([3, 4], (3, 4)), ("1,1", (1, 1))])
def test_rank_worldsize_parses(text, expected):
    assert parse_rank_worldsize(text) == expected


@pytest.mark.parametrize("text", ["1", "1-2", "a,b", "1,2,3", ""])
def test_malformed_rank_worldsize(text):
    with pytest.raises(DataError, match="malformed.*'RANK,WORLD_SIZE'"):
        parse_rank_worldsize(text)


@pytest.mark.parametrize("text", ["0,2", "3,2", "-1,2"])
def test_rank_out_of_range(text):
    with pytest.raises(DataError, match="rank must be between 1 and 2"):
        parse_rank_worldsize(text)


def test_world_size_zero():
    with pytest.raises(DataError, match="world size must be at least 1"):
        parse_rank_worldsize("0,0")


def test_more_shards_than_samples():
    with pytest.raises(DataError, match="cannot cut 3 samples into 4 shards"):
        shard_indices(3, 1, 4)


def test_unknown_partition_strategy():
    with pytest.raises(DataError, match="unknown partition 'weird'"):
        shard_indices(10, 1, 2, strategy="weird")
