"""The best-model rule on easy data: ties in the chosen metric go to the lower validation loss, then to the later
round, whichever order a round's metrics arrive in; the director and the notebook choose the same model."""
import logging

import pytest
from test_follow import Experiment

from medfl import Best
from medfl.aggregator import SelectingAggregator, _Tap
from medfl.events import AGGREGATED, VALIDATE_GLOBAL
from medfl.researcher import follow
from medfl.selection import TIE

# A real-image 9-class run (3 envoys, Dirichlet alpha 0.3, FedAvg): validation AUC reaches 1.0 after round 3 and
# stays there, while validation loss keeps falling. (round, auc, loss, acc)
EASY = [(0, 0.512, 2.197, 0.110), (1, 0.981, 0.610, 0.801), (2, 0.997, 0.322, 0.902), (3, 1.0, 0.195, 0.965),
        (4, 1.0, 0.088, 0.975), (5, 1.0, 0.054, 0.985)]


def _m(r, name, value, origin=AGGREGATED, task=VALIDATE_GLOBAL):
    return {"round": r, "metric_origin": origin, "task_name": task, "metric_name": name, "metric_value": value}


def stream(rounds, loss_first=True):
    """Aggregated global validation metrics as the director streams them, with the envoys' and training's around."""
    out = []
    for r, auc, loss, acc in rounds:
        values = [("loss", loss), ("acc", acc), ("auc", auc), ("seconds", 0.1)]
        if not loss_first:
            values = values[1:3] + values[:1] + values[3:]
        out += [_m(r, "auc", 0.5, origin="envoy_1"), *(_m(r, n, v) for n, v in values),
                _m(r, "train_loss", 0.3, task="train")]
    return out


@pytest.mark.parametrize("loss_first", [True, False], ids=["loss-then-auc", "auc-then-loss"])
def test_a_tie_at_auc_1_goes_to_the_lower_validation_loss(loss_first):
    best = Best("auc", "max").pick(stream(EASY, loss_first))
    assert (best.round, best.value, best.loss) == (5, 1.0, 0.054)
    assert best.describe(5) == "best model: after 5 of 5 rounds, validation auc 1.0000, loss 0.0540"


def test_the_first_maximum_rule_kept_the_weaker_model():
    """What the rule before replaced: the first maximum of validation AUC kept round 3."""
    first_maximum = None
    for r, auc, _, _ in EASY:
        if first_maximum is None or auc > first_maximum[1]:
            first_maximum = (r, auc)
    assert first_maximum[0] == 3 and Best().pick(stream(EASY)).round == 5
    assert Best().pick(stream(EASY[:4])).round == 3  # before any tie, the new rule agrees


def test_equal_loss_goes_to_the_later_round_and_a_worse_loss_keeps_the_earlier():
    same = [(0, 0.9, 0.4, 0.7), (1, 1.0, 0.2, 0.9), (2, 1.0, 0.2, 0.9)]
    assert Best().pick(stream(same)).round == 2
    worse = [(0, 0.9, 0.4, 0.7), (1, 1.0, 0.2, 0.9), (2, 1.0, 0.3, 0.95)]
    assert Best().pick(stream(worse)).round == 1


def test_the_tie_tolerance_is_stated_and_only_within_it_does_loss_decide():
    assert TIE == 1e-3
    within = [(0, 0.9, 0.4, 0.7), (1, 0.9990, 0.30, 0.9), (2, 0.9990 - TIE / 2, 0.10, 0.9)]
    assert Best().pick(stream(within)).round == 2  # a hair lower AUC, far lower loss: the later model
    beyond = [(0, 0.9, 0.4, 0.7), (1, 0.9990, 0.30, 0.9), (2, 0.9990 - 2 * TIE, 0.10, 0.9)]
    assert Best().pick(stream(beyond)).round == 1  # a real drop in AUC is not made up for by loss
    better = [(0, 0.9, 0.4, 0.7), (1, 0.995, 0.10, 0.9), (2, 0.995 + 2 * TIE, 0.30, 0.9)]
    assert Best().pick(stream(better)).round == 2  # a real gain in AUC wins whatever the loss
    minimum = [(0, 0.9, 0.4, 0.7), (1, 0.9, 0.3, 0.7), (2, 0.9, 0.3 + TIE / 2, 0.7)]
    assert Best("loss", "min").pick(stream(minimum)).round == 1  # best_metric loss: the lower loss itself


def test_nan_is_never_best_and_a_validate_without_loss_keeps_ties_with_the_earlier_round():
    assert Best().pick(stream([(0, float("nan"), 1.0, 0.1)])).round is None
    no_loss = [m for m in stream(EASY) if m["metric_name"] != "loss"]
    best = Best().pick(no_loss)
    assert (best.round, best.loss) == (3, None)


@pytest.mark.parametrize("loss_first", [True, False], ids=["loss-then-auc", "auc-then-loss"])
def test_the_director_saves_exactly_the_models_the_notebook_fetches(loss_first):
    metrics = stream(EASY, loss_first)
    aggregator = SelectingAggregator.__new__(SelectingAggregator)
    aggregator.logger, aggregator.best, aggregator.best_state_path = logging.getLogger("test"), Best(), "best.pbuf"
    saved = []
    aggregator._save_model = lambda r, path: saved.append((r, path))
    aggregator.metric_queue = _Tap(aggregator._consider)
    for m in metrics:  # as OpenFL puts each aggregated metric
        aggregator.metric_queue.put(m)
    experiment = Experiment(metrics)
    run = follow(experiment, 5, Best(), on_new_best=experiment.get_best_model, echo=lambda line: None)
    assert [r for r, _ in saved] == [0, 1, 2, 3, 4, 5]  # each a new best: higher AUC, then lower loss
    assert experiment.best_fetches == len(saved) and run.best.round == aggregator.best.round == 5
