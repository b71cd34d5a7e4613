"""How envoys and the aggregator talk: at the speed of the wire, not of round trips. Found by `make bench WAN=...`.

OpenFL 1.6's envoy opened a new TLS connection for every call to the aggregator and closed it after (its
`_atomic_connection`), fetched the global model one tensor per call, one after another, sent each task's results
and waited for the answer before the next task, and asked for the next round's tasks in a sleep loop: about 230
round trips a round, 10 s at a 40 ms round trip. Here:

- One connection. An envoy's client keeps one channel (one mutually authenticated HTTP/2 connection) for the whole
  experiment and closes it when the experiment ends. gRPC makes a new connection only after the old one failed
  (keepalive, network.py, notices one that a cut cable killed).
- The model in one round trip. The tensors a task needs from the aggregator are fetched concurrently, up to
  FETCH_STREAMS at once, over that connection.
- Results while the next task runs. Each task's results are encoded at once and go to the aggregator in the
  background; the envoy waits for them only before it next asks for tasks (so the aggregator never hands out a
  task whose results are on the way). A failed send raises there, as it would have where it was made.
- No polling across the network. The aggregator holds an idle envoy's request for tasks until it has some (the
  round ended), the experiment ends, or LONG_POLL_S pass, so an envoy learns of the next round within half a round
  trip. The aggregator's server gets enough threads for every waiting envoy plus the fetches.
- Only what aggregation needs goes up. OpenFL's envoy sends its optimizer's state (Adam's two moments: twice the
  model) with its trained weights every round, although with opt_treatment RESET or CONTINUE_LOCAL nothing uses it:
  the next round starts from a fresh optimizer, or from the envoy's own. Here it stays on the envoy, and only
  CONTINUE_GLOBAL, which averages it, sends it.
- Delta updates that work (medfl.wire's half-precision wire uses them). OpenFL's envoy sends the change of its
  weights against the model it received, which it looks up under its own name; but a model it rebuilt from the
  aggregator's change is kept under the aggregator's name only, so from the second round on it sent full float32
  weights. Here a model it received is found under both. And OpenFL adds a change to a tensor with numpy, which
  turns a 0-d array (BatchNorm's counter) into a numpy scalar that PyTorch's adapter refuses; here it stays an
  array.
- A metric of many values (the test's bootstrap values, for confidence intervals) travels as a tensor of the
  validation, which OpenFL's collaborator and aggregator do not try to print or stream as one number.
- Connections counted. Each call tells the aggregator which connection (the peer's address and port) it came on,
  if the aggregator counts them (contract.CountsConnections): results.json's `traffic` shows them per envoy.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from . import faults
from .contract import CountsConnections
from .patching import replace
from .polling import POLL_S

logger = logging.getLogger("openfl_adjustments")
FETCH_STREAMS = 64  # tensors fetched at once: every tensor of this project's CNN (41) in one go
SEND_STREAMS = 4  # task results in flight at once
LONG_POLL_S = 10.0  # longest an idle envoy's request for tasks is held (within the call's own deadline)
SERVER_WORKERS = 64  # the aggregator server's threads; at most half of them hold requests for tasks
RETRY_S = 1.0  # pause before sending a call again that the aggregator answered with an error


# --- the envoy's client: one channel for the experiment -------------------------------------------------------
def _header(client, collaborator_name: str):
    from openfl.protocols import aggregator_pb2

    # Built per call, not kept on the client (OpenFL's _set_header): calls run on several threads at once.
    return aggregator_pb2.MessageHeader(sender=collaborator_name, receiver=client.aggregator_uuid,
                                        federation_uuid=client.federation_uuid,
                                        single_col_cert_common_name=client.single_col_cert_common_name or "")


def _call(client, collaborator_name: str, rpc, make_request):
    """rpc(make_request()) on the client's channel, the answer checked as OpenFL checks it. As OpenFL's
    _resend_data_on_reconnection, a call the aggregator answers with an error is sent again, except one refused
    for its credentials; but only until AGGREGATOR_PATIENCE_S have passed, where OpenFL tried forever. (An
    aggregator that does not answer at all is faults.patient_intercept_call's, below this.)"""
    give_up = time.monotonic() + faults.AGGREGATOR_PATIENCE_S
    while True:
        try:
            response = rpc(make_request())
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > give_up:
                raise
            client.logger.info("Sending again to the aggregator at %s: %s: %s", client.uri, exc.code().name,
                               exc.details())
            time.sleep(RETRY_S)
            continue
        client.validate_response(response, collaborator_name)
        return response


def get_tasks(self, collaborator_name):
    """AggregatorGRPCClient.get_tasks, on the client's one channel."""
    from openfl.protocols import aggregator_pb2

    response = _call(self, collaborator_name, self.stub.GetTasks,
                     lambda: aggregator_pb2.GetTasksRequest(header=_header(self, collaborator_name)))
    return response.tasks, response.round_number, response.sleep_time, response.quit


def get_aggregated_tensor(self, collaborator_name, tensor_name, round_number, report, tags, require_lossless):
    """AggregatorGRPCClient.get_aggregated_tensor, on the client's one channel; safe to call from several threads."""
    from openfl.protocols import aggregator_pb2

    response = _call(self, collaborator_name, self.stub.GetAggregatedTensor,
                     lambda: aggregator_pb2.GetAggregatedTensorRequest(
                         header=_header(self, collaborator_name), tensor_name=tensor_name, round_number=round_number,
                         report=report, tags=tags, require_lossless=require_lossless))
    return response.tensor


def send_local_task_results(self, collaborator_name, round_number, task_name, data_size, named_tensors):
    """AggregatorGRPCClient.send_local_task_results, on the client's one channel."""
    from openfl.protocols import aggregator_pb2, utils

    request = aggregator_pb2.TaskResults(header=_header(self, collaborator_name), round_number=round_number,
                                         task_name=task_name, data_size=data_size, tensors=named_tensors)
    chunks = list(utils.proto_to_datastream(request, self.logger))  # a list, so that it can be sent again
    _call(self, collaborator_name, self.stub.SendLocalTaskResults, lambda: iter(chunks))


# --- the collaborator: fetch together, send in the background -------------------------------------------------
class SendingInBackground:
    """A collaborator's client whose send_local_task_results returns at once and sends from a thread; every other
    call goes straight to the client. The collaborator encodes its results before (OpenFL's send_task_results is
    unchanged), so only the network waits."""

    def __init__(self, client, collaborator_name: str):
        self.client = client
        self.pool = ThreadPoolExecutor(SEND_STREAMS, thread_name_prefix=f"{collaborator_name}-send")
        self.sending: list[Future] = []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def send_local_task_results(self, *args, **kwargs) -> None:
        self.sending.append(self.pool.submit(self.client.send_local_task_results, *args, **kwargs))

    def wait(self) -> None:
        """Wait until every result sent has arrived; raise the first failed send's error, if one failed."""
        while self.sending:
            self.sending.pop(0).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.disconnect()


def sending_in_background(init):
    """Collaborator.__init__ that gives the collaborator a SendingInBackground client and a pool to fetch with."""

    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.client = SendingInBackground(self.client, self.collaborator_name)
        self._fetching = ThreadPoolExecutor(FETCH_STREAMS, thread_name_prefix=f"{self.collaborator_name}-fetch")

    return wrapper


def fetching_together(self, tensor_keys) -> dict:
    """Collaborator.get_numpy_dict_for_tensorkeys: every tensor it needs at once, not one call after another."""
    keys = list(tensor_keys)
    values = self._fetching.map(self.get_data_for_tensorkey, keys)
    return {key.tensor_name: value for key, value in zip(keys, values, strict=True)}


def after_the_sends(get_tasks):
    """Collaborator.get_tasks, asked only once this envoy's results are in (else the aggregator would hand out the
    same tasks again)."""

    def wrapper(self):
        self.client.wait()
        return get_tasks(self)

    return wrapper


def closing_at_the_end(run):
    """Collaborator.run that closes its connection and threads when the experiment ends for this envoy."""

    def wrapper(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        finally:
            self._fetching.shutdown(wait=False, cancel_futures=True)
            self.client.close()

    return wrapper


def keeping_optimizer_state_home(prepare):
    """CoreTaskRunner._prepare_tensorkeys_for_agggregation that, unless the optimizer's state is aggregated
    (CONTINUE_GLOBAL), keeps it among the envoy's local tensors instead of sending it with the weights."""

    def wrapper(self, metric_dict, validation_flag, col_name, round_num):
        to_send, local = prepare(self, metric_dict, validation_flag, col_name, round_num)
        if validation_flag or self.opt_treatment == "CONTINUE_GLOBAL":
            return to_send, local
        model = self.required_tensorkeys_for_function
        weights = {*model["global_model_dict_val"], *model["local_model_dict_val"]}
        stays = {key for key in to_send if not key.report and key.tensor_name not in weights}
        return {k: v for k, v in to_send.items() if k not in stays}, {**local, **{k: to_send[k] for k in stays}}

    return wrapper


def arrays_as_tensors(prepare):
    """CoreTaskRunner._prepare_tensorkeys_for_agggregation that sends a task's metric of more than one value (the
    test's bootstrap values, medfl.metrics.bootstrap) as a tensor of the validation: not reported, and without the
    "metric" tag, under which OpenFL's collaborator and aggregator read each metric as one number."""
    import numpy as np

    def wrapper(self, metric_dict, validation_flag, col_name, round_num):
        to_send, local = prepare(self, metric_dict, validation_flag, col_name, round_num)
        arrays = {key for key, value in to_send.items() if key.report and np.size(value) > 1}
        moved = {key._replace(report=False, tags=tuple(t for t in key.tags if t != "metric")): to_send[key]
                 for key in arrays}
        return {**{k: v for k, v in to_send.items() if k not in arrays}, **moved}, local

    return wrapper


def models_under_own_name(get_data_for_tensorkey):
    """Collaborator.get_data_for_tensorkey that also keeps a global model tensor under the envoy's own name, as
    OpenFL does for one fetched whole, where nparray_to_named_tensor looks for it to send a change against it."""
    from openfl.utilities import TensorKey

    def wrapper(self, tensor_key):
        value = get_data_for_tensorkey(self, tensor_key)
        name, origin, round_number, report, tags = tensor_key
        if origin == self.aggregator_uuid and tags == ("model",) and value is not None:
            self.tensor_db.cache_tensor({TensorKey(name, self.collaborator_name, round_number, report, tags): value})
        return value

    return wrapper


def arrays_from_deltas(apply_delta):
    """TensorCodec.apply_delta whose new tensor is an array even where the tensor has no dimensions."""

    def wrapper(tensor_key, delta, base_model_nparray, creates_model=False):
        key, value = apply_delta(tensor_key, delta, base_model_nparray, creates_model)
        return key, np.asarray(value)

    return wrapper


# --- the aggregator's server: hold requests for tasks, count connections --------------------------------------
class _Changes:
    """A counter of what can give an envoy new tasks (results arriving, a round ending), to wait on."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.count = 0
        self.holding = 0  # requests for tasks held now

    def happened(self) -> None:
        with self.condition:
            self.count += 1
            self.condition.notify_all()


CHANGES = _Changes()


def _count_connection(server, sender: str, context) -> None:
    aggregator = server.aggregator
    if sender and isinstance(aggregator, CountsConnections):
        aggregator.connected(sender, context.peer())


def holding_requests_for_tasks(get_tasks_rpc):
    """AggregatorGRPCServer.GetTasks that answers an envoy with nothing to do only once it has something (or the
    experiment ends, or LONG_POLL_S pass); the answer then says not to sleep, so the envoy asks again at once."""

    def wrapper(self, request, context):
        _count_connection(self, request.header.sender, context)
        remaining = context.time_remaining()
        hold = min(LONG_POLL_S, (remaining - 1.0) if remaining is not None else LONG_POLL_S)
        until = time.monotonic() + hold
        with CHANGES.condition:
            held = CHANGES.holding < SERVER_WORKERS // 2
            CHANGES.holding += held
        try:
            while True:
                count = CHANGES.count
                response = get_tasks_rpc(self, request, context)
                if not held or response.tasks or response.quit or not context.is_active():
                    return response
                left = until - time.monotonic()
                if left <= 0:
                    response.sleep_time = 0  # nothing changed: ask again now
                    return response
                with CHANGES.condition:
                    # Woken by results or a round's end; every POLL_S for what happens elsewhere (a drop, a stop).
                    CHANGES.condition.wait_for(lambda count=count: CHANGES.count != count, timeout=min(left, POLL_S))
        finally:
            with CHANGES.condition:
                CHANGES.holding -= held

    return wrapper


def counting_connections(rpc):
    """AggregatorGRPCServer.GetAggregatedTensor that tells the aggregator which connection the call came on."""

    def wrapper(self, request, context):
        _count_connection(self, request.header.sender, context)
        return rpc(self, request, context)

    return wrapper


def announcing_results(send_local_task_results):
    """AggregatorGRPCServer.SendLocalTaskResults that wakes the requests for tasks it may answer."""

    def wrapper(self, request, context):
        if self.tls:  # the sender is in the stream; under TLS the certificate names it (the aggregator checks)
            _count_connection(self, context.auth_context()["x509_common_name"][0].decode(), context)
        try:
            return send_local_task_results(self, request, context)
        finally:
            CHANGES.happened()

    return wrapper


def announcing_round_ends(end_of_round_check):
    """Aggregator._end_of_round_check that wakes the requests for tasks (a dropped envoy can end a round too)."""

    def wrapper(self, *args, **kwargs):
        try:
            return end_of_round_check(self, *args, **kwargs)
        finally:
            CHANGES.happened()

    return wrapper


def with_enough_threads(thread_pool_executor):
    """The ThreadPoolExecutor of OpenFL's aggregator server, with at least SERVER_WORKERS threads (OpenFL gives it
    one per CPU: two waiting envoys would take both of a 2-core director's)."""

    def make(max_workers=None, *args, **kwargs):
        return thread_pool_executor(max(max_workers or 0, SERVER_WORKERS), *args, **kwargs)

    return make


def install() -> None:
    """One channel per experiment, concurrent fetches, background sends, the optimizer's state kept home, and
    held requests for tasks."""
    from openfl.component.aggregator.aggregator import Aggregator
    from openfl.component.collaborator.collaborator import Collaborator
    from openfl.federated.task.task_runner import CoreTaskRunner
    from openfl.pipelines.tensor_codec import TensorCodec
    from openfl.transport.grpc import aggregator_server
    from openfl.transport.grpc.aggregator_client import AggregatorGRPCClient
    from openfl.transport.grpc.aggregator_server import AggregatorGRPCServer

    for name, method in (("get_tasks", get_tasks), ("get_aggregated_tensor", get_aggregated_tensor),
                         ("send_local_task_results", send_local_task_results)):
        replace(AggregatorGRPCClient, name, lambda _, method=method: method)
    replace(Collaborator, "get_numpy_dict_for_tensorkeys", lambda _: fetching_together)
    replace(Collaborator, "__init__", sending_in_background)
    replace(Collaborator, "get_tasks", after_the_sends)
    replace(Collaborator, "run", closing_at_the_end)
    replace(Collaborator, "get_data_for_tensorkey", models_under_own_name)
    replace(CoreTaskRunner, "_prepare_tensorkeys_for_agggregation", keeping_optimizer_state_home)
    replace(CoreTaskRunner, "_prepare_tensorkeys_for_agggregation", arrays_as_tensors)
    replace(TensorCodec, "apply_delta", lambda original: staticmethod(arrays_from_deltas(original)))
    replace(AggregatorGRPCServer, "GetTasks", holding_requests_for_tasks)
    replace(AggregatorGRPCServer, "GetAggregatedTensor", counting_connections)
    replace(AggregatorGRPCServer, "SendLocalTaskResults", announcing_results)
    replace(Aggregator, "_end_of_round_check", announcing_round_ends)
    replace(aggregator_server, "ThreadPoolExecutor", with_enough_threads)
