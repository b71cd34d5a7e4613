"""Secure aggregation's director half, on the director, inside the experiment's aggregator
(medfl.aggregator.SelectingAggregator mixes in SecureAggregation): the director only relays the protocol's messages
(security.secagg) and unmasks the round's weighted mean, nothing else.

SecureAggregation routes what reaches the aggregator: task results and tensor requests named secagg/<step> are the
protocol's messages, handed to SecureRounds; an update that arrives unmasked is refused; and when a round ends, the
new global weights come from the secure sum. The aggregation function (FedAvg's mean, a server optimizer) then sees
that one mean, as if one envoy had sent it: algorithms that need each update (median, geometric median) are refused
in the notebook.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np

from . import secagg


class SecureAggregation:
    """The director's half, mixed into the experiment's aggregator. Needs of the aggregator: OpenFL's Aggregator,
    its _global_model, stopped and dropped, drop, _fail and _drop (which this extends), _reject_update, _claimed_count
    (medfl.checks), and SECURE_EVENT (the
    task name of the event streamed for each securely aggregated round)."""

    _secure = None  # SecureRounds, when the experiment asks for secure aggregation

    def _start_secure(self, enabled: bool, threshold: int, bound: float) -> None:
        self._secure = SecureRounds(self, threshold, bound) if enabled else None

    def send_local_task_results(self, collaborator_name, round_number, task_name, data_size, named_tensors):
        if task_name.startswith(secagg.STEP):  # one of the protocol's messages
            if self._secure is not None:
                self._secure.receive(collaborator_name, round_number, task_name[len(secagg.STEP):], named_tensors)
            return
        if self._secure is not None and any(not t.report and "trained" in t.tags for t in named_tensors):
            # a node without secure aggregation: its update is not used, its metrics are
            self._reject_update(collaborator_name, round_number, task_name, "secure", "its update arrived unmasked: "
                                "its node does not run this project's secure aggregation (security.secagg_envoy)")
            named_tensors = [t for t in named_tensors if t.report]
        super().send_local_task_results(collaborator_name, round_number, task_name, data_size, named_tensors)

    def get_aggregated_tensor(self, collaborator_name, tensor_name, round_number, report, tags, require_lossless):
        if not tensor_name.startswith(secagg.STEP):
            return super().get_aggregated_tensor(collaborator_name, tensor_name, round_number, report, tags,
                                                 require_lossless)
        from openfl.protocols import base_pb2  # a request in the protocol: held until its answer is ready

        answer = (self._secure.answer(collaborator_name, round_number, tensor_name[len(secagg.STEP):])
                  if self._secure is not None else b'{"error": "this experiment has no secure aggregation"}')
        return base_pb2.NamedTensor(name=tensor_name, round_number=round_number, lossless=True, data_bytes=answer)

    def _compute_validation_related_task_metrics(self, task_name: str) -> None:
        super()._compute_validation_related_task_metrics(task_name)
        if self._secure is not None and "train" in task_name and not self.stopped:
            self._aggregate_securely(task_name)

    def _aggregate_securely(self, task_name: str) -> None:
        """The round's new global model from the secure sum (the envoys sent no weights in the clear)."""
        from openfl.utilities import LocalTensor

        r = self.round_number
        try:
            weights, report = self._secure.mean(r, self._global_model(r))
        except Exception as exc:  # below the threshold, or inputs of another size
            self._fail(f"round {r + 1}: {exc}")
            return
        # metric_origin as OpenFL gives its own aggregated metrics (medfl.events.AGGREGATED)
        self.metric_queue.put({"round": r, "metric_origin": "aggregator", "task_name": self.SECURE_EVENT,
                               "metric_name": json.dumps(report), "metric_value": report["seconds"]})
        for envoy, why in report.get("bad_shares", {}).items():  # summed without them; they lied: dropped
            self._reject_update(envoy, r, task_name, "secure", why)
            if envoy not in self.dropped:
                self._drop(envoy, f"its update was rejected: it failed the secure check: {why}", r)
        if weights is None:  # the sum failed its check: the global model stays as it was
            self.logger.warning("Round %d: %s; the global model stays as it was", r + 1, report["rejected"])
            weights = self._global_model(r)
        function = self.assigner.get_aggregation_type_for_task(task_name)
        for name, value in weights.items():
            mean = function.call([LocalTensor(col_name="secure sum", tensor=value, weight=1.0)], None, name, r,
                                 ("trained",))
            self._prepare_trained(name, self.uuid, r, False, mean)

    def fail_securely(self, why: str) -> None:
        """Secure aggregation cannot go on (below its threshold): the experiment fails with that line."""
        with self.lock:
            if not self.stopped:
                self._fail(why)

    def _drop(self, name: str, why: str, round_number: int | None = None) -> None:
        super()._drop(name, why, round_number)
        if self._secure is not None:
            self._secure.notify()  # requests waiting for its protocol messages look again

    def _fail(self, why: str) -> None:
        super()._fail(why)
        if self._secure is not None:
            self._secure.notify()  # envoys waiting in the protocol hear it


class SecureRounds:
    """The protocol's state on the director, for one experiment: one secagg.DirectorRound per round."""

    def __init__(self, aggregator, threshold: int, bound: float):
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
        if envoy in self.aggregator.dropped:
            return
        if bad := self._refused(envoy, r, step, payload):  # named and dropped: the round goes on without it
            self.aggregator._reject_update(envoy, r, "train", *bad)
            self.aggregator.drop(envoy, f"its update was rejected: it failed the {bad[0]} check: {bad[1]}")
            self.notify()
            return
        with self.changed:
            rnd = self.round(r)
            if step == "advertise":
                rnd.advertised[envoy] = json.loads(payload)
                if not rnd.waiting_for("advertise"):  # every envoy has trained: the protocol itself starts
                    rnd.started = time.monotonic()
            elif step == "share":
                rnd.sealed[envoy] = json.loads(payload)
            elif step == "masked":
                try:
                    rnd.receive_input(envoy, np.frombuffer(payload, dtype=np.uint64).copy())
                except self.secagg.SecAggError as exc:  # too late: its reveal will refuse, and it drops out
                    self.aggregator.logger.warning("Round %d: %s", r + 1, exc)
            elif step == "confirm":
                rnd.confirmations[envoy] = json.loads(payload)
            elif step == "reveal":
                rnd.reveals[envoy] = json.loads(payload)
            else:
                raise ValueError(f"unknown secure aggregation step {step!r} from {envoy}")
        self.notify()

    def _refused(self, envoy: str, r: int, step: str, payload: bytes) -> tuple | None:
        """(check, detail, numbers) for a message that no honest envoy sends: a training-set size it cannot have
        (the count check of medfl.checks, against what its shard registered), or a masked input whose length is not
        the model's. None for the others."""
        if step == "advertise":
            try:
                samples = json.loads(payload)["samples"]
            except (ValueError, KeyError, TypeError):
                return "secure", "its advertisement is not the protocol's", {}
            if isinstance(samples, bool) or not isinstance(samples, int):
                return "count", f"it advertises {samples!r} training samples, not a whole number", {}
            if bad := self.aggregator._claimed_count(envoy, samples):
                return "count", bad.pop("detail"), bad
        elif step == "masked":
            expected = sum(int(np.size(value)) for value in self.aggregator._global_model(r).values())
            if len(payload) != 8 * expected:
                return "secure", (f"its masked input holds {len(payload) / 8:g} values, the model {expected}"), \
                    {"values": len(payload) / 8, "expected": expected}
        return None

    def answer(self, envoy: str, r: int, step: str) -> bytes:
        """The message an envoy asks for, once it is ready (else, after secagg.POLL_S, "pending")."""
        waits = {"peers": "advertise", "inbox": "share", "unmask": "masked", "confirmations": "confirm"}
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
        if step == "confirmations":
            return {"confirmations": rnd.confirmations}
        rnd.freeze()
        return {"survivors": rnd.u3, "dropped": sorted(set(rnd.u2) - set(rnd.u3))}

    def mean(self, r: int, model: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, dict]:
        """When round r ends: the global weights after it (the model plus the envoys' weighted mean change), or None
        if the sum fails its check or a bad share cannot be told apart, with what results.json records of the round
        (bad_shares: the envoys that revealed one, left out of the unmasking); SecAggError below threshold."""
        with self.changed:
            rnd = self.round(r)
            try:
                total, share, bad = rnd.unmask()
            except self.secagg.BadShare as exc:  # a bad share, and no spare one to tell whose: the round is void
                return None, {"round": r + 1, "envoys": rnd.u1, "threshold": rnd.threshold, "summed": rnd.u3,
                              "seconds": round(time.monotonic() - rnd.started, 3), "rejected": str(exc)}
        layout = [(name, np.shape(model[name])) for name in sorted(model)]
        if total.size != sum(int(np.prod(shape)) for _, shape in layout):
            raise self.secagg.SecAggError(f"the masked inputs hold {total.size} values, the model {len(layout)} "
                                          "tensors of another size")
        change = self.secagg.unflatten(total, layout)
        lost = sorted(set(rnd.u3) & set(self.aggregator.dropped))
        report = {"round": r + 1, "envoys": rnd.u1, "threshold": rnd.threshold, "summed": rnd.u3,
                  "dropped_before_sending": sorted(set(rnd.u1) - set(rnd.u3)), "dropped_after_sending": lost,
                  "samples_share": round(share, 6), "seconds": round(time.monotonic() - rnd.started, 3),
                  "bad_shares": bad}
        try:
            norm = self.secagg.norm(change)
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
