"""Secure aggregation end to end: a real director and three envoys, the notebook headless, what the director's
process received captured as it arrived (tests/saboteur). With secure_aggregation the run scores as the plain one
does, the director never holds an envoy's weights in the clear, and an envoy killed after sending its masked update
is unmasked from the others' shares."""
from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pytest
import torch
from cryptography import x509
from scipy.stats import chisquare

from conftest import ROOT

pytestmark = pytest.mark.slow
SIZES = {"train": 300, "val": 60, "test": 60}
# A fresh mask every run: a truly uniform vector fails the chi-square test at this level with probability 1e-8, so
# the three checked here fail a run by chance once in 33 million runs.
ALPHA = 1e-8
CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def runs(tiny_file, tmp_path_factory):
    """{name: (results, captured task results)} for a plain run, a secure run, and a secure run in which envoy_3
    dies after sending its masked update of round 2; one federation of three envoys."""
    from localfed.run import local_federation, run_notebook, shard_params
    from localfed.settings import parse

    data_dir = tiny_file("bloodmnist", 28, SIZES).parent
    out = tmp_path_factory.mktemp("secure")
    capture = out / "captured"
    env = {"PYTHONPATH": str(ROOT / "tests" / "saboteur"), "MEDFL_TEST_CAPTURE": str(capture),
           "MEDFL_TEST_SABOTEUR": "envoy_3:die_after_masked:2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    done = {}
    try:
        # under mutual TLS, as a hospital runs it: each envoy signs its keys with its certificate
        settings = parse(["demo", f"data_dir={data_dir}", "envoys=3", "health_period=2", f"runs={out}"])
        with local_federation(settings, out, shard_params(settings, data_dir)) as federation:
            deadline = time.monotonic() + 600
            # The secure run also fine-tunes a model per envoy in its test (personalize_epochs): every tensor stays
            # on the envoys there, and the director has nothing to sum.
            runs = [("plain", dict(rounds=1)),
                    ("secure", dict(rounds=1, secure_aggregation=True, personalize_epochs=1))]
            if CI:  # a third run, of 3 rounds (about 25 s)
                runs.append(("dropout", dict(rounds=3, secure_aggregation=True)))
            for name, given in runs:
                capture.mkdir()
                run_notebook(out / name, federation, settings.replace(**given), "synthetic", deadline)
                captured = [pickle.loads(p.read_bytes()) for p in sorted(capture.iterdir())]
                capture.rename(out / f"captured-{name}")
                done[name] = (json.loads((out / name / "results.json").read_text()), captured)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return done


def _uniform(data: bytes) -> float:
    return chisquare(np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)).pvalue


def test_a_secure_run_scores_as_the_plain_run(runs):
    plain, secure = runs["plain"][0], runs["secure"][0]
    assert secure["status"] == "completed"
    assert secure["test"]["acc"] == pytest.approx(plain["test"]["acc"], abs=1e-4)
    for mine, theirs in zip(secure["rounds"], plain["rounds"], strict=True):
        for name in ("val_acc", "val_auc", "val_loss"):
            assert mine["aggregated"][name] == pytest.approx(theirs["aggregated"][name], abs=1e-4), name
    # The same model, but for the rare weight whose float32 rounding the fixed point's 2^-49 tips over.
    last, reference = torch.load(secure["last_model"]), torch.load(plain["last_model"])
    assert max(float((last[k].double() - reference[k].double()).abs().max()) for k in reference) < 1e-6
    (summed,) = secure["secure_aggregation"]["rounds"]
    assert summed["summed"] == summed["envoys"] == ["envoy_1", "envoy_2", "envoy_3"] and summed["threshold"] == 2
    # Twice the bytes up (64-bit ring elements for float32 weights), the same down.
    up = [t["received_bytes"] for t in secure["traffic"]][0], [t["received_bytes"] for t in plain["traffic"]][0]
    assert 1.9 < up[0] / up[1] < 2.1
    assert plain["secure_aggregation"] is None
    personal = secure["test"]["personalized"]  # the fine-tuned models' scores came back; their weights did not
    assert personal["epochs"] == 1 and sorted(personal["per_envoy"]) == ["envoy_1", "envoy_2", "envoy_3"]


def test_the_director_never_held_an_envoys_weights_in_the_clear(runs):
    _, captured = runs["secure"]
    trained = [t for r in captured for t in r["tensors"] if not t["report"] and "trained" in t["tags"]]
    assert trained == []  # no weights, in any task's results
    masked = [r for r in captured if r["task"] == "secagg/masked"]
    assert sorted(r["envoy"] for r in masked) == ["envoy_1", "envoy_2", "envoy_3"]
    for record in masked:  # each update arrived as uniform ring elements
        (tensor,) = record["tensors"]
        assert _uniform(tensor["bytes"]) > ALPHA, record["envoy"]
    # The control: in the plain run the same check finds the weights at once.
    plain = [t for r in runs["plain"][1] for t in r["tensors"] if not t["report"] and "trained" in t["tags"]]
    assert plain and _uniform(b"".join(t["bytes"] for t in plain)) < 1e-100
    # Every advertisement was signed by its envoy's certificate, and no envoy's update leaves its norm in the clear.
    for record in (r for r in captured if r["task"] == "secagg/advertise"):
        advertised = json.loads(record["tensors"][0]["bytes"])
        subject = x509.load_pem_x509_certificate(advertised["cert"].encode()).subject.rfc4514_string()
        assert f"CN={record['envoy']}" in subject
        assert advertised["sig"]
    # ...and each signed the list of survivors it was told before it revealed (the consistency round).
    assert sorted(r["envoy"] for r in captured if r["task"] == "secagg/confirm") == ["envoy_1", "envoy_2", "envoy_3"]
    metrics = {t["name"] for r in captured if r["task"] == "train" for t in r["tensors"] if t["report"]}
    assert "update_clipped" in metrics and "update_norm" not in metrics
    # No envoy revealed both secrets of one envoy.
    for record in (r for r in captured if r["task"] == "secagg/reveal"):
        revealed = json.loads(record["tensors"][0]["bytes"])
        assert not set(revealed["b"]) & set(revealed["s"])


@pytest.mark.skipif(not CI, reason="a 3-round secure run of its own (about 25 s): runs when CI=true")
def test_an_envoy_killed_after_sending_its_masked_update_is_unmasked_from_the_others_shares(runs):
    results, captured = runs["dropout"]
    assert results["status"] == "completed", results["error"]
    rounds = results["secure_aggregation"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    second = rounds[1]
    assert second["summed"] == ["envoy_1", "envoy_2", "envoy_3"]  # its update counted
    assert second["dropped_after_sending"] == ["envoy_3"]
    assert not [r for r in captured if r["task"] == "secagg/reveal" and r["envoy"] == "envoy_3" and r["round"] == 1]
    assert rounds[2]["envoys"] == ["envoy_1", "envoy_2"]  # then the run went on without it
    assert [(d["envoy"], d["round"]) for d in results["dropouts"]] == [("envoy_3", 2)]
    aucs = [e["aggregated"]["val_auc"] for e in results["rounds"]]
    assert all(np.isfinite(aucs)) and aucs[-1] > aucs[0]


def test_median_under_secure_aggregation_is_refused_in_one_line(capsys):
    from localfed.__main__ import main

    assert main(["demo", "SECAGG=1", "algorithm=median", "data=synthetic"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: algorithm='median' needs each envoy's update, which secure aggregation hides")
    assert len(err.splitlines()) == 1
