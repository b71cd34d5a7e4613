"""This project's runtime adjustments to OpenFL 1.6, applied by `python -m openfl_adjustments` (start_director.sh
and start_envoy.sh run it instead of `fx`).

Each adjustment replaces one named piece of OpenFL at start-up; site-packages is untouched, and
tests/test_openfl_contract.py fails if the pinned OpenFL stops doing what an adjustment relies on.
By concern:

- polling: OpenFL's 10 s and 1 s polling sleeps, capped at FX_POLL_S (0.1 s).
- tensor_store: a dict in place of OpenFL's pandas tensor store, which scans on every lookup.
- tls: under mutual TLS, the director serves researchers' calls to researcher certificates only, each researcher
  its own experiments, and envoys' calls to envoys under their own names; an envoy may report its own failure.
- signing, trust: researchers sign experiments; the director and each envoy check who signed before anything is
  unpacked, and each envoy runs only what researchers it trusts signed (its config's trusted_researchers).
- plaintext: without TLS, a director listens and an envoy connects on loopback only (unless ALLOW_PLAINTEXT=1).
- faults: lost, restarted and returning envoys; aggregators that vanish; failure reports about ended experiments.
  What it needs from an experiment's aggregator is one interface, contract.EnvoyAwareAggregator.
- network: envoys' health checks go on after a failed one (OpenFL's stop for good); keepalive on every channel, so
  that a connection a cut cable killed is noticed and made again.
- transport: one connection per envoy and experiment, the model fetched in one round trip, results sent while the
  next task runs, the optimizer's state kept on the envoy, and requests for tasks held until there are some.
- experiments: code an experiment brought leaves the node's module cache when the experiment ends.
- startup: an envoy waits for a director that is not up yet; a taken director port is one line; an envoy
  imports torch's compiler front end while idle.
"""
from __future__ import annotations

from . import experiments, faults, network, polling, startup, tensor_store, tls, transport, trust
from .patching import restore_all

__all__ = ["install", "restore_all"]


def install() -> None:
    """Apply every adjustment (again: a no-op)."""
    for concern in (polling, tensor_store, tls, trust, faults, network, transport, experiments, startup):
        concern.install()
