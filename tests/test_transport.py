"""openfl_adjustments.transport and medfl.wire, each against OpenFL's own behaviour: a real aggregator server on a
loopback port with a stand-in aggregator, OpenFL's client and collaborator, with the adjustments and without."""
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from openfl.component.collaborator.collaborator import Collaborator
from openfl.protocols import aggregator_pb2, utils
from openfl.transport.grpc.aggregator_client import AggregatorGRPCClient
from openfl.transport.grpc.aggregator_server import AggregatorGRPCServer
from openfl.utilities import TensorKey

import openfl_adjustments
from medfl.wire import WIRE_DTYPES, CastForTheWire, WirePipeline, wire_format
from openfl_adjustments import transport
from openfl_adjustments.contract import CountsConnections

NAME, AGGREGATOR, FEDERATION = "envoy_1", "aggregator_uuid", "federation_uuid"


def _named(name: str, value: np.ndarray, round_number: int = 0):
    from openfl.pipelines import NoCompressionPipeline

    data, metadata = NoCompressionPipeline().forward(value)
    return utils.construct_named_tensor(TensorKey(name, AGGREGATOR, round_number, False, ("model", "compressed")),
                                        data, metadata, lossless=True)


class StandIn:
    """The aggregator behind OpenFL's server: serves fixed tensors and tasks, records results and connections."""

    def __init__(self, tensors: dict):
        self.uuid, self.federation_uuid, self.single_col_cert_common_name = AGGREGATOR, FEDERATION, ""
        self.authorized_cols = [NAME]
        self.tensors, self.peers, self.results = tensors, [], []
        self.tasks_ready = threading.Event()
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    def connected(self, envoy, peer):
        self.peers.append((envoy, peer))

    def get_tasks(self, name):
        if self.tasks_ready.is_set():
            return [aggregator_pb2.Task(name="train", function_name="train")], 1, 0, False
        return None, 0, 10, False  # OpenFL's "nothing yet, sleep 10 s"

    def get_aggregated_tensor(self, name, tensor_name, round_number, report, tags, require_lossless):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.05)  # a round trip's worth: concurrent fetches overlap here
        with self.lock:
            self.in_flight -= 1
        return _named(tensor_name, self.tensors[tensor_name], round_number)

    def send_local_task_results(self, name, round_number, task_name, data_size, named_tensors):
        self.results.append((task_name, [t.name for t in named_tensors]))


@pytest.fixture
def adjusted():
    openfl_adjustments.install()
    yield
    openfl_adjustments.restore_all()


def _serve(aggregator):
    server = AggregatorGRPCServer(aggregator, 0, tls=False)
    grpc_server = server.get_server()
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    return grpc_server, port


def _client(port):
    return AggregatorGRPCClient("127.0.0.1", port, disable_client_auth=True, root_certificate=None, certificate=None,
                                private_key=None, tls=False, aggregator_uuid=AGGREGATOR, federation_uuid=FEDERATION)


TENSORS = {f"layer{i}": np.random.default_rng(i).standard_normal((i + 1, 3)).astype(np.float32) for i in range(41)}


def _array(tensor) -> np.ndarray:
    return np.frombuffer(tensor.data_bytes, np.float32).reshape(tuple(tensor.transformer_metadata[0].int_list))


def test_the_adjusted_client_keeps_one_connection_for_every_call(adjusted):
    aggregator = StandIn(TENSORS)
    assert isinstance(aggregator, CountsConnections)
    server, port = _serve(aggregator)
    try:
        client = _client(port)
        for name in list(TENSORS)[:10]:
            assert np.array_equal(_array(client.get_aggregated_tensor(NAME, name, 0, False, ("model",), True)),
                                  TENSORS[name])
        aggregator.tasks_ready.set()
        client.get_tasks(NAME)
        client.send_local_task_results(NAME, 0, "train", 10, [_named("layer0", TENSORS["layer0"])])
        client.disconnect()
    finally:
        server.stop(0)
    assert len(aggregator.peers) == 11 and len({peer for _, peer in aggregator.peers}) == 1
    assert aggregator.results == [("train", ["layer0"])]


def _counting_channels(client) -> list:
    made = []
    create = client.create_insecure_channel
    client.create_insecure_channel = lambda uri: made.append(uri) or create(uri)
    return made


def test_openfls_own_client_makes_a_new_channel_for_every_call_and_the_adjusted_one_none():
    aggregator = StandIn(TENSORS)
    server, port = _serve(aggregator)
    try:
        plain = _client(port)
        made = _counting_channels(plain)
        for name in list(TENSORS)[:5]:
            plain.get_aggregated_tensor(NAME, name, 0, False, ("model",), True)
        assert len(made) == 5  # OpenFL's _atomic_connection: a new channel (a new TLS connection) per call
        openfl_adjustments.install()
        try:
            adjusted = _client(port)
            made = _counting_channels(adjusted)
            for name in list(TENSORS)[:5]:
                adjusted.get_aggregated_tensor(NAME, name, 0, False, ("model",), True)
            assert made == []
        finally:
            openfl_adjustments.restore_all()
    finally:
        server.stop(0)


def _collaborator(client):
    runner = SimpleNamespace(set_optimizer_treatment=lambda _: None)
    return Collaborator(NAME, AGGREGATOR, FEDERATION, client, runner, {}, opt_treatment="RESET")


def _keys():
    return [TensorKey(name, AGGREGATOR, 0, False, ("model",)) for name in TENSORS]


def test_the_model_is_fetched_all_at_once_with_exactly_the_tensors_of_the_sequential_fetch(adjusted):
    aggregator = StandIn(TENSORS)
    server, port = _serve(aggregator)
    try:
        together = _collaborator(_client(port))
        started = time.monotonic()
        fetched = together.get_numpy_dict_for_tensorkeys(_keys())
        took = time.monotonic() - started
        assert aggregator.most_in_flight >= 20  # 41 requests in flight together (the server has 64 threads)
        openfl_adjustments.restore_all()
        one_by_one = _collaborator(_client(port))
        aggregator.most_in_flight = 0
        started = time.monotonic()
        sequential = one_by_one.get_numpy_dict_for_tensorkeys(_keys())
        took_sequential = time.monotonic() - started
        assert aggregator.most_in_flight == 1
        openfl_adjustments.install()
    finally:
        server.stop(0)
    assert list(fetched) == list(sequential) == list(TENSORS)
    for name, value in sequential.items():
        assert np.array_equal(fetched[name], value) and fetched[name].dtype == value.dtype
    assert took < took_sequential / 4  # 41 x 50 ms one after another; about one 50 ms wait together


def test_results_go_in_the_background_and_are_in_before_the_envoy_asks_for_tasks(adjusted):
    sent, release = [], threading.Event()

    class SlowClient:
        def send_local_task_results(self, name, round_number, task_name, data_size, named_tensors):
            release.wait(5)
            sent.append(task_name)

        def get_tasks(self, name):
            assert sent == ["train"], "asked for tasks before its results arrived"
            return [], 1, 0, True

    collaborator = _collaborator(SlowClient())
    collaborator.task_runner.get_train_data_size = lambda: 10
    started = time.monotonic()
    collaborator.send_task_results({TensorKey("w", NAME, 0, False, ("trained",)): np.ones(3, np.float32)}, 0, "train")
    assert time.monotonic() - started < 1 and sent == []  # the envoy goes on to its next task
    threading.Timer(0.2, release.set).start()
    assert collaborator.get_tasks()[3] is True and sent == ["train"]


def test_a_send_that_failed_in_the_background_fails_the_next_request_for_tasks(adjusted):
    class Broken:
        def send_local_task_results(self, *args):
            raise RuntimeError("the aggregator refused the results")

        def get_tasks(self, name):
            raise AssertionError("never asked")

    collaborator = _collaborator(Broken())
    collaborator.task_runner.get_train_data_size = lambda: 10
    collaborator.send_task_results({TensorKey("w", NAME, 0, False, ("trained",)): np.ones(3, np.float32)}, 0, "train")
    with pytest.raises(RuntimeError, match="refused the results"):
        collaborator.get_tasks()


def test_a_request_for_tasks_is_held_until_the_aggregator_has_some(adjusted, monkeypatch):
    aggregator = StandIn(TENSORS)
    server, port = _serve(aggregator)
    try:
        client = _client(port)
        threading.Timer(0.5, lambda: (aggregator.tasks_ready.set(), transport.CHANGES.happened())).start()
        started = time.monotonic()
        tasks, round_number, sleep_time, quit_ = client.get_tasks(NAME)
        took = time.monotonic() - started
        assert [t.name for t in tasks] == ["train"] and (round_number, sleep_time, quit_) == (1, 0, False)
        assert 0.45 < took < 0.9  # answered as soon as the tasks were there, not after a 10 s polling period
        # Nothing comes: the request is held LONG_POLL_S, then answered "ask again now" (no sleep).
        aggregator.tasks_ready.clear()
        monkeypatch.setattr(transport, "LONG_POLL_S", 0.3)
        started = time.monotonic()
        tasks, _, sleep_time, quit_ = client.get_tasks(NAME)
        assert list(tasks) == [] and sleep_time == 0 and not quit_ and 0.25 < time.monotonic() - started < 1
        # OpenFL's own server answers at once with its 10 s sleep.
        openfl_adjustments.restore_all()
        plain, plain_port = _serve(aggregator)
        started = time.monotonic()
        assert _client(plain_port).get_tasks(NAME)[2] == 10 and time.monotonic() - started < 0.3
        plain.stop(0)
        openfl_adjustments.install()
    finally:
        server.stop(0)


def test_the_aggregator_server_gets_threads_for_every_waiting_envoy(adjusted):
    from openfl.transport.grpc import aggregator_server

    pool = aggregator_server.ThreadPoolExecutor(max_workers=2)
    assert pool._max_workers == transport.SERVER_WORKERS
    pool.shutdown()


def _runner(opt_treatment):
    from openfl.federated.task.task_runner import CoreTaskRunner
    from openfl.plugins.frameworks_adapters.pytorch_adapter import FrameworkAdapterPlugin

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()  # Adam now has its moments
    runner = CoreTaskRunner()
    runner.set_optimizer_treatment(opt_treatment)
    runner.model, runner.optimizer = model, optimizer
    runner.set_framework_adapter(FrameworkAdapterPlugin())
    return runner


@pytest.mark.parametrize("opt_treatment", ["RESET", "CONTINUE_LOCAL", "CONTINUE_GLOBAL"])
def test_the_optimizer_state_stays_home_unless_it_is_aggregated(opt_treatment):
    metrics = {"train_loss": 0.5}
    runner = _runner(opt_treatment)
    openfl_sent, _ = runner._prepare_tensorkeys_for_agggregation(metrics, False, NAME, 0)
    openfl_names = {k.tensor_name for k in openfl_sent}
    assert any(n.startswith("__opt_") for n in openfl_names)  # OpenFL sends Adam's state whatever the treatment
    openfl_adjustments.install()
    try:
        sent, local = _runner(opt_treatment)._prepare_tensorkeys_for_agggregation(metrics, False, NAME, 0)
    finally:
        openfl_adjustments.restore_all()
    names = {k.tensor_name for k in sent}
    weights = {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
               "1.num_batches_tracked"}
    if opt_treatment == "CONTINUE_GLOBAL":
        assert names == openfl_names
    else:
        assert names == weights | {"train_loss"}
        assert openfl_names - names <= {k.tensor_name for k in local}  # kept on the envoy, not lost
    validation, _ = _runner(opt_treatment)._prepare_tensorkeys_for_agggregation({"acc": 1.0}, "_agg", NAME, 0)
    assert {k.tensor_name for k in validation} == {"acc"}


# --- medfl.wire -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_wire_casts_float_tensors_to_half_the_bytes_and_back(dtype):
    cast = CastForTheWire(dtype)
    values = np.array([[0.1, -2.5e-4, 3.0], [np.inf, -np.inf, np.nan]], dtype=np.float32)
    data, metadata = cast.forward(values)
    assert len(data) == values.size * 2 and metadata == {"int_list": [2, 3], "bool_list": [True]}
    back = cast.backward(data, metadata)
    expected = torch.from_numpy(values).to(getattr(torch, dtype)).float().numpy()
    assert back.dtype == np.float32 and back.shape == (2, 3) and back.flags.writeable
    np.testing.assert_array_equal(back, expected)  # torch's rounding, NaN and infinity kept
    assert np.abs(back[0] - values[0]).max() <= np.abs(values[0]).max() * (2 ** -11 if dtype == "float16" else 2 ** -8)
    counter = np.array(123456, dtype=np.int64)  # BatchNorm's num_batches_tracked: exact, and still 0-d
    data, metadata = cast.forward(counter)
    assert cast.backward(data, metadata).shape == () and float(cast.backward(data, metadata)) == 123456.0
    pipeline = WirePipeline(dtype)
    assert pipeline.is_lossy()
    data, metadata = pipeline.forward(values)
    np.testing.assert_array_equal(pipeline.backward(data, metadata), expected)


def test_float16_overflows_to_infinity_where_bfloat16_keeps_the_range():
    big = np.array([1e5], dtype=np.float32)
    assert np.isinf(CastForTheWire("float16").backward(*CastForTheWire("float16").forward(big)))[0]
    assert CastForTheWire("bfloat16").backward(*CastForTheWire("bfloat16").forward(big))[0] == pytest.approx(1e5, 0.01)


def test_the_wire_format_turns_on_delta_updates_with_the_pipeline_and_refuses_other_dtypes():
    assert wire_format("float32") == {} and WIRE_DTYPES == ("float32", "float16", "bfloat16")
    settings = wire_format("bfloat16")
    assert settings["compression_pipeline.template"] == "medfl.wire.WirePipeline"
    assert settings["compression_pipeline.settings.dtype"] == "bfloat16"
    assert settings["collaborator.settings.delta_updates"] is True
    with pytest.raises(ValueError, match="wire_dtype='int8': give one of float32, float16, bfloat16"):
        wire_format("int8")
    with pytest.raises(ValueError, match="a half-precision wire is float16 or bfloat16"):
        CastForTheWire("float32")


def test_openfls_delta_of_a_0d_tensor_is_a_scalar_and_the_adjusted_one_an_array():
    from openfl.pipelines.tensor_codec import TensorCodec

    key = TensorKey("bn.num_batches_tracked", AGGREGATOR, 1, False, ("aggregated", "delta"))
    _, value = TensorCodec.apply_delta(key, np.array(2.0, np.float32), np.array(5.0, np.float32), creates_model=True)
    assert not isinstance(value, np.ndarray)  # torch.from_numpy refuses it
    openfl_adjustments.install()
    try:
        _, value = TensorCodec.apply_delta(key, np.array(2.0, np.float32), np.array(5.0, np.float32), True)
        assert isinstance(value, np.ndarray) and value.shape == () and value == 7.0
    finally:
        openfl_adjustments.restore_all()
    assert TensorCodec.apply_delta(key, np.ones(2), np.ones(2))[1].tolist() == [2.0, 2.0]  # a static method again


def test_two_adjustments_of_one_attribute_wrap_one_another_and_installing_twice_changes_nothing():
    from openfl_adjustments.patching import replace, restore_all

    class Owner:
        def greet(self):
            return "hello"

    def loud(original):
        return lambda self: original(self) + "!"

    def polite(original):
        return lambda self: original(self) + ", please"

    try:
        for _ in range(2):
            replace(Owner, "greet", loud)
            replace(Owner, "greet", polite)
        assert Owner().greet() == "hello!, please"
    finally:
        restore_all()
    assert Owner().greet() == "hello"
