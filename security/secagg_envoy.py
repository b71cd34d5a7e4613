"""Secure aggregation's envoy half, on each envoy node: where its collaborator sends the train task's results, the
trained weights leave as one masked vector (security.secagg's protocol), their change clipped to the experiment's
max_update_norm. install() puts it in place in the envoy's process (security.install).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np

from .secagg import DEADLINE_S, STEP, EnvoyRound, SecAggError, clipped, flatten


def _named(payload: bytes, name: str = "payload"):
    from openfl.protocols import base_pb2

    return base_pb2.NamedTensor(name=name, round_number=0, lossless=True, report=False, data_bytes=payload)


class Messenger:
    """An envoy's messages to and from the aggregator, on its collaborator's client, for one round."""

    def __init__(self, client, name: str, round_number: int, deadline_s: float):
        self.client, self.name, self.round, self.deadline = client, name, round_number, time.monotonic() + deadline_s

    def send(self, step: str, payload: bytes) -> None:
        self.client.send_local_task_results(self.name, self.round, STEP + step, 0, [_named(payload)])

    def fetch(self, step: str) -> dict:
        """The aggregator's answer for this step, once it has one (it holds each request up to POLL_S)."""
        while True:
            answer = json.loads(self.client.get_aggregated_tensor(self.name, STEP + step, self.round, False, [],
                                                                  True).data_bytes)
            if "error" in answer:
                raise SecAggError(answer["error"])
            if not answer.get("pending"):
                return answer
            if time.monotonic() > self.deadline:
                raise SecAggError(f"no answer from the director to {step} in time; still waiting for "
                                  f"{', '.join(answer.get('waiting_for', [])) or 'nothing it named'}")


def signer(client) -> tuple | None:
    """Under mutual TLS: (this envoy's certificate PEM, its private key, the federation's CA certificate), from the
    files its connection to the aggregator uses; None without TLS (nothing to sign with)."""
    paths = tuple(getattr(client, a, None) for a in ("certificate", "private_key", "root_certificate"))
    return _loaded(*paths) if getattr(client, "tls", False) and all(paths) else None


@functools.lru_cache(maxsize=4)
def _loaded(certificate: str, private_key: str, root_certificate: str) -> tuple:
    """The files read once per process, not every round."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return (Path(certificate).read_bytes(),
            serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None),
            x509.load_pem_x509_certificate(Path(root_certificate).read_bytes()))


def mask_and_send(collaborator, tensor_dict: dict, round_number: int, bound: float) -> tuple[dict, float]:
    """Run this round's protocol for the train task's results: the trained weights leave as one masked vector,
    their change clipped to norm `bound`; return the results without them, and the change's norm before clipping."""
    from openfl.utilities import TensorKey

    client = getattr(collaborator.client, "client", collaborator.client)  # the calls themselves, not in background
    name, origin = collaborator.collaborator_name, collaborator.aggregator_uuid
    trained = {key: value for key, value in tensor_dict.items() if not key.report and "trained" in key.tags}
    glob = {key.tensor_name: collaborator.tensor_db.get_tensor_from_cache(
        TensorKey(key.tensor_name, origin, round_number, False, ("model",))) for key in trained}
    missing = [n for n, v in glob.items() if v is None]
    if missing:
        raise SecAggError(f"the round's global model is not at hand for {missing[0]}: cannot make the update")
    change = {key.tensor_name: np.asarray(value, np.float64) - np.asarray(glob[key.tensor_name], np.float64)
              for key, value in trained.items()}
    update, norm = clipped(change, bound)
    messenger = Messenger(client, name, round_number, DEADLINE_S)
    mine = EnvoyRound(name, f"{origin}|{round_number}", collaborator.task_runner.get_train_data_size(),
                      signer(client))
    messenger.send("advertise", json.dumps(mine.advertise()).encode())
    peers = messenger.fetch("peers")
    messenger.send("share", json.dumps(mine.share(peers["advertised"], peers["threshold"])).encode())
    inbox = messenger.fetch("inbox")
    messenger.send("masked", mine.masked(flatten(update)[0], inbox["sealed"]).tobytes())
    request = messenger.fetch("unmask")
    if mine.signer:  # the consistency round: a threshold of survivors must have signed the same U3
        messenger.send("confirm", json.dumps(mine.confirm(request["survivors"])).encode())
        mine.check_confirmations(request["survivors"], messenger.fetch("confirmations")["confirmations"])
    messenger.send("reveal", json.dumps(mine.reveal(request["survivors"], request["dropped"])).encode())
    return {key: value for key, value in tensor_dict.items() if key not in trained}, norm


def install() -> None:
    """On an envoy: a collaborator whose plan asks for secure aggregation (its settings' secure_aggregation and
    max_update_norm) masks its train task's weights, and reports whether their change was clipped (update_clipped:
    1 or 0), not its norm."""
    from openfl.component.collaborator import collaborator as module
    from openfl.utilities import TensorKey

    from openfl_adjustments.patching import replace

    def taking_the_settings(init):
        def wrapper(self, *args, secure_aggregation=False, max_update_norm=None, **kwargs):
            init(self, *args, **kwargs)
            self.secure_bound = float(max_update_norm) if secure_aggregation else None

        return wrapper

    def masking(send_task_results):
        def wrapper(self, tensor_dict, round_number, task_name):
            bound = getattr(self, "secure_bound", None)
            if bound and any(not k.report and "trained" in k.tags for k in tensor_dict):
                tensor_dict, norm = mask_and_send(self, tensor_dict, round_number, bound)
                tags = next((k.tags for k in tensor_dict if k.report), ("trained", "metric"))
                # whether it was clipped, not its norm: the norm of one envoy's update is more than the sum tells
                tensor_dict = {**tensor_dict, TensorKey("update_clipped", self.collaborator_name, round_number, True,
                                                        tags): np.array(float(norm > bound))}
            return send_task_results(self, tensor_dict, round_number, task_name)

        return wrapper

    replace(module.Collaborator, "__init__", taking_the_settings)
    replace(module.Collaborator, "send_task_results", masking)
