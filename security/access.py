"""Who may call what on the director, under mutual TLS.

- Roles. Every certificate carries its role (certs.py). The director serves its researcher API (submit, the
  shard registry, experiment lists, status, metrics, models) to researcher certificates only, and its envoy API
  (register, health, wait for and fetch experiments, report failures) to envoy certificates only. OpenFL 1.6 lets
  any certificate of the CA submit an experiment, so one envoy's credentials could run code on every other envoy.
- Owners. A researcher reads, streams, fetches and removes only the experiments it submitted (OpenFL checks some
  of these itself, answering others with an empty model or a generic error).
- Names. An envoy acts only under its certificate's name: OpenFL's director accepted an envoy's registration under
  any name and checked the common name only later, in the aggregator, once an experiment ran.
- Failure reports. Under TLS, OpenFL's director ignores an envoy's report that its task failed (it hears only
  callers without a certificate name), so the experiment would wait forever; here an envoy may report its own
  failure, which faults.envoy_failed handles. A report that begins with contract.HELD is an envoy holding the
  experiment for its operator's review; one that begins with contract.REFUSED is an envoy refusing the
  experiment (trust.py): the experiment goes on without it, as without a lost envoy.
Refusals end the call with PERMISSION_DENIED and one line saying why, and one line in the director's log.
"""
from __future__ import annotations

import functools
import inspect
import logging

import grpc
from cryptography import x509

from openfl_adjustments import faults
from openfl_adjustments.contract import HELD, REFUSED
from openfl_adjustments.patching import replace

from .certs import identity
from .signing import Refused

logger = logging.getLogger("openfl_adjustments")
RESEARCHER_API = ("SetNewExperiment", "GetExperimentStatus", "GetTrainedModel", "GetDatasetInfo", "GetMetricStream",
                  "RemoveExperimentData", "GetEnvoys", "GetExperimentsList", "GetExperimentDescription")
ENVOY_API = ("UpdateShardInfo", "WaitExperiment", "GetExperimentData", "SetExperimentFailed", "UpdateEnvoyStatus")
# The request field that names the experiment a researcher call is about, and the envoy a node call is from.
EXPERIMENT_FIELD = {"GetExperimentStatus": "experiment_name", "GetTrainedModel": "experiment_name",
                    "GetMetricStream": "experiment_name", "RemoveExperimentData": "experiment_name",
                    "GetExperimentDescription": "name"}
ENVOY_FIELD = {"WaitExperiment": "collaborator_name", "GetExperimentData": "collaborator_name",
               "SetExperimentFailed": "collaborator_name", "UpdateEnvoyStatus": "name"}


@functools.lru_cache(maxsize=256)
def _identity(pem: bytes) -> tuple[str, str | None]:
    return identity(x509.load_pem_x509_certificate(pem))


def caller(context) -> tuple[str, str | None]:
    """(common name, role) of the certificate the peer presented."""
    return _identity(context.auth_context()["x509_pem_cert"][0])


def _role_phrase(role: str | None) -> str:
    return {"envoy": "an envoy's", "director": "the director's", "researcher": "a researcher's"}.get(
        role, "one without a role")


def _why_not(server, rpc: str, request, context) -> str | None:
    """Why this caller may not make this call, or None if it may."""
    name, role = caller(context)
    if rpc in RESEARCHER_API:
        if role != "researcher":
            return (f"{rpc} is for researchers, and {name!r}'s certificate is {_role_phrase(role)}: use a "
                    "researcher's certificate (make certs RESEARCHERS=\"...\")")
        field = EXPERIMENT_FIELD.get(rpc)
        experiment = server.director.experiments_registry.get(getattr(request, field)) if field else None
        if experiment is not None and name not in experiment.users:
            return (f"experiment {experiment.name} is not {name!r}'s: a researcher sees only the experiments it "
                    "submitted")
        return None
    if role != "envoy":
        return f"{rpc} is for envoys, and {name!r}'s certificate is {_role_phrase(role)}"
    field = ENVOY_FIELD.get(rpc)
    if field and getattr(request, field) != name:
        return f"{name!r} may act only under its own name, not as {getattr(request, field)!r}"
    if rpc == "GetExperimentData":
        experiment = server.director.experiments_registry.get(request.experiment_name)
        if experiment is None or name not in experiment.collaborators:
            return f"{name!r} is not one of experiment {request.experiment_name!r}'s envoys"
    return None


async def _refuse(rpc: str, context, why: str) -> None:
    name, _ = caller(context)
    logger.error("Refused %s from %s: %s", rpc, name, why)
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)


def gated(rpc: str):
    """DirectorGRPCServer.<rpc>, answering under TLS only the callers _why_not lets through; a submission the
    director refuses (an unsigned or foreign archive) ends in PERMISSION_DENIED with the reason."""

    def make(method):
        if inspect.isasyncgenfunction(method):
            async def streaming(self, request, context):
                if self.tls and (why := _why_not(self, rpc, request, context)):
                    await _refuse(rpc, context, why)
                async for item in method(self, request, context):
                    yield item

            return streaming

        async def unary(self, request, context):
            # SetNewExperiment's request is the upload stream: its checks need no field of it.
            if self.tls and (why := _why_not(self, rpc, None if rpc == "SetNewExperiment" else request, context)):
                await _refuse(rpc, context, why)
            try:
                return await method(self, request, context)
            except Refused as refused:
                await _refuse(rpc, context, str(refused))

        return unary

    return make


def named_envoys_only(update_shard_info):
    """DirectorGRPCServer.UpdateShardInfo that, under TLS, refuses an envoy registering under a name other than
    its certificate's."""
    from openfl.protocols import director_pb2

    async def wrapper(self, request, context):
        name = request.shard_info.node_info.name
        if self.tls and self.get_caller(context) != name:
            logger.error("Refused envoy %r: its certificate is for %r. Start it with the certificate made for "
                         "its name (python -m security.certs make --envoy %s).", name, self.get_caller(context), name)
            return director_pb2.UpdateShardInfoResponse(accepted=False)
        return await update_shard_info(self, request, context)

    return wrapper


def hearing_envoys(set_experiment_failed):
    """DirectorGRPCServer.SetExperimentFailed that hears an envoy's report of its own failure (under TLS, from the
    certificate of that name; without, as OpenFL does, from any caller) and passes it to faults.envoy_failed; a
    refusal is the envoy leaving the experiment."""
    from openfl.protocols import director_pb2
    from openfl.transport.grpc.director_server import CLIENT_ID_DEFAULT

    async def wrapper(self, request, context):
        caller = self.get_caller(context)
        if caller == (request.collaborator_name if self.tls else CLIENT_ID_DEFAULT):
            envoy, why = request.collaborator_name, request.error_description
            experiment = self.director.experiments_registry.get(request.experiment_name)
            if why.startswith(HELD):
                logger.warning("Envoy %s holds experiment %s: %s", envoy, request.experiment_name, why[len(HELD):])
                if experiment is not None:
                    faults.hold(experiment, envoy, why[len(HELD):])
            elif why.startswith(REFUSED):
                logger.warning("Envoy %s refused experiment %s: %s", envoy, request.experiment_name, why)
                if experiment is not None:
                    faults.drop(experiment, envoy, why)
            else:
                faults.envoy_failed(self.director, request.experiment_name, envoy, why)
            return director_pb2.SetExperimentFailedResponse()
        return await set_experiment_failed(self, request, context)

    return wrapper


def install() -> None:
    """Gate every director call by role, owner and name; hear envoys' failure reports and refusals."""
    from openfl.transport.grpc.director_server import DirectorGRPCServer

    inner = {"UpdateShardInfo": named_envoys_only, "SetExperimentFailed": hearing_envoys}
    for rpc in RESEARCHER_API + ENVOY_API:
        within = inner.get(rpc, lambda method: method)
        replace(DirectorGRPCServer, rpc, lambda original, rpc=rpc, within=within: gated(rpc)(within(original)))
