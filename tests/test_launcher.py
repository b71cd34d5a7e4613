"""The launcher's checks that run before any process starts, and the centralized baseline."""
import json
import os
import socket

import pytest

import localfed.data
from localfed.__main__ import main
from medmnist_shard import files


def test_data_dir_without_the_file_fails_before_anything_starts(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path), "--runs", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert f"DATA_DIR {tmp_path} has no bloodmnist.npz" in err and "never written to" in err
    assert not (tmp_path / "runs").exists()


def test_offline_download_fails_with_the_url_and_the_synthetic_option(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/pathmnist_64.npz"
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (url, "x"))
    monkeypatch.setattr(localfed.data, "CACHE", tmp_path / "cache")
    assert main(["demo", "--dataset", "pathmnist", "--size", "64", "--runs", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert url in err and "make demo DATA=synthetic runs the same on generated data" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["--envoys", "0"], "ENVOYS=0: must be at least 1"),
    (["--rounds", "0"], "ROUNDS=0: must be at least 1"),
    (["--partition", "dirichlet", "--alpha", "0"], "ALPHA=0.0: the Dirichlet concentration must be positive"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--size", "100"], "unsupported image size 100"),
    (["--min-envoys", "0"], "MIN_ENVOYS=0: give a number of envoys (an int of at least 1) or a share of them"),
    (["--min-envoys", "3"], "MIN_ENVOYS=3 is more than ENVOYS=2"),
    (["--round-timeout", "-5"], "ROUND_TIMEOUT=-5.0: give seconds, or 0 for no limit"),
    (["--algo", "fedsgd"], "ALGO='fedsgd': use one of fedavg, fedprox, fedntd, fedadam"),
    (["--algo", "fedntd", "--ntd-beta", "-1"], "NTD_BETA=-1.0: FedNTD's distillation weight must be a number of"),
    (["--algo", "fedntd", "--dataset", "pneumoniamnist"], "ALGO='fedntd' distils the classes an image is not, so it "
     "needs one label of three or more classes; pneumoniamnist is binary-class with 2 outputs: use fedavg or fedprox"),
    (["--mu", "-1"], "MU=-1.0: FedProx's proximal weight must be a number of at least 0"),
    (["--server-lr", "0"], "SERVER_LR=0.0: it must be a positive number"),
    (["--partition", "skewed"], "PARTITION=skewed: use iid or dirichlet"),
    (["--wire-dtype", "int8"], "WIRE_DTYPE=int8: use float32, float16, bfloat16"),
    (["--wan", "20ms,fast"], "WAN=20ms,fast: 'fast' in the link profile '20ms,fast': give e.g. 40ms, 50mbit and 0.5%"),
])
def test_bad_settings_are_refused_up_front(tmp_path, capsys, args, message):
    assert main(["demo", "--data", "synthetic", "--runs", str(tmp_path / "runs"), *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["--algorithms", "fedavg,fedsgd"], "ALGOS='fedsgd': use one of fedavg, fedprox, fedntd, fedadam"),
    (["--algorithms", " , "], "ALGOS is empty"),
    (["--server-lr", "-0.1"], "SERVER_LR=-0.1: it must be a positive number"),
])
def test_make_compare_refuses_bad_algorithms_up_front(tmp_path, capsys, args, message):
    assert main(["compare", "--data", "synthetic", "--runs", str(tmp_path / "runs"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "runs").exists()


def test_make_compare_defaults_to_three_skewed_envoys_and_make_demo_to_two_iid():
    from localfed.__main__ import compared, parse

    compare, demo = parse(["compare"]), parse(["demo"])
    assert (compare.envoys, compare.partition, compare.alpha) == (3, "dirichlet", 0.3)
    assert (demo.envoys, demo.partition, demo.alpha) == (2, "iid", 0.5)
    assert compared(compare) == ["fedavg", "fedprox", "fedadam", "median"] and compare.algo == "fedavg"
    assert compared(parse(["compare", "--algorithms", "fedavg, median"])) == ["fedavg", "median"]
    assert parse(["compare", "--envoys", "", "--partition", "", "--alpha", ""]) == compare  # unset make variables


def test_a_partition_that_starves_an_envoy_is_refused_up_front(tiny_file, tmp_path, capsys):
    data_dir = tiny_file("bloodmnist").parent
    # 12 val samples for 12 envoys: every envoy needs exactly one, which a strong skew never deals out.
    code = main(["demo", "--data-dir", str(data_dir), "--envoys", "12", "--partition", "dirichlet", "--alpha", "0.01",
                 "--runs", str(tmp_path / "runs")])
    assert code == 1 and "leaves a node without samples" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_baseline_reports_the_same_test_block(tiny_file, tmp_path, capsys):
    data_dir = tiny_file("bloodmnist", 28, {"train": 128, "val": 32, "test": 32}).parent
    assert main(["baseline", "--data-dir", str(data_dir), "--rounds", "2", "--runs", str(tmp_path)]) == 0
    results = json.loads(next(tmp_path.glob("*-baseline/results.json")).read_text())
    assert results["kind"] == "centralized baseline" and results["synthetic"] is True
    assert [e["round"] for e in results["rounds"]] == [0, 1, 2]
    test = results["test"]
    assert sorted(test["per_envoy"]) == ["envoy_1", "envoy_2"]
    assert sum(e["samples"] for e in test["per_envoy"].values()) == 32
    for block in [test, *test["per_envoy"].values()]:
        assert 0 <= block["acc"] <= 1 and 0 <= block["auc"] <= 1
    assert "centralized baseline on SYNTHETIC data" in capsys.readouterr().out


def test_the_readmes_settings_table_shows_the_defaults_that_make_demo_uses():
    from conftest import ROOT
    from localfed.__main__ import parse

    empty = parse(["demo", *[arg for option in ("--dataset", "--size", "--envoys", "--rounds", "--epochs",
                                                "--partition", "--alpha", "--seed", "--data", "--tls",
                                                "--min-envoys", "--round-timeout", "--algo", "--mu", "--server-lr",
                                                "--ntd-beta", "--algorithms", "--wire-dtype") for arg in (option, "")]])
    assert empty == parse(["demo"])  # an unset Makefile variable means the default
    documented = {}
    for row in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in row.split("|")]
        if len(cells) > 3 and cells[1].startswith("`") and cells[1].strip("`").isupper():
            names = [n.strip(" `") for n in cells[1].split(",")]
            values = [v.strip(" `") for v in cells[2].split(",")]
            documented.update(zip(names, values, strict=False))
    for variable, value in vars(empty).items():
        if variable.upper() in documented and variable not in ("data_dir", "device", "notebook", "bf16", "stem",
                                                                "server_lr"):
            assert documented[variable.upper()] == str(value), variable
    assert {"DATASET", "SIZE", "ENVOYS", "ROUNDS", "EPOCHS", "SEED", "MIN_ENVOYS", "TLS", "ALGO", "MU",
            "NTD_BETA", "ALGOS", "WIRE_DTYPE"} <= set(documented)
    assert documented["ALGOS"] == empty.algorithms  # stored as args.algorithms, so not matched above


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a whole benchmark (about a minute): runs when CI=true")
def test_make_bench_names_the_device_it_measured_and_prints_its_ratios(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, "-m", "localfed", "bench", "--dataset", "breastmnist", "--rounds", "1",
                             "--tls", "0", "--device", "cpu", "--runs", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
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
