"""Each hospital's own data: make demo data_dirs=a,b,c gives envoy i the whole file in folder i, read where it is;
files that do not fit together are refused, by the launcher up front and by the director when an envoy registers."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from localfed.__main__ import main
from medmnist_shard.synthetic import make_synthetic
from openfl_adjustments import registration

SIZES = {"train": 150, "val": 30, "test": 30}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three hospitals' folders, each with its own (synthetic) BloodMNIST file of its own size."""
    root = tmp_path_factory.mktemp("hospitals")
    made = []
    for i in range(3):
        sizes = {split: n + 30 * i for split, n in SIZES.items()}
        made.append(make_synthetic("bloodmnist", 28, root / f"hospital_{i + 1}", sizes, seed=10 + i).parent)
    return made


def _digests(folders):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a federation of its own (about 35 s): runs when CI=true")
def test_make_demo_with_three_folders_trains_on_each_envoy_s_whole_file(folders, tmp_path):
    before = _digests(folders)
    dirs = ",".join(map(str, folders))
    result = subprocess.run([sys.executable, "-m", "localfed", "demo", f"DATA_DIRS={dirs}", "rounds=1", "tls=0",
                             f"runs={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "latest" / "results.json").read_text())
    assert results["status"] == "completed" and results["data_source"] == "own files"
    served = {e["name"]: (e["train"], e["val"], e["test"]) for e in results["envoys"]}
    assert served == {f"envoy_{i + 1}": (150 + 30 * i, 30 + 30 * i, 30 + 30 * i) for i in range(3)}  # every row
    assert results["partition"]["strategy"] == "own"
    assert "envoy_3: bloodmnist 28px, its own file: train 210, val 90, test 90" in result.stdout
    assert _digests(folders) == before  # used as given: nothing written there


def test_a_folder_whose_file_does_not_fit_is_refused_up_front_naming_its_envoy(folders, tmp_path, capsys):
    other = make_synthetic("bloodmnist", 64, tmp_path / "scanner_64", SIZES).parent
    (other / "bloodmnist_64.npz").rename(other / "bloodmnist.npz")  # 64 px images under the 28 px name
    dirs = ",".join(map(str, [*folders[:2], other]))
    assert main(["demo", f"data_dirs={dirs}", f"runs={tmp_path / 'runs'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: envoy_3's folder {other} (data_dirs entry 3): ")
    assert "expected uint8 (N, 28, 28, 3)" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()
    assert main(["demo", f"data_dirs={folders[0]},{tmp_path / 'nowhere'}", f"runs={tmp_path / 'runs'}"]) == 1
    assert "envoy_2's folder" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["envoys=2"], "envoys=2 but data_dirs names 3 folders: one envoy per folder"),
    (["partition=scanner"], "data_dirs gives each envoy its own whole file: leave data_dir and partition out"),
])
def test_data_dirs_with_settings_that_cut_one_file_is_refused(folders, tmp_path, capsys, args, message):
    assert main(["demo", "data_dirs=" + ",".join(map(str, folders)), f"runs={tmp_path / 'runs'}", *args]) == 1
    assert message in capsys.readouterr().err


def _entry(flag, size, classes, online=True):
    described = {"flag": flag, "size": size, "label_histogram": {"train": [1] * classes}}
    return {"shard_info": {"shard_description": json.dumps(described)}, "is_online": online}


def test_the_director_refuses_an_envoy_that_serves_other_data_naming_it():
    registry = {"envoy_1": _entry("bloodmnist", 28, 8), "envoy_2": _entry("bloodmnist", 28, 8),
                "envoy_9": _entry("pathmnist", 28, 9, online=False)}  # gone: it counts no more
    same = registration.served(_entry("bloodmnist", 28, 8)["shard_info"])
    assert registration.mismatch("envoy_3", same, registry) is None
    assert registration.mismatch("envoy_1", registration.served(_entry("pathmnist", 28, 9)["shard_info"]),
                                 {"envoy_1": registry["envoy_1"]}) is None  # re-registering with new data: alone
    why = registration.mismatch("envoy_3", registration.served(_entry("pathmnist", 28, 9)["shard_info"]), registry)
    assert why == ("refused envoy_3: it serves pathmnist at 28 px with 9 classes, but envoy_1, envoy_2 serve "
                   "bloodmnist at 28 px with 8 classes: give every envoy the same dataset and size (its config's "
                   "flag and size, and a file of that dataset)")
    assert registration.served({"shard_description": "a descriptor of someone else's"}) is None


def test_the_director_s_acknowledge_shard_goes_through_the_rule():
    class Director:
        def __init__(self):
            self._shard_registry = {"envoy_1": _entry("bloodmnist", 28, 8)}

    def acknowledge(self, shard_info):
        self._shard_registry[shard_info["node_info"]["name"]] = {"shard_info": shard_info, "is_online": True}
        return True

    checked = registration.same_data(acknowledge)
    other = {**_entry("bloodmnist", 64, 8)["shard_info"], "node_info": {"name": "envoy_2"}}
    director = Director()
    assert checked(director, other) is False and "envoy_2" not in director._shard_registry
    fits = {**_entry("bloodmnist", 28, 8)["shard_info"], "node_info": {"name": "envoy_2"}}
    assert checked(director, fits) is True and "envoy_2" in director._shard_registry
