"""The notebook, run headless against a real director and two envoys on disjoint synthetic shards."""
import json
import subprocess
import sys
import uuid

import papermill
import pytest
from results_schema import check_results

from conftest import ROOT
from localfed import LocalFederation, tail

SIZES = {"train": 256, "val": 64, "test": 64}
ROUNDS = 2
ENVOYS = ["envoy_1", "envoy_2"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_file):
    data_dir = tiny_file("bloodmnist", 28, SIZES).parent
    shards = {name: {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},2",
                     "download": False} for r, name in enumerate(ENVOYS, 1)}
    fed = LocalFederation(tmp_path_factory.mktemp("federation"), shards, [28, 28, 3], [1])
    with fed:
        fed.data_dir = data_dir
        yield fed
    assert all(c.process.poll() is not None for c in fed.components), "a component outlived the test"


@pytest.fixture(scope="module")
def run(federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    try:
        papermill.execute_notebook(
            ROOT / "workspace" / "Pytorch_MedMNIST_2D.ipynb", out / "executed.ipynb", cwd=ROOT / "workspace",
            parameters={"director_port": federation.port, "rounds_to_train": ROUNDS, "train_batch_size": 32,
                        "experiment_name": name, "output_dir": str(out)},
            kernel_name="python3", progress_bar=False, execution_timeout=240,
        )
    except Exception as exc:
        logs = "\n".join(f"--- {c.name} ---\n{tail(c.log)}" for c in federation.components)
        pytest.fail(f"notebook failed: {exc}\n{logs}")
    return out / name


@pytest.fixture(scope="module")
def results(run):
    return json.loads((run / "results.json").read_text())


def test_results_follow_the_schema(results, run):
    check_results(results, envoys=ENVOYS, rounds=ROUNDS)
    assert results["synthetic"] is True and results["data_source"] == "synthetic"
    for name in ("metrics.csv", "curves.png", "partition.png", "best_model.pt", "last_model.pt"):
        assert (run / name).stat().st_size > 0, name
    assert any((run / "tensorboard").iterdir())
    assert (run.parent / "latest").resolve() == run.resolve()


def test_every_streamed_acc_and_auc_is_a_fraction(run):
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    values = [float(r.split(",")[-1]) for r in rows if r.split(",")[5] in ("acc", "auc")]
    # training: (rounds + final validation) x global validate + rounds x local validate, x (2 envoys + aggregate);
    # test: 3; two metrics each
    assert len(values) == ((ROUNDS + 1) + ROUNDS) * 3 * 2 + 3 * 2
    assert all(0.0 <= v <= 1.0 for v in values)


def test_training_loss_went_down(results):
    losses = [e["aggregated"]["train_loss"] for e in results["rounds"][1:]]
    assert losses[-1] < losses[0]


def _evaluate(model, split, federation):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "evaluate_saved.py"), str(model), split,
                             "bloodmnist", "28", str(federation.data_dir), "2"],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def _pooled(shards):
    total = sum(s["n"] for s in shards.values())
    # OpenFL's aggregate is the sample-weighted mean of the envoys' values.
    return {k: sum(s[k] * s["n"] for s in shards.values()) / total for k in ("loss", "acc", "auc")}


def test_best_model_is_the_reported_best_and_reproduces_its_validation(results, federation):
    """Loaded in a fresh process, the best model scores exactly what the federation reported for it."""
    best = results["best"]
    aucs = [e["aggregated"]["val_auc"] for e in results["rounds"]]
    assert best["value"] == max(aucs) and best["round"] == aucs.index(max(aucs))
    reported = results["rounds"][best["round"]]["aggregated"]
    fresh = _pooled(_evaluate(results["best_model"], "val", federation))
    for name in ("loss", "acc", "auc"):
        assert fresh[name] == pytest.approx(reported[f"val_{name}"], abs=1e-5), name


def test_test_scores_are_the_best_models_on_each_envoys_test_split(results, federation):
    shards = _evaluate(results["best_model"], "test", federation)
    for name, scores in results["test"]["per_envoy"].items():
        assert scores["samples"] == shards[name]["n"]
        for metric in ("loss", "acc", "auc"):
            assert scores[metric] == pytest.approx(shards[name][metric], abs=1e-5), (name, metric)
    pooled = _pooled(shards)
    for metric in ("loss", "acc", "auc"):
        assert results["test"][metric] == pytest.approx(pooled[metric], abs=1e-5)


def test_last_model_is_the_final_average_and_loads_in_three_lines(results, federation):
    import torch

    from medfl import build_model

    torch.manual_seed(0)  # the notebook's seed: this is the model it submitted
    initial = build_model("bloodmnist", 28).state_dict()
    model = build_model("bloodmnist", 28)
    model.load_state_dict(torch.load(results["last_model"]))
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    # The final global model is validated too (the extra round), so its scores are on record.
    fresh = _pooled(_evaluate(results["last_model"], "val", federation))
    assert fresh["loss"] == pytest.approx(results["rounds"][-1]["aggregated"]["val_loss"], abs=1e-5)
