"""Networks that fail and come back: a cut cable, a router that restarts. Found by tests/test_hosts.py.

- Health checks. OpenFL's envoy sends them from a thread that ends at the first failed one (it then sleeps for the
  None that the failed call returns), and each waits for its answer without a deadline. An envoy whose link was cut
  once therefore stayed offline for good, though it ran on: the director never counted it in again. Here a check
  waits at most HEALTH_DEADLINE_S (or the director's period, if longer), a failed one is logged in one line per
  outage and tried again each period, and the envoy logs when the director answers again.
- Dead connections. A cut cable sends no reset: gRPC keeps using the connection, and calls on it hang until TCP
  gives up, many minutes later. Here every channel pings its peer (HTTP/2 keepalive) every KEEPALIVE_S and drops a
  connection that does not answer within KEEPALIVE_S; channels try to reconnect at least every KEEPALIVE_S; and
  the servers (director, aggregator) accept those pings rather than closing the connection of a client that sends
  them.
"""
from __future__ import annotations

import logging
import time

import grpc

from .patching import replace

logger = logging.getLogger("openfl_adjustments")
KEEPALIVE_S = 10
HEALTH_DEADLINE_S = 5.0
KEEPALIVE = [
    ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_S * 1000),
    ("grpc.keepalive_permit_without_calls", 1),  # an idle envoy's connection is watched too
    ("grpc.http2.max_pings_without_data", 0),  # a client would stop pinging an idle connection after two
    ("grpc.max_reconnect_backoff_ms", KEEPALIVE_S * 1000),  # gRPC's default grows to 120 s
    # Servers: accept a ping this often, and never close a connection for pinging (gRPC's defaults: 5 min, 2).
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


def health_check(envoy, deadline: float) -> int:
    """Send `envoy`'s status to its director, as OpenFL's ShardDirectorClient.send_health_check builds it, waiting
    at most `deadline` seconds; return the director's health-check period. A failed call raises grpc.RpcError."""
    from openfl.protocols import director_pb2

    status = director_pb2.UpdateEnvoyStatusRequest(name=envoy.name, is_experiment_running=envoy.is_experiment_running)
    status.cuda_devices.extend(director_pb2.CudaDeviceInfo(**item) for item in envoy._get_cuda_device_info() or [])
    return envoy.director_client.stub.UpdateEnvoyStatus(status, timeout=deadline).health_check_period.seconds


def steady_health_checks(self) -> None:
    """Envoy.send_health_check that goes on after failed checks, for as long as the envoy runs."""
    period, outage = HEALTH_DEADLINE_S, None
    while True:
        try:
            period = health_check(self, max(period, HEALTH_DEADLINE_S)) or period
            if outage is not None:
                logger.info("The director answers this envoy's health checks again, after %.0f s without",
                            time.monotonic() - outage)
                outage = None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # the director forgot this envoy (it restarted)
                logger.info("The director has lost information about current shard. Resending...")
                try:
                    if self.director_client.report_shard_info(shard_descriptor=self.shard_descriptor,
                                                              cuda_devices=self.cuda_devices):
                        logger.info("Shard was accepted by director again")  # as OpenFL says it the first time
                except grpc.RpcError as again:
                    exc = again
            if exc.code() != grpc.StatusCode.NOT_FOUND and outage is None:
                outage = time.monotonic()
                logger.warning("The director does not answer this envoy's health checks (%s: %s); trying again "
                               "every %.0f s", exc.code().name, exc.details(), period)
        except Exception as exc:  # anything else would end this thread, and with it the envoy's presence
            logger.error("Health check failed: %r; trying again in %.0f s", exc, period)
        time.sleep(period)


def install() -> None:
    """Health checks that outlive failures; keepalive on every channel and server."""
    from openfl.component.envoy.envoy import Envoy
    from openfl.transport.grpc import aggregator_client, aggregator_server, director_client, director_server

    replace(Envoy, "send_health_check", lambda _: steady_health_checks)
    # Each of them imported OpenFL's option list by name: give each the longer list.
    for module in (aggregator_client, aggregator_server, director_client, director_server):
        replace(module, "channel_options", lambda options: [*options, *KEEPALIVE])
