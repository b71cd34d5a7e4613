"""Run OpenFL's `fx` with this project's adjustments; start_director.sh and start_envoy.sh use it.

Each adjustment replaces one named piece of OpenFL 1.6 at start-up; site-packages is untouched, and
tests/test_openfl_contract.py fails if the pinned OpenFL stops doing what an adjustment relies on.

- Waiting. OpenFL polls in long fixed steps: the director looks for a submitted experiment every
  10 s and checks every 10 s whether a running one has ended, it streams metrics in 1 s steps, and
  an idle collaborator sleeps as long as the aggregator says, 10 s. Those sleeps are capped at
  POLL_S (0.1 s, FX_POLL_S); in a few-round run they were most of the wall time.
- Tensor store. Every node keeps its tensors (about 40 per model and round) in a pandas DataFrame
  that it scans and re-concatenates on each lookup and insert, about 0.4 s of the director's time
  a round. FastTensorDB keeps the same entries, with the same answers, in a dict.
- Names under TLS. The director accepts an envoy only if its certificate's common name is the name
  it registers under (OpenFL checks that only later, in the aggregator, once an experiment runs).
- Failures. Under TLS, OpenFL's director ignores an envoy's report that its task failed (it hears
  only callers without a certificate name), so the experiment would wait forever: an envoy may
  report its own failure. An envoy is handed an experiment again (after a restart) only while it
  runs and has not dropped that envoy: joining an ended one, it would wait forever for its
  vanished aggregator.
- Vanished aggregators. OpenFL's collaborator retries an unreachable aggregator forever, so an
  envoy whose experiment ended without it (it was dropped, then came back) would never take part
  in anything again. Here it gives up after AGGREGATOR_PATIENCE_S (60 s,
  FX_AGGREGATOR_PATIENCE_S) and waits for the next experiment; the director ignores failure reports
  about experiments that are over, and an envoy that cannot reach its director to report one says so.
- Lost envoys. Each experiment's aggregator (medfl.aggregator.SelectingAggregator) learns which
  envoys the director no longer hears from (no health check for twice envoy_health_check_period),
  so that it can go on without them, and drops an envoy that registers again after a restart (a
  restarted collaborator that rejoined a running experiment was seen to fail it, asking for
  tensors the aggregator no longer had); an experiment it stopped for want of envoys ends as failed.
- Start order. An envoy started before its director waits for it, retrying with a growing pause
  and one log line each time, instead of exiting; TLS refusals still end it at once.
- Busy port. A director whose port is taken says so in one line instead of a gRPC traceback.
- Start-up. An envoy imports torch's compiler front end (torch._dynamo) while idle: the first
  optimizer an experiment unpickles would otherwise import it, 1.5 s into the experiment.

usage: python openfl_prompt.py {director,envoy} start ...   (the same arguments as `fx`)
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import namedtuple
from threading import Lock

import grpc
import numpy as np
import pandas as pd
from openfl.databases.tensor_db import TensorDB
from openfl.databases.utilities import ROUND_PLACEHOLDER
from openfl.utilities import LocalTensor, TensorKey, change_tags

logger = logging.getLogger("openfl_prompt")
POLL_S = float(os.environ.get("FX_POLL_S", "0.1"))
AGGREGATOR_PATIENCE_S = float(os.environ.get("FX_AGGREGATOR_PATIENCE_S", "60"))


class AggregatorGone(RuntimeError):
    """The experiment's aggregator stopped answering: the envoy leaves that experiment."""


class _CappedAsyncio:
    """The asyncio module as those modules see it: the same, except that sleep is capped."""

    def __getattr__(self, name):
        return getattr(asyncio, name)

    @staticmethod
    def sleep(delay, result=None):
        return asyncio.sleep(min(delay, POLL_S), result)


def _capped_sleep(seconds: float) -> None:
    time.sleep(min(seconds, POLL_S))


class FastTensorDB(TensorDB):
    """OpenFL's TensorDB over a dict keyed by TensorKey: same entries, same answers, no scans.

    As in OpenFL, the first value cached under a key is the one returned. Aggregation functions that
    ask for the database itself (`_privileged` ones; this project's FedAvg does not) are refused.
    """

    def __init__(self) -> None:
        self._entries: dict = {}
        self.mutex = Lock()

    @property
    def tensor_db(self) -> pd.DataFrame:
        """The entries as OpenFL's DataFrame, built on demand (for printing and iteration only)."""
        rows = [[*key, value] for key, value in self._entries.items()]
        return pd.DataFrame(rows, columns=["tensor_name", "origin", "round", "report", "tags", "nparray"])

    def cache_tensor(self, tensor_key_dict: dict) -> None:
        with self.mutex:
            for key, value in tensor_key_dict.items():
                self._entries.setdefault(TensorKey(*key), value)

    def get_tensor_from_cache(self, tensor_key):
        value = self._entries.get(TensorKey(*tensor_key))
        return None if value is None else np.array(value)

    def clean_up(self, remove_older_than: int = 1) -> None:
        if remove_older_than < 0 or not self._entries:
            return
        rounds = sorted({int(key.round_number) for key in self._entries})
        current = rounds[-1] if rounds[-1] != ROUND_PLACEHOLDER else rounds[-2]
        with self.mutex:
            self._entries = {k: v for k, v in self._entries.items()
                             if int(k.round_number) > current - remove_older_than or k.report}

    def get_aggregated_tensor(self, tensor_key, collaborator_weight_dict: dict, aggregation_function):
        if collaborator_weight_dict:
            total = sum(collaborator_weight_dict.values())
            assert abs(1.0 - total) < 0.01, f"Collaborator weights do not sum to 1.0: {collaborator_weight_dict}"
        tensor_name, origin, fl_round, report, tags = tensor_key
        cached = self._entries.get(TensorKey(*tensor_key))
        if cached is not None:
            return np.array(cached), {}  # what OpenFL's TensorDB returns here, tuple included
        local_tensors = []
        for col, weight in collaborator_weight_dict.items():
            own = TensorKey(tensor_name, origin, fl_round, report, change_tags(tags, add_field=col))
            value = self._entries.get(own)
            if value is None:
                return None
            local_tensors.append(LocalTensor(col_name=col, tensor=value, weight=weight))
        if getattr(aggregation_function, "_privileged", False):
            raise NotImplementedError("privileged aggregation functions need OpenFL's own TensorDB: start "
                                      "the director with fx instead of openfl_prompt.py")
        aggregated = aggregation_function(local_tensors, self._iterate(), tensor_name, fl_round, tags)
        self.cache_tensor({tensor_key: aggregated})
        return np.array(aggregated)


def install() -> None:
    """Cap the polling sleeps of OpenFL's director, experiment runner, director server and collaborator,
    and give the aggregator and the collaborator the dict-backed TensorDB."""
    from openfl.component.aggregator import aggregator
    from openfl.component.collaborator import collaborator
    from openfl.component.director import director, experiment
    from openfl.transport.grpc import director_server

    for module in (director, experiment, director_server):
        module.asyncio = _CappedAsyncio()
    collaborator.sleep = _capped_sleep
    aggregator.TensorDB = collaborator.TensorDB = FastTensorDB
    if not hasattr(director.Director.wait_experiment, "current_only"):
        director.Director.wait_experiment = _current_only(director.Director.wait_experiment)
    if not hasattr(experiment.Experiment.start, "tells_lost"):
        experiment.Experiment.start = _telling_lost_envoys(experiment.Experiment.start)
    from openfl.transport.grpc import director_client

    shard_client = director_client.ShardDirectorClient
    if not hasattr(shard_client.report_shard_info, "waits"):
        shard_client.report_shard_info = _waiting_for_director(shard_client.report_shard_info)
    if not hasattr(director.Director.acknowledge_shard, "drops_restarted"):
        director.Director.acknowledge_shard = _dropping_restarted(director.Director.acknowledge_shard)
    if not hasattr(director.Director.__init__, "remembered"):
        director.Director.__init__ = _remembered(director.Director.__init__)
    if not hasattr(director.Director.set_experiment_failed, "in_progress_only"):
        director.Director.set_experiment_failed = _in_progress_only(director.Director.set_experiment_failed)
    if not hasattr(shard_client.set_experiment_failed, "says_unreachable"):
        shard_client.set_experiment_failed = _saying_unreachable(shard_client.set_experiment_failed)
    from openfl.transport.grpc import aggregator_client

    interceptor = aggregator_client.RetryOnRpcErrorClientInterceptor
    if not hasattr(interceptor._intercept_call, "patient"):
        interceptor._intercept_call = _patient_intercept_call
    server = director_server.DirectorGRPCServer
    if not hasattr(server.UpdateShardInfo, "checks_name"):
        server.UpdateShardInfo = _named_envoys_only(server.UpdateShardInfo)
    if not hasattr(server.SetExperimentFailed, "hears_envoys"):
        server.SetExperimentFailed = _hearing_envoys(server.SetExperimentFailed)


def _hearing_envoys(set_experiment_failed):
    """DirectorGRPCServer.SetExperimentFailed that, under TLS, accepts an envoy's report of its own failure."""
    from openfl.protocols import director_pb2

    async def wrapper(self, request, context):
        if self.tls and self.get_caller(context) == request.collaborator_name:
            logger.error("Envoy %s failed in experiment %s, which stops: %s", request.collaborator_name,
                         request.experiment_name, request.error_description)
            self.director.set_experiment_failed(experiment_name=request.experiment_name,
                                                collaborator_name=request.collaborator_name)
            return director_pb2.SetExperimentFailedResponse()
        return await set_experiment_failed(self, request, context)

    wrapper.hears_envoys = True
    return wrapper


def _waiting_for_director(report_shard_info, first_pause: float = 1.0, longest_pause: float = 30.0):
    """ShardDirectorClient.report_shard_info that waits for a director that is not up yet."""

    def wrapper(self, *args, **kwargs):
        pause = first_pause
        while True:
            try:
                return report_shard_info(self, *args, **kwargs)
            except grpc.RpcError as exc:
                details = str(exc.details() if hasattr(exc, "details") else exc)
                # Nobody listening: wait. A handshake or certificate failure is final.
                if exc.code() != grpc.StatusCode.UNAVAILABLE or "Connection refused" not in details:
                    raise
                logger.warning("No director answers yet (connection refused); trying again in %.0f s", pause)
                time.sleep(pause)
                pause = min(pause * 2, longest_pause)

    wrapper.waits = True
    return wrapper


def _named_envoys_only(update_shard_info):
    """DirectorGRPCServer.UpdateShardInfo that, under TLS, refuses an envoy registering under a name
    other than its certificate's."""
    from openfl.protocols import director_pb2

    async def wrapper(self, request, context):
        name = request.shard_info.node_info.name
        if self.tls and self.get_caller(context) != name:
            logger.error("Refused envoy %r: its certificate is for %r. Start it with the certificate made for "
                         "its name (python tlscerts.py make --envoy %s).", name, self.get_caller(context), name)
            return director_pb2.UpdateShardInfoResponse(accepted=False)
        return await update_shard_info(self, request, context)

    wrapper.checks_name = True
    return wrapper


class _CallDetails(namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
                   grpc.ClientCallDetails):
    """A call's details with another timeout (gRPC's own object cannot be changed)."""


def _patient_intercept_call(self, continuation, client_call_details, request_or_iterator):
    """RetryOnRpcErrorClientInterceptor._intercept_call that retries an unreachable aggregator for
    AGGREGATOR_PATIENCE_S, then raises AggregatorGone (OpenFL retries forever). Each attempt is bounded
    by what is left of that time: a call on a connection the aggregator dropped can otherwise hang."""
    give_up = time.monotonic() + AGGREGATOR_PATIENCE_S
    retry = (*(self.status_for_retry or ()), grpc.StatusCode.DEADLINE_EXCEEDED)
    while True:
        d = client_call_details
        bounded = _CallDetails(d.method, max(0.1, give_up - time.monotonic()), d.metadata, d.credentials,
                               getattr(d, "wait_for_ready", None), getattr(d, "compression", None))
        response = continuation(bounded, request_or_iterator)
        if not isinstance(response, Exception) or (self.status_for_retry and response.code() not in retry):
            return response
        if time.monotonic() > give_up:
            # Not a grpc.RpcError: OpenFL's collaborator client would retry that too.
            raise AggregatorGone(f"the experiment's aggregator at {self.sleeping_policy.uri} has not answered for "
                                 f"{AGGREGATOR_PATIENCE_S:.0f} s: the experiment went on without this envoy, or "
                                 "its director stopped; this envoy leaves it and waits for the next one")
        self.sleeping_policy.sleep()


_patient_intercept_call.patient = True


def _in_progress_only(set_experiment_failed):
    """Director.set_experiment_failed that ignores reports about an experiment that is over."""
    from openfl.component.director.experiment import Status

    def wrapper(self, *, experiment_name: str, collaborator_name: str):
        experiment = self.experiments_registry.get(experiment_name)
        if experiment is not None and experiment.status != Status.IN_PROGRESS:
            logger.info("Ignored %s's failure report about experiment %s, which is %s", collaborator_name,
                        experiment_name, experiment.status)
            return
        set_experiment_failed(self, experiment_name=experiment_name, collaborator_name=collaborator_name)

    wrapper.in_progress_only = True
    return wrapper


def _saying_unreachable(set_experiment_failed):
    """ShardDirectorClient.set_experiment_failed that logs, rather than raises, a director that does not answer."""

    def wrapper(self, experiment_name: str, *args, **kwargs):
        try:
            return set_experiment_failed(self, experiment_name, *args, **kwargs)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            logger.error("Could not tell the director that experiment %s failed here: it does not answer (%s)",
                         experiment_name, exc.details())

    wrapper.says_unreachable = True
    return wrapper


def _remembered(init):
    """Director.__init__ that keeps the director where the experiments' aggregators can ask it."""

    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _DIRECTOR[:] = [self]

    wrapper.remembered = True
    return wrapper


def _current_only(wait_experiment):
    """Director.wait_experiment that hands an envoy its last experiment again only while that runs and
    still counts the envoy in."""
    from openfl.component.director.experiment import Status

    async def wrapper(self, envoy_name: str):
        experiment = self.experiments_registry.get(self.col_exp.get(envoy_name) or "")
        if experiment is not None and (experiment.status in (Status.FINISHED, Status.FAILED, Status.REJECTED)
                                       or envoy_name in getattr(experiment.aggregator, "dropped", ())):
            self.col_exp[envoy_name] = None
        return await wait_experiment(self, envoy_name)

    wrapper.current_only = True
    return wrapper


def _dropping_restarted(acknowledge_shard):
    """Director.acknowledge_shard that, when an envoy registers again during an experiment it is part of,
    has that experiment go on without it; the envoy then waits for the next one."""
    from openfl.component.director.experiment import Status

    def wrapper(self, shard_info: dict) -> bool:
        accepted = acknowledge_shard(self, shard_info)
        name = shard_info["node_info"]["name"]
        experiment = self.experiments_registry.get(self.col_exp.get(name) or "")
        if accepted and experiment is not None and experiment.status == Status.IN_PROGRESS \
                and hasattr(experiment.aggregator, "drop"):
            experiment.aggregator.drop(name, "it restarted during the experiment; it joins the next one")
        return accepted

    wrapper.drops_restarted = True
    return wrapper


def silent_envoys(director) -> dict:
    """{envoy: seconds since its last health check} for the envoys the director counts as offline."""
    now = time.time()
    return {name: now - entry["last_updated"] for name, entry in list(director._shard_registry.items())
            if now > entry["last_updated"] + entry["valid_duration"]}


def _telling_lost_envoys(start):
    """Experiment.start that lets the aggregator ask which envoys the director has lost, and that ends an
    experiment the aggregator stopped (too few envoys left, an envoy's error) as failed."""
    from openfl.component.director import director as director_module
    from openfl.component.director.experiment import Status

    async def wrapper(self, **kwargs):
        director = _DIRECTOR[0] if _DIRECTOR else None
        create = self._create_aggregator_grpc_server

        def creating(**create_kwargs):
            server = create(**create_kwargs)
            if director is not None and hasattr(server.aggregator, "lost_envoys"):
                server.aggregator.lost_envoys = lambda: silent_envoys(director)
            return server

        self._create_aggregator_grpc_server = creating
        await start(self, **kwargs)
        failure = getattr(self.aggregator, "failure", None)
        if failure and self.status == Status.FINISHED:
            self.status = Status.FAILED
            director_module.logger.error("Experiment %s failed: %s", self.name, failure)

    wrapper.tells_lost = True
    return wrapper


_DIRECTOR: list = []  # the director of this process, once made


def director_port_is_free(argv: list[str]) -> None:
    """Exit with one line if the director's configured (or overridden) port is already taken."""
    import socket

    import yaml

    config = argv[argv.index("--director-config-path") + 1]
    settings = (yaml.safe_load(open(config)) or {}).get("settings", {})
    host = os.environ.get("DYNACONF_SETTINGS__LISTEN_HOST") or settings.get("listen_host", "localhost")
    port = int(os.environ.get("DYNACONF_SETTINGS__LISTEN_PORT") or settings.get("listen_port", 50051))
    with socket.socket() as probe:
        try:
            probe.bind((socket.gethostbyname(host) if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError as exc:
            sys.exit(f"error: cannot listen on {host}:{port} ({exc.strerror}): another director or program "
                     "holds it; stop it, or choose another port with DIRECTOR_PORT")


if __name__ == "__main__":
    if sys.argv[1:3] == ["director", "start"]:
        director_port_is_free(sys.argv)
    install()
    if sys.argv[1:2] == ["envoy"]:
        import torch._dynamo  # noqa: F401
    from openfl.interface.cli import entry

    sys.argv[0] = "fx"
    entry()
