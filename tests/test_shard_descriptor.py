"""The shard descriptor: served shapes for every flag and size, three splits, clear config errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

import roots
from conftest import ROOT
from medmnist_shard import FLAGS, SIZES, DataError, MedMNISTShardDescriptor
from medmnist_shard.spec import sample_shape, target_shape

FEW = {"train": 4, "val": 2, "test": 2}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("flag", FLAGS)
def test_served_samples_match_the_announced_shapes(tiny_file, flag, size):
    path = tiny_file(flag, size, FEW)
    shard = MedMNISTShardDescriptor(flag, size, path.parent, "2,2")
    assert shard.sample_shape == [str(d) for d in sample_shape(flag, size)]
    assert shard.target_shape == [str(d) for d in target_shape(flag)]
    image, label = shard.get_dataset("train")[0]
    assert list(image.shape) == sample_shape(flag, size) and image.dtype == np.uint8
    assert list(label.shape) == target_shape(flag)


def test_three_splits_each_a_disjoint_share_of_medmnists_own_split(tiny_file):
    path = tiny_file("bloodmnist")
    full = np.load(path)
    shards = [MedMNISTShardDescriptor("bloodmnist", 28, path.parent, f"{r},3") for r in (1, 2, 3)]
    for split in ("train", "val", "test"):
        served = np.concatenate([s.get_dataset(split).images for s in shards])
        assert len(served) == len(full[f"{split}_images"])
        # Every image of MedMNIST's split is served by exactly one node.
        assert sorted(map(bytes, served)) == sorted(map(bytes, full[f"{split}_images"]))


def test_batches_come_from_one_indexing_call(tiny_file):
    dataset = MedMNISTShardDescriptor("chestmnist", 28, tiny_file("chestmnist").parent).get_dataset("val")
    images, labels = dataset[[0, 3, 5]]
    assert images.shape == (3, 28, 28, 1) and labels.shape == (3, 14)


def test_description_tells_the_notebook_what_the_node_serves(tiny_file):
    shard = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist").parent, "1,2", "dirichlet", 1.0)
    summary = json.loads(shard.dataset_description)
    assert "shard 1/2 (dirichlet, alpha 1.0)" in summary["text"] and "SYNTHETIC" in summary["text"]
    assert (summary["flag"], summary["size"], summary["synthetic"]) == ("bloodmnist", 28, True)
    assert summary["samples"] == {s: len(shard.get_dataset(s)) for s in ("train", "val", "test")}
    train_labels = shard.get_dataset("train").labels[:, 0]
    assert summary["label_histogram"]["train"] == np.bincount(train_labels, minlength=8).tolist()


def test_unknown_split(tiny_file):
    shard = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist").parent)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        shard.get_dataset("valid")


@pytest.mark.parametrize("params,message", [
    ({"flag": "bloodmnist3d"}, "unknown dataset"),
    ({"size": 32}, "unsupported image size"),
    ({"rank_worldsize": "1/2"}, "malformed"),
    ({"rank_worldsize": "3,2"}, "rank must be between 1 and 2"),
    ({"rank_worldsize": "13,13"}, "cannot cut 12 val samples into 13 shards"),
    ({"size": 64}, "missing .*bloodmnist_64.npz"),
    ({"partition": "dirichlet-ish", "rank_worldsize": "1,2"}, "unknown partition"),
    ({"partition": "dirichlet"}, "without rank_worldsize: a node's own file is served whole"),
    ({"seed": "x"}, "seed .x. must be an integer"),
    ({"partition": "dirichlet", "alpha": 0, "rank_worldsize": "1,2"}, "alpha must be positive"),
])
def test_bad_configuration_is_refused(tiny_file, params, message):
    settings = {"flag": "bloodmnist", "size": 28, "data_dir": tiny_file("bloodmnist").parent, "download": False}
    with pytest.raises(DataError, match=message):
        MedMNISTShardDescriptor(**{**settings, **params})


def _config(tmp_path, data_dir, **params):
    path = tmp_path / "envoy_config.yaml"
    shard = {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": "1,2", **params}
    path.write_text(yaml.safe_dump({"params": {"install_requirements": False},
                                    "shard_descriptor": {"template": "medmnist_shard.MedMNISTShardDescriptor",
                                                         "params": shard}}))
    return path


def _run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": roots.pythonpath("node")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_check_command_describes_a_good_config(tiny_file, tmp_path):
    result = _run(sys.executable, "-m", "medmnist_shard", "check", _config(tmp_path, tiny_file("bloodmnist").parent))
    assert result.returncode == 0, result.stderr
    assert "bloodmnist 28px, shard 1/2 (iid): train 12, val 6, test 6; SYNTHETIC" in result.stdout


def test_check_command_gives_one_line_not_a_traceback(tiny_file, tmp_path):
    result = _run(sys.executable, "-m", "medmnist_shard", "check",
                  _config(tmp_path, tiny_file("bloodmnist").parent, rank_worldsize="5,2"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: rank_worldsize '5,2': the rank must be between 1 and 2 "
                                                  "(ranks count from 1)"]


def test_check_command_rejects_unknown_parameters(tiny_file, tmp_path):
    result = _run(sys.executable, "-m", "medmnist_shard", "check",
                  _config(tmp_path, tiny_file("bloodmnist").parent, flg="x"))
    assert result.returncode == 2 and "unexpected keyword argument 'flg'" in result.stderr
    assert "Traceback" not in result.stderr


def test_start_envoy_stops_on_a_bad_config_before_openfl_starts(tiny_file, tmp_path):
    config = _config(tmp_path, tiny_file("bloodmnist").parent, flag="bloodmnist3d")
    result = _run("bash", str(ROOT / "envoy" / "start_envoy.sh"), "envoy_1", str(config))
    assert result.returncode == 2
    assert "error: unknown dataset 'bloodmnist3d'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout and "Starting the Envoy" not in result.stdout


@pytest.mark.parametrize("args,message", [((), "usage: "),
                                          (("envoy_1", "no/such.yaml"), "envoy config no/such.yaml not found")])
def test_start_envoy_usage_and_missing_config(args, message):
    result = _run("bash", str(ROOT / "envoy" / "start_envoy.sh"), *args)
    assert result.returncode == 2 and message in result.stderr


def test_start_director_missing_config(tmp_path):
    env = {**os.environ, "DIRECTOR_CONFIG": str(tmp_path / "nope.yaml")}
    result = subprocess.run(["bash", str(ROOT / "director" / "start_director.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "director config" in result.stderr and "not found" in result.stderr


def test_make_synthetic_command(tmp_path):
    result = _run(sys.executable, "-m", "medmnist_shard", "make-synthetic", "retinamnist", "--size", "64",
                  "--out", str(tmp_path), "--train", "10", "--val", "5", "--test", "5")
    assert result.returncode == 0, result.stderr
    assert "SYNTHETIC retinamnist at 64 px: train 10, val 5, test 5" in result.stdout
    again = _run(sys.executable, "-m", "medmnist_shard", "make-synthetic", "retinamnist", "--size", "64",
                 "--out", str(tmp_path))
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_start_director_says_when_its_port_is_taken(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "DIRECTOR_HOST": "localhost", "DIRECTOR_PORT": str(port)}
        result = subprocess.run(["bash", str(ROOT / "director" / "start_director.sh")], env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"error: cannot listen on localhost:{port} (Address already in use)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_node_s_own_file_is_served_whole(tiny_file):
    path = tiny_file("dermamnist", 28, FEW)
    own = MedMNISTShardDescriptor("dermamnist", 28, path.parent, download=False)  # no rank_worldsize
    with np.load(path) as data:
        for split in ("train", "val", "test"):
            served = own.get_dataset(split)
            np.testing.assert_array_equal(served.images, data[f"{split}_images"])
            np.testing.assert_array_equal(served.labels, data[f"{split}_labels"])
    described = json.loads(own.dataset_description)
    assert described["partition"] == "own" and (described["rank"], described["world_size"]) == (1, 1)
    assert "dermamnist 28px, its own file: train 4, val 2, test 2; SYNTHETIC" in described["text"]
