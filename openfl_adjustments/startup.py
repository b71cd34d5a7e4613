"""Starting nodes.

- Start order. OpenFL's envoy exits if its director is not up yet; here it waits, retrying with a growing pause
  and one log line each time. TLS refusals still end it at once.
- Busy port. A director whose port is taken says so in one line instead of a gRPC traceback.
- Idle time. An envoy imports torch's compiler front end (torch._dynamo) before any experiment arrives: the first
  optimizer an experiment unpickles would otherwise import it, 1.5 s into the experiment. On a GPU host it also
  makes its CUDA context then (a second or more on first use).
- Stopping. On Ctrl-C OpenFL's envoy printed `Aborted!` and went on running (its health-check thread kept the
  process alive); a second Ctrl-C ended it with a traceback. Here one Ctrl-C (or SIGTERM) stops a director or an
  envoy at once, idle or busy, with one line. Nothing of value is lost: a node keeps no state between
  experiments, and an experiment goes on without a stopped envoy (or fails, by min_envoys).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc

from .patching import replace

logger = logging.getLogger("openfl_adjustments")


def waiting_for_director(report_shard_info, first_pause: float = 1.0, longest_pause: float = 30.0):
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

    return wrapper


def listen_host(config: Path) -> str:
    """The address a director started with this config listens on (DIRECTOR_HOST overrides it)."""
    import yaml

    settings = (yaml.safe_load(Path(config).read_text()) or {}).get("settings", {})
    return os.environ.get("DYNACONF_SETTINGS__LISTEN_HOST") or os.environ.get("DIRECTOR_HOST") or \
        settings.get("listen_host", "localhost")


def director_port_is_free(argv: list[str]) -> None:
    """Exit with one line if the director's configured (or overridden) port is already taken."""
    import yaml

    config = argv[argv.index("--director-config-path") + 1]
    settings = (yaml.safe_load(open(config)) or {}).get("settings", {})
    host = listen_host(config)
    port = int(os.environ.get("DYNACONF_SETTINGS__LISTEN_PORT") or settings.get("listen_port", 50051))
    with socket.socket() as probe:
        try:
            probe.bind((socket.gethostbyname(host) if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError as exc:
            sys.exit(f"error: cannot listen on {host}:{port} ({exc.strerror}): another director or program "
                     "holds it; stop it, or choose another port with DIRECTOR_PORT")


def preload_for_envoy(config: Path) -> None:
    """Import, and set up, while idle what the first experiment would otherwise pay for on its clock: torch's
    compiler front end, and a CUDA context on each GPU the envoy's config lists (else its default one)."""
    import torch
    import torch._dynamo  # noqa: F401

    if torch.cuda.is_available():
        for index in cuda_devices(config) or (torch.cuda.current_device(),):
            torch.zeros(1, device=f"cuda:{index}")


def install() -> None:
    """Have envoys wait for their director."""
    from openfl.transport.grpc.director_client import ShardDirectorClient

    replace(ShardDirectorClient, "report_shard_info", waiting_for_director)


def stop_on_signals(node: str) -> None:
    """Exit at the first Ctrl-C or SIGTERM, saying so in one line."""
    names = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def stop(number, frame):
        logging.shutdown()  # flush what the log handlers hold
        print(f"{node} stopped ({names[number]})", file=sys.stderr, flush=True)
        os._exit(128 + number)

    for number in names:
        signal.signal(number, stop)


def cuda_devices(config: Path) -> tuple[int, ...]:
    """The GPUs an envoy config lists under params.cuda_devices."""
    import yaml

    params = (yaml.safe_load(Path(config).read_text()) or {}).get("params") or {}
    return tuple(int(i) for i in params.get("cuda_devices") or ())
