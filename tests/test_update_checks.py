"""A broken envoy costs its own contribution and nothing else: medfl.checks on their own, then a real
SelectingAggregator (OpenFL's Aggregator underneath) fed updates as envoys send them, and the director's handling
of a failed task. tests/test_broken_envoy.py does it end to end."""
import json
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from openfl.pipelines import NoCompressionPipeline
from openfl.protocols import utils
from openfl.utilities import TensorKey, add_log_level

from medfl import Schedule, build_tasks, checks
from medfl.aggregator import SelectingAggregator
from medfl.events import CLIPPED, DROPPED, FAILED, REJECTED
from openfl_adjustments import faults
from openfl_adjustments.tensor_store import FastTensorDB

add_log_level("METRIC", 25)  # as OpenFL's fx does at start-up: its aggregator logs metrics at this level
ENVOYS = ["envoy_1", "envoy_2", "envoy_3"]
MODEL = {"conv.weight": np.zeros((4, 3), np.float32), "bn.running_mean": np.zeros(4, np.float32),
         "bn.num_batches_tracked": np.array(0, np.float32)}


# --- the checks on their own -------------------------------------------------------------------------------------
def test_the_structure_check_names_what_differs():
    assert checks.structure_problem(dict(MODEL), MODEL) is None
    assert checks.structure_problem({**MODEL, "__opt_state_needed": np.array(1.0)}, MODEL) is None  # optimizer
    missing = {k: v for k, v in MODEL.items() if k != "bn.running_mean"}
    assert checks.structure_problem(missing, MODEL) == ("its tensors do not match the global model's: 1 missing "
                                                       "(bn.running_mean first)")
    assert "1 unknown (head.bias first)" in checks.structure_problem({**MODEL, "head.bias": np.zeros(2)}, MODEL)
    short = {**MODEL, "conv.weight": np.zeros((3, 3), np.float32)}
    assert checks.structure_problem(short, MODEL) == "conv.weight has shape [3, 3], the global model's [4, 3]"
    wide = {**MODEL, "conv.weight": np.zeros((4, 3), np.float64)}
    assert checks.structure_problem(wide, MODEL) == "conv.weight is float64, not float32"


def test_the_finite_check_counts_the_tensors_with_nan_or_infinity():
    assert checks.non_finite(MODEL) == {}
    bad = {**MODEL, "conv.weight": np.array([[np.nan, 1.0]]), "bn.running_mean": np.array([np.inf])}
    assert checks.non_finite(bad) == {"tensors": 2, "first": "conv.weight", "of": 3}


def test_an_updates_distance_leaves_batchnorms_counter_out():
    update = {**MODEL, "conv.weight": np.full((4, 3), 0.5, np.float32), "bn.num_batches_tracked": np.array(94.0)}
    assert checks.distance(update, MODEL) == pytest.approx(np.sqrt(12 * 0.25))


def test_an_update_stands_out_only_against_the_median_of_three_or_more():
    assert checks.outsized({"a": 1.0, "b": 100.0}, 10) == {}  # two: the median is their mean, nothing stands out
    out = checks.outsized({"a": 1.0, "b": 1.2, "c": 13.0}, 10)
    assert out == {"c": {"norm": 13.0, "median": 1.2, "ratio": pytest.approx(13 / 1.2), "max_update_ratio": 10}}
    assert checks.outsized({"a": 1.0, "b": 1.2, "c": 11.9}, 10) == {}
    assert checks.outsized({"a": 0.0, "b": 0.0, "c": 5.0}, 10) == {}  # no median to measure against


@pytest.mark.parametrize("ratio,rejections,window,message", [
    (1, 2, 5, "max_update_ratio=1: give a number above 1"), ("10", 2, 5, "max_update_ratio='10'"),
    (10, 0, 5, "max_rejections=0: give a whole number of rounds of at least 1"), (10, 1.5, 5, "max_rejections=1.5"),
    (10, 3, 2, "rejection_window=2: give a whole number of rounds of at least max_rejections=3"),
    (10, 2, "5", "rejection_window='5'")])
def test_impossible_settings_are_refused_in_one_line(ratio, rejections, window, message):
    from medfl.researcher import DEFAULTS, ParameterError, check_parameters

    with pytest.raises(ValueError, match=message):
        checks.check_settings(ratio, rejections, window)
    with pytest.raises(ParameterError, match=message):
        check_parameters(**{**DEFAULTS, "run": {"max_update_ratio": ratio, "max_rejections": rejections,
                                                "rejection_window": window}})


@pytest.mark.parametrize("size,cosine,message", [
    (0, 0.0, "max_update_size=0: give a number above 0"), (float("inf"), 0.0, "max_update_size=inf"),
    ("1", 0.0, "max_update_size='1'"), (1.0, 1.0, "min_update_cosine=1.0: give a number from -1"),
    (1.0, -1.5, "min_update_cosine=-1.5"), (1.0, True, "min_update_cosine=True")])
def test_an_impossible_size_bound_or_direction_is_refused_in_one_line(size, cosine, message):
    from medfl.researcher import DEFAULTS, ParameterError, check_parameters

    with pytest.raises(ValueError, match=message):
        checks.check_settings(10, 2, 5, size, cosine)
    with pytest.raises(ParameterError, match=message):
        check_parameters(**{**DEFAULTS, "run": {"max_update_size": size, "min_update_cosine": cosine}})


def test_a_direction_leaves_batchnorms_statistics_out_and_a_clipped_update_keeps_it():
    model = {"w": np.ones(3, np.float32), "bn.running_var": np.ones(2, np.float32),
             "bn.num_batches_tracked": np.array(4.0, np.float32)}
    step = {"w": np.array([1.0, 0.0, 0.0]), "bn.running_var": np.array([5.0, 5.0]), "bn.num_batches_tracked": 9.0}
    ahead = {**model, "w": np.array([3.0, 1.0, 1.0], np.float32), "bn.running_var": np.array([-9.0, 7.0])}
    assert checks.cosine(ahead, model, step) == pytest.approx(1.0)
    back = {**ahead, "w": np.array([-1.0, 1.0, 2.0], np.float32)}
    assert checks.cosine(back, model, step) == pytest.approx(-2 / np.sqrt(4 + 1))
    assert checks.cosine(model, model, step) is None  # it did not move: no direction
    half = checks.clipped(back, model, 0.5)
    assert checks.distance(half, model) == pytest.approx(checks.distance(back, model) / 2)
    assert checks.cosine(half, model, step) == pytest.approx(checks.cosine(back, model, step))
    assert half["bn.num_batches_tracked"] == 4.0 and half["w"].dtype == np.float32


def test_an_envoy_whose_training_diverged_names_itself_and_sends_nothing(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    checks.check_trained(model)
    with torch.no_grad():
        model[1].running_var[0] = float("inf")
    monkeypatch.setenv("ENVOY_NAME", "envoy_7")
    with pytest.raises(checks.NonFiniteWeights, match=r"envoy_7's trained weights are not finite \(1 of 7 tensors, "
                                                      r"1.running_var first\): training diverged"):
        checks.check_trained(model)


# --- a real SelectingAggregator ------------------------------------------------------------------------------------
def aggregator(tmp_path, envoys=ENVOYS, rounds=3, model=MODEL, **settings) -> SelectingAggregator:
    tasks = build_tasks("bloodmnist").get_registered_tasks()
    from openfl.component.assigner.custom_assigner import Assigner

    assigner = Assigner(assigner_function=Schedule(tasks, train_rounds=rounds), aggregation_functions_by_task={},
                        authorized_cols=list(envoys), rounds_to_train=rounds + 1)
    with mock.patch("openfl.component.aggregator.aggregator.TensorDB", FastTensorDB):  # the director's store
        return SelectingAggregator("aggregator_test", "federation", list(envoys), str(tmp_path / "init.pbuf"),
                                   str(tmp_path / "best.pbuf"), str(tmp_path / "last.pbuf"), assigner,
                                   rounds_to_train=rounds + 1, initial_tensor_dict=dict(model), **settings)


def _named(envoy, r, name, value, tags, report=False):
    data, metadata = NoCompressionPipeline().forward(np.asarray(value, np.float32))
    return utils.construct_named_tensor(TensorKey(name, envoy, r, report, (*tags, "compressed")), data, metadata,
                                        lossless=True)


def send_round(agg, r, updates: dict, sizes: dict, losses: dict | None = None, aucs: dict | None = None):
    """Each envoy's three tasks of round r, as an envoy sends them: validation of the global model (its loss, and
    its AUC where `aucs` gives them), training (its weights `updates[envoy]` and a train_loss), validation of its
    local model."""
    for envoy, weights in updates.items():
        loss = (losses or {}).get(envoy, 0.5)
        auc = [_named(envoy, r, "auc", aucs[envoy], ("validate_agg", "metric"), True)] if aucs else []
        agg.send_local_task_results(envoy, r, "aggregated_model_validate", sizes[envoy],
                                    [_named(envoy, r, "loss", loss, ("validate_agg", "metric"), True), *auc])
        trained = [_named(envoy, r, name, value, ("trained",)) for name, value in weights.items()]
        agg.send_local_task_results(envoy, r, "train", sizes[envoy],
                                    [*trained, _named(envoy, r, "train_loss", 0.7, ("trained", "metric"), True)])
        agg.send_local_task_results(envoy, r, "locally_tuned_model_validate", sizes[envoy],
                                    [_named(envoy, r, "loss", 0.4, ("validate_local", "metric"), True)])


def global_model(agg, r):
    return {name: agg.tensor_db.get_tensor_from_cache(TensorKey(name, agg.uuid, r, False, ("model",)))
            for name in MODEL}


def events(agg, kind):
    return [m for m in agg.metric_queue.queue if m["task_name"] == kind]


def aggregated(agg, r, task, name):
    wanted = ("aggregator", r, task, name)
    (value,) = [m["metric_value"] for m in agg.metric_queue.queue
                if (m["metric_origin"], m["round"], m["task_name"], m["metric_name"]) == wanted]
    return value


def shifted(value):
    return {name: np.full_like(v, value) for name, v in MODEL.items()}


SIZES = {"envoy_1": 100, "envoy_2": 300, "envoy_3": 600}


def test_a_clean_round_is_aggregated_exactly_as_openfl_averages_it(tmp_path):
    agg = aggregator(tmp_path)
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": shifted(2.0), "envoy_3": shifted(3.0)}, SIZES)
    assert agg.round_number == 1 and agg.rejected == [] and events(agg, REJECTED) == []
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], (100 + 600 + 1800) / 1000)


def test_a_nan_update_is_left_out_and_the_rest_reweighted_by_their_samples(tmp_path):
    agg = aggregator(tmp_path)
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": shifted(2.0), "envoy_3": shifted(np.nan)}, SIZES)
    model = global_model(agg, 1)
    np.testing.assert_allclose(model["conv.weight"], (100 * 1.0 + 300 * 2.0) / 400)
    assert all(np.isfinite(v).all() for v in model.values())
    (rejection,) = agg.rejected
    assert (rejection.envoy, rejection.round, rejection.check) == ("envoy_3", 1, "finite")
    assert rejection.numbers == {"tensors": 3, "first": "conv.weight", "of": 3}
    (event,) = events(agg, REJECTED)
    assert event["metric_origin"] == "envoy_3" and json.loads(event["metric_name"])["check"] == "finite"
    # The train_loss and local validation of the rejected update stay out too; its validation of the global model
    # (a good model) counts.
    assert aggregated(agg, 0, "train", "train_loss") == pytest.approx(0.7)
    assert aggregated(agg, 0, "aggregated_model_validate", "loss") == pytest.approx(0.5)


def test_a_huge_update_is_left_out_and_two_rejections_in_a_row_drop_the_envoy(tmp_path):
    agg = aggregator(tmp_path)
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": shifted(1.5), "envoy_3": shifted(1e4)}, SIZES)
    assert [(r.envoy, r.check) for r in agg.rejected] == [("envoy_3", "norm")]
    assert agg.rejected[0].numbers["ratio"] > 1000 and "max_update_ratio=10" in agg.rejected[0].detail
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], (100 + 450) / 400)
    assert "envoy_3" not in agg.dropped  # one rejection: it stays
    base = global_model(agg, 1)["conv.weight"][0, 0]
    send_round(agg, 1, {"envoy_1": shifted(base + 1), "envoy_2": shifted(base + 1), "envoy_3": shifted(1e4)}, SIZES)
    assert agg.dropped["envoy_3"].startswith("its update was rejected in 2 of the last 5 rounds (max_rejections=2); "
                                             "last: its update failed the norm check")
    (dropped,) = events(agg, DROPPED)
    assert (dropped["metric_origin"], dropped["round"]) == ("envoy_3", 1)  # rejected in round 1 (from 0) the 2nd time
    assert agg.failure() is None  # two of three remain: min_envoys 0.5 holds


@pytest.mark.parametrize("window, dropped", [(5, True), (2, False)])
def test_an_envoy_that_lies_every_other_round_is_dropped_within_the_window(tmp_path, window, dropped):
    agg = aggregator(tmp_path, rounds=3, rejection_window=window)
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": shifted(1.0), "envoy_3": shifted(np.nan)}, SIZES)
    send_round(agg, 1, {"envoy_1": shifted(1.1), "envoy_2": shifted(1.1), "envoy_3": shifted(1.1)}, SIZES)
    send_round(agg, 2, {"envoy_1": shifted(1.2), "envoy_2": shifted(1.2), "envoy_3": shifted(np.inf)}, SIZES)
    assert [r.round for r in agg.rejected] == [1, 3]
    if dropped:  # rejected in rounds 1 and 3: two of the last five
        assert agg.dropped["envoy_3"].startswith("its update was rejected in 2 of the last 5 rounds")
        assert [(e["metric_origin"], e["round"]) for e in events(agg, DROPPED)] == [("envoy_3", 2)]
    else:  # with a window of two rounds, only two in a row count: the accepted round between them clears it
        assert agg.dropped == {}


ONES = {name: np.ones_like(value) for name, value in MODEL.items()}  # a model with a norm, to clip to
# ...and with 10^4 weights, where chance reaches a cosine of -6/sqrt(10^4) = -0.06 (checks.CHANCE_Z)
WIDE = {**ONES, "conv.weight": np.ones((100, 100), np.float32)}


def moved(model, by, counter=0.0):
    """model's tensors plus `by`; its step counter plus `counter` (the batches an envoy ran)."""
    return {name: value + (counter if name.endswith("num_batches_tracked") else by) for name, value in model.items()}


def test_with_two_envoys_a_huge_update_is_clipped_to_the_global_models_norm_and_recorded(tmp_path):
    agg = aggregator(tmp_path, envoys=["envoy_1", "envoy_2"], model=ONES)
    huge = {name: value * np.float32(1e4) for name, value in ONES.items()}
    send_round(agg, 0, {"envoy_1": moved(ONES, 0.1), "envoy_2": huge}, SIZES)
    assert agg.rejected == []  # two updates: no median to stand out from; the bound still holds
    (clipping,) = agg.clipped
    size = checks.distance(ONES, {k: np.zeros_like(v) for k, v in ONES.items()})
    assert (clipping.envoy, clipping.round, clipping.check) == ("envoy_2", 1, "size")
    assert clipping.numbers["bound"] == pytest.approx(size) and clipping.numbers["scale"] < 1e-3
    assert "clipped to max_update_size=1 times it" in clipping.detail
    (event,) = events(agg, CLIPPED)
    assert event["metric_origin"] == "envoy_2" and json.loads(event["metric_name"])["numbers"]["scale"] < 1e-3
    # Aggregated: envoy_1's update and envoy_2's clipped to the global model's norm, weighted by their counts.
    clipped = checks.clipped(huge, ONES, clipping.numbers["scale"])
    assert checks.distance(clipped, ONES) == pytest.approx(size)
    expected = (100 * 1.1 + 300 * clipped["conv.weight"]) / 400
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], expected, rtol=1e-6)
    assert agg.failure() is None and agg.dropped == {}


def test_an_update_within_the_bound_is_not_touched(tmp_path):
    agg = aggregator(tmp_path, envoys=["envoy_1", "envoy_2"], model=ONES)
    send_round(agg, 0, {"envoy_1": moved(ONES, 0.1), "envoy_2": moved(ONES, 0.9)}, SIZES)
    assert agg.clipped == [] and events(agg, CLIPPED) == []
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], (110 + 300 * 1.9) / 400, rtol=1e-6)


@pytest.mark.parametrize("envoys", [ENVOYS, ENVOYS[1:]])
def test_an_update_turned_around_against_its_envoys_last_one_is_rejected_at_any_number_of_envoys(tmp_path, envoys):
    agg = aggregator(tmp_path, envoys=envoys, model=WIDE)
    send_round(agg, 0, {e: moved(WIDE, 0.1, 5) for e in envoys}, SIZES)  # the first round: no step yet
    assert agg.rejected == []
    before = global_model(agg, 1)
    # Round 2: envoy_3 sends g - (w - g), its honest update turned around; its size is the others', its count grew.
    updates = {e: moved(before, 0.1, 5) for e in envoys}
    updates["envoy_3"] = {**moved(before, -0.1), "bn.num_batches_tracked": updates["envoy_3"]["bn.num_batches_tracked"]}
    send_round(agg, 1, updates, SIZES)
    (rejection,) = agg.rejected
    assert (rejection.envoy, rejection.round, rejection.check) == ("envoy_3", 2, "direction")
    assert rejection.numbers == {"cosine": pytest.approx(-1.0), "min_update_cosine": 0.0,
                                 "chance": pytest.approx(0.06)}
    assert "points against its own last accepted one: cosine -1.000" in rejection.detail
    honest = [e for e in envoys if e != "envoy_3"]
    expected = sum(SIZES[e] * (before["conv.weight"] + 0.1) for e in honest) / sum(SIZES[e] for e in honest)
    np.testing.assert_allclose(global_model(agg, 2)["conv.weight"], expected, rtol=1e-6)
    # Its next update is judged against its last accepted one, not the turned one: turned again, rejected again.
    before = global_model(agg, 2)
    send_round(agg, 2, {**{e: moved(before, 0.1, 5) for e in envoys}, "envoy_3": moved(before, -0.1)}, SIZES)
    assert [(r.envoy, r.round, r.check) for r in agg.rejected][1:] == [("envoy_3", 3, "direction")]


def test_an_update_at_right_angles_to_its_last_passes_and_min_update_cosine_minus_1_turns_the_check_off(tmp_path):
    agg = aggregator(tmp_path, model=WIDE, min_update_cosine=-1.0)
    send_round(agg, 0, {e: moved(WIDE, 0.1) for e in ENVOYS}, SIZES)
    before = global_model(agg, 1)
    send_round(agg, 1, {**{e: moved(before, 0.1) for e in ENVOYS}, "envoy_3": moved(before, -0.1)}, SIZES)
    assert agg.rejected == []
    agg = aggregator(tmp_path, model=WIDE)
    send_round(agg, 0, {e: moved(WIDE, 0.1) for e in ENVOYS}, SIZES)
    before = global_model(agg, 1)
    across = np.tile(np.float32([0.1, -0.1]), (100, 50))
    sideways = {**moved(before, 0.0), "conv.weight": before["conv.weight"] + across}
    send_round(agg, 1, {**{e: moved(before, 0.1) for e in ENVOYS}, "envoy_3": sideways}, SIZES)
    assert agg.rejected == []  # at right angles (cosine 0) to its last: not against it


def test_a_direction_no_further_against_its_last_than_chance_reaches_passes(tmp_path):
    """Under DP-SGD an update is mostly noise: its cosine to its last is about 0, at times a little below. Over 10^6
    weights, chance reaches -0.006."""
    rng = np.random.default_rng(0)
    big = {"w": np.zeros(10 ** 6, np.float32)}
    agg = aggregator(tmp_path, envoys=["envoy_1", "envoy_2"], model=big, max_update_size=10.0)
    first = {e: {"w": rng.normal(size=10 ** 6).astype(np.float32)} for e in ("envoy_1", "envoy_2")}
    send_round(agg, 0, first, SIZES)
    before = agg._global_model(1)["w"]
    noise = rng.normal(size=10 ** 6)
    noise -= (noise @ first["envoy_1"]["w"]) / (first["envoy_1"]["w"] @ first["envoy_1"]["w"]) * first["envoy_1"]["w"]
    mine = first["envoy_1"]["w"]
    slightly_back = noise - 0.004 * np.linalg.norm(noise) / np.linalg.norm(mine) * mine
    send_round(agg, 1, {"envoy_1": {"w": (before + slightly_back).astype(np.float32)},
                        "envoy_2": {"w": (before - first["envoy_2"]["w"]).astype(np.float32)}}, SIZES)
    assert [(r.envoy, r.check) for r in agg.rejected] == [("envoy_2", "direction")]  # -1: far past chance
    assert -0.0045 < checks.cosine({"w": before + slightly_back}, {"w": before}, first["envoy_1"]) < -0.0035


def test_an_update_of_another_shape_is_refused_on_arrival_and_the_round_still_ends(tmp_path):
    agg = aggregator(tmp_path)
    wrong = {**shifted(2.0), "conv.weight": np.full((3, 3), 2.0, np.float32)}
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": wrong, "envoy_3": shifted(3.0)}, SIZES)
    assert agg.round_number == 1
    (rejection,) = agg.rejected
    assert (rejection.envoy, rejection.check) == ("envoy_2", "structure")
    assert rejection.detail == "conv.weight has shape [3, 3], the global model's [4, 3]"
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], (100 + 1800) / 700)


def test_a_round_whose_every_update_was_rejected_keeps_the_global_model(tmp_path):
    agg = aggregator(tmp_path)
    send_round(agg, 0, {e: shifted(np.nan) for e in ENVOYS}, SIZES)
    assert agg.round_number == 1 and len(agg.rejected) == 3
    for name, value in global_model(agg, 1).items():
        np.testing.assert_array_equal(value, MODEL[name])


def test_an_auc_left_undefined_by_a_split_of_one_class_is_missing_not_a_failure(tmp_path):
    agg = aggregator(tmp_path)
    send_round(agg, 0, {e: shifted(1.0) for e in ENVOYS}, SIZES, aucs={"envoy_1": 0.6, "envoy_2": 0.9,
                                                                         "envoy_3": float("nan")})
    assert agg.dropped == {} and agg.rejected == []
    # The others' mean, by their counts: NaN is missing, not zero, and does not make the round's AUC NaN.
    assert aggregated(agg, 0, "aggregated_model_validate", "auc") == pytest.approx((100 * 0.6 + 300 * 0.9) / 400)
    assert aggregated(agg, 0, "aggregated_model_validate", "loss") == pytest.approx(0.5)
    agg = aggregator(tmp_path)  # an infinite AUC is no split's doing: that envoy's task failed
    send_round(agg, 0, {e: shifted(1.0) for e in ENVOYS}, SIZES, aucs={"envoy_1": 0.6, "envoy_2": float("inf"),
                                                                         "envoy_3": 0.7})
    assert agg.dropped == {"envoy_2": "its task failed: its aggregated_model_validate task reported auc = inf"}


def test_a_non_finite_validation_metric_is_that_envoys_failed_task(tmp_path):
    agg = aggregator(tmp_path)
    send_round(agg, 0, {e: shifted(1.0) for e in ENVOYS}, SIZES, losses={"envoy_2": float("nan")})
    assert agg.dropped == {"envoy_2": "its task failed: its aggregated_model_validate task reported loss = nan"}
    assert aggregated(agg, 0, "aggregated_model_validate", "loss") == pytest.approx(0.5)  # the others', not NaN


# --- a failed task names its envoy and its error -----------------------------------------------------------------
def test_an_envoys_failure_report_starts_with_its_error_in_one_line():
    try:
        try:
            raise ValueError("Input contains NaN.\nmore detail")
        except ValueError as exc:
            exc.add_note("in the train task of round 2")
            raise
    except ValueError as exc:
        assert faults.summary(exc) == "ValueError: Input contains NaN. (in the train task of round 2)"
    report = "ValueError: Input contains NaN. (in the train task of round 2)\nTraceback (most recent call last):\n ..."
    assert faults.cause(report) == "ValueError: Input contains NaN. (in the train task of round 2)"
    plain = 'Traceback (most recent call last):\n  File "x.py", line 1\nKeyError: \'w\'\n'  # OpenFL's own envoy
    assert faults.cause(plain) == "KeyError: 'w'"
    assert faults.cause("") == "it gave no reason"


def test_the_envoy_sends_that_line_first_when_it_reports_a_failed_task():
    sent = []
    report = faults.saying_unreachable(lambda self, name, **kwargs: sent.append(kwargs["error_description"]))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        report(None, "experiment", error_code=1, error_description="Traceback ...")
    report(None, "experiment", error_description="refused: envoy_1 refused experiment x")  # a refusal stays as is
    assert sent == ["RuntimeError: boom\nTraceback ...", "refused: envoy_1 refused experiment x"]


def test_the_director_drops_the_envoy_whose_task_failed_and_the_run_goes_on(tmp_path):
    from types import SimpleNamespace

    from openfl.component.director.experiment import Status

    agg = aggregator(tmp_path)
    director = SimpleNamespace(experiments_registry={"run": SimpleNamespace(status=Status.IN_PROGRESS,
                                                                            aggregator=agg, name="run")})
    faults.envoy_failed(director, "run", "envoy_1", "ValueError: Input contains NaN (in the train task of round 2)\n")
    assert agg.dropped == {"envoy_1": "its task failed: ValueError: Input contains NaN (in the train task of round 2)"}
    assert agg.failure() is None
    faults.envoy_failed(director, "run", "envoy_2", "Traceback (most recent call last):\nOSError: disk full")
    assert agg.failure() == ("only 1 of 3 envoys remain, fewer than the 2 that min_envoys=0.5 requires. Lost: "
                             "envoy_1: its task failed: ValueError: Input contains NaN (in the train task of round 2); "
                             "envoy_2: its task failed: OSError: disk full")
    stopped = []
    plain = SimpleNamespace(experiments_registry={"run": SimpleNamespace(status=Status.IN_PROGRESS,
                                                                         aggregator=object(), name="run")},
                            set_experiment_failed=lambda **kwargs: stopped.append(kwargs))
    faults.envoy_failed(plain, "run", "envoy_1", "boom")  # an aggregator outside the contract stops as in OpenFL
    assert stopped == [{"experiment_name": "run", "collaborator_name": "envoy_1"}]


def test_openfl_reports_an_envoys_failure_from_inside_its_except_block():
    import inspect

    from openfl.component.envoy.envoy import Envoy

    source = inspect.getsource(Envoy.run)
    assert "except Exception as exc:" in source and "error_description=traceback.format_exc()" in source
    assert sys.version_info >= (3, 11)  # BaseException.add_note


def test_model_state_no_training_gives_is_rejected_a_negative_variance_or_a_counter_that_went_back(tmp_path):
    model = {**MODEL, "bn.running_var": np.ones(4, np.float32), "bn.num_batches_tracked": np.array(10.5, np.float32)}
    honest = {**model, "bn.running_var": np.full(4, 0.5, np.float32), "bn.num_batches_tracked": np.array(10.0)}
    assert checks.invalid_state(honest, model) == {}  # no batch run: the counter's whole part, exactly
    negative = {**honest, "bn.running_var": np.array([0.5, -0.25, 1.0, 0.0], np.float32)}
    assert checks.invalid_state(negative, model) == {"tensor": "bn.running_var", "what": "a negative running variance",
                                                     "value": -0.25, "bound": 0.0}
    back = {**honest, "bn.num_batches_tracked": np.array(3.0)}
    assert checks.invalid_state(back, model)["bound"] == 10.0
    # On the director: the update is left out of the round, named with the numbers, the others averaged.
    agg = aggregator(tmp_path)
    lying = {**shifted(3.0), "bn.num_batches_tracked": np.array(-1e6, np.float32)}
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": shifted(2.0), "envoy_3": lying}, SIZES)
    (rejection,) = agg.rejected
    assert (rejection.envoy, rejection.check) == ("envoy_3", "state")
    assert rejection.detail == ("bn.num_batches_tracked holds a step counter below the global model's: -1e+06, "
                                "where it cannot go below 0")
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], (100 * 1.0 + 300 * 2.0) / 400)


def test_a_variance_that_fell_to_zero_may_arrive_a_rounding_below_it_on_a_half_precision_wire():
    model = {"bn.running_var": np.full(2, 1e-3, np.float32)}
    change = np.float32(-1e-3)  # the variance of a channel that went dead, to about 0
    for dtype in (np.float16, "bfloat16"):
        import torch

        rounded = torch.tensor(change).to(torch.bfloat16 if dtype == "bfloat16" else torch.float16).float().numpy()
        arrived = {"bn.running_var": model["bn.running_var"] + rounded}
        assert checks.invalid_state(arrived, model) == {}, (dtype, arrived)
    assert checks.invalid_state({"bn.running_var": np.array([1e-3, -1e-4], np.float32)}, model)  # not a rounding


def test_an_update_that_claims_more_samples_than_its_shard_registered_or_none_is_left_out(tmp_path):
    """OpenFL weights each update by the count its envoy claims: one claiming 10^9 samples would be the whole mean.
    The director compares the claim with what the envoy's shard registered (openfl_adjustments.faults hands it the
    registry's sizes); more, zero or negative is a rejection, named with both numbers."""
    agg = aggregator(tmp_path)
    agg.registered_samples(lambda: registered(SIZES))
    claims = {**SIZES, "envoy_3": 10 ** 9}
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": shifted(2.0), "envoy_3": shifted(5.0)}, claims)
    # send_round claims the same for its validations: those are named too (the next test)
    assert [r.detail.split(",")[0] for r in agg.rejected] == [
        "it claims 1000000000 validation samples", "it claims 1000000000 training samples",
        "it claims 1000000000 validation samples"]
    rejection = agg.rejected[1]
    assert (rejection.envoy, rejection.check, rejection.round) == ("envoy_3", "count", 1)
    assert rejection.detail == ("it claims 1000000000 training samples, more than the 600 its shard registered with "
                                "the director")
    assert rejection.numbers == {"claimed": 10 ** 9, "registered": 600}
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], (100 * 1.0 + 300 * 2.0) / 400)
    assert aggregated(agg, 0, "train", "train_loss") == pytest.approx(0.7)  # its metrics left out of the round too
    # Zero or negative (OpenFL's count is an int32: a negative one amplifies the others' differences), even for an
    # envoy whose size the director does not know.
    (tmp_path / "b").mkdir()
    agg = aggregator(tmp_path / "b")
    agg.registered_samples(lambda: registered({"envoy_1": 100}))
    send_round(agg, 0, {"envoy_1": shifted(1.0), "envoy_2": shifted(2.0), "envoy_3": shifted(5.0)},
               {"envoy_1": 100, "envoy_2": -300, "envoy_3": 0})
    assert [(r.envoy, r.check, r.numbers["claimed"]) for r in agg.rejected if "training" in r.detail] == \
        [("envoy_2", "count", -300), ("envoy_3", "count", 0)]
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], 1.0)
    # Claims at or below the registered size pass, as does any positive claim the director cannot compare.
    (tmp_path / "c").mkdir()
    agg = aggregator(tmp_path / "c")
    agg.registered_samples(lambda: {"envoy_1": {"train": 100, "val": 100, "test": 7},
                                    "envoy_2": {"train": 300, "val": 5, "test": 299}})
    send_round(agg, 0, {e: shifted(1.0) for e in ENVOYS}, {"envoy_1": 100, "envoy_2": 299, "envoy_3": 10 ** 6})
    assert agg.rejected == []


def registered(sizes: dict) -> dict:
    """What openfl_adjustments.registration hands the aggregator for shards of these sizes (every split alike, as
    send_round claims them)."""
    return {envoy: {"train": n, "val": n, "test": n} for envoy, n in sizes.items()}


def test_a_validation_that_claims_another_count_than_its_split_s_is_left_out_of_the_round_s_metrics(tmp_path):
    """OpenFL weighs each envoy's metrics by the count its validation claims: 10^9 would make its AUC the round's,
    and pick the best model. The claim must be its val or test split's registered size."""
    agg = aggregator(tmp_path)
    agg.registered_samples(lambda: {**registered(SIZES), "envoy_3": {"train": 600, "val": 600, "test": 61}})
    agg.send_local_task_results("envoy_3", 0, "aggregated_model_validate", 10 ** 9,
                                [_named("envoy_3", 0, "loss", 9.0, ("validate_agg", "metric"), True)])
    send_round(agg, 0, {e: shifted(1.0) for e in ENVOYS}, SIZES)  # its other tasks honest (its first is not resent)
    (rejection,) = agg.rejected
    assert (rejection.envoy, rejection.check) == ("envoy_3", "count")
    assert rejection.detail == "it claims 1000000000 validation samples, where its shard registered 600 (val) and " \
                               "61 (test)"
    assert agg.dropped == {}  # a metric's weight: left out, not counted towards dropping it
    # its loss of 9.0, claimed to weigh 10^9 samples, is not in the round's: the other two's 0.5 is
    assert aggregated(agg, 0, "aggregated_model_validate", "loss") == pytest.approx(0.5)


def test_the_director_reads_each_envoy_s_registered_split_sizes_from_its_shard_description():
    from openfl_adjustments.contract import ChecksCounts
    from openfl_adjustments.registration import registered_samples

    registry = {"envoy_1": {"shard_info": {"shard_description": json.dumps({"flag": "bloodmnist", "samples": {
        "train": 512, "val": 64, "test": 64}})}},
                "envoy_2": {"shard_info": {"shard_description": "another descriptor's text"}},
                "envoy_3": {"shard_info": {"shard_description": json.dumps({"samples": {"train": "many"}})}}}
    assert registered_samples(registry) == {"envoy_1": {"train": 512, "val": 64, "test": 64}}
    assert issubclass(SelectingAggregator, ChecksCounts)


def test_a_metric_outside_its_range_is_left_out_of_the_round_and_named(tmp_path):
    """An envoy that reports AUC 5.0 would make its round's global model the best; one out of range is a lie."""
    assert checks.out_of_range({"acc": 0.5, "auc": 1.0, "loss": 0.0, "seconds": -3.0}) == {}
    assert checks.out_of_range({"acc": 0.5, "auc": 5.0}) == {"metric": "auc", "value": 5.0, "low": 0.0, "high": 1.0}
    assert checks.out_of_range({"loss": -1e30})["metric"] == "loss"
    agg = aggregator(tmp_path)
    send_round(agg, 0, {e: shifted(1.0) for e in ENVOYS}, SIZES, losses={"envoy_2": -1e30})
    (rejection,) = agg.rejected
    assert (rejection.envoy, rejection.round, rejection.check) == ("envoy_2", 1, "metric")
    assert rejection.detail == "its aggregated_model_validate task reported loss = -1e+30, outside [0, inf]"
    # The round's validation loss is the other two's; its update, which nothing faults, is averaged as usual.
    assert aggregated(agg, 0, "aggregated_model_validate", "loss") == pytest.approx(0.5)
    np.testing.assert_allclose(global_model(agg, 1)["conv.weight"], 1.0)
    assert agg.dropped == {}


# --- under secure aggregation: what an envoy advertises and sends, checked as it arrives ----------------------------
def _message(agg, envoy, step, payload: bytes):
    from openfl.protocols import base_pb2

    agg.send_local_task_results(envoy, 0, f"secagg/{step}", 0,
                                [base_pb2.NamedTensor(name=f"secagg/{step}", round_number=0, data_bytes=payload)])


@pytest.mark.parametrize("advertised, check, detail", [
    (10 ** 9, "count", "it claims 1000000000 training samples, more than the 600 its shard registered"),
    (-600, "count", "it claims -600 training samples, where an update weighs by a count above 0"),
    ("600", "count", "it advertises '600' training samples, not a whole number")])
def test_under_secure_aggregation_an_advertised_count_is_held_to_the_registered_one(tmp_path, advertised, check,
                                                                                  detail):
    agg = aggregator(tmp_path, secure_aggregation=True)
    agg.registered_samples(lambda: registered(SIZES))
    _message(agg, "envoy_1", "advertise", json.dumps({"c": "", "s": "", "samples": 100}).encode())
    _message(agg, "envoy_3", "advertise", json.dumps({"c": "", "s": "", "samples": advertised}).encode())
    (rejection,) = agg.rejected
    assert (rejection.envoy, rejection.check) == ("envoy_3", check) and rejection.detail.startswith(detail)
    assert agg.dropped["envoy_3"].startswith(f"its update was rejected: it failed the {check} check: {detail}")
    rnd = agg._secure.round(0)
    assert rnd.u1 == ["envoy_1"] and "envoy_3" in rnd.dropped  # the round goes on without it
    assert agg.failure() is None


def test_under_secure_aggregation_a_masked_input_of_the_wrong_length_is_refused_as_it_arrives(tmp_path):
    agg = aggregator(tmp_path, secure_aggregation=True)
    values = sum(v.size for v in MODEL.values())
    _message(agg, "envoy_1", "masked", np.zeros(values, np.uint64).tobytes())
    _message(agg, "envoy_2", "masked", np.zeros(values + 1, np.uint64).tobytes())
    _message(agg, "envoy_3", "masked", b"\x00" * 5)
    assert [(r.envoy, r.check, r.detail) for r in agg.rejected] == [
        ("envoy_2", "secure", f"its masked input holds {values + 1} values, the model {values}"),
        ("envoy_3", "secure", f"its masked input holds 0.625 values, the model {values}")]
    assert sorted(agg.dropped) == ["envoy_2", "envoy_3"]
    assert agg._secure.round(0).u3 == ["envoy_1"]


def test_a_fault_in_the_checks_stops_the_run_named_rather_than_leave_the_envoys_waiting(tmp_path, monkeypatch):
    agg = aggregator(tmp_path)

    def broken(r):
        raise KeyError("conv.weight")

    monkeypatch.setattr(agg, "_check_round", broken)
    send_round(agg, 0, {e: shifted(1.0) for e in ENVOYS}, SIZES)
    assert agg.failure() == "the director's update checks failed in round 1: KeyError: 'conv.weight'"
    assert agg.stopped and [m["metric_name"] for m in agg.metric_queue.queue if m["task_name"] == FAILED] == \
        [agg.failure()]
