"""Plaintext only on loopback. Without mutual TLS nobody is identified: a director listening on a network address
would take experiments (code, run on every envoy) from anyone who reaches its port, and an envoy talking to a
remote director would run whatever that address sends. So a director listens, and an envoy connects, without TLS
only on a loopback address, unless ALLOW_PLAINTEXT=1 accepts the risk (with a warning at every start).

    python -m security check-plaintext director CONFIG  (the listen host: DIRECTOR_HOST, else the config's)
    python -m security check-plaintext envoy HOST       (the director the envoy connects to)
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

from openfl_adjustments.startup import listen_host


def is_loopback(host: str) -> bool:
    """True if every address `host` names is a loopback address (so nothing leaves this machine)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def refuse_unless_loopback(role: str, host: str) -> None:
    """Exit with one line if a plaintext `role` would use a non-loopback `host`; warn if ALLOW_PLAINTEXT=1."""
    if is_loopback(host):
        return
    doing = f"listen on {host}" if role == "director" else f"connect to the director at {host}"
    if os.environ.get("ALLOW_PLAINTEXT") == "1":
        print(f"WARNING: the {role} will {doing} without TLS (ALLOW_PLAINTEXT=1): anyone on that network can "
              f"{'submit experiments, which are code,' if role == 'director' else 'send this node code to run'}",
              file=sys.stderr, flush=True)
        return
    sys.exit(f"error: the {role} would {doing} without TLS, where anyone on the network could "
             f"{'run code on every envoy' if role == 'director' else 'make this node run code'}: run `make certs` "
             "and start it with CERTS=certs, or set ALLOW_PLAINTEXT=1 to accept that risk")



def main(argv: list[str]) -> None:
    """check-plaintext {director CONFIG | envoy HOST}: the start scripts' check, before anything starts."""
    if len(argv) != 2 or argv[0] not in ("director", "envoy"):
        sys.exit(__doc__)
    refuse_unless_loopback(argv[0], listen_host(Path(argv[1])) if argv[0] == "director" else argv[1])
