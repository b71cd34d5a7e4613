"""Shards are disjoint, cover each split, are deterministic, skew with alpha; bad settings are refused."""
import numpy as np
import pytest

from medmnist_shard.partition import label_histogram, make_shards, parse_rank_worldsize, skew_classes
from medmnist_shard.spec import DataError


def _labels(n, classes=8, seed=0, width=1):
    rng = np.random.default_rng(seed)
    if width == 1:
        return rng.integers(0, classes, (n, 1))
    return (rng.random((n, width)) < 0.2).astype(np.int64)


def _splits(n_train=2000, width=1):
    return {"train": _labels(n_train, width=width), "val": _labels(n_train // 4, seed=1, width=width),
            "test": _labels(n_train // 2, seed=2, width=width)}


def _assert_disjoint_cover(shards, labels):
    for split, parts in shards.items():
        joined = np.concatenate(parts)
        assert len(joined) == len(labels[split]) == len(np.unique(joined)), split
        assert all(len(p) for p in parts)


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("width", [1, 14])
def test_shards_are_disjoint_and_cover_every_split(strategy, world, width):
    labels = _splits(width=width)
    _assert_disjoint_cover(make_shards(labels, world, strategy, alpha=0.5, seed=3), labels)


def test_iid_shards_are_balanced_and_shuffled():
    shards = make_shards({"train": _labels(1001)}, 3, "iid")["train"]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert not np.array_equal(shards[0], np.arange(len(shards[0])))  # not simply the first third


@pytest.mark.parametrize("strategy", ["iid", "dirichlet"])
def test_partitions_are_deterministic_per_seed(strategy):
    labels = _splits()
    a = make_shards(labels, 4, strategy, seed=0)
    assert all(np.array_equal(x, y) for s in a for x, y in zip(a[s], make_shards(labels, 4, strategy, seed=0)[s],
                                                                 strict=True))
    assert not np.array_equal(a["train"][0], make_shards(labels, 4, strategy, seed=1)["train"][0])


def _skew(shards, labels):
    """Mean total-variation distance between each node's train label mix and the global one."""
    y = labels["train"][:, 0]
    overall = np.bincount(y, minlength=8) / len(y)
    return np.mean([0.5 * np.abs(np.bincount(y[s], minlength=8) / len(s) - overall).sum() for s in shards["train"]])


def test_skew_grows_as_alpha_shrinks():
    labels = _splits(4000)
    skews = [np.mean([_skew(make_shards(labels, 4, "dirichlet", alpha, seed), labels) for seed in range(5)])
             for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert _skew(make_shards(labels, 4, "iid"), labels) < 0.1 < skews[2]


def test_dirichlet_keeps_each_nodes_mix_across_splits():
    labels = _splits(8000)
    shards = make_shards(labels, 2, "dirichlet", alpha=0.3, seed=0)
    train = np.bincount(labels["train"][shards["train"][0], 0], minlength=8) / len(shards["train"][0])
    test = np.bincount(labels["test"][shards["test"][0], 0], minlength=8) / len(shards["test"][0])
    assert 0.5 * np.abs(train - test).sum() < 0.1


def test_dirichlet_that_starves_a_node_says_what_to_change():
    labels = {"train": _labels(12), "val": _labels(8), "test": _labels(8)}
    with pytest.raises(DataError, match="alpha=0.01 leaves a node without samples.*raise alpha, use fewer nodes"):
        make_shards(labels, 8, "dirichlet", alpha=0.01)


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_dirichlet_alpha_must_be_positive(alpha):
    with pytest.raises(DataError, match="alpha must be positive"):
        make_shards(_splits(), 2, "dirichlet", alpha=alpha)


def test_more_shards_than_samples():
    with pytest.raises(DataError, match="cannot cut 3 val samples into 4 shards"):
        make_shards({"train": _labels(10), "val": _labels(3)}, 4)


def test_unknown_partition_strategy():
    with pytest.raises(DataError, match="unknown partition 'weird'.*iid, dirichlet"):
        make_shards(_splits(), 2, strategy="weird")


def test_skew_classes_and_histograms():
    multi = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]])
    assert skew_classes(multi).tolist() == [1, 3, 0]
    assert label_histogram(multi, 3) == [1, 1, 1]
    assert label_histogram(np.array([[2], [2], [0]]), 4) == [1, 0, 2, 0]


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
