"""SelectingAggregator's rule for envoys that vanish or stall: drop them, finish the round with the rest
while enough remain, otherwise fail naming them. The aggregator's OpenFL plumbing is stubbed out here;
tests/test_end_to_end.py kills real envoys."""
import inspect
import logging
import queue
import threading
import time

import pytest
from openfl.component.aggregator.aggregator import Aggregator

from medfl.aggregator import SelectingAggregator
from medfl.events import DROPPED, FAILED
from medfl.selection import Best, quorum


def policy_aggregator(envoys, min_envoys=0.5, round_timeout=0, silent=None):
    """A SelectingAggregator with only its envoy-handling state; ended rounds are recorded in .ended."""
    aggregator = SelectingAggregator.__new__(SelectingAggregator)
    aggregator._policy(min_envoys, round_timeout)
    aggregator._secure = None  # a plain experiment: no secure aggregation
    aggregator.round_number, aggregator.rounds_to_train = 0, 3
    aggregator.authorized_cols, aggregator.quit_job_sent_to, aggregator.collaborators_done = list(envoys), [], []
    aggregator.logger, aggregator.metric_queue, aggregator.best = logging.getLogger("test"), queue.Queue(), Best()
    if silent is not None:
        aggregator.watch_envoys(lambda: silent)
    aggregator.ended, aggregator.lock = [], threading.Lock()
    aggregator._end_of_round_check = lambda: aggregator.ended.append(aggregator.round_number)
    return aggregator


def events(aggregator):
    found = []
    while not aggregator.metric_queue.empty():
        m = aggregator.metric_queue.get()
        found.append((m["task_name"], m["metric_origin"], m["metric_name"]))
    return found


@pytest.mark.parametrize("min_envoys,envoys,needed", [(0.5, 2, 1), (0.5, 3, 2), (1.0, 3, 3), (0.75, 8, 6),
                                                      (0.01, 3, 1), (2, 3, 2), (1, 1, 1)])
def test_min_envoys_is_a_count_or_a_share(min_envoys, envoys, needed):
    assert quorum(min_envoys, envoys) == needed


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, True, "2", None])
def test_a_min_envoys_that_means_nothing_is_refused(bad):
    with pytest.raises(ValueError, match="give a number of envoys"):
        quorum(bad, 3)


def test_an_envoy_the_director_lost_is_dropped_and_the_round_ends_with_the_rest():
    aggregator = policy_aggregator(["envoy_1", "envoy_2", "envoy_3"], silent={"envoy_3": 21.4})
    aggregator.collaborators_done = ["envoy_1"]
    aggregator.check_envoys()
    assert aggregator.dropped == {"envoy_3": "the director has not heard from it for 21 s"}
    assert events(aggregator) == [(DROPPED, "envoy_3", "the director has not heard from it for 21 s")]
    assert aggregator.ended == []  # envoy_2 is still working
    aggregator.collaborators_done.append("envoy_2")
    aggregator._end_of_round_with_stragglers_check()  # as OpenFL calls it after envoy_2's results
    assert aggregator.ended == [0]
    # The dropped envoy gets no more work, its late results are ignored, and it counts as told to quit.
    assert aggregator.get_tasks("envoy_3") == (None, 0, 0, True)
    aggregator.send_local_task_results("envoy_3", 0, "train", 10, [])  # would fail on [] if processed
    assert set(aggregator.quit_job_sent_to) == {"envoy_3"}


def test_too_few_envoys_left_fails_the_experiment_naming_the_lost_ones():
    aggregator = policy_aggregator(["envoy_1", "envoy_2", "envoy_3"], min_envoys=3, silent={"envoy_2": 30.0})
    aggregator.check_envoys()
    assert aggregator.stopped and aggregator._time_to_quit()
    assert aggregator.failure() == ("only 2 of 3 envoys remain, fewer than the 3 that min_envoys=3 requires. "
                                  "Lost: envoy_2: the director has not heard from it for 30 s")
    assert [kind for kind, _, _ in events(aggregator)] == [DROPPED, FAILED]
    # The others are told to quit when they next ask; only then may the aggregator go.
    assert not aggregator.all_quit_jobs_sent()
    for name in ("envoy_1", "envoy_3"):
        assert aggregator.get_tasks(name)[3] is True
    assert aggregator.all_quit_jobs_sent()


def test_round_timeout_drops_the_envoys_still_busy_and_only_those():
    aggregator = policy_aggregator(["envoy_1", "envoy_2", "envoy_3"], round_timeout=5)
    aggregator.collaborators_done = ["envoy_1", "envoy_2"]
    aggregator._round_started[0] = time.monotonic() - 4
    aggregator.check_envoys()
    assert not aggregator.dropped
    aggregator._round_started[0] = time.monotonic() - 6
    aggregator.check_envoys()
    assert aggregator.dropped == {"envoy_3": "it had not finished the round 5 s after it began (round_timeout)"}
    assert aggregator.ended == [0]


def test_an_envoy_held_for_its_operators_review_is_named_and_waited_for_until_it_asks_for_tasks():
    from medfl.events import HELD

    aggregator = policy_aggregator(["envoy_1", "envoy_2"], round_timeout=5)
    aggregator.hold("envoy_2", "envoy_2 holds experiment x for review (code 3a412cf4d365...): its operator runs "
                               "make review on that node")
    assert events(aggregator) == [(HELD, "envoy_2", "envoy_2 holds experiment x for review (code 3a412cf4d365...): "
                                                    "its operator runs make review on that node")]
    aggregator.collaborators_done = ["envoy_1"]
    aggregator._round_started[0] = time.monotonic() - 6
    aggregator.check_envoys()
    assert not aggregator.dropped  # round_timeout waits for a held envoy
    aggregator._held.discard("envoy_2")  # approved: it asked for its first task (get_tasks)
    aggregator.check_envoys()
    assert list(aggregator.dropped) == ["envoy_2"]


def test_a_round_nobody_finishes_in_time_fails_the_experiment_rather_than_waiting():
    aggregator = policy_aggregator(["envoy_1", "envoy_2"], round_timeout=5)
    aggregator._round_started[0] = time.monotonic() - 6
    aggregator.check_envoys()
    assert aggregator.failure().startswith("only 0 of 2 envoys remain, fewer than the 1 that min_envoys=0.5 requires")


def test_an_envoy_lost_after_the_last_round_still_lets_the_experiment_end():
    aggregator = policy_aggregator(["envoy_1", "envoy_2"], min_envoys=2, silent={"envoy_2": 25.0})
    aggregator.round_number = aggregator.rounds_to_train  # every round done: quit jobs are being handed out
    aggregator.get_tasks("envoy_1")
    aggregator.check_envoys()
    assert aggregator.all_quit_jobs_sent() and not aggregator.failure() and events(aggregator) == []


def test_without_a_director_to_ask_nothing_is_dropped_but_by_round_timeout():
    aggregator = policy_aggregator(["envoy_1", "envoy_2"])
    aggregator.check_envoys()
    assert not aggregator.dropped and not aggregator.stopped


def test_a_stopped_selecting_aggregator_tells_each_remaining_collaborator_to_quit_when_it_asks():
    assert "if self._time_to_quit():" in inspect.getsource(Aggregator.get_tasks)
    assert "set(self.quit_job_sent_to) == set(self.authorized_cols)" in inspect.getsource(Aggregator.all_quit_jobs_sent)
    aggregator = policy_aggregator(["envoy_1", "envoy_2"])
    assert not aggregator._time_to_quit()
    aggregator.stop(failed_collaborator="envoy_1")
    assert aggregator._time_to_quit() and not aggregator.all_quit_jobs_sent()  # envoy_2 has not been told yet
    why = "envoy_1 reported an error in its task; its envoy's log shows it"
    assert events(aggregator) == [(FAILED, "aggregator", why)]
    assert aggregator.get_tasks("envoy_2")[3] is True  # time_to_quit
    assert aggregator.all_quit_jobs_sent()


def test_dropping_the_last_envoys_fails_the_experiment():
    aggregator = policy_aggregator(["envoy_1"], min_envoys=1)
    aggregator.drop("envoy_1", "refused: envoy_1 refused the experiment")
    assert aggregator.failure().startswith("only 0 of 1 envoys remain, fewer than the 1 that min_envoys=1 requires. "
                                           "Lost: envoy_1 refused the experiment")  # its own words
    assert [e[0] for e in events(aggregator)] == [DROPPED, FAILED]
