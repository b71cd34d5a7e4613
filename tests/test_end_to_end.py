"""`make demo` end to end: a real director and two envoys on disjoint synthetic shards, the notebook
executed headless against them, and everything it leaves behind checked against a fresh evaluation."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from results_schema import check_results

from conftest import ROOT

SIZES = {"train": 512, "val": 64, "test": 64}
ROUNDS = 2
ENVOYS = ["envoy_1", "envoy_2"]


def leftovers(run_dir):
    """Processes still running inside a run folder (the director and envoys work there)."""
    found = []
    for process in psutil.process_iter(["pid", "cwd", "cmdline"]):
        cwd = process.info["cwd"] or ""
        if cwd.startswith(str(run_dir)) or str(run_dir) in " ".join(process.info["cmdline"] or []):
            found.append(process.info)
    return found


def stop(demo):
    """End a launcher the way a user would (Ctrl-C), so that it still stops what it started."""
    if demo.poll() is None:
        demo.send_signal(2)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()


def demo_command(data_dir, runs, *extra):
    return [sys.executable, "-m", "localfed", "demo", f"data_dir={data_dir}", f"runs={runs}", f"rounds={ROUNDS}",
            "envoys=2", "timeout=300", *extra]


@pytest.fixture(scope="module")
def data_dir(tiny_file):
    return tiny_file("bloodmnist", 28, SIZES).parent


@pytest.fixture(scope="module")
def medfl_imports(tmp_path_factory):
    """Where every process of the module's run records each import of medfl (tests/saboteur: MEDFL_TEST_IMPORTS)."""
    return tmp_path_factory.mktemp("imports") / "medfl.jsonl"


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory, medfl_imports):
    runs = tmp_path_factory.mktemp("runs")
    saboteur = str(ROOT / "tests" / "saboteur")  # test-only hooks: here, each process records its imports of medfl
    env = {**os.environ, "MEDFL_TEST_IMPORTS": str(medfl_imports),
           "PYTHONPATH": os.pathsep.join(filter(None, [saboteur, os.environ.get("PYTHONPATH")]))}
    # tracking=mlflow: the run also goes to MLflow (runs/mlruns); the default imports no MLflow (test_intervals.py)
    result = subprocess.run(demo_command(data_dir, runs, "tracking=mlflow"), cwd=ROOT, capture_output=True, text=True,
                            timeout=400,
                            env=env)
    assert result.returncode == 0, f"make demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    run_dir = (runs / "latest").resolve()
    assert not leftovers(run_dir), "a director, envoy or kernel outlived the run"
    return run_dir, result.stdout


@pytest.fixture(scope="module")
def results(run):
    return json.loads((run[0] / "results.json").read_text())


def test_results_follow_the_schema(results):
    check_results(results, envoys=ENVOYS, rounds=ROUNDS)
    assert results["data_source"] == "file" and results["synthetic"] is True
    assert results["tls"] is True  # make demo runs with mutual TLS unless TLS=0
    assert results["partition"] == {"strategy": "iid", "alpha": 0.5, "seed": 0}


def test_the_run_folder_holds_everything_a_user_looks_at(run):
    run_dir, _ = run
    for name in ("results.json", "metrics.csv", "curves.png", "partition.png", "best_model.pt", "last_model.pt",
                 "notebook.ipynb", "logs/director.log", "logs/envoy_1.log", "logs/envoy_2.log", "logs/notebook.log"):
        assert (run_dir / name).stat().st_size > 0, name
    assert any((run_dir / "tensorboard").iterdir())
    for png in ("curves.png", "partition.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_is_shown_round_by_round(run):
    _, stdout = run
    assert "all 2 envoys registered" in stdout
    for line in ("round 1/2        envoy_1     train", "round 2/2        envoy_2     train",
                 "model after 2/2  aggregator  global val", "test             aggregator  global val"):
        assert line in stdout, line
    assert "SYNTHETIC data, not MedMNIST" in stdout and "test ACC" in stdout


def test_the_nodes_run_the_medfl_their_experiment_brought_not_a_copy_of_their_own(run, medfl_imports):
    """The director and every envoy import medfl only from the experiment OpenFL unpacked into their working folder,
    with workspace/ never on their path (roots.py): else a node would run its own copy, not what the researcher sent."""
    records = [json.loads(line) for line in medfl_imports.read_text().splitlines()]
    nodes = [r for r in records if r["role"] == "director" or r["role"].startswith("envoy ")]
    assert {r["role"] for r in nodes} == {"director", *(f"envoy {e}" for e in ENVOYS)}, records
    workspace = ROOT / "workspace"
    for record in nodes:
        package = Path(record["file"]).resolve().parent
        assert not record["workspace_on_path"] and not package.is_relative_to(workspace), record
        # OpenFL runs an experiment inside the folder it unpacked it to, in the node's own folder.
        experiment = Path(record["cwd"]).resolve()
        node = "director" if record["role"] == "director" else record["role"].split()[1]
        assert package == experiment / "medfl" and experiment.parent == run[0] / "nodes" / node, record
    # The check can see a copy: the launcher, which has workspace/ on its path, imports that one.
    assert any(Path(r["file"]).resolve().is_relative_to(workspace) for r in records if r not in nodes), records


def test_every_streamed_acc_and_auc_is_a_fraction(run):
    rows = (run[0] / "metrics.csv").read_text().splitlines()[1:]
    values = [float(r.split(",")[-1]) for r in rows if r.split(",")[5] in ("acc", "auc")]
    # (rounds + final validation) global + rounds local validations, x (2 envoys + aggregate) x 2 metrics; test: 3 x 2
    assert len(values) == ((ROUNDS + 1) + ROUNDS) * 3 * 2 + 3 * 2
    assert all(0.0 <= v <= 1.0 for v in values)


def _model_bytes():
    from medfl import build_model

    return 4 * sum(t.numel() for t in build_model("bloodmnist", 28).state_dict().values())


def test_each_envoy_moves_the_model_once_each_way_a_round_on_one_connection(results):
    weights = _model_bytes()
    training, final = results["traffic"][:ROUNDS], results["traffic"][ROUNDS]
    for t in training:
        for envoy, share in t["per_envoy"].items():
            # Up: the trained weights (not Adam's state: opt_treatment RESET) and a few metrics; down: the model.
            assert weights <= share["received_bytes"] < weights + 100, (t["round"], envoy)
            assert share["sent_bytes"] == weights, (t["round"], envoy)
    assert all(share["received_bytes"] < 100 for share in final["per_envoy"].values())  # metrics only
    for envoy in ENVOYS:
        assert sum(t["per_envoy"][envoy]["connections"] for t in results["traffic"]) == 1, envoy


def test_training_loss_went_down(results):
    losses = [e["aggregated"]["train_loss"] for e in results["rounds"][1:]]
    assert losses[-1] < losses[0]


def _evaluate(model, split, data_dir):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "evaluate_saved.py"), str(model), split,
                             "bloodmnist", "28", str(data_dir), "2"],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def _pooled(shards):
    total = sum(s["n"] for s in shards.values())
    # OpenFL's aggregate is the sample-weighted mean of the envoys' values.
    return {k: sum(s[k] * s["n"] for s in shards.values()) / total for k in ("loss", "acc", "auc")}


def test_best_model_is_the_reported_best_and_reproduces_its_validation(results, data_dir):
    """Loaded in a fresh process, the best model scores exactly what the federation reported for it."""
    best = results["best"]
    aucs = [e["aggregated"]["val_auc"] for e in results["rounds"]]
    assert best["value"] == max(aucs) and best["round"] == aucs.index(max(aucs))
    reported = results["rounds"][best["round"]]["aggregated"]
    fresh = _pooled(_evaluate(results["best_model"], "val", data_dir))
    for name in ("loss", "acc", "auc"):
        assert fresh[name] == pytest.approx(reported[f"val_{name}"], abs=1e-5), name


@pytest.fixture(scope="module")
def evaluated(run, data_dir, tmp_path_factory):
    """make evaluate of the run's best model on the same envoys' test splits: (evaluation.json, stdout)."""
    runs = tmp_path_factory.mktemp("evaluations")
    command = [sys.executable, "-m", "localfed", "evaluate", f"model={run[0] / 'best_model.pt'}",
               f"data_dir={data_dir}", f"runs={runs}", "envoys=2", "timeout=300"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"make evaluate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (folder,) = runs.glob("*-evaluate-bloodmnist-28")
    assert not leftovers(folder), "a director, envoy or kernel outlived the evaluation"
    return json.loads((folder / "evaluation.json").read_text()), result.stdout


def test_every_test_score_has_its_interval_per_envoy_and_pooled(results):
    for block in [results["test"], *results["test"]["per_envoy"].values()]:
        for metric in ("acc", "auc", "loss"):
            low, high = block["ci"][metric]
            assert low <= block[metric] <= high and high - low > 0, metric
    # pooled over both envoys' test images: narrower than either envoy's own
    for metric in ("acc", "loss"):
        pooled = results["test"]["ci"][metric]
        assert all(pooled[1] - pooled[0] < e["ci"][metric][1] - e["ci"][metric][0]
                   for e in results["test"]["per_envoy"].values()), metric


@pytest.mark.slow
def test_make_evaluate_reproduces_the_runs_test_block_exactly(results, evaluated, run):
    """The run's best model, sent back with nothing trained, scores what the run's test reported: every value and
    every interval, bit for bit (the bootstrap is seeded by the run's seed and the split)."""
    evaluation, stdout = evaluated
    assert (evaluation["status"], evaluation["split"], evaluation["dataset"]) == ("completed", "test", "bloodmnist")
    assert evaluation["model_sha256"] == hashlib.sha256((run[0] / "best_model.pt").read_bytes()).hexdigest()
    for key in ("acc", "auc", "loss", "ci"):
        assert evaluation[key] == results["test"][key], key
    for name, scores in results["test"]["per_envoy"].items():
        for key in ("samples", "acc", "auc", "loss", "ci"):
            assert evaluation["per_envoy"][name][key] == scores[key], (name, key)
    table = stdout[stdout.index("on each envoy's test split"):]
    assert "envoy_1" in table and "pooled" in table and "95 % CI" in table


@pytest.mark.slow
def test_make_evaluate_refuses_a_model_of_another_network_before_it_starts(data_dir, tmp_path):
    import torch

    from medfl import build_model

    model = tmp_path / "pathmnist.pt"
    torch.save(build_model("pathmnist", 28).state_dict(), model)  # 9 classes, where bloodmnist has 8
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "localfed", "evaluate", f"model={model}", f"data_dir={data_dir}",
                             f"runs={runs}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "is not the weights of this network (bloodmnist 28 px" in result.stderr
    assert "(9, 128) there and (8, 128) here" in result.stderr and not runs.exists()


def test_mlflow_lists_the_run_with_the_metrics_of_results_json(results):
    """Read back through MLflow's own API: one run, whose test scores, intervals and curves are results.json's."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    tracked = results["tracking"]
    client = MlflowClient(tracked["uri"])
    experiment = client.get_experiment_by_name("medfl-bloodmnist-28")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == tracked["run_id"] and found.info.status == "FINISHED"
    metrics, test = found.data.metrics, results["test"]
    for metric in ("acc", "auc", "loss"):
        assert metrics[f"test_{metric}"] == test[metric]
        assert [metrics[f"test_{metric}_ci_low"], metrics[f"test_{metric}_ci_high"]] == test["ci"][metric]
        assert metrics[f"envoy_1/test_{metric}"] == test["per_envoy"]["envoy_1"][metric]
    history = client.get_metric_history(found.info.run_id, "val_auc")
    assert sorted((h.step, h.value) for h in history) == [(e["round"], e["aggregated"]["val_auc"])
                                                          for e in results["rounds"]]
    assert found.data.params["algorithm.name"] == "fedavg" and found.data.params["rounds"] == str(ROUNDS)
    files = {f.path for f in client.list_artifacts(found.info.run_id)}
    assert {"results.json", "best_model.pt", "curves.png", "metrics.csv"} <= files


def test_test_scores_are_the_best_models_on_each_envoys_test_split(results, data_dir):
    shards = _evaluate(results["best_model"], "test", data_dir)
    for name, scores in results["test"]["per_envoy"].items():
        assert scores["samples"] == shards[name]["n"]
        for metric in ("loss", "acc", "auc"):
            assert scores[metric] == pytest.approx(shards[name][metric], abs=1e-5), (name, metric)
    pooled = _pooled(shards)
    for metric in ("loss", "acc", "auc"):
        assert results["test"][metric] == pytest.approx(pooled[metric], abs=1e-5)


def test_last_model_is_the_final_average_and_loads_in_three_lines(results, data_dir):
    import torch

    from medfl import build_model

    torch.manual_seed(0)  # the notebook's seed: this is the model it submitted
    initial = build_model("bloodmnist", 28).state_dict()
    model = build_model("bloodmnist", 28)
    model.load_state_dict(torch.load(results["last_model"]))
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    # The final global model is validated too (the extra round), so its scores are on record.
    fresh = _pooled(_evaluate(results["last_model"], "val", data_dir))
    assert fresh["loss"] == pytest.approx(results["rounds"][-1]["aggregated"]["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_a_half_precision_wire_halves_the_bytes_and_the_envoys_hold_the_directors_model(data_dir, tmp_path):
    """wire_dtype float16: each round's change travels in half the bytes both ways (after the first model), and the
    model the envoys rebuild from those changes is the director's, to the bit: scored here in a fresh process,
    the director's last model gives exactly what each envoy reported for it."""
    result = subprocess.run(demo_command(data_dir, tmp_path, "wire_dtype=float16", "tls=0"), cwd=ROOT,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    results = json.loads((tmp_path / "latest" / "results.json").read_text())
    check_results(results, envoys=ENVOYS, rounds=ROUNDS)
    assert results["params"]["wire_dtype"] == "float16"
    half = _model_bytes() // 2
    for t in results["traffic"][:ROUNDS]:
        for share in t["per_envoy"].values():
            assert half <= share["received_bytes"] < half + 100
            assert share["sent_bytes"] == (2 * half if t["round"] == 0 else half)  # the first model whole
    final = results["rounds"][ROUNDS]
    fresh = _evaluate(results["last_model"], "val", data_dir)
    for envoy in ENVOYS:
        for metric in ("loss", "acc", "auc"):
            assert fresh[envoy][metric] == pytest.approx(final["envoys"][envoy][f"val_{metric}"], abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_stops_every_process(data_dir, tmp_path):
    # Many rounds, so that the interrupt surely lands in the middle of training. Started with SIGINT ignored, as a
    # script's background job (`make demo &`) inherits it from bash: Ctrl-C still stops the run.
    demo = subprocess.Popen(demo_command(data_dir, tmp_path, "rounds=100"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in demo.stdout:  # wait until the envoys are training
            if "round 1/100" in line:
                break
        run_dir = next(tmp_path.glob("*-bloodmnist-28"))
        assert leftovers(run_dir), "nothing was running yet"
        demo.send_signal(2)  # SIGINT, as Ctrl-C sends
        rest = demo.communicate(timeout=60)[0]
    finally:
        stop(demo)
    assert demo.returncode == 130 and "interrupted" in rest
    assert not leftovers(run_dir)
    assert not (tmp_path / "latest").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="the HPU notebook's own federation (about 20 s): runs when "
                    "CI=true; tests/test_repository.py checks it differs from the CPU one only in its parameters")
def test_the_hpu_notebook_runs_here_with_device_auto(data_dir, tmp_path):
    """With FedProx: its optimizer travels to the envoys (tests/test_compare.py runs FedNTD and FedAdam)."""
    notebook = ROOT / "workspace" / "HPU_Pytorch_MedMNIST_2D.ipynb"
    result = subprocess.run(demo_command(data_dir, tmp_path, f"notebook={notebook}", "device=auto", "rounds=1",
                                         "tls=0", "algorithm=fedprox", "mu=0.1"),
                            cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    results = json.loads((tmp_path / "latest" / "results.json").read_text())
    check_results(results, envoys=ENVOYS, rounds=1)
    assert results["params"]["device"] == "auto" and results["params"]["bf16"] is True  # autocast is off on CPU
    assert results["tls"] is False and results["algorithm"] == {"name": "fedprox", "mu": 0.1}
    assert not leftovers((tmp_path / "latest").resolve())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a federation of its own (about 20 s): runs when CI=true")
def test_an_envoy_without_the_requested_device_fails_by_name(data_dir, tmp_path):
    notebook = ROOT / "workspace" / "HPU_Pytorch_MedMNIST_2D.ipynb"
    result = subprocess.run(demo_command(data_dir, tmp_path, f"notebook={notebook}", "rounds=1"),
                            cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode != 0
    run_dir = next(tmp_path.glob("*-bloodmnist-28"))
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("envoy_*.log"))
    assert "has no HPU device, but the experiment asked for device='hpu'" in logs
    assert not leftovers(run_dir)


# --- faults: a node killed mid-run (SIGKILL, as a crash or a pulled cable would) ------------------------------
HEALTH_S = 2  # envoys' health-check period here: a silent envoy is lost after 2 x 2 s
BOUND_S = 4 * HEALTH_S + 40  # from the kill to the end of make demo: detection, saving, stopping every node


@pytest.fixture(scope="module")
def chaos_data(tiny_file):
    # Big enough shards that each envoy trains for seconds: the kill lands inside the round it aims at.
    return tiny_file("bloodmnist", 28, {"train": 3000, "val": 90, "test": 90}).parent


def node_pid(run_dir, name):
    """The process id of the director or of the envoy called `name`, from the run's processes."""
    for p in leftovers(run_dir):
        args = p["cmdline"] or []
        if "node" in args and name in args:  # "director", or an envoy's name
            return p["pid"]
    raise AssertionError(f"no running {name}")


def kill_when(command, pattern, victim, cwd=ROOT):
    """Run `make demo`; when a line matches `pattern`, SIGKILL the process group of `victim` (the director
    or an envoy's name). Returns (return code, output, seconds from the kill to the end, run folder)."""
    demo = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, killed = [], None
    try:
        for line in demo.stdout:
            output.append(line)
            if killed is None and re.search(pattern, line):
                runs = next(arg for arg in command if arg.startswith("runs=")).partition("=")[2]
                run_dir = next(Path(runs).glob("*-bloodmnist-28"))
                os.killpg(os.getpgid(node_pid(run_dir, victim)), signal.SIGKILL)
                killed = time.monotonic()
        demo.wait(timeout=BOUND_S + 60)
    finally:
        stop(demo)
    assert killed is not None, "never saw " + pattern + ":\n" + "".join(output)[-3000:]
    return demo.returncode, "".join(output), time.monotonic() - killed, run_dir


def chaos_command(data_dir, runs, *extra):
    return [sys.executable, "-m", "localfed", "demo", f"data_dir={data_dir}", f"runs={runs}", "rounds=3", "epochs=3",
            f"health_period={HEALTH_S}", "timeout=300", *extra]


@pytest.mark.slow
def test_an_envoy_killed_in_round_2_is_dropped_and_the_others_finish_the_run(chaos_data, tmp_path):
    code, out, took, run_dir = kill_when(chaos_command(chaos_data, tmp_path, "envoys=3"),
                                         r"model after 1/3\s+envoy_3\s+global val", "envoy_3")
    assert code == 0 and took < BOUND_S, out[-3000:]
    assert "envoy_3     DROPPED: the director has not heard from it for" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["error"] is None
    (dropout,) = results["dropouts"]
    assert (dropout["envoy"], dropout["round"], dropout["experiment"]) == ("envoy_3", 2, run_dir.name)
    assert f"{dropout['envoy']} dropped out of {run_dir.name} in round 2: {dropout['reason']}" in out
    # Up to the model it validated before dying, envoy_3 is on record; from round 2 on, only the others.
    assert [sorted(e["envoys"]) for e in results["rounds"]] == [["envoy_1", "envoy_2", "envoy_3"]] * 2 + \
        [["envoy_1", "envoy_2"]] * 2
    assert all({"val_auc", "train_loss"} <= set(e["aggregated"]) for e in results["rounds"][1:])
    assert sorted(results["test"]["per_envoy"]) == ["envoy_1", "envoy_2"]  # a lost envoy is not in the next run
    assert Path(results["best_model"]).stat().st_size > 0 and Path(results["last_model"]).stat().st_size > 0
    assert not leftovers(run_dir)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a federation of its own (about 30 s): runs when CI=true")
def test_too_few_envoys_left_fails_the_run_naming_the_lost_one_and_keeps_the_best_model(chaos_data, tmp_path):
    code, out, took, run_dir = kill_when(chaos_command(chaos_data, tmp_path, "envoys=2", "min_envoys=2"),
                                         r"model after 1/3\s+envoy_2\s+global val", "envoy_2")
    assert code == 1 and took < BOUND_S, out[-3000:]
    assert (f"error: the notebook failed: ExperimentFailed: experiment {run_dir.name} failed: only 1 of 2 envoys "
            "remain, fewer than the 2 that min_envoys=2 requires. Lost: envoy_2: the director has not heard from "
            "it for") in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["error"].startswith("only 1 of 2 envoys remain")
    assert [(d["envoy"], d["round"]) for d in results["dropouts"]] == [("envoy_2", 2)]
    assert results["best"]["round"] in (0, 1) and Path(results["best_model"]).stat().st_size > 0
    assert results["test"]["per_envoy"] == {}
    assert (run_dir / "metrics.csv").stat().st_size > 0 and (run_dir / "curves.png").stat().st_size > 0
    assert not leftovers(run_dir)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a federation of its own (about 30 s): runs when CI=true")
def test_a_killed_director_stops_the_run_within_a_bound_and_what_arrived_is_kept(chaos_data, tmp_path):
    code, out, took, run_dir = kill_when(chaos_command(chaos_data, tmp_path, "envoys=2"),
                                         r"model after 1/3\s+aggregator\s+global val", "director")
    assert code == 1 and took < BOUND_S, out[-3000:]
    assert "the director exited (status -9)" in out
    assert "failed: lost the director (UNAVAILABLE" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["error"].startswith("lost the director")
    assert [e["round"] for e in results["rounds"]][:2] == [0, 1] and results["best"]["round"] in (0, 1)
    assert Path(results["best_model"]).stat().st_size > 0  # fetched as soon as it became the best
    assert not leftovers(run_dir)


@pytest.mark.slow
def test_a_reader_who_edits_a_task_cell_gets_what_the_edited_task_reports(data_dir, tmp_path):
    """The envoys run what the notebook's cells define: a copy of the workspace whose validate cell reports one
    more metric brings that metric back from every envoy."""
    import shutil

    workspace = tmp_path / "my-workspace"
    shutil.copytree(ROOT / "workspace" / "medfl", workspace / "medfl", ignore=shutil.ignore_patterns("__pycache__"))
    notebook = json.loads((ROOT / "workspace" / "Pytorch_MedMNIST_2D.ipynb").read_text())
    (cell,) = [c for c in notebook["cells"] if c["metadata"].get("tags") == ["validate-task"]]
    source = "".join(cell["source"])
    assert '"seconds": time.perf_counter() - started}' in source
    cell["source"] = source.replace('"seconds": time.perf_counter() - started}',
                                    '"seconds": time.perf_counter() - started, "samples": float(len(y_true))}')
    (workspace / "Edited.ipynb").write_text(json.dumps(notebook))
    result = subprocess.run(demo_command(data_dir, tmp_path / "runs", f"notebook={workspace / 'Edited.ipynb'}",
                                         "rounds=1", "tls=0"), cwd=ROOT, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    run_dir = (tmp_path / "runs" / "latest").resolve()
    results = json.loads((run_dir / "results.json").read_text())
    sizes = {e["name"]: e["val"] for e in results["envoys"]}
    rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    reported = {(r[3], int(r[2])): float(r[6]) for r in rows
                if r[0] == "train" and r[4] == "aggregated_model_validate" and r[5] == "samples"}
    assert reported == {(name, r): float(n) for name, n in sizes.items() for r in (0, 1)} | \
        {("aggregator", r): pytest.approx(sum(n * n for n in sizes.values()) / sum(sizes.values())) for r in (0, 1)}
    assert results["rounds"][1]["envoys"]["envoy_1"]["val_samples"] == sizes["envoy_1"]
    assert not list(workspace.glob("*.pkl")) and not (workspace / "plan").exists()  # OpenFL wrote in a copy


@pytest.mark.slow
def test_dp_sgd_runs_on_every_envoy_and_its_privacy_is_reported(data_dir, tmp_path):
    result = subprocess.run(demo_command(data_dir, tmp_path, "rounds=2", "tls=0", "dp=1",
                                         "target_epsilon=6"), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    results = json.loads((tmp_path / "latest" / "results.json").read_text())
    check_results(results, envoys=ENVOYS, rounds=2)
    privacy = results["privacy"]
    assert privacy["dp"] is True and sorted(privacy["per_envoy"]) == ENVOYS
    assert privacy["epsilon"] == max(v["epsilon"] for v in privacy["per_envoy"].values()) == \
        pytest.approx(6.0, rel=0.05)  # the budget, spent over the planned rounds
    epsilons = [e["envoys"]["envoy_1"]["epsilon"] for e in results["rounds"][1:]]
    assert epsilons[0] < epsilons[1] and results["rounds"][2]["aggregated"]["epsilon"] == privacy["epsilon"]
    assert f"DP-SGD: each envoy spent at most epsilon = {privacy['epsilon']:.2f} at delta = " in result.stdout
    weights = __import__("torch").load(results["best_model"])
    assert not any("running_mean" in k for k in weights)  # GroupNorm, not BatchNorm
