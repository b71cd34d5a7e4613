"""Names under mutual TLS.

- OpenFL's director accepts an envoy's registration under any name and checks the certificate's common name only
  later, in the aggregator, once an experiment runs. Here the director refuses at registration an envoy whose
  certificate is made for another name.
- Under TLS, OpenFL's director ignores an envoy's report that its task failed (it hears only callers without a
  certificate name), so the experiment would wait forever. Here an envoy may report its own failure.
"""
from __future__ import annotations

import logging

from .patching import replace

logger = logging.getLogger("openfl_adjustments")


def named_envoys_only(update_shard_info):
    """DirectorGRPCServer.UpdateShardInfo that, under TLS, refuses an envoy registering under a name other than
    its certificate's."""
    from openfl.protocols import director_pb2

    async def wrapper(self, request, context):
        name = request.shard_info.node_info.name
        if self.tls and self.get_caller(context) != name:
            logger.error("Refused envoy %r: its certificate is for %r. Start it with the certificate made for "
                         "its name (python tlscerts.py make --envoy %s).", name, self.get_caller(context), name)
            return director_pb2.UpdateShardInfoResponse(accepted=False)
        return await update_shard_info(self, request, context)

    return wrapper


def hearing_envoys(set_experiment_failed):
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

    return wrapper


def install() -> None:
    """Check envoys' names at registration; hear envoys' own failure reports."""
    from openfl.transport.grpc.director_server import DirectorGRPCServer

    replace(DirectorGRPCServer, "UpdateShardInfo", named_envoys_only)
    replace(DirectorGRPCServer, "SetExperimentFailed", hearing_envoys)
