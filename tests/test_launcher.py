"""The launcher's settings and the checks that run before any process starts, and the centralized baseline."""
import json
import os
import socket

import pytest

import localfed.data
from localfed.__main__ import main
from localfed.run import compared
from localfed.settings import ALIASES, TABLE, parse
from medmnist_shard import files


def test_data_dir_without_the_file_fails_before_anything_starts(tmp_path, capsys):
    assert main(["demo", f"data_dir={tmp_path}", f"runs={tmp_path / 'runs'}"]) == 1
    err = capsys.readouterr().err
    assert f"data_dir {tmp_path} has no bloodmnist.npz" in err and "never written to" in err
    assert not (tmp_path / "runs").exists()


def test_offline_download_fails_with_the_url_and_the_synthetic_option(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/pathmnist_64.npz"
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (url, "x"))
    monkeypatch.setattr(localfed.data, "CACHE", tmp_path / "cache")
    assert main(["demo", "dataset=pathmnist", "size=64", f"runs={tmp_path / 'runs'}"]) == 1
    err = capsys.readouterr().err
    assert url in err and "make demo data=synthetic runs the same on generated data" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["envoys=0"], "envoys=0: must be at least 1"),
    (["rounds=0"], "rounds=0: it must be a whole number of at least 1"),
    (["rounds=two"], "rounds='two': give a whole number"),
    (["partition=dirichlet", "alpha=0"], "alpha=0.0: the Dirichlet concentration must be positive"),
    (["dataset=mnist"], "dataset='mnist' is not a MedMNIST 2D dataset"),
    (["size=100"], "size=100 is not a MedMNIST size: use 28, 64, 128 or 224"),
    (["min_envoys=0"], "min_envoys=0: give a number of envoys (an int of at least 1) or a share of them"),
    (["min_envoys=3"], "min_envoys=3 is more than envoys=2"),
    (["round_timeout=-5"], "round_timeout=-5.0: give seconds (0 for no limit)"),
    (["algorithm=fedsgd"], "algorithm='fedsgd': use one of fedavg, fedprox, fedntd, fedbn, fedadam"),
    (["ALGO=fedsgd"], "algorithm='fedsgd': use one of fedavg, fedprox, fedntd, fedbn, fedadam"),  # the documented alias
    (["algorithm=fedntd", "ntd_beta=-1"], "ntd_beta=-1.0: FedNTD's distillation weight must be a number of"),
    (["algorithm=fedntd", "dataset=pneumoniamnist"], "algorithm='fedntd' distils the classes an image is not, so it "
     "needs one label of three or more classes; pneumoniamnist is binary-class with 2 outputs: use fedavg or fedprox"),
    (["mu=-1"], "mu=-1.0: FedProx's proximal weight must be a number of at least 0"),
    (["SERVER_LR=0"], "server_learning_rate=0.0: it must be a positive number"),
    (["partition=skewed"], "partition=skewed: use iid or dirichlet"),
    (["wire_dtype=int8"], "wire_dtype='int8': use \"float32\""),
    (["max_update_ratio=1"], "max_update_ratio=1.0: give a number above 1"),
    (["dp=1", "target_epsilon=0"], "dp_options: give noise_multiplier > 0, or noise_multiplier = 0 and a target_"),
    (["wan=20ms,fast"], "wan=20ms,fast: 'fast' in the link profile '20ms,fast': give e.g. 40ms, 50mbit and 0.5%"),
    (["epochs"], "'epochs': give settings as name=value, e.g. rounds=5"),
    (["rounds_to_train=5"], "unknown setting 'rounds_to_train': docs/settings.md lists them all"),
])
def test_bad_settings_are_refused_up_front_in_one_line(tmp_path, capsys, args, message):
    assert main(["demo", "data=synthetic", f"runs={tmp_path / 'runs'}", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["algorithms=fedavg,fedsgd"], "algorithm='fedsgd': use one of fedavg, fedprox, fedntd, fedbn, fedadam"),
    (["ALGOS= , "], "algorithms is empty"),
    (["server_learning_rate=-0.1"], "server_learning_rate=-0.1: it must be a positive number"),
])
def test_make_compare_refuses_bad_algorithms_up_front(tmp_path, capsys, args, message):
    assert main(["compare", "data=synthetic", f"runs={tmp_path / 'runs'}", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "runs").exists()


def test_each_setting_has_one_name_and_the_documented_make_variables_are_the_same_settings():
    compare, demo = parse(["compare"]), parse(["demo"])
    assert (compare.envoys, compare.partition, compare.alpha) == (3, "dirichlet", 0.3)
    assert (demo.envoys, demo.partition, demo.alpha) == (2, "iid", 0.5)
    assert compared(compare) == ["fedavg", "fedprox", "fedadam", "median"] and compare.algorithm == "fedavg"
    assert compared(parse(["compare", "algorithms=fedavg, median"])) == ["fedavg", "median"]
    assert parse(["compare", "envoys=", "partition=", "alpha="]).values == compare.values  # empty: the default
    # The capitalised names the README documented before are the same settings, the four irregular ones by ALIASES.
    legacy = parse(["demo", "ROUNDS=5", "ALGO=fedprox", "MU=0.1", "SERVER_LR=0.01", "EPSILON=4", "DATA_DIR=/x",
                    "MIN_ENVOYS=2", "PYTHON=python3.12"])
    named = parse(["demo", "rounds=5", "algorithm=fedprox", "mu=0.1", "server_learning_rate=0.01",
                   "target_epsilon=4", "data_dir=/x", "min_envoys=2"])
    assert legacy.values == named.values and legacy.given == named.given
    assert set(ALIASES.values()) <= set(TABLE)
    # Only what was given reaches the notebook, each under its own name or in its dict.
    assert named.notebook_parameters() == {"rounds": 5, "algorithm": "fedprox",
                                           "algorithm_options": {"mu": 0.1, "server_learning_rate": 0.01},
                                           "dp_options": {"target_epsilon": 4.0}, "run": {"min_envoys": 2}}
    assert demo.notebook_parameters() == {}


def test_a_partition_that_starves_an_envoy_is_refused_up_front(tiny_file, tmp_path, capsys):
    data_dir = tiny_file("bloodmnist").parent
    # 12 val samples for 12 envoys: every envoy needs exactly one, which a strong skew never deals out.
    code = main(["demo", f"data_dir={data_dir}", "envoys=12", "partition=dirichlet", "alpha=0.01",
                 f"runs={tmp_path / 'runs'}"])
    assert code == 1 and "leaves a node without samples" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_baseline_reports_the_same_test_block(tiny_file, tmp_path, capsys):
    data_dir = tiny_file("bloodmnist", 28, {"train": 128, "val": 32, "test": 32}).parent
    assert main(["baseline", f"data_dir={data_dir}", "rounds=2", f"runs={tmp_path}"]) == 0
    results = json.loads(next(tmp_path.glob("*-baseline/results.json")).read_text())
    assert results["kind"] == "centralized baseline" and results["synthetic"] is True
    assert [e["round"] for e in results["rounds"]] == [0, 1, 2]
    test = results["test"]
    assert sorted(test["per_envoy"]) == ["envoy_1", "envoy_2"]
    assert sum(e["samples"] for e in test["per_envoy"].values()) == 32
    for block in [test, *test["per_envoy"].values()]:
        assert 0 <= block["acc"] <= 1 and 0 <= block["auc"] <= 1
    assert "centralized baseline on SYNTHETIC data" in capsys.readouterr().out
    assert results["local"] is None  # each envoy alone only with local=1


def test_baseline_local_trains_each_envoy_alone_on_the_data_as_it_serves_it(tiny_file, tmp_path, capsys):
    # 512 training images: enough that every model, pooled or alone, trains past its initial weights whatever seed
    # the session gives this file (with 128, a pooled and an envoy's model could both stay at round 0, the same)
    data_dir = tiny_file("bloodmnist", 28, {"train": 512, "val": 32, "test": 32}).parent
    assert main(["baseline", f"data_dir={data_dir}", "rounds=2", "LOCAL=1", "partition=scanner", "envoys=2",
                 f"runs={tmp_path}"]) == 0
    out = capsys.readouterr().out
    results = json.loads(next(tmp_path.glob("*-baseline/results.json")).read_text())
    local, test = results["local"], results["test"]
    assert sorted(local["per_envoy"]) == ["envoy_1", "envoy_2"] and results["partition"]["strategy"] == "scanner"
    for name, alone in local["per_envoy"].items():
        assert alone["samples"] == test["per_envoy"][name]["samples"] and 0 <= alone["best_round"] <= 2
        assert f"{name} alone, after 2/2 rounds' worth" in out
        assert alone["acc"] != test["per_envoy"][name]["acc"] or alone["loss"] != test["per_envoy"][name]["loss"]
    total = sum(e["samples"] for e in local["per_envoy"].values())
    assert local["acc"] == pytest.approx(sum(e["acc"] * e["samples"] for e in local["per_envoy"].values()) / total)
    assert "pooled: train 512, val 32, test 32" in out  # both envoys' images, as each serves them
    assert "each envoy alone: test ACC envoy_1" in out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a whole benchmark (about a minute): runs when CI=true")
def test_make_bench_names_the_device_it_measured_and_prints_its_ratios(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, "-m", "localfed", "bench", "dataset=breastmnist", "rounds=1", "tls=0",
                             "device=cpu", f"runs={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "measured on cpu (CPU), bf16 off, stem patch" in result.stdout
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert (numbers["device"], numbers["bf16"], numbers["stem"]) == ("cpu", False, "patch")
    assert numbers["wall_s"] > 0 and numbers["train_throughput_over_limit"] > 0
    assert len(numbers["limit_peak_rss_mb"]) == 2 and {"envoy_1", "envoy_2", "director"} <= set(numbers["peak_rss_mb"])
    # Up per envoy and round: the model's weights and a few metrics, nothing else; one connection each.
    assert numbers["model_bytes"] <= numbers["up_bytes"] <= 1.05 * numbers["model_bytes"]
    assert numbers["down_bytes"] == numbers["model_bytes"] and numbers["connections"] == {"envoy_1": 1, "envoy_2": 1}
    assert "on the wire (float32), per envoy and training round: up" in result.stdout


def _edited_notebook(tmp_path, change) -> str:
    """A copy of the CPU notebook (with the medfl package beside it) whose model cell `change` rewrote."""
    import shutil

    from conftest import ROOT

    shutil.copytree(ROOT / "workspace" / "medfl", tmp_path / "workspace" / "medfl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    notebook = json.loads((ROOT / "workspace" / "Pytorch_MedMNIST_2D.ipynb").read_text())
    (cell,) = [c for c in notebook["cells"] if c["metadata"].get("tags") == ["model"]]
    cell["source"] = change("".join(cell["source"]))
    path = tmp_path / "workspace" / "Mine.ipynb"
    path.write_text(json.dumps(notebook))
    return str(path)


def test_make_baseline_trains_the_model_cell_of_the_notebook_it_is_given(tiny_file, tmp_path):
    import torch

    data_dir = tiny_file("bloodmnist", 28, {"train": 128, "val": 32, "test": 32}).parent
    narrower = _edited_notebook(tmp_path, lambda source: source.replace(
        "nn.Linear(128, 128), nn.ReLU(),", "nn.Linear(128, 32), nn.ReLU(),").replace(
        "nn.Linear(128, num_classes),", "nn.Linear(32, num_classes),"))
    assert main(["baseline", f"data_dir={data_dir}", "rounds=1", f"runs={tmp_path / 'runs'}",
                 f"notebook={narrower}"]) == 0
    results = json.loads(next((tmp_path / "runs").glob("*-baseline/results.json")).read_text())
    trained = torch.load(results["best_model"])
    assert trained["classifier.3.weight"].shape == (32, 128)  # the edited cell's network, not the package's
    assert results["params"]["notebook"] == narrower


def test_a_model_cell_that_needs_more_than_the_parameters_is_refused_in_one_line(tiny_file, tmp_path, capsys):
    data_dir = tiny_file("bloodmnist").parent
    needy = _edited_notebook(tmp_path, lambda source: source + "\nprobe = dummy_shard_descriptor\n")
    assert main(["baseline", f"data_dir={data_dir}", f"runs={tmp_path / 'runs'}", f"notebook={needy}"]) == 1
    err = capsys.readouterr().err
    assert "Mine.ipynb's model cell cannot build the model from the parameters alone (NameError: name " \
           "'dummy_shard_descriptor' is not defined)" in err and err.count("\n") == 1
