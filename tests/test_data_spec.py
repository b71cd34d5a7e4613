"""Dataset facts come from medmnist.INFO, and bad names fail with a clear message."""
import os
import subprocess
import sys

import medmnist
import pytest

import roots
from medmnist_shard.spec import (
    FLAGS,
    SIZES,
    DataError,
    check_flag,
    check_size,
    file_name,
    sample_shape,
    target_shape,
    url_and_md5,
)


def test_a_shard_is_described_from_medmnists_info_without_importing_torch():
    """An envoy checks its shard in a process of its own before it starts: that takes 0.2 s, not the 2 s of
    importing medmnist's datasets (torch, scikit-learn, PIL) for a dict."""
    probe = ("import sys, medmnist_shard, medmnist_shard.spec as spec; heavy = sorted({'torch', 'sklearn', 'PIL'} & "
             "set(sys.modules)); import medmnist; print(heavy, spec.INFO == medmnist.INFO, spec.INFO is medmnist.INFO)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": roots.pythonpath("node")})
    assert result.stdout.split() == ["[]", "True", "False"], result.stderr


def test_the_twelve_2d_flags_are_medmnist_2d_datasets():
    assert len(FLAGS) == 12
    for flag in FLAGS:
        assert medmnist.INFO[flag]["python_class"].endswith("MNIST")
        assert "3d" not in flag


@pytest.mark.parametrize("flag", FLAGS)
def test_shapes_follow_info(flag):
    meta = medmnist.INFO[flag]
    assert sample_shape(flag, 64) == [64, 64, meta["n_channels"]]
    width = len(meta["label"]) if meta["task"].startswith("multi-label") else 1
    assert target_shape(flag) == [width]


def test_file_names_and_urls_per_size():
    assert file_name("bloodmnist", 28) == "bloodmnist.npz"
    assert file_name("bloodmnist", 224) == "bloodmnist_224.npz"
    url, md5 = url_and_md5("bloodmnist", 128)
    assert url == medmnist.INFO["bloodmnist"]["url_128"] and md5 == medmnist.INFO["bloodmnist"]["MD5_128"]


@pytest.mark.parametrize("bad", ["bloodmnist3d", "BloodMNIST", "", "mnist"])
def test_unknown_flag_names_the_choices(bad):
    with pytest.raises(DataError, match="unknown dataset .* choose one of pathmnist"):
        check_flag(bad)


@pytest.mark.parametrize("bad", [32, "27", 0, "big", None, 28.5])
def test_unsupported_size_names_the_choices(bad):
    with pytest.raises(DataError, match="unsupported image size .* 28, 64, 128, 224"):
        check_size(bad)


def test_sizes_accept_ints_and_numeric_strings():
    assert [check_size(s) for s in SIZES] == list(SIZES)
    assert check_size("64") == 64
