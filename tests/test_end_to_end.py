"""The notebook, run headless against a real director and two envoys on disjoint synthetic shards."""
import json
import subprocess
import sys
import uuid

import papermill
import pytest

from conftest import ROOT
from localfed import LocalFederation, tail

SIZES = {"train": 256, "val": 64, "test": 64}
ROUNDS = 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_file):
    data_dir = tiny_file("bloodmnist", 28, SIZES).parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir),
                             "rank_worldsize": f"{r},2", "download": False} for r in (1, 2)}
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


def _aggregated(metrics, task):
    rounds = {}
    for m in metrics:
        if m["metric_origin"] == "aggregator" and m["task_name"] == task:
            rounds.setdefault(m["round"], {})[m["metric_name"]] = m["metric_value"]
    return rounds


def test_experiment_finished_every_round_for_every_envoy(run):
    metrics = json.loads((run / "metrics.json").read_text())
    for task in ("train", "aggregated_model_validate", "locally_tuned_model_validate"):
        assert sorted(_aggregated(metrics, task)) == list(range(ROUNDS))
        for envoy in ("envoy_1", "envoy_2"):
            assert {m["round"] for m in metrics if m["metric_origin"] == envoy and m["task_name"] == task} \
                == set(range(ROUNDS))
    params = json.loads((run / "params.json").read_text())
    assert params["synthetic"] is True and params["dataset"] == "bloodmnist"


def test_every_acc_and_auc_is_a_fraction(run):
    metrics = json.loads((run / "metrics.json").read_text())
    values = [m["metric_value"] for m in metrics if m["metric_name"] in ("acc", "auc")]
    assert len(values) == ROUNDS * 3 * 2 * 2  # rounds x (2 envoys + aggregate) x 2 tasks x 2 metrics
    assert all(0.0 <= v <= 1.0 for v in values)


def test_training_loss_went_down(run):
    train = _aggregated(json.loads((run / "metrics.json").read_text()), "train")
    assert train[ROUNDS - 1]["train_loss"] < train[0]["train_loss"]


def test_saved_best_model_reproduces_its_reported_validation(run, federation):
    """Loaded in a fresh process, the best model scores what the federation reported for it."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "evaluate_saved.py"), str(run / "best_model.pt"), "bloodmnist", "28",
         str(federation.data_dir), "2"], capture_output=True, text=True, timeout=120, check=True)
    shards = json.loads(result.stdout)
    total = sum(s["n"] for s in shards)
    assert total == SIZES["val"]
    # OpenFL's aggregate is the sample-weighted mean of the envoys' values.
    pooled = {k: sum(s[k] * s["n"] for s in shards) / total for k in ("loss", "acc", "auc")}
    reported = _aggregated(json.loads((run / "metrics.json").read_text()), "aggregated_model_validate")
    matches = [r for r, m in reported.items() if all(abs(m[k] - pooled[k]) < 1e-4 for k in pooled)]
    assert matches, f"fresh evaluation {pooled} matches no reported round: {reported}"


def test_last_model_is_trained_and_loads_in_three_lines(run):
    import torch

    from medfl import build_model

    torch.manual_seed(0)  # the notebook's seed: this is the model it submitted
    initial = build_model("bloodmnist", 28).state_dict()
    model = build_model("bloodmnist", 28)
    model.load_state_dict(torch.load(run / "last_model.pt"))
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
