"""What medfl.aggregator and medfl.run rely on in the pinned OpenFL: if an upgrade changes it, fail here."""
import inspect

from openfl.component.aggregator.aggregator import Aggregator
from openfl.component.assigner.custom_assigner import Assigner

from medfl.aggregator import Best, SelectingAggregator, _Never, _Tap


def _m(origin, task, name, value, r):
    return {"metric_origin": origin, "task_name": task, "metric_name": name, "metric_value": value, "round": r}


def test_best_follows_one_metric_in_one_direction():
    stream = [_m("aggregator", "aggregated_model_validate", "auc", v, r) for r, v in enumerate([0.6, 0.8, 0.7])]
    stream += [_m("aggregator", "aggregated_model_validate", "loss", 9.0, 2),  # other metrics never count
               _m("envoy_1", "aggregated_model_validate", "auc", 0.99, 2),
               _m("aggregator", "locally_tuned_model_validate", "auc", 0.99, 2)]
    best = Best("auc", "max").pick(stream)
    assert (best.round, best.value) == (1, 0.8)
    losses = [_m("aggregator", "aggregated_model_validate", "loss", v, r) for r, v in enumerate([2.0, 1.0, 1.0])]
    assert Best("loss", "min").pick(losses).round == 1  # a tie does not replace the earlier model
    assert Best("auc").pick([_m("aggregator", "aggregated_model_validate", "auc", float("nan"), 0)]).round is None


def test_the_tap_shows_each_metric_and_still_queues_it():
    seen = []
    tap = _Tap(seen.append)
    tap.put({"x": 1})
    assert seen == [{"x": 1}] and tap.get() == {"x": 1} and tap.empty()


def test_aggregator_judges_best_right_after_queueing_each_aggregated_metric():
    source = inspect.getsource(Aggregator._compute_validation_related_task_metrics)
    put, judge, save = (source.index(s) for s in ("self.metric_queue.put(metrics)",
                                                  "self.best_model_score < agg_results",
                                                  "self._save_model(round_number, self.best_state_path)"))
    assert put < judge < save
    assert not (_Never() < 0.0) and not (_Never() < float("inf"))
    assert "self.metric_queue = queue.Queue()" in inspect.getsource(Aggregator.__init__)
    assert "def _save_model(self, round_number, file_path)" in inspect.getsource(Aggregator)
    assert issubclass(SelectingAggregator, Aggregator)


def test_custom_assigner_asks_our_schedule_for_every_round():
    source = inspect.getsource(Assigner.define_task_assignments)
    assert "for round_number in range(self.rounds_to_train)" in source
    assert "self.assigner_function(" in source


def test_a_round_without_training_leaves_the_last_model_as_it_was():
    # The final validation-only round has no new model to save; OpenFL logs it and keeps the last one.
    source = inspect.getsource(Aggregator._save_model)
    assert "Cannot save model for round" in source and "return" in source
