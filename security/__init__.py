"""Who may make a node run code, and how each node checks it. An experiment is code: the director hands it to every
envoy, which unpickles and runs it beside the hospital's images.

- certs: a federation's CA and certificates, each carrying its role (director, envoy, researcher), made offline
  (`make certs`, or python -m security.certs make), and the check the start scripts run on a node's own.
- access: under mutual TLS, the director serves its researcher API to researcher certificates only, each researcher
  its own experiments, and its envoy API to envoys under their own names; an envoy reports its own failures.
- signing: a researcher signs each experiment's archive; trust: the director and each envoy check the signature
  before anything is unpacked, and each envoy runs only what the researchers it trusts signed.
- plaintext: without TLS, a director listens and an envoy connects on loopback only (unless ALLOW_PLAINTEXT=1).
- policy, guard, budget, audit: each envoy's policy (which researchers, DP-SGD, a privacy budget over every
  experiment, secure aggregation, rounds, federation size), enforced by the node's own code; its privacy ledger;
  and every node's audit log of what arrived and what left (python -m security.audit checks them).
- secagg: secure aggregation, the director learning the round's sum of the envoys' updates and never one of them:
  the protocol (secagg), its envoy half masking the train task's weights before they leave the node
  (secagg_envoy), and its director half, which the experiment's aggregator runs on the director (secagg_director).

install() puts access, trust and the envoy's masking in place in a node's process (python -m node, node.py,
does it); the notebook signs with signing.signing().
"""
from __future__ import annotations

__all__ = ["install"]


def install() -> None:
    """Gate the director's calls by role, owner and name; have envoys run only what they trust, and mask their
    updates when an experiment asks for secure aggregation."""
    from . import access, guard, secagg_envoy, trust

    access.install()
    trust.install()
    guard.install()
    secagg_envoy.install()
