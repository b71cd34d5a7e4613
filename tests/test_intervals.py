"""Confidence intervals of the test metrics: the bootstrap on an envoy (medfl.metrics), its values on the wire
(openfl_adjustments.transport), the intervals a real SelectingAggregator streams from them (medfl.intervals), what
results.json, make baseline and make compare keep of them, and the settings around them. test_end_to_end.py checks
them in a real run, and that make evaluate reproduces them."""
import subprocess
import sys

import numpy as np
import pytest
from openfl.utilities import TensorKey
from test_update_checks import _named, aggregator

from conftest import ROOT
from medfl.intervals import problem
from medfl.metrics import REPLICATES, bootstrap, correct, evaluate, interval, pooled, with_intervals
from medfl.researcher import ParameterError, check_parameters, report
from openfl_adjustments.transport import arrays_as_tensors

TASKS = {"multi-class": 5, "binary-class": 2, "multi-label, binary-class": 4, "ordinal-regression": 5}


def sample(task: str, n: int, rng, skill: float = 0.3):
    """Labels, scores that lean towards them by `skill`, and a loss per sample."""
    k = TASKS[task]
    if task.startswith("multi-label"):
        y = (rng.random((n, k)) < 0.4).astype(int)
        s = np.clip(rng.random((n, k)) * (1 - skill) + skill * y, 0, 1).round(2)  # rounded: tied scores too
    else:
        y = rng.integers(0, k, (n, 1))
        s = rng.random((n, k)) + skill * 3 * np.eye(k)[y[:, 0]]
        s = (s / s.sum(axis=1, keepdims=True)).round(2)
    return y, s, rng.random(n)


@pytest.mark.parametrize("task", TASKS)
def test_the_bootstrap_reproduces_a_direct_numpy_computation_with_medmnists_evaluator(task):
    """Each resample's ACC and AUC are medmnist.evaluator's (through medfl.metrics.evaluate) on the resampled samples,
    its loss their mean: the same values to rounding, and so the same percentile interval."""
    rng = np.random.default_rng(1)
    y, s, loss = sample(task, 40, rng)  # small: some resamples lose a class, whose AUC is then left out
    assert correct(task, y, s).mean() == pytest.approx(evaluate(task, y, s)["acc"], abs=1e-12)
    values = bootstrap(task, y, s, loss, 150, seed=7)
    draws = np.random.default_rng([7, len(y), int(y.sum())])  # the seed the bootstrap documents
    direct = {"acc": [], "auc": [], "loss": []}
    for _ in range(150):
        i = draws.integers(0, len(y), len(y))
        scores = evaluate(task, y[i], s[i])
        direct["acc"].append(scores["acc"])
        direct["auc"].append(scores["auc"])
        direct["loss"].append(loss[i].mean())
    for name, expected in direct.items():
        np.testing.assert_allclose(values[name], expected, atol=1e-12, err_msg=name)
        assert interval(values[name]) == pytest.approx(np.percentile(expected, [2.5, 97.5]), abs=1e-12)


def test_the_bootstrap_is_seeded_and_two_envoys_draw_differently():
    rng = np.random.default_rng(2)
    y, s, loss = sample("multi-class", 50, rng)
    first, again = bootstrap("multi-class", y, s, loss, 200, seed=0), bootstrap("multi-class", y, s, loss, 200, seed=0)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    y2, s2, loss2 = sample("multi-class", 50, rng)  # another envoy's split of the same size
    other = bootstrap("multi-class", y2, s2, loss2, 200, seed=0)
    assert abs(np.corrcoef(first["acc"], other["acc"])[0, 1]) < 0.3  # independent draws, not the same indices


def test_the_pooled_interval_equals_the_direct_bootstrap_over_the_pooled_predictions():
    """Pooling the envoys' values by sample count gives what a bootstrap over all their predictions gives, within
    Monte Carlo error: for ACC and loss, whose pooled value is that of the pooled predictions, against a plain
    bootstrap of the pooled samples; for AUC, whose pooled value is the envoys' weighted mean, against resampling
    each envoy's samples and weighing their AUCs."""
    rng = np.random.default_rng(3)
    sizes = {"envoy_1": 150, "envoy_2": 850}  # unequal: a mean that ignored the counts would be far off
    data = {e: sample("multi-class", n, rng, skill) for (e, n), skill in zip(sizes.items(), (0.2, 0.4), strict=True)}
    resamples = 1000
    values = {e: bootstrap("multi-class", *data[e], resamples, seed=11) for e in sizes}
    y = np.concatenate([d[0] for d in data.values()])
    s = np.concatenate([d[1] for d in data.values()])
    loss = np.concatenate([d[2] for d in data.values()])
    direct = bootstrap("multi-class", y, s, loss, resamples, seed=12)
    # Monte Carlo error of a 2.5 % quantile from 1000 resamples: about 3 % of the interval's width (seeded)
    for name in ("acc", "loss"):
        ours = interval(pooled({e: v[name] for e, v in values.items()}, sizes))
        theirs = interval(direct[name])
        width = theirs[1] - theirs[0]
        assert ours == pytest.approx(theirs, abs=0.12 * width), name
        point = sum(evaluate("multi-class", *data[e][:2])[name] * n if name == "acc" else data[e][2].mean() * n
                    for e, n in sizes.items()) / sum(sizes.values())
        assert ours[0] < point < ours[1]
    # AUC on a binary task (one column: sklearn's AUC once per resample and envoy keeps the direct loop short)
    sizes = {"envoy_1": 150, "envoy_2": 850}
    data = {e: sample("binary-class", n, rng, skill=0.05) for e, n in sizes.items()}
    values = {e: bootstrap("binary-class", *data[e], 1000, seed=14) for e in sizes}
    draws, stratified = np.random.default_rng(13), []
    for _ in range(1000):
        aucs = {}
        for e, (ye, se, _) in data.items():
            i = draws.integers(0, len(ye), len(ye))
            aucs[e] = evaluate("binary-class", ye[i], se[i])["auc"]
        stratified.append(sum(aucs[e] * n for e, n in sizes.items()) / sum(sizes.values()))
    ours, theirs = interval(pooled({e: v["auc"] for e, v in values.items()}, sizes)), interval(stratified)
    assert ours == pytest.approx(theirs, abs=0.15 * (theirs[1] - theirs[0]))


def test_intervals_narrow_as_the_test_split_grows():
    """About as 1 / sqrt(n): four times the samples, half the width."""
    rng = np.random.default_rng(4)
    widths = []
    for n in (100, 400, 1600):
        y, s, loss = sample("binary-class", n, rng)
        low, high = interval(bootstrap("binary-class", y, s, loss, 1000, seed=0)["acc"])
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert 1.5 < widths[0] / widths[1] < 2.7 and 1.5 < widths[1] / widths[2] < 2.7


def test_undefined_resamples_are_left_out_and_pooling_skips_an_envoy_where_its_value_is_undefined():
    assert interval(np.array([np.nan, np.nan])) is None
    assert interval(np.array([0.5, np.nan, 0.7] * 100)) == pytest.approx([0.5, 0.7])
    mixed = pooled({"a": np.array([0.6, np.nan]), "b": np.array([0.8, 0.9])}, {"a": 1, "b": 3})
    assert mixed == pytest.approx([0.75, 0.9])
    assert np.isnan(pooled({"a": np.array([np.nan]), "b": np.array([np.nan])}, {"a": 1, "b": 1})[0])


def test_a_run_without_a_director_turns_the_values_into_intervals():
    """make baseline's path: a validate result's bootstrap values become `ci`, and none without them."""
    scores = {"acc": 0.5, "acc" + REPLICATES: np.linspace(0, 1, 1001), "loss": 1.0}
    assert with_intervals(scores) == {"acc": 0.5, "loss": 1.0, "ci": {"acc": pytest.approx([0.025, 0.975])}}
    assert with_intervals({"acc": 0.5})["ci"] is None


def test_the_values_travel_as_a_tensor_of_the_validation_not_as_a_metric():
    """OpenFL's collaborator prints, and its aggregator streams, each metric as one number: an array goes as an
    unreported tensor without the metric tag; single numbers stay metrics."""

    def prepare(self, metric_dict, validation_flag, col_name, round_num):
        return {TensorKey(k, col_name, round_num, True, ("validate_agg", "metric")): np.array(v)
                for k, v in metric_dict.items()}, {}

    sent, _ = arrays_as_tensors(prepare)(None, {"acc": 0.5, "acc" + REPLICATES: np.ones(10)}, "_agg", "envoy_1", 0)
    assert {(k.tensor_name, k.report, k.tags) for k in sent} == {
        ("acc", True, ("validate_agg", "metric")), ("acc" + REPLICATES, False, ("validate_agg",))}


# --- a real SelectingAggregator streams the intervals -------------------------------------------------------------
ENVOYS = ["envoy_1", "envoy_2", "envoy_3"]
SIZES = {"envoy_1": 100, "envoy_2": 300, "envoy_3": 600}


def validate_round(agg, replicates: dict, accs: dict):
    """Each envoy's test: its ACC, and its bootstrap values as arrays_as_tensors sends them."""
    for envoy, values in replicates.items():
        agg.send_local_task_results(envoy, 0, "aggregated_model_validate", SIZES[envoy], [
            _named(envoy, 0, "acc", accs[envoy], ("validate_agg", "metric"), True),
            _named(envoy, 0, "acc" + REPLICATES, values, ("validate_agg",))])


def streamed(agg, origin):
    found = {m["metric_name"]: m["metric_value"] for m in agg.metric_queue.queue
             if m["metric_origin"] == origin and m["task_name"] == "aggregated_model_validate"}
    return found


def test_the_director_streams_each_envoys_interval_and_the_pooled_one(tmp_path):
    agg = aggregator(tmp_path, rounds=0)
    rng = np.random.default_rng(5)
    replicates = {e: np.clip(rng.normal(a, 0.03, 1000), 0, 1) for e, a in zip(ENVOYS, (0.6, 0.7, 0.8), strict=True)}
    validate_round(agg, replicates, dict(zip(ENVOYS, (0.6, 0.7, 0.8), strict=True)))
    for envoy in ENVOYS:
        got = streamed(agg, envoy)
        assert [got["acc_ci_low"], got["acc_ci_high"]] == pytest.approx(interval(replicates[envoy]), abs=1e-6)
    mean = streamed(agg, "aggregator")
    assert mean["acc"] == pytest.approx(0.75)  # OpenFL's weighted mean, untouched
    expected = interval(pooled({e: replicates[e].astype(np.float32) for e in ENVOYS}, SIZES))
    assert [mean["acc_ci_low"], mean["acc_ci_high"]] == pytest.approx(expected, abs=1e-6)
    # what results.json makes of the stream, and the table the notebook and make evaluate show
    metrics = [{**m, "task_name": "aggregated_model_validate"} for m in agg.metric_queue.queue]
    block = report.test_block(metrics, SIZES)
    assert block["ci"]["acc"] == pytest.approx(expected, abs=1e-6) and "acc_ci_low" not in block
    assert block["per_envoy"]["envoy_1"]["ci"]["acc"] == pytest.approx(interval(replicates["envoy_1"]), abs=1e-6)
    rows = report.test_rows(block)
    assert rows[-1]["envoy"] == "pooled" and rows[-1]["samples"] == 1000 and "95 % CI" in rows[-1]["ACC"]


def test_a_lying_envoys_values_give_no_interval_and_no_pooled_one(tmp_path):
    """An envoy controls its own values: out-of-range or wrongly sized ones are left out, with the pooled
    interval (which would leave it out of the mean it describes); the others' intervals stand."""
    agg = aggregator(tmp_path, rounds=0)
    good = np.full(1000, 0.7)
    validate_round(agg, {"envoy_1": good, "envoy_2": good, "envoy_3": np.full(1000, 5.0)},
                   dict.fromkeys(ENVOYS, 0.7))
    assert "acc_ci_low" in streamed(agg, "envoy_1") and "acc_ci_low" not in streamed(agg, "envoy_3")
    assert "acc_ci_low" not in streamed(agg, "aggregator")
    assert problem("acc", np.full(10, 5.0), 10) == "values outside [0, 1]"
    assert problem("acc", np.full(9, 0.5), 10) == "9 values, where the others sent 10"
    assert problem("loss", np.array([np.nan, 1.0]), 2) == "values that are not finite"
    assert problem("auc", np.array([np.nan, 0.5]), 2) is None  # an AUC may be undefined on a resample


@pytest.mark.parametrize("bad", [-1, 50, 1.5, True, "1000"])
def test_an_impossible_number_of_resamples_is_refused_in_one_line(bad):
    with pytest.raises(ParameterError, match="bootstrap=.*at least 100.*or 0 for none"):
        check_parameters(dataset="bloodmnist", size=28, rounds=1, epochs=1, train_batch_size=8, eval_batch_size=8,
                         learning_rate=1e-3, run={"bootstrap": bad})


@pytest.mark.parametrize("run, message", [({"tracking": "wandb"}, "tracking='wandb'"),
                                          ({"evaluate_split": "train"}, "evaluate_split='train'"),
                                          ({"evaluate_model": 3}, "evaluate_model=3")])
def test_impossible_tracking_and_evaluation_settings_are_refused_in_one_line(run, message):
    with pytest.raises(ParameterError, match=message):
        check_parameters(dataset="bloodmnist", size=28, rounds=1, epochs=1, train_batch_size=8, eval_batch_size=8,
                         learning_rate=1e-3, run=run)


def test_the_default_run_imports_no_mlflow():
    """MLflow is imported only for a tracked run: not by the notebook's package, the director's aggregator or the
    launcher."""
    code = ("import sys, roots; roots.join('launcher'); import medfl.researcher, medfl.aggregator, medfl.intervals; "
            "import localfed.compare, localfed.demo, localfed.evaluate, localfed.baseline; "
            "print('mlflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
