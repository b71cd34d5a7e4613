"""This project's runtime adjustments to OpenFL 1.6's behaviour, applied by `python -m node` (node.py, which
start_director.sh and start_envoy.sh run instead of `fx`, with the security package's rules too).

Each adjustment replaces one named piece of OpenFL at start-up; site-packages is untouched, and
tests/test_openfl_contract.py fails if the pinned OpenFL stops doing what an adjustment relies on.
By concern:

- polling: OpenFL's 10 s and 1 s polling sleeps, capped at FX_POLL_S (0.1 s).
- tensor_store: a dict in place of OpenFL's pandas tensor store, which scans on every lookup.
- faults: lost, restarted and returning envoys; aggregators that vanish; failure reports about ended experiments.
  What it needs from an experiment's aggregator is one interface, contract.EnvoyAwareAggregator.
- network: envoys' health checks go on after a failed one (OpenFL's stop for good); keepalive on every channel, so
  that a connection a cut cable killed is noticed and made again.
- transport: one connection per envoy and experiment, the model fetched in one round trip, results sent while the
  next task runs, the optimizer's state kept on the envoy, and requests for tasks held until there are some.
- local_tensors: tensors an experiment's plan names (FedBN's normalization layers) never leave the envoy, and
  outlive the experiment on the envoy's disk, for the test of the best model and a resumed run.
- registration: the director refuses an envoy that serves other data (dataset, size, classes) than the envoys
  already registered, naming it; the envoy says why it may have been refused.
- experiments: code an experiment brought leaves the node's module cache when the experiment ends.
- startup: an envoy waits for a director that is not up yet; a taken director port is one line; an envoy
  imports torch's compiler front end while idle.
- client: in the notebook's process, received models as writable arrays, and failed calls as one line.

Who may make a node run code (certificates, roles, signed experiments, trust, plaintext on loopback only) is the
security package's, beside this one; its rules use contract.py and patching.py from here.
"""
from __future__ import annotations

from . import experiments, faults, local_tensors, network, polling, registration, startup, tensor_store, transport
from .patching import restore_all

__all__ = ["install", "restore_all"]


def install() -> None:
    """Apply every adjustment (again: a no-op)."""
    for concern in (polling, tensor_store, faults, network, transport, local_tensors, registration, experiments,
                    startup):
        concern.install()
