"""Following an experiment from the notebook: progress lines, the best model, dropouts and failures, on a scripted
metric stream (the end-to-end tests follow real ones)."""
from types import SimpleNamespace

import grpc

from medfl import Best
from medfl.events import DROPPED, FAILED
from medfl.researcher import follow

VAL = "aggregated_model_validate"


def _m(r, origin, task, name, value):
    return {"round": r, "metric_origin": origin, "task_name": task, "metric_name": name, "metric_value": value}


def _val(r, origin, auc, task=VAL, **extra):
    values = {"loss": 1.0, "acc": 0.5, "auc": auc, "seconds": 0.1, **extra}
    return [_m(r, origin, task, n, v) for n, v in values.items()]


class Experiment:
    """A submitted FLExperiment as follow() sees it, streaming `metrics`, then raising `error` if given."""

    def __init__(self, metrics, error=None, status="finished"):
        self.experiment_name, self.experiment_submitted, self.status = "exp", True, status
        self.best_fetches = 0

        def stream(name):
            yield from metrics
            if error:
                raise error

        self.federation = SimpleNamespace(dir_client=SimpleNamespace(stream_metrics=stream))

    def get_experiment_status(self):
        return self.status

    def get_best_model(self):
        self.best_fetches += 1
        return f"model {self.best_fetches}"


def test_one_line_per_task_and_the_best_model_fetched_as_it_arrives():
    stream = [*_val(0, "envoy_1", 0.6), *_val(0, "envoy_2", 0.7), *_val(0, "aggregator", 0.65),
              _m(0, "envoy_1", "train", "train_loss", 2.0), _m(0, "envoy_1", "train", "train_seconds", 1.0),
              *_val(1, "aggregator", 0.6), *_val(2, "aggregator", 0.9)]
    lines, experiment = [], Experiment(stream)
    run = follow(experiment, 2, Best("auc", "max"), on_new_best=experiment.get_best_model, echo=lines.append)
    assert run.error is None and len(run.metrics) == len(stream) and run.ended
    assert lines[0] == "initial model    envoy_1     global val  loss 1.0000  acc 0.5000  auc 0.6000  seconds 0.1"
    assert "round 1/2        envoy_1     train       train_loss 2.0000  train_seconds 1.0" in lines
    assert len(lines) == 6
    assert (run.best.round, run.best_model) == (2, "model 2")  # new bests after rounds 0 and 2


def test_a_metric_a_reader_added_to_a_task_joins_its_line_from_the_next_report_on():
    # The two envoys' reports interleave, as the aggregator's threads may put them: lines still hold one task each.
    round_0 = [m for pair in zip(_val(0, "envoy_1", 0.6, samples=32.0), _val(0, "envoy_2", 0.6, samples=30.0),
                                 strict=True) for m in pair]
    stream = [*round_0, *_val(1, "envoy_1", 0.7, samples=32.0), _m(1, "envoy_1", "train", "train_loss", 1.0)]
    lines = []
    follow(Experiment(stream), 2, echo=lines.append)
    assert sum("samples 32.0000" in line for line in lines) == 2  # round 0: its own line; round 1: in the line
    assert any(line.startswith("model after 1/2  envoy_1") and "auc 0.7000  seconds 0.1  samples 32.0000" in line
               for line in lines)
    assert all(line.count("envoy") == 1 for line in lines)


def test_dropouts_failures_and_a_lost_director_end_in_one_line():
    lines = []
    dropped = _m(1, "envoy_2", DROPPED, "the director has not heard from it for 21 s", 3.0)
    failed = _m(1, "aggregator", FAILED, "only 1 of 2 envoys remain", 0.0)
    run = follow(Experiment([*_val(0, "aggregator", 0.5), dropped, failed]), 3, echo=lines.append)
    assert run.error == "only 1 of 2 envoys remain" and lines[-1] == "FAILED: only 1 of 2 envoys remain"
    assert [(d["envoy"], d["round"]) for d in run.dropouts] == [("envoy_2", 2)]
    assert any("envoy_2     DROPPED: the director has not heard from it for 21 s" in line for line in lines)

    class Gone(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "Socket closed"

    run = follow(Experiment([], error=Gone()), 3, echo=lines.append)
    assert run.error.startswith("lost the director (UNAVAILABLE: Socket closed)")
    assert follow(Experiment([], status="failed"), 1, echo=lines.append).error.startswith("the director reports")
    refused = Experiment([])
    refused.experiment_submitted = False
    assert follow(refused, 1, echo=lines.append).error == "the director refused the experiment; its log says why"


def test_openfls_log_goes_to_a_file_and_the_page_shows_only_what_needs_attention(tmp_path, capsys):
    import logging

    from medfl.researcher import log_to

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        for verbose in (False, True):
            log_to(tmp_path / "logs" / "openfl.log", verbose)
            log_to(tmp_path / "logs" / "openfl.log", verbose)  # the cell run again: still one file handler
            logging.getLogger("openfl.experiment").info("Starting experiment!")
            logging.getLogger("openfl.split").warning("tried to remove tensor")
            logging.getLogger("openfl.director").error("the director refused it")
            logging.getLogger("medfl").warning("something of ours")
            out, err = capsys.readouterr()
            also = " (also shown here)" if verbose else ""
            assert out == f"OpenFL's log: {tmp_path / 'logs' / 'openfl.log'}{also}\n" * 2
            shown = ["the director refused it", "something of ours"] + (["Starting", "tried to"] if verbose else [])
            assert all(text in err for text in shown)
            assert verbose or ("Starting" not in err and "tried to" not in err)
        assert (tmp_path / "logs" / "openfl.log").read_text().count("Starting experiment!") == 2
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()


def test_each_rounds_traffic_is_one_line_and_lands_in_the_results():
    from medfl.events import TRAFFIC
    from medfl.researcher.report import traffic

    def shares(r, origin, received, sent, connections):
        return [_m(r, origin, TRAFFIC, "received_bytes", received), _m(r, origin, TRAFFIC, "sent_bytes", sent),
                _m(r, origin, TRAFFIC, "connections", connections)]

    stream = [*_val(0, "aggregator", 0.6), *shares(0, "aggregator", 1_890_000.0, 1_880_000.0, 2.0),
              *shares(0, "envoy_1", 945_000.0, 940_000.0, 1.0), *shares(0, "envoy_2", 945_000.0, 940_000.0, 1.0),
              *_val(1, "aggregator", 0.7), *shares(1, "aggregator", 0.0, 1_880_000.0, 0.0),
              *shares(1, "envoy_1", 0.0, 940_000.0, 0.0), *shares(1, "envoy_2", 0.0, 940_000.0, 0.0)]
    lines = []
    run = follow(Experiment(stream), 1, Best(), echo=lines.append)
    assert "round 1/1        aggregator  traffic     received 1.89 MB  sent 1.88 MB  new connections 2" in lines
    assert "final validation aggregator  traffic     received 0.00 MB  sent 1.88 MB  new connections 0" in lines
    assert not [line for line in lines if "traffic" in line and "aggregator" not in line]  # shares: results only
    envoy = {"received_bytes": 945_000, "sent_bytes": 940_000, "connections": 1}
    idle = {"received_bytes": 0, "sent_bytes": 940_000, "connections": 0}
    assert traffic(run.metrics) == [
        {"round": 0, "received_bytes": 1_890_000, "sent_bytes": 1_880_000, "connections": 2,
         "per_envoy": {"envoy_1": envoy, "envoy_2": envoy}},
        {"round": 1, "received_bytes": 0, "sent_bytes": 1_880_000, "connections": 0,
         "per_envoy": {"envoy_1": idle, "envoy_2": idle}}]
