"""`make compare` end to end on tiny synthetic data: two algorithms through a real director and make compare's three
envoys under Dirichlet 0.3 label skew (FedNTD on the envoys, FedAdam on the director), two rounds, the centralized
baseline, and what it leaves behind; the director's update checks reject and clip no honest envoy there (the second
round is the first the direction check judges). FedProx's run is the HPU notebook's in tests/test_end_to_end.py."""
import json
import os
import subprocess
import sys

import pytest
from test_end_to_end import leftovers

from conftest import ROOT
from localfed.compare import gap, table

SIZES = {"train": 512, "val": 64, "test": 64}
ENVOYS = ["envoy_1", "envoy_2", "envoy_3"]


@pytest.fixture(scope="module")
def compared(tiny_file, tmp_path_factory):
    data_dir = tiny_file("bloodmnist", 28, SIZES).parent
    runs = tmp_path_factory.mktemp("runs")
    command = [sys.executable, "-m", "localfed", "compare", f"data_dir={data_dir}", f"runs={runs}", "rounds=2",
               "algorithms=fedntd fedadam", "timeout=300", "tracking=mlflow"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"make compare failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (out,) = runs.glob("compare-*")
    assert not leftovers(out), "a director, envoy or kernel outlived the comparison"
    return out, result.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="make compare end to end (about 60 s): runs when CI=true")
def test_compare_json_holds_every_algorithm_and_the_centralized_baseline(compared):
    out, _ = compared
    report = json.loads((out / "compare.json").read_text())
    assert report["synthetic"] is True and report["envoys"] == 3
    assert report["partition"] == {"strategy": "dirichlet", "alpha": 0.3, "seed": 0}  # make compare's defaults
    assert (report["rounds"], report["epochs"]) == (2, 1) and report["machine"]["cpus"] >= 1
    assert list(report["algorithms"]) == ["fedntd", "fedadam"]
    assert report["algorithms"]["fedntd"]["settings"] == {"name": "fedntd", "ntd_beta": 1.0, "ntd_tau": 1.0}
    assert report["algorithms"]["fedadam"]["settings"]["server_learning_rate"] == 0.01
    for name, run in [*report["algorithms"].items(), ("centralized", report["centralized"])]:
        assert run["status"] == "completed", name
        assert sorted(run["test"]["per_envoy"]) == ENVOYS
        for block in [run["test"], *run["test"]["per_envoy"].values()]:
            assert 0 <= block["acc"] <= 1 and 0 <= block["auc"] <= 1
            # every test score with its 95 % interval around it, the federated runs' and the centralized one's
            for metric in ("acc", "auc"):
                low, high = block["ci"][metric]
                assert 0 <= low <= block[metric] <= high <= 1, (name, metric)
        assert sum(e["samples"] for e in run["test"]["per_envoy"].values()) == SIZES["test"]
        assert 0 <= run["best"]["round"] <= 2 and len(run["val_auc"]) == 3
        assert run["wall_seconds"] > 0 and (out / name / "results.json").is_file()
    for run in report["algorithms"].values():
        traffic = run["bytes_per_round"]
        # Every envoy fetches the model and sends back the trained one (with Adam's moments: OpenFL sends them).
        assert traffic["envoys_to_director"] > traffic["director_to_envoys"] > 2 * 4 * 100_000
    assert report["centralized"]["bytes_per_round"] is None
    alone = report["centralized"]["local"]  # each envoy's model trained on its own data alone
    assert sorted(alone["per_envoy"]) == ENVOYS and all(0 <= e["acc"] <= 1 for e in alone["per_envoy"].values())
    assert report["gap"] is None  # no FedAvg run to measure a gap from
    # The runs differ: each algorithm's global model is its own.
    assert report["algorithms"]["fedntd"]["val_auc"][1] != report["algorithms"]["fedadam"]["val_auc"][1]
    for name in ("fedntd", "fedadam"):
        results = json.loads((out / name / "results.json").read_text())
        assert results["algorithm"]["name"] == name and results["traffic"]
        # Honest envoys under label skew: none rejected, none clipped (docs/faults.md's calibration)
        assert (results["rejected_updates"], results["clipped_updates"], results["dropouts"]) == ([], [], []), name


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="make compare end to end (about 60 s): runs when CI=true")
def test_with_tracking_mlflow_each_algorithm_is_a_run_under_one_parent(compared):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    out, _ = compared
    client = MlflowClient((out.parent / "mlruns").as_uri())
    found = client.search_runs([client.get_experiment_by_name("medfl-bloodmnist-28").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("mlflow.runName") == out.name]
    children = {r.data.params["algorithm.name"]: r for r in found if r.data.tags.get("mlflow.parentRunId")
                == parent.info.run_id}
    assert sorted(children) == ["fedadam", "fedntd"] and parent.info.status == "FINISHED"
    for name, run in children.items():
        results = json.loads((out / name / "results.json").read_text())
        assert run.info.run_id == results["tracking"]["run_id"]
        assert run.data.metrics["test_acc"] == results["test"]["acc"], name


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="make compare end to end (about 60 s): runs when CI=true")
def test_the_plot_and_the_table_show_the_comparison(compared):
    out, stdout = compared
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in ("[1/3] fedntd", "[2/3] fedadam", "[3/3] centralized baseline",
                 "round 2/2        aggregator  train",
                 "SYNTHETIC data: bloodmnist 28px, 3 envoys, dirichlet label skew, alpha 0.3, 2 rounds x 1 epochs, "
                 "seed 0"):
        assert line in stdout, line
    table = stdout[stdout.index("SYNTHETIC data: bloodmnist"):]
    for label in ("FedNTD (beta 1, tau 1)", "FedAdam (server lr 0.01)", "\ncentralized ", "\neach envoy alone "):
        assert label in table, label


def test_the_table_shows_each_envoy_s_own_models_beside_the_federated_ones():
    def run(per_envoy, **extra):
        test = {"acc": 0.5, "auc": 0.9, "per_envoy": {n: {"acc": a, "auc": 0.9, "samples": 10}
                                                      for n, a in per_envoy.items()}}
        return {"status": "completed", "settings": {"name": "fedbn"}, "test": test, "best": {"round": 2},
                "wall_seconds": 1.0, "bytes_per_round": None, **extra}

    personal = {"epochs": 2, "acc": 0.8, "auc": 0.95, "per_envoy": {"envoy_1": {"acc": 0.75}, "envoy_2": {"acc": 0.85}}}
    report = {"synthetic": True, "dataset": "bloodmnist", "size": 28, "envoys": 2, "rounds": 2, "epochs": 1, "seed": 0,
              "partition": {"strategy": "scanner", "alpha": 0.5, "seed": 0},
              "algorithms": {"fedbn": run({"envoy_1": 0.6, "envoy_2": 0.7}, personalized=personal)},
              "centralized": run({"envoy_1": 0.9, "envoy_2": 0.95},
                                 local={"acc": 0.55, "auc": 0.8, "per_envoy": {"envoy_1": {"acc": 0.5},
                                                                                "envoy_2": {"acc": 0.6}}})}
    lines = table(report).splitlines()
    assert lines[0] == ("SYNTHETIC data: bloodmnist 28px, 2 envoys, scanner shift (each envoy's own acquisition), "
                        "2 rounds x 1 epochs, seed 0")
    assert lines[3].split()[:4] == ["FedBN", "0.5000", "0.9000", "0.600"]
    assert lines[4].split() == ["+", "2", "epochs", "on", "each", "envoy", "0.8000", "0.9500", "0.750", "0.850"]
    assert lines[6].split() == ["each", "envoy", "alone", "0.5500", "0.8000", "0.500", "0.600"]


def test_the_table_says_what_was_run_and_what_each_column_measured():
    """With data_dirs no partition was applied; the traffic is all envoys' together; intervals beside scores."""
    entry = {"acc": 0.5, "auc": 0.9, "ci": {"acc": [0.41, 0.59], "auc": [0.85, 0.94]}, "samples": 10}
    run = {"status": "completed", "settings": {"name": "fedavg"}, "best": {"round": 1}, "wall_seconds": 1.0,
           "test": {**entry, "per_envoy": {"envoy_1": entry}},
           "bytes_per_round": {"envoys_to_director": 2_000_000, "director_to_envoys": 1_000_000}}
    report = {"synthetic": False, "dataset": "bloodmnist", "size": 28, "envoys": 1, "rounds": 1, "epochs": 1,
              "seed": 0, "bootstrap": 1000, "partition": {"strategy": "own files", "alpha": None, "seed": None},
              "algorithms": {"fedavg": run}, "centralized": {**run, "bytes_per_round": None}}
    lines = table(report).splitlines()
    assert "each envoy's own file, no partition applied" in lines[0] and "alpha" not in lines[0]
    assert "all envoys together" in lines[1] and "1000 resamples" in lines[1]
    assert "MB up" in lines[2] and "test ACC [95% CI]" in lines[2]
    assert lines[3].split()[:7] == ["FedAvg", "0.5000", "[0.410,", "0.590]", "0.9000", "[0.850,", "0.940]"]
    assert lines[3].split()[-2:] == ["2.00", "1.00"]


def test_the_gap_is_measured_from_fedavg_to_the_centralized_model():
    def run(acc):
        return {"status": "completed", "test": {"acc": acc}}

    report = {"algorithms": {"fedavg": run(0.70), "fedprox": run(0.75), "median": run(0.80),
                             "fedadam": {"status": "failed", "error": "lost"}}, "centralized": run(0.90)}
    found = gap(report)
    assert (found["best_algorithm"], found["fedavg"], found["centralized"]) == ("median", 0.70, 0.90)
    assert found["closed"] == pytest.approx(0.5)
    report["centralized"] = run(0.65)
    assert gap(report)["closed"] is None  # FedAvg is not behind: nothing to close
