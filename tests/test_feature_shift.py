"""Hospitals that differ by scanner: FedBN (each envoy's BatchNorm layers never leave it, openfl_adjustments.
local_tensors; the rest is averaged) and a model per hospital (personalize_epochs: fine-tuned on each envoy, never
sent).

The unit tests hold OpenFL to what the adjustment relies on (its task runner's holdouts, its collaborator's search
of earlier rounds); the end-to-end test runs a real federation on the scanner partition with FedBN and
personalize_epochs=1, with what the director's process received captured as it arrived (tests/saboteur)."""
from __future__ import annotations

import inspect
import json
import os
import pickle
import time

import numpy as np
import pytest
import torch
from openfl.component.collaborator.collaborator import Collaborator
from openfl.federated.task.task_runner import CoreTaskRunner

from conftest import ROOT
from medfl.algorithms import describe, local_layers, local_plan, settings
from medfl.model import build_model
from medfl.researcher import ParameterError, check_parameters, personalizing
from medfl.tasks import build_tasks
from openfl_adjustments import local_tensors
from openfl_adjustments.patching import restore_all

SIZES = {"train": 300, "val": 60, "test": 60}
ROUNDS = 2


def test_fedbn_keeps_every_batchnorm_tensor_and_nothing_else():
    model = build_model("bloodmnist", 28)
    kept = local_layers(model)
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(norms) == 5 and len(kept) == 5 * 5  # weight, bias, running mean and variance, counter each
    assert {name.rsplit(".", 1)[0] for name in kept} == norms
    assert set(kept) < set(model.state_dict())
    plan = local_plan("fedbn", model, "run-1", first_round=2, start_round=2)
    assert plan["task_runner.settings.local_tensors"] == plan["aggregator.settings.local_tensors"] == kept
    assert (plan["task_runner.settings.local_run"], plan["task_runner.settings.local_first_round"],
            plan["task_runner.settings.local_start_round"]) == ("run-1", 2, 2)
    assert local_plan("fedavg", model, "run-1") == {}
    everything = local_plan("fedavg", model, "run-1", personalize=True)  # a model per hospital: nothing is sent
    assert everything == {"task_runner.settings.local_tensors": list(model.state_dict()),
                          "aggregator.settings.local_tensors": list(model.state_dict())}
    both = local_plan("fedbn", model, "run-1", first_round=None, start_round=3, personalize=True)
    assert both["task_runner.settings.local_tensors"] == list(model.state_dict())
    assert (both["task_runner.settings.local_first_round"], both["task_runner.settings.local_start_round"]) == (None, 3)
    with pytest.raises(ValueError, match="this model has none"):
        local_plan("fedbn", build_model("bloodmnist", 28, norm="group"), "run-1")
    # FedBN's idea with another algorithm: FedProx's proximal term on the rest
    assert local_plan("fedprox", model, "run-1", local_norms=True) == local_plan("fedbn", model, "run-1")
    assert settings("fedprox", {"local_norms": True}) == {"name": "fedprox", "mu": 0.01, "local_norms": True}
    assert describe(settings("fedprox", {"local_norms": True})) == "FedProx (mu 0.01) + local norms"
    assert settings("fedbn", {"local_norms": True}) == {"name": "fedbn"}


def test_fedbn_with_dp_and_a_personalization_that_is_no_number_of_epochs_are_refused_in_one_line():
    given = dict(dataset="bloodmnist", size=28, rounds=2, epochs=1, train_batch_size=64, eval_batch_size=256,
                 learning_rate=1e-3)
    check_parameters(**given, algorithm="fedbn", personalize_epochs=2)
    with pytest.raises(ParameterError, match="algorithm='fedbn' with dp=True: .* GroupNorm"):
        check_parameters(**given, algorithm="fedbn", dp=True)
    check_parameters(**given, algorithm="fedprox", algorithm_options={"local_norms": True})
    with pytest.raises(ParameterError, match="local_norms=True with dp=True"):
        check_parameters(**given, algorithm="fedprox", algorithm_options={"local_norms": True}, dp=True)
    with pytest.raises(ParameterError, match="local_norms='yes': True"):
        check_parameters(**given, algorithm_options={"local_norms": "yes"})
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ParameterError, match="personalize_epochs=.*: give a whole number of epochs"):
            check_parameters(**given, personalize_epochs=bad)


def test_personalizing_fine_tunes_on_the_plain_loss_and_leaves_the_notebook_s_tasks_as_they_were():
    tasks = build_tasks("bloodmnist", epochs_per_round=3, distill=object(), privacy=object())
    tuned = personalizing(tasks, 2)
    assert tuned.task_settings["train"]["epochs"] == 2
    assert tuned.task_settings["train"]["privacy"] is None and tuned.task_settings["train"]["distill"] is None
    assert tasks.task_settings["train"]["epochs"] == 3 and tasks.task_settings["train"]["privacy"] is not None
    assert tuned.task_settings["validate"] == tasks.task_settings["validate"]
    assert tuned.get_registered_tasks() == tasks.get_registered_tasks()


def test_openfl_holds_back_what_its_task_runner_names_and_finds_it_in_earlier_rounds():
    # What the adjustment relies on: holdout_tensor_names are split off what is sent, and stored for the next round;
    # a tensor of the envoy's own is looked for in earlier rounds before the aggregator is asked.
    prepare = inspect.getsource(CoreTaskRunner._prepare_tensorkeys_for_agggregation)
    assert "split_tensor_dict_for_holdouts" in prepare and "round_num + 1" in prepare
    assert '"holdout_tensor_names"' in inspect.getsource(CoreTaskRunner.__init__)
    search = inspect.getsource(Collaborator.get_data_for_tensorkey)
    assert "origin == self.collaborator_name" in search and "prior_round -= 1" in search


def test_an_envoy_holds_back_keeps_on_disk_and_starts_from_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv(local_tensors.STATE_ENV, str(tmp_path))
    local_tensors.install()
    try:
        runner = CoreTaskRunner(local_tensors=["bn.weight"], local_run="run-1", local_first_round=3,
                                local_start_round=None)
        assert runner.tensor_dict_split_fn_kwargs["holdout_tensor_names"] == ["__opt_state_needed", "bn.weight"]
        plain = CoreTaskRunner()
        assert plain.tensor_dict_split_fn_kwargs["holdout_tensor_names"] == ["__opt_state_needed"]
    finally:
        restore_all()
    # Rounds are the run's: the experiment's round 1 of a run resumed after 3 is the run's round 5.
    assert local_tensors.save("run-1", 5, {"bn.weight": np.ones(4, np.float32)}) == \
        tmp_path / "run-1" / "local-tensors" / "round-5.npz"
    local_tensors.save("run-1", 2, {"bn.weight": np.zeros(4, np.float32)})
    assert local_tensors.load("run-1", 5)[0] == 5
    n, found = local_tensors.load("run-1", 4)  # absent in round 4: what it trained last before it
    assert n == 2 and not found["bn.weight"].any()
    assert local_tensors.load("run-1", 1) is None and local_tensors.load("run-2", 5) is None
    monkeypatch.delenv(local_tensors.STATE_ENV)
    assert local_tensors.save("run-1", 6, {"bn.weight": np.ones(4)}) is None  # no envoy state: nothing kept


@pytest.fixture(scope="module")
def fedbn_run(tiny_file, tmp_path_factory):
    """(results, captured task results, run folder) of a FedBN run of three envoys on the scanner partition."""
    from localfed.run import local_federation, run_notebook, shard_params
    from localfed.settings import parse

    data_dir = tiny_file("bloodmnist", 28, SIZES).parent
    out = tmp_path_factory.mktemp("fedbn")
    capture = out / "captured"
    capture.mkdir()
    env = {"PYTHONPATH": str(ROOT / "tests" / "saboteur"), "MEDFL_TEST_CAPTURE": str(capture)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = parse(["demo", f"data_dir={data_dir}", "envoys=3", "tls=0", f"runs={out}", "partition=scanner",
                          "algorithm=fedbn", f"rounds={ROUNDS}", "personalize_epochs=1"])
        with local_federation(settings, out, shard_params(settings, data_dir)) as federation:
            run_notebook(out / "run", federation, settings, "synthetic", time.monotonic() + 400)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    captured = [pickle.loads(p.read_bytes()) for p in sorted(capture.iterdir())]
    return json.loads((out / "run" / "results.json").read_text()), captured, out


@pytest.mark.slow
def test_fedbn_s_normalization_layers_never_reach_the_director(fedbn_run):
    results, captured, _ = fedbn_run
    assert results["status"] == "completed", results["error"]
    assert results["algorithm"]["name"] == "fedbn"
    kept = set(local_layers(build_model("bloodmnist", 28)))
    sent = {t["name"] for r in captured for t in r["tensors"] if not t["report"] and "trained" in t["tags"]}
    assert len(sent) == 41 - len(kept)  # the rest of the model went up, every round
    assert not sent & kept
    # Each training round's update from every envoy; the test's fine-tuning (personalize_epochs) sent no weights.
    trains = [[t for t in r["tensors"] if not t["report"]] for r in captured if r["task"] == "train"]
    assert len(trains) == 3 * (ROUNDS + 1) and sum(1 for weights in trains if weights) == 3 * ROUNDS
    # The director's models are whole (its normalization layers stay the initial ones).
    for model in (results["best_model"], results["last_model"]):
        assert set(torch.load(model)) == set(build_model("bloodmnist", 28).state_dict())


@pytest.mark.slow
def test_each_envoy_tests_with_its_own_normalization_of_the_best_round(fedbn_run):
    results, _, out = fedbn_run
    best = results["best"]["round"]
    assert best >= 1 and sorted(results["test"]["per_envoy"]) == ["envoy_1", "envoy_2", "envoy_3"]
    for envoy in ("envoy_1", "envoy_2", "envoy_3"):
        kept = sorted(p.name for p in out.glob(f"**/state/{envoy}/*/local-tensors/round-*.npz"))
        assert kept == [f"round-{r}.npz" for r in range(1, ROUNDS + 1)], envoy
        log = next(out.glob(f"**/logs/{envoy}.log")).read_text()
        assert f"starts its held-back tensors from its own, of round {best} of run" in log, envoy
    personal = results["test"]["personalized"]  # the best model fine-tuned 1 epoch on each envoy, tested there
    assert personal["epochs"] == 1 and sorted(personal["per_envoy"]) == ["envoy_1", "envoy_2", "envoy_3"]
    assert all(0 <= e["acc"] <= 1 and e["samples"] for e in personal["per_envoy"].values())
    assert personal["per_envoy"] != results["test"]["per_envoy"]
    for block in [personal, *personal["per_envoy"].values()]:  # each hospital's own model has its intervals too
        for metric in ("acc", "auc", "loss"):
            low, high = block["ci"][metric]
            assert low <= block[metric] <= high, metric
    scanners = [e["acquisition"] for e in results["envoys"]]
    assert [a["rank"] for a in scanners] == [1, 2, 3] and results["partition"]["strategy"] == "scanner"
    # Honest envoys behind different scanners: the update checks reject and clip none (docs/faults.md)
    assert (results["rejected_updates"], results["clipped_updates"], results["dropouts"]) == ([], [], [])
