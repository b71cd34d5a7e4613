"""What medfl.aggregator and openfl_adjustments rely on in the pinned OpenFL: if an upgrade changes it, fail here."""
import inspect

from openfl.component.aggregator.aggregator import Aggregator
from openfl.component.assigner.custom_assigner import Assigner

from medfl.aggregator import SelectingAggregator, _Never, _Tap
from medfl.selection import Best
from openfl_adjustments import faults
from openfl_adjustments.contract import EnvoyAwareAggregator


class Aware:
    """A stand-in aggregator that keeps the contract with the director's adjustments."""

    def __init__(self, dropped=()):
        self.dropped, self.calls = dict.fromkeys(dropped, "lost"), []

    def watch_envoys(self, silent):
        self.calls.append(("watch", silent))

    def drop(self, name, why):
        self.calls.append((name, why))

    def hold(self, name, why):
        self.calls.append(("hold", name, why))

    def has_dropped(self, name):
        return name in self.dropped

    def failure(self):
        return None


def test_selecting_aggregator_keeps_the_contract_with_the_director():
    assert issubclass(SelectingAggregator, EnvoyAwareAggregator)
    assert isinstance(Aware(), EnvoyAwareAggregator) and faults.aware(Aware())
    assert faults.aware(object()) is None  # an aggregator without it runs as in OpenFL
    protocol = {n for n in vars(EnvoyAwareAggregator) if not n.startswith("_")}
    assert protocol == {"watch_envoys", "drop", "hold", "has_dropped", "failure"}


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
    assert Best("loss", "min").pick(losses).round == 2  # a tie goes to the later model (tests/test_model_selection.py)
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


def test_the_polling_sleeps_that_the_adjustments_cap_are_still_there():
    from openfl.component.collaborator import collaborator
    from openfl.component.director import director, experiment
    from openfl.transport.grpc import director_server

    assert "await asyncio.sleep(10)" in inspect.getsource(experiment.ExperimentsRegistry.get_next_experiment)
    assert "await asyncio.sleep(10)" in inspect.getsource(experiment.Experiment._run_aggregator_grpc_server)
    assert "await asyncio.sleep(1)" in inspect.getsource(director.Director.stream_metrics)
    assert "await asyncio.sleep(1)" in inspect.getsource(director_server.DirectorGRPCServer.GetMetricStream)
    assert "sleep(sleep_time)" in inspect.getsource(collaborator.Collaborator.run)
    assert collaborator.sleep.__module__ == "time"  # `from time import sleep`: the name polling.py replaces


def test_the_adjustments_cap_those_sleeps_and_nothing_else_and_can_be_undone():
    import asyncio
    import time

    from openfl.component.aggregator import aggregator
    from openfl.component.collaborator import collaborator
    from openfl.component.director import director, experiment

    import openfl_adjustments
    from openfl_adjustments import polling

    originals = (experiment.asyncio, collaborator.sleep, aggregator.TensorDB, director.Director.__init__)
    try:
        openfl_adjustments.install()
        openfl_adjustments.install()  # again: nothing is wrapped twice
        started = time.monotonic()
        collaborator.sleep(10)
        asyncio.run(experiment.asyncio.sleep(10))
        assert time.monotonic() - started < 2 * polling.POLL_S + 0.5
        assert experiment.asyncio.Queue is asyncio.Queue  # the rest of asyncio is untouched
        assert time.sleep is not collaborator.sleep and asyncio.sleep is not experiment.asyncio.sleep
        assert director.Director.__init__ is not originals[3]
    finally:
        openfl_adjustments.restore_all()
    assert (experiment.asyncio, collaborator.sleep, aggregator.TensorDB, director.Director.__init__) == originals


def test_an_envoy_is_handed_its_last_experiment_again_only_while_it_runs_and_counts_the_envoy_in():
    import asyncio
    from types import SimpleNamespace

    from openfl.component.director import director

    source = inspect.getsource(director.Director.wait_experiment)
    assert "experiment_name = self.col_exp.get(envoy_name)" in source  # what the fix clears
    running = SimpleNamespace(status="in_progress", aggregator=Aware(dropped=["envoy_2"]))
    ended = SimpleNamespace(status="failed", aggregator=None)
    fake = SimpleNamespace(col_exp={"envoy_1": "run", "envoy_2": "run", "envoy_3": "old", "envoy_4": None},
                           experiments_registry={"run": running, "old": ended})
    handed = []

    async def original(self, envoy_name):
        handed.append((envoy_name, self.col_exp[envoy_name]))

    wrapped = faults.current_only(original)
    for name in ("envoy_1", "envoy_2", "envoy_3", "envoy_4"):
        asyncio.run(wrapped(fake, name))
    assert handed == [("envoy_1", "run"), ("envoy_2", None), ("envoy_3", None), ("envoy_4", None)]


def test_an_envoy_gives_up_on_an_aggregator_that_stopped_answering(monkeypatch):
    from types import SimpleNamespace

    import grpc
    import pytest
    from openfl.transport.grpc import aggregator_client

    # OpenFL retries UNAVAILABLE forever in the interceptor, and any other RpcError in the client methods:
    # giving up must raise something that is not an RpcError.
    original = inspect.getsource(aggregator_client.RetryOnRpcErrorClientInterceptor._intercept_call)
    assert "while True:" in original and "self.sleeping_policy.sleep()" in original
    assert "except grpc.RpcError as e:" in inspect.getsource(aggregator_client._resend_data_on_reconnection)
    assert not issubclass(faults.AggregatorGone, grpc.RpcError)

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

    sleeps = []
    fake = SimpleNamespace(status_for_retry=(grpc.StatusCode.UNAVAILABLE,),
                           sleeping_policy=SimpleNamespace(uri="localhost:51000", sleep=lambda: sleeps.append(1)))
    answers = iter([Unavailable(), Unavailable(), "response"])
    timeouts = []

    def call(details, request):
        timeouts.append(details.timeout)
        return next(answers)

    details = SimpleNamespace(method="/Aggregator/GetTasks", timeout=None, metadata=None, credentials=None)
    assert faults.patient_intercept_call(fake, call, details, None) == "response"
    assert len(timeouts) == 3 and all(0 < t <= faults.AGGREGATOR_PATIENCE_S for t in timeouts)
    monkeypatch.setattr(faults, "AGGREGATOR_PATIENCE_S", 0.05)
    with pytest.raises(faults.AggregatorGone, match="aggregator at localhost:51000 has not answered for 0 s"):
        faults.patient_intercept_call(fake, lambda details, request: Unavailable(), details, None)
    assert sleeps


def test_an_envoy_that_registers_again_mid_experiment_is_dropped_from_it():
    from types import SimpleNamespace

    from openfl.component.director import director

    assert "self._shard_registry[shard_info[\"node_info\"][\"name\"]] = {" in \
        inspect.getsource(director.Director.acknowledge_shard).replace("'", '"')
    # The shard registry reads every registered envoy's experiment, which OpenFL sets only once the envoy asks.
    assert 'envoy_info["experiment_name"] = self.col_exp[envoy_name]' in inspect.getsource(director.Director.get_envoys)
    running = SimpleNamespace(status="in_progress", aggregator=Aware())
    fake = SimpleNamespace(col_exp={"envoy_1": "run"}, experiments_registry={"run": running})
    wrapped = faults.dropping_restarted(lambda self, info: True)
    for name in ("envoy_1", "envoy_2"):  # envoy_2 is new: nothing to leave
        assert wrapped(fake, {"node_info": {"name": name}})
    assert running.aggregator.calls == [("envoy_1", "it restarted during the experiment; it joins the next one")]
    assert fake.col_exp == {"envoy_1": "run", "envoy_2": None}


def test_the_director_ignores_failure_reports_about_experiments_that_are_over():
    from types import SimpleNamespace

    reports = []
    wrapped = faults.in_progress_only(lambda self, **kw: reports.append(kw["experiment_name"]))
    fake = SimpleNamespace(experiments_registry={"done": SimpleNamespace(status="finished"),
                                                 "running": SimpleNamespace(status="in_progress")})
    for name in ("done", "running", "unknown"):
        wrapped(fake, experiment_name=name, collaborator_name="envoy_1")
    assert reports == ["running", "unknown"]  # OpenFL's own method ignores unknown ones


def test_the_director_tells_the_aggregator_which_envoys_it_no_longer_hears():
    import time
    from types import SimpleNamespace

    from openfl.component.director import director

    assert '"valid_duration": 2 * self.envoy_health_check_period' in inspect.getsource(director.Director)
    assert 'shard_info["last_updated"] = time.time()' in inspect.getsource(director.Director.update_envoy_status)
    now = time.time()
    fake = SimpleNamespace(_shard_registry={"envoy_1": {"last_updated": now - 1, "valid_duration": 20},
                                            "envoy_2": {"last_updated": now - 25, "valid_duration": 20}})
    silent = faults.silent_envoys(fake)
    assert list(silent) == ["envoy_2"] and 25 <= silent["envoy_2"] < 30


def test_fast_tensor_db_answers_as_openfls_does():
    import numpy as np
    from openfl.databases.tensor_db import TensorDB
    from openfl.databases.utilities import ROUND_PLACEHOLDER
    from openfl.interface.aggregation_functions import WeightedAverage
    from openfl.utilities import TensorKey, change_tags

    from openfl_adjustments.tensor_store import FastTensorDB

    rng = np.random.default_rng(0)
    ops = []
    for r in range(4):
        for name in ("conv.weight", "bn.running_mean"):
            for col in ("envoy_1", "envoy_2"):
                ops.append({TensorKey(name, "agg", r, False, change_tags(("trained",), add_field=col)):
                            rng.normal(size=3)})
            ops.append({TensorKey(name, "agg", r + 1, False, ("model",)): rng.normal(size=3)})
        ops.append({TensorKey("acc", "envoy_1", r, True, ("metric", "validate_agg")): np.array(0.5 + r / 10)})
    ops.append({TensorKey("conv.weight", "agg", 2, False, ("model",)): np.zeros(3)})  # a duplicate: first one wins
    ops.append({TensorKey("x", "agg", ROUND_PLACEHOLDER, False, ("model",)): np.ones(1)})
    dbs = [TensorDB(), FastTensorDB()]
    for db in dbs:
        for op in ops:
            db.cache_tensor(op)
    weights = {"envoy_1": 0.25, "envoy_2": 0.75}
    for r in range(4):
        key = TensorKey("conv.weight", "agg", r, False, ("trained",))
        answers = [db.get_aggregated_tensor(key, weights, WeightedAverage()) for db in dbs]
        assert answers[0] is not None
        np.testing.assert_allclose(answers[0], answers[1])
        again = [db.get_aggregated_tensor(key, weights, WeightedAverage()) for db in dbs]  # now cached
        np.testing.assert_allclose(again[0][0], again[1][0])
        assert again[0][1] == again[1][1] == {}
    missing = TensorKey("conv.weight", "agg", 9, False, ("trained",))
    assert [db.get_aggregated_tensor(missing, weights, WeightedAverage()) for db in dbs] == [None, None]
    for db in dbs:
        db.clean_up(2)
    keys = [sorted(map(tuple, db.tensor_db[["tensor_name", "origin", "round", "report", "tags"]].values.tolist()),
                   key=str) for db in dbs]
    assert keys[0] == keys[1]
    for key in [TensorKey("conv.weight", "agg", 2, False, ("model",)), TensorKey("acc", "envoy_1", 0, True,
                                                                                  ("metric", "validate_agg"))]:
        np.testing.assert_array_equal(dbs[0].get_tensor_from_cache(key), dbs[1].get_tensor_from_cache(key))
    assert dbs[1].get_tensor_from_cache(TensorKey("gone", "agg", 0, False, ())) is None


def test_under_tls_openfl_ignores_an_envoys_failure_report_and_checks_no_names_at_registration():
    from openfl.transport.grpc import director_server

    server = director_server.DirectorGRPCServer
    assert "if self.get_caller(context) != CLIENT_ID_DEFAULT:" in inspect.getsource(server.SetExperimentFailed)
    assert "get_caller" not in inspect.getsource(server.UpdateShardInfo)
    assert 'return context.auth_context()["x509_common_name"]' in inspect.getsource(server.get_caller)


def test_an_envoy_that_cannot_reach_its_director_exits_in_openfl_unless_it_waits():
    from openfl.component.envoy.envoy import Envoy

    source = inspect.getsource(Envoy.start)
    assert "self.director_client.report_shard_info(" in source and "sys.exit(1)" in source


def test_models_reach_the_notebook_as_writable_arrays_equal_to_openfls():
    import warnings

    import numpy as np
    from openfl.pipelines.pipeline import Float32NumpyArrayToBytes

    import medfl.researcher  # noqa: F401  importing it applies the notebook's adjustments
    from openfl_adjustments import client

    assert Float32NumpyArrayToBytes.backward is client.writable_backward
    # What it replaces: a read-only view, reshaped with the keyword NumPy deprecated.
    assert "np.frombuffer(data, dtype=np.float32)" in inspect.getsource(Float32NumpyArrayToBytes)
    assert "newshape=array_shape" in inspect.getsource(Float32NumpyArrayToBytes)
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    data, metadata = Float32NumpyArrayToBytes().forward(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        received = Float32NumpyArrayToBytes().backward(data, metadata)
    np.testing.assert_array_equal(received, weights)
    assert received.flags.writeable and received.dtype == np.float32


def test_fast_tensor_db_answers_as_openfls_does_for_the_algorithms_aggregations():
    """FedOpt's server optimizer keeps state across rounds: through either store, each round steps it once (a
    repeated request is answered from the cache) and the answers agree."""
    import numpy as np
    import torch
    from openfl.databases.tensor_db import TensorDB
    from openfl.utilities import TensorKey, change_tags

    from medfl.algorithms import aggregation_function
    from openfl_adjustments.tensor_store import FastTensorDB

    model = torch.nn.Linear(3, 1)
    rng = np.random.default_rng(1)
    weights = {"envoy_1": 0.4, "envoy_2": 0.6}
    for algorithm in ("fedyogi", "geomedian"):
        dbs = [TensorDB(), FastTensorDB()]
        functions = [aggregation_function(algorithm, model, {"server_learning_rate": 0.05}) for _ in dbs]
        for r in range(3):
            trained = {col: rng.normal(size=(1, 3)).astype(np.float32) for col in weights}
            key = TensorKey("weight", "agg", r, False, ("trained",))
            answers = []
            for db, function in zip(dbs, functions, strict=True):
                db.cache_tensor({TensorKey("weight", "agg", r, False, change_tags(("trained",), add_field=col)): value
                                 for col, value in trained.items()})
                answers.append(db.get_aggregated_tensor(key, weights, function))
                np.testing.assert_array_equal(db.get_aggregated_tensor(key, weights, function)[0], answers[-1])
            np.testing.assert_allclose(answers[0], answers[1], rtol=1e-6)
        if algorithm == "fedyogi":
            assert [f.steps["weight"] for f in functions] == [3, 3]


def test_openfls_health_checks_stop_at_the_first_failure_and_wait_without_a_deadline():
    from openfl.component.envoy.envoy import Envoy
    from openfl.transport.grpc.director_client import ShardDirectorClient

    loop, client = inspect.getsource(Envoy.send_health_check), inspect.getsource(ShardDirectorClient.send_health_check)
    # A failed call returns None, and the thread's time.sleep(None) ends it: what network.py replaces.
    assert "timeout = self.director_client.send_health_check(" in loop and "time.sleep(timeout)" in loop
    assert "except grpc.RpcError as rpc_error:" in client and "self.stub.UpdateEnvoyStatus(status)" in client
    # What network.health_check sends in its place.
    for field in ("name=envoy_name", "is_experiment_running=is_experiment_running", "status.cuda_devices.extend(",
                  "response.health_check_period.seconds"):
        assert field in client, field


def test_an_envoys_health_checks_go_on_after_failures_with_a_deadline_each(monkeypatch, caplog):
    from types import SimpleNamespace

    import grpc
    import pytest

    from openfl_adjustments import network

    class Failed(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "Deadline Exceeded"

    answers = iter([7, Failed(grpc.StatusCode.DEADLINE_EXCEEDED), Failed(grpc.StatusCode.UNAVAILABLE), 7,
                    Failed(grpc.StatusCode.NOT_FOUND), 7])
    calls, registered, sleeps = [], [], []

    def update(status, timeout):
        calls.append((status.name, status.is_experiment_running, timeout))
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(health_check_period=SimpleNamespace(seconds=answer))

    class Done(Exception):
        pass

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 6:
            raise Done

    envoy = SimpleNamespace(name="envoy_2", is_experiment_running=True, _get_cuda_device_info=lambda: [],
                            shard_descriptor="shard", cuda_devices=(),
                            director_client=SimpleNamespace(stub=SimpleNamespace(UpdateEnvoyStatus=update),
                                                            report_shard_info=lambda **kw: registered.append(kw)))
    monkeypatch.setattr(network.time, "sleep", sleep)
    with caplog.at_level("INFO", logger="openfl_adjustments"), pytest.raises(Done):
        network.steady_health_checks(envoy)
    assert [c[:2] for c in calls] == [("envoy_2", True)] * 6
    assert [c[2] for c in calls] == [network.HEALTH_DEADLINE_S] + [7] * 5  # the director's period, once known
    assert sleeps == [7] * 6 and registered == [{"shard_descriptor": "shard", "cuda_devices": ()}]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("does not answer this envoy's health checks (DEADLINE_EXCEEDED" in line for line in lines) == 1
    assert sum("answers this envoy's health checks again" in line for line in lines) == 1


def test_every_channel_and_server_keeps_its_connections_alive_and_can_be_undone():
    from openfl.transport.grpc import aggregator_client, aggregator_server, director_client, director_server

    import openfl_adjustments
    from openfl_adjustments import network

    modules = (aggregator_client, aggregator_server, director_client, director_server)
    originals = [m.channel_options for m in modules]
    assert all("channel_options" in inspect.getsource(m) for m in modules)
    try:
        openfl_adjustments.install()
        for module, original in zip(modules, originals, strict=True):
            assert module.channel_options == [*original, *network.KEEPALIVE]
    finally:
        openfl_adjustments.restore_all()
    assert [m.channel_options for m in modules] == originals
