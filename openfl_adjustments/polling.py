"""OpenFL polls in long fixed steps: the director looks for a submitted experiment every 10 s and checks every
10 s whether a running one has ended, it streams metrics in 1 s steps, and an idle collaborator sleeps as long as
the aggregator says, 10 s. In a few-round run those sleeps were most of the wall time; here they are capped at
POLL_S (FX_POLL_S, 0.1 s)."""
from __future__ import annotations

import asyncio
import os
import time

from .patching import replace

POLL_S = float(os.environ.get("FX_POLL_S", "0.1"))


class CappedAsyncio:
    """The asyncio module as the patched modules see it: the same, except that sleep is capped."""

    def __getattr__(self, name):
        return getattr(asyncio, name)

    @staticmethod
    def sleep(delay, result=None):
        return asyncio.sleep(min(delay, POLL_S), result)


def capped_sleep(seconds: float) -> None:
    """time.sleep, capped at POLL_S."""
    time.sleep(min(seconds, POLL_S))


def install() -> None:
    """Cap the sleeps of the director, its experiment runner and server, and the collaborator."""
    from openfl.component.collaborator import collaborator
    from openfl.component.director import director, experiment
    from openfl.transport.grpc import director_server

    for module in (director, experiment, director_server):
        replace(module, "asyncio", lambda _: CappedAsyncio())
    replace(collaborator, "sleep", lambda _: capped_sleep)
