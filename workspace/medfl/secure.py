"""Secure aggregation in an experiment: the plan that switches it on, and the director's side of the protocol.

With `secure_aggregation = True` every envoy masks its train task's update before it leaves the node
(security.secagg, on the envoy), and the director, which only relays the protocol's messages, unmasks the round's
weighted mean and nothing else. This module is the director's side: SelectingAggregator hands it the protocol's
messages (task results and tensor requests named secagg/...) and asks it, when a round ends, for the new global
weights. The aggregation function (FedAvg's mean, a server optimizer) then sees that one mean, as if one envoy had
sent it: algorithms that need each update (median, geometric median) are refused in the notebook.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np

# How far an envoy's update may move the global model (L2 norm of the change, BatchNorm's step counters left out):
# under secure aggregation each envoy clips its own to this, since the director cannot see it. The tutorial's CNN
# moves by 2 to 8 a round (synthetic BloodMNIST, 28 px, Adam at 1e-3, measured 2026-12-04).
MAX_UPDATE_NORM = 100.0
SECURE = "secure_aggregation"  # the event streamed when a round was aggregated securely; metric_name is JSON


def plan(secure_aggregation: bool, threshold: int, max_update_norm: float) -> dict:
    """The experiment's plan overrides: the director's settings and every envoy's (empty when off)."""
    if not secure_aggregation:
        return {}
    return {"aggregator.settings.secure_aggregation": True, "aggregator.settings.secure_threshold": threshold,
            "aggregator.settings.max_update_norm": max_update_norm,
            "collaborator.settings.secure_aggregation": True, "collaborator.settings.max_update_norm": max_update_norm}


class SecureRounds:
    """The director's side, for one experiment: one security.secagg.DirectorRound per round."""

    def __init__(self, aggregator, threshold: int, bound: float):
        from security import secagg

        self.secagg, self.aggregator, self.threshold, self.bound = secagg, aggregator, int(threshold or 0), bound
        self.rounds: dict[int, secagg.DirectorRound] = {}
        self.changed = threading.Condition()

    def round(self, r: int):
        """Round r's protocol state, begun with the envoys the round's train task went to."""
        if r not in self.rounds:
            agg = self.aggregator
            envoys = [c for c in agg.assigner.get_collaborators_for_task("train", r) if c not in agg.dropped]
            threshold = self.threshold or max(2, self.secagg.majority(len(envoys)))
            self.rounds[r] = self.secagg.DirectorRound(envoys, threshold, f"{agg.uuid}|{r}")
        return self.rounds[r]

    def notify(self) -> None:
        """Something changed (a message, a dropped envoy): the waiting requests look again."""
        with self.changed:
            for rnd in self.rounds.values():
                rnd.dropped |= set(self.aggregator.dropped)
            self.changed.notify_all()

    def receive(self, envoy: str, r: int, step: str, named_tensors) -> None:
        """One of the protocol's messages from an envoy."""
        payload = named_tensors[0].data_bytes if named_tensors else b""
        with self.changed:
            rnd = self.round(r)
            if step == "advertise":
                rnd.advertised[envoy] = json.loads(payload)
                if not rnd.waiting_for("advertise"):  # every envoy has trained: the protocol itself starts
                    rnd.started = time.monotonic()
            elif step == "share":
                rnd.sealed[envoy] = json.loads(payload)
            elif step == "masked":
                rnd.inputs[envoy] = np.frombuffer(payload, dtype=np.uint64).copy()
            elif step == "reveal":
                rnd.reveals[envoy] = json.loads(payload)
            else:
                raise ValueError(f"unknown secure aggregation step {step!r} from {envoy}")
        self.notify()

    def answer(self, envoy: str, r: int, step: str) -> bytes:
        """The message an envoy asks for, once it is ready (else, after secagg.POLL_S, "pending")."""
        waits = {"peers": "advertise", "inbox": "share", "unmask": "masked"}
        if step not in waits:
            return json.dumps({"error": f"unknown secure aggregation request {step!r}"}).encode()
        with self.changed:
            rnd = self.round(r)
            self.changed.wait_for(lambda: not rnd.waiting_for(waits[step]) or self.aggregator.stopped,
                                  timeout=self.secagg.POLL_S)
            waiting = rnd.waiting_for(waits[step])
            if waiting and not self.aggregator.stopped:
                return json.dumps({"pending": True, "waiting_for": waiting}).encode()
            try:
                rnd.check_quorum(waits[step])
            except self.secagg.SecAggError as exc:
                failure = str(exc)
            else:
                failure = "the experiment stopped" if self.aggregator.stopped else None
                if failure is None:
                    return json.dumps(self._message(rnd, envoy, step)).encode()
        self.aggregator.fail_securely(failure)
        return json.dumps({"error": failure}).encode()

    @staticmethod
    def _message(rnd, envoy: str, step: str) -> dict:
        if step == "peers":
            return {"advertised": rnd.advertised, "threshold": rnd.threshold}
        if step == "inbox":
            return {"sealed": rnd.inbox(envoy)}
        return {"survivors": rnd.u3, "dropped": sorted(set(rnd.u2) - set(rnd.u3))}

    def mean(self, r: int, model: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, dict]:
        """When round r ends: the global weights after it (the model plus the envoys' weighted mean change), or None
        if the sum fails its check, with what results.json records of the round; SecAggError below threshold."""
        with self.changed:
            rnd = self.round(r)
            total, share = rnd.sum()
        layout = [(name, np.shape(model[name])) for name in sorted(model)]
        if total.size != sum(int(np.prod(shape)) for _, shape in layout):
            raise self.secagg.SecAggError(f"the masked inputs hold {total.size} values, the model {len(layout)} "
                                          "tensors of another size")
        change = self.secagg.unflatten(total, layout)
        lost = sorted(set(rnd.u3) & set(self.aggregator.dropped))
        report = {"round": r + 1, "envoys": rnd.u1, "threshold": rnd.threshold, "summed": rnd.u3,
                  "dropped_before_sending": sorted(set(rnd.u1) - set(rnd.u3)), "dropped_after_sending": lost,
                  "samples_share": round(share, 6), "seconds": round(time.monotonic() - rnd.started, 3)}
        try:
            _, norm = self.secagg.clipped(change, float("inf"))
        except self.secagg.SecAggError as exc:
            return None, {**report, "rejected": f"the unmasked sum is not finite: {exc}"}
        report["update_norm"] = round(norm, 6)
        if norm > self.bound * (1 + 1e-6):  # an envoy skipped its own clipping
            return None, {**report, "rejected": f"the mean update's norm {norm:.4g} exceeds max_update_norm="
                                                f"{self.bound:g}: an envoy did not clip its update"}
        del self.rounds[r]  # its masked inputs and shares are of no more use
        # The envoys' changes are from the model as they received it, in float32 on the wire (the director may hold
        # the last mean unrounded): that plus the mean change is the plain mean of their weights, in float64 as
        # OpenFL's mean gives it (its rounding to float32 then follows the same path).
        return {name: np.asarray(model[name]).astype(np.float32).astype(np.float64) + change[name]
                for name in model}, report
