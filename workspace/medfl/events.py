"""What the director streams to the notebook beside the metrics, and what travels with its last model: the names
that the aggregator (on the director), the notebook's follower and report, and the launcher share.

This module imports nothing of the aggregator's, so the notebook and the launcher can read these names without
loading OpenFL's aggregator.
"""
from __future__ import annotations

import numpy as np

VALIDATE_GLOBAL = "aggregated_model_validate"
VALIDATE_LOCAL = "locally_tuned_model_validate"
AGGREGATED = "aggregator"
# Events streamed with the metrics; metric_name carries the reason, metric_value the seconds into the round.
DROPPED = "envoy_dropped"  # metric_origin is the envoy
# A dropped envoy's reason begins with this when its own policy refused or stopped the experiment
# (openfl_adjustments.contract.REFUSED, on the nodes; tests/test_policy.py keeps the two equal).
REFUSED = "refused: "
FAILED = "experiment_failed"  # metric_origin is the aggregator
HELD = "envoy_held"  # metric_origin is the envoy, waiting for its operator to approve the experiment's code
REJECTED = "update_rejected"  # metric_origin is the envoy; metric_name is JSON: check, detail, numbers
# An envoy dropped for its rejected updates has a reason that begins with this (medfl.checks, security.secagg_director):
# a resumed run keeps it out (medfl.researcher.checkpoint), where an envoy lost and back again takes part.
REJECTED_DROP = "its update was rejected"
CLIPPED = "update_clipped"  # the same, for an update clipped to max_update_size and aggregated
# A round aggregated under secure aggregation (security.secagg_director); metric_name is JSON: who was summed.
SECURE = "secure_aggregation"
# What a round cost on the wire, streamed by the aggregator when the round ends, for all envoys (metric_origin is the
# aggregator) and for each: received_bytes (the envoys' results) and sent_bytes (the tensors they fetched), tensor
# data only, and connections, the new connections the envoys opened to the aggregator in the round.
TRAFFIC = "traffic"
TRAFFIC_COUNTS = ("received_bytes", "sent_bytes", "connections")

# A run's checkpoint needs, beside the last global model, the round it is the model after and the aggregation's
# state (a server optimizer's moments): both come with the last model (get_last_model), the state's float64
# arrays viewed as float32, so that they cross OpenFL's float32 wire bit for bit (medfl.researcher.checkpoint).
ROUND_KEY = "__round__"
STATE_PREFIX = "__aggregation_state__/"


def pack(array) -> np.ndarray:
    """A float64 array as the float32 array of its bytes (flattened), for OpenFL's float32 wire."""
    return np.ascontiguousarray(array, dtype=np.float64).reshape(-1).view(np.float32)


def unpack(array) -> np.ndarray:
    """pack()'s float64 values back, flattened."""
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.float64)
