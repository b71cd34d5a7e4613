"""The scanner partition: each node's images pass its own fixed acquisition; labels are dealt out as in iid."""
import base64
import json

import numpy as np
import pytest

from medmnist_shard import MedMNISTShardDescriptor, prepare
from medmnist_shard.scanner import BLUR_MAX, CONTRAST, GAMMA, NOISE_MAX, acquisition

SIZES = {"train": 60, "val": 20, "test": 20}


def test_an_acquisition_is_fixed_by_seed_and_rank_and_differs_between_nodes():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    first, again, other_node, other_seed = (acquisition(7, 1, 3), acquisition(7, 1, 3), acquisition(7, 2, 3),
                                            acquisition(8, 1, 3))
    assert first == again
    np.testing.assert_array_equal(first(images), again(images))
    assert first != other_node and first != other_seed
    for a in (first, other_node, other_seed):
        assert CONTRAST[0] <= a.contrast <= CONTRAST[1] and GAMMA[0] <= a.gamma <= GAMMA[1]
        assert 0 <= a.blur <= BLUR_MAX and 0 <= a.noise <= NOISE_MAX and len(a.colour) == 3
    assert not np.array_equal(first(images), other_node(images))
    shifted = first(images)
    assert shifted.dtype == np.uint8 and shifted.shape == images.shape
    np.testing.assert_array_equal(first(images[2]), shifted[2])  # one image as in a batch: no batch effects
    assert acquisition(7, 1, 1).colour == (1.0,)  # greyscale: no colour gain


@pytest.mark.parametrize("size", [28, 64])
def test_the_scanner_partition_changes_pixels_not_labels(tiny_file, size):
    folder = tiny_file("bloodmnist", size, SIZES).parent
    for rank in (1, 2, 3):
        iid = MedMNISTShardDescriptor("bloodmnist", size, folder, f"{rank},3", partition="iid", seed=4)
        scanner = MedMNISTShardDescriptor("bloodmnist", size, folder, f"{rank},3", partition="scanner", seed=4)
        for split in ("train", "val", "test"):
            plain, shifted = iid.get_dataset(split), scanner.get_dataset(split)
            np.testing.assert_array_equal(plain.labels, shifted.labels)  # the same samples, the same labels
            batch = list(range(len(plain)))
            np.testing.assert_array_equal(shifted[batch][0], acquisition(4, rank, 3)(plain[batch][0]))
            assert (shifted[batch][0] != plain[batch][0]).mean() > 0.5
        described = json.loads(scanner.dataset_description)
        assert described["partition"] == "scanner" and described["acquisition"]["rank"] == rank
        sample = described["sample"]  # one training image as the node sees it, for partition.png
        pixels = np.frombuffer(base64.b64decode(sample["uint8"]), dtype=np.uint8).reshape(sample["shape"])
        np.testing.assert_array_equal(pixels, scanner.get_dataset("train")[0][0])  # up to 64 px, whole
        assert "sample" not in json.loads(iid.dataset_description)  # only the simulation shows an image


def test_scanner_shards_are_the_iid_shards(tiny_file):
    folder = tiny_file("dermamnist", 28, SIZES).parent
    for rank in (1, 2):
        iid, scanner = (prepare("dermamnist", 28, folder, f"{rank},2", partition=p, seed=1) for p in ("iid", "scanner"))
        assert all(np.array_equal(iid.indices[s], scanner.indices[s]) for s in ("train", "val", "test"))
        assert iid.acquisition is None and scanner.acquisition == acquisition(1, rank, 3)


def test_each_image_is_transformed_once_as_the_shard_loads_and_a_memory_mapped_shard_caches_it(tiny_file, tmp_path,
                                                                                               monkeypatch):
    from medmnist_shard import scanner as scanner_module

    folder = tiny_file("bloodmnist", 28, SIZES).parent
    calls = []
    block = scanner_module.Acquisition._block
    monkeypatch.setattr(scanner_module.Acquisition, "_block", lambda self, x: calls.append(len(x)) or block(self, x))
    in_memory = MedMNISTShardDescriptor("bloodmnist", 28, folder, "2,3", partition="scanner", seed=4)
    loaded = sum(calls)
    assert loaded == sum(len(in_memory.get_dataset(s)) for s in ("train", "val", "test"))  # every image, once...
    for split in ("train", "val", "test"):
        data = in_memory.get_dataset(split)
        data[list(range(len(data)))], data[0]
    assert sum(calls) == loaded  # ...and none again as batches are served
    # Memory-mapped: the cache holds the transformed images, named apart from the iid shard's, and is only read after.
    mapped = {p: MedMNISTShardDescriptor("bloodmnist", 28, folder, "2,3", partition=p, seed=4, memory_map_above_mb=0,
                                         cache_dir=tmp_path) for p in ("iid", "scanner")}
    assert set(mapped["iid"].setup.cache_files().values()).isdisjoint(mapped["scanner"].setup.cache_files().values())
    calls.clear()
    again = MedMNISTShardDescriptor("bloodmnist", 28, folder, "2,3", partition="scanner", seed=4,
                                    memory_map_above_mb=0, cache_dir=tmp_path)
    assert calls == [] and all(f.exists() for f in again.setup.cache_files().values())
    for split in ("train", "val", "test"):
        n = len(in_memory.get_dataset(split))
        np.testing.assert_array_equal(again.get_dataset(split)[list(range(n))][0],
                                      in_memory.get_dataset(split)[list(range(n))][0])
        assert isinstance(again.get_dataset(split).images, np.memmap)
