"""Envoys that vanish, restart or come back, and aggregators that vanish.

- Lost envoys. Each experiment's aggregator learns which envoys the director no longer hears from (no health
  check for twice envoy_health_check_period), so that it can go on without them; an envoy that registers again
  during its experiment (it restarted: its state in the experiment is gone) is dropped from it, since a restarted
  collaborator that rejoined was seen to fail the experiment asking for tensors the aggregator no longer had. An
  experiment the aggregator stopped ends as failed. All of it goes through contract.EnvoyAwareAggregator.
- Handing out experiments. OpenFL hands an envoy its last experiment again after a restart; here only while that
  experiment runs and has not dropped the envoy: joining an ended one, it would wait forever for its aggregator.
- Vanished aggregators. OpenFL's collaborator retries an unreachable aggregator forever, so an envoy whose
  experiment ended without it would never take part in anything again. Here it gives up after
  AGGREGATOR_PATIENCE_S (FX_AGGREGATOR_PATIENCE_S, 60 s), which also bounds each call, and waits for the next
  experiment.
- Failed tasks. OpenFL stops the whole experiment when one envoy's task raises, and says only that it did. Here
  the envoy's report starts with one line naming the error and where it happened ("ValueError: Input contains
  NaN (in the train task of round 2)"); the director drops that envoy with that line, as a lost one, and the
  min_envoys rule decides whether the run goes on.
- Failure reports. The director ignores reports about experiments that are over, and an envoy that cannot reach
  its director to report one says so in its log instead of raising.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import namedtuple

import grpc

from .contract import REFUSED, ChecksCounts, EnvoyAwareAggregator, Refusal
from .patching import replace
from .registration import registered_samples

logger = logging.getLogger("openfl_adjustments")
AGGREGATOR_PATIENCE_S = float(os.environ.get("FX_AGGREGATOR_PATIENCE_S", "60"))
_DIRECTOR: list = []  # the director of this process, once made
_EARLY: dict[str, list[tuple[str, str, str]]] = {}  # experiment: (drop or hold, envoy, why) before its aggregator


class AggregatorGone(RuntimeError):
    """The experiment's aggregator stopped answering: the envoy leaves that experiment."""


def aware(aggregator) -> EnvoyAwareAggregator | None:
    """The aggregator, if it takes part in the contract; else None."""
    return aggregator if isinstance(aggregator, EnvoyAwareAggregator) else None


def silent_envoys(director) -> dict:
    """{envoy: seconds since its last health check} for the envoys the director counts as offline."""
    now = time.time()
    return {name: now - entry["last_updated"] for name, entry in list(director._shard_registry.items())
            if now > entry["last_updated"] + entry["valid_duration"]}


def drop(experiment, envoy: str, why: str) -> None:
    """Have `experiment` go on without `envoy`: now, or as soon as its aggregator exists (envoys receive an
    experiment while the director may still be building its aggregator)."""
    _tell(experiment, "drop", envoy, why)


def hold(experiment, envoy: str, why: str) -> None:
    """Tell `experiment` that `envoy` waits for its operator's review (security.review), now or once it exists."""
    _tell(experiment, "hold", envoy, why)


def _tell(experiment, what: str, envoy: str, why: str) -> None:
    if aggregator := aware(experiment.aggregator):
        getattr(aggregator, what)(envoy, why)
    else:
        _EARLY.setdefault(experiment.name, []).append((what, envoy, why))


def remembered(init):
    """Director.__init__ that keeps the director where the experiments' aggregators can ask it."""

    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _DIRECTOR[:] = [self]

    return wrapper


def telling_lost_envoys(start):
    """Experiment.start that has the aggregator watch the envoys the director loses, and that ends an experiment
    the aggregator stopped as failed."""
    from openfl.component.director import director as director_module
    from openfl.component.director.experiment import Status

    async def wrapper(self, **kwargs):
        director = _DIRECTOR[0] if _DIRECTOR else None
        create = self._create_aggregator_grpc_server

        def creating(**create_kwargs):
            server = create(**create_kwargs)
            if aggregator := aware(server.aggregator):
                if director is not None:
                    aggregator.watch_envoys(lambda: silent_envoys(director))
            if director is not None and isinstance(server.aggregator, ChecksCounts):
                server.aggregator.registered_samples(lambda: registered_samples(director._shard_registry))
            if aggregator:
                for what, envoy, why in _EARLY.pop(self.name, []):
                    getattr(aggregator, what)(envoy, why)
            return server

        self._create_aggregator_grpc_server = creating
        await start(self, **kwargs)
        failure = aggregator.failure() if (aggregator := aware(self.aggregator)) else None
        if failure and self.status == Status.FINISHED:
            self.status = Status.FAILED
            director_module.logger.error("Experiment %s failed: %s", self.name, failure)

    return wrapper


def current_only(wait_experiment):
    """Director.wait_experiment that hands an envoy its last experiment again only while that runs and still
    counts the envoy in."""
    from openfl.component.director.experiment import Status

    async def wrapper(self, envoy_name: str):
        experiment = self.experiments_registry.get(self.col_exp.get(envoy_name) or "")
        if experiment is not None:
            aggregator = aware(experiment.aggregator)
            if experiment.status in (Status.FINISHED, Status.FAILED, Status.REJECTED) or \
                    (aggregator and aggregator.has_dropped(envoy_name)):
                self.col_exp[envoy_name] = None
        return await wait_experiment(self, envoy_name)

    return wrapper


def dropping_restarted(acknowledge_shard):
    """Director.acknowledge_shard that, when an envoy registers again during an experiment it is part of, has that
    experiment go on without it; the envoy then waits for the next one. It also lists a new envoy as without an
    experiment at once: OpenFL does so only when the envoy first asks for one, and until then the shard registry
    fails with a KeyError (seconds, for envoys that register again with a restarted director)."""
    from openfl.component.director.experiment import Status

    def wrapper(self, shard_info: dict) -> bool:
        accepted = acknowledge_shard(self, shard_info)
        name = shard_info["node_info"]["name"]
        if accepted:
            self.col_exp.setdefault(name, None)
        experiment = self.experiments_registry.get(self.col_exp.get(name) or "")
        if accepted and experiment is not None and experiment.status == Status.IN_PROGRESS \
                and (aggregator := aware(experiment.aggregator)):
            aggregator.drop(name, "it restarted during the experiment; it joins the next one")
        return accepted

    return wrapper


def in_progress_only(set_experiment_failed):
    """Director.set_experiment_failed that ignores reports about an experiment that is over."""
    from openfl.component.director.experiment import Status

    def wrapper(self, *, experiment_name: str, collaborator_name: str):
        experiment = self.experiments_registry.get(experiment_name)
        if experiment is not None and experiment.status != Status.IN_PROGRESS:
            logger.info("Ignored %s's failure report about experiment %s, which is %s", collaborator_name,
                        experiment_name, experiment.status)
            return
        set_experiment_failed(self, experiment_name=experiment_name, collaborator_name=collaborator_name)

    return wrapper


def cause(description: str) -> str:
    """One line of an envoy's failure report: the summary this project's envoys put first (summary()), or, from
    another envoy, the last line of the traceback OpenFL sends."""
    lines = [line.strip() for line in description.splitlines() if line.strip()]
    if not lines:
        return "it gave no reason"
    return lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]


def summary(exc: BaseException) -> str:
    """The error in one line, and where it happened if the collaborator noted it (naming_the_task)."""
    message = (str(exc).strip().splitlines() or [""])[0]
    notes = "; ".join(getattr(exc, "__notes__", ()))
    return f"{type(exc).__name__}: {message}" + (f" ({notes})" if notes else "")


def envoy_failed(director, experiment_name: str, envoy: str, description: str) -> None:
    """An envoy's task raised: the experiment goes on without that envoy, which it names with the error; the
    min_envoys rule decides whether it can. An aggregator outside the contract stops as in OpenFL."""
    experiment = director.experiments_registry.get(experiment_name)
    why = f"its task failed: {cause(description)}"
    if experiment is not None and (experiment.aggregator is None or aware(experiment.aggregator)):
        from openfl.component.director.experiment import Status

        if experiment.status != Status.IN_PROGRESS:
            logger.info("Ignored %s's failure report about experiment %s, which is %s", envoy, experiment_name,
                        experiment.status)
            return
        logger.error("Envoy %s failed in experiment %s, which goes on without it if enough envoys remain: %s",
                     envoy, experiment_name, why)
        drop(experiment, envoy, why)
        return
    director.set_experiment_failed(experiment_name=experiment_name, collaborator_name=envoy)


def naming_the_task(do_task):
    """Collaborator.do_task that notes, on an error, which task of which round raised it."""

    def wrapper(self, task, round_number):
        try:
            return do_task(self, task, round_number)
        except Exception as exc:
            exc.add_note(f"in the {getattr(task, 'name', task)} task of round {round_number + 1}")
            raise

    return wrapper


def saying_unreachable(set_experiment_failed):
    """ShardDirectorClient.set_experiment_failed that starts the report with the error in one line (summary())
    and logs, rather than raises, a director that does not answer."""

    def wrapper(self, experiment_name: str, *args, **kwargs):
        raised = sys.exc_info()[1]  # the envoy reports from the except block around its collaborator
        description = kwargs.get("error_description", "")
        if isinstance(raised, Refusal):
            kwargs["error_description"] = f"{REFUSED}{raised}"
        elif raised is not None and not description.startswith(REFUSED):
            kwargs["error_description"] = f"{summary(raised)}\n{description}"
        try:
            return set_experiment_failed(self, experiment_name, *args, **kwargs)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            logger.error("Could not tell the director that experiment %s failed here: it does not answer (%s)",
                         experiment_name, exc.details())

    return wrapper


class _CallDetails(namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
                   grpc.ClientCallDetails):
    """A call's details with another timeout (gRPC's own object cannot be changed)."""


def patient_intercept_call(self, continuation, client_call_details, request_or_iterator):
    """RetryOnRpcErrorClientInterceptor._intercept_call that retries an unreachable aggregator for
    AGGREGATOR_PATIENCE_S, then raises AggregatorGone (OpenFL retries forever). Each attempt is bounded by what is
    left of that time: a call on a connection the aggregator dropped can otherwise hang."""
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


def install() -> None:
    """Connect the director's health checks, registrations and failure reports to the aggregator; bound envoys'
    patience; name failed tasks."""
    from openfl.component.collaborator.collaborator import Collaborator
    from openfl.component.director.director import Director
    from openfl.component.director.experiment import Experiment
    from openfl.transport.grpc.aggregator_client import RetryOnRpcErrorClientInterceptor
    from openfl.transport.grpc.director_client import ShardDirectorClient

    replace(Director, "__init__", remembered)
    replace(Experiment, "start", telling_lost_envoys)
    replace(Director, "wait_experiment", current_only)
    replace(Director, "acknowledge_shard", dropping_restarted)
    replace(Director, "set_experiment_failed", in_progress_only)
    replace(ShardDirectorClient, "set_experiment_failed", saying_unreachable)
    replace(RetryOnRpcErrorClientInterceptor, "_intercept_call", lambda _: patient_intercept_call)
    replace(Collaborator, "do_task", naming_the_task)
