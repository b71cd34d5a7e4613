"""The interfaces between the director's adjustments (faults.py, transport.py) and an experiment's aggregator.

The aggregator arrives with each experiment (medfl.aggregator.SelectingAggregator implements both, through its
bases), while the adjustments are part of the director's installation; neither imports the other. An aggregator
without these methods runs as in OpenFL: the director then drops and fails nothing on its behalf, and counts no
connections.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

# An envoy that refuses an experiment (trust.py) reports it as a failure whose description starts with this; the
# director then drops the envoy from the experiment (EnvoyAwareAggregator.drop) instead of failing it.
REFUSED = "refused: "
# An envoy that holds an experiment for its operator's review (security.review) says so in a report that begins with
# this; the experiment waits for it (EnvoyAwareAggregator.hold) until it joins, or refuses.
HELD = "held: "


class Refusal(RuntimeError):
    """Raised on an envoy by a rule of its own node (security.guard) while it runs an experiment: reported as a
    refusal (REFUSED and the message), so the experiment goes on without the envoy, or fails by min_envoys."""


@runtime_checkable
class EnvoyAwareAggregator(Protocol):
    """What the director asks of an aggregator that goes on without lost envoys."""

    def watch_envoys(self, silent: Callable[[], dict[str, float]]) -> None:
        """From now on, drop the envoys that `silent()` names: {envoy: seconds since the director last heard it}."""

    def drop(self, name: str, why: str) -> None:
        """Go on without envoy `name` at once (the director saw it register again after a restart)."""

    def hold(self, name: str, why: str) -> None:
        """Envoy `name` waits for its operator's approval: tell the notebook `why`; round_timeout waits for it."""

    def has_dropped(self, name: str) -> bool:
        """True if envoy `name` left this experiment; the director then hands it the next one instead."""

    def failure(self) -> str | None:
        """Why the aggregator stopped the experiment (too few envoys left, an envoy's error), or None."""


@runtime_checkable
class ChecksCounts(Protocol):
    """What the director tells an aggregator that checks the training-set sizes the envoys claim with each update
    (OpenFL weights the average by them, taking each envoy's word)."""

    def registered_samples(self, samples: Callable[[], dict[str, int]]) -> None:
        """From now on, `samples()` gives the size of each envoy's splits as its shard registered them with the
        director: {envoy: {train, val, test: samples}}, for the envoys whose shard descriptor says
        (registration.split_samples)."""


@runtime_checkable
class CountsConnections(Protocol):
    """What the aggregator's server (transport.py) tells an aggregator that counts the envoys' connections."""

    def connected(self, envoy: str, peer: str) -> None:
        """Envoy `envoy` made a call on connection `peer` (gRPC's peer: the address and port it connected from)."""
