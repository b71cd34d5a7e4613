"""What each round costs on the wire, counted on the director by the experiment's aggregator
(medfl.aggregator.SelectingAggregator) and streamed when the round ends (medfl.events.TRAFFIC)."""
from __future__ import annotations

import threading

from .events import AGGREGATED, TRAFFIC, TRAFFIC_COUNTS


class TrafficCounts:
    """Bytes received and sent and connections opened, per round and envoy. Needs the aggregator's metric_queue."""

    def _start_counting(self) -> None:
        self._traffic: dict[int, dict[str, dict[str, int]]] = {}  # round: envoy: TRAFFIC_COUNTS
        self._peers: dict[str, set[str]] = {}  # envoy: the connections it called on
        self._traffic_lock = threading.Lock()

    def connected(self, envoy: str, peer: str) -> None:
        """Count envoy's connection `peer` (address and port) in this round if it is new (the director's
        openfl_adjustments.contract.CountsConnections)."""
        with self._traffic_lock:
            seen = self._peers.setdefault(envoy, set())
            if peer in seen:
                return
            seen.add(peer)
        self._count(self.round_number, envoy, "connections", 1)

    def _count(self, round_number: int, envoy: str, what: str, amount: int) -> None:
        with self._traffic_lock:  # envoys' calls arrive on several threads
            counts = self._traffic.setdefault(round_number, {}).setdefault(envoy, dict.fromkeys(TRAFFIC_COUNTS, 0))
            counts[what] += amount

    def _report_traffic(self, ended: int) -> None:
        """Stream round `ended`'s counts: for all envoys together, then for each."""
        with self._traffic_lock:
            per_envoy = self._traffic.pop(ended, {})
        for origin, counts in [(AGGREGATED, {what: sum(c[what] for c in per_envoy.values())
                                             for what in TRAFFIC_COUNTS}), *sorted(per_envoy.items())]:
            for what, amount in counts.items():
                self.metric_queue.put({"round": ended, "metric_origin": origin, "task_name": TRAFFIC,
                                       "metric_name": what, "metric_value": float(amount)})
