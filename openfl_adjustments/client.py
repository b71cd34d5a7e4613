"""OpenFL in the notebook's process, adjusted (medfl.researcher applies this when imported; the nodes never do).

- Received models. OpenFL rebuilds each model it receives (get_best_model, get_last_model) from read-only views of
  the message's bytes, and PyTorch then warns on the page that it does not support non-writable tensors; OpenFL
  also passes NumPy a keyword it deprecated (`newshape`). Received models are small (this project's CNN is 1 MB),
  so each tensor is copied once into a writable array instead.
- Errors. A call the director refuses or never answers shows in the notebook as one line (what the director said),
  not as a wall of gRPC traceback.
"""
from __future__ import annotations

import grpc
import numpy as np
from openfl.pipelines.pipeline import Float32NumpyArrayToBytes


def writable_backward(self, data, metadata, **kwargs) -> np.ndarray:
    """Float32NumpyArrayToBytes.backward: the bytes as a writable float32 array of the recorded shape."""
    return np.frombuffer(data, dtype=np.float32).reshape(tuple(metadata["int_list"])).copy()


def rpc_error_lines(self) -> list[str]:
    """grpc.RpcError._render_traceback_: what IPython shows for a failed call to the director."""
    code = self.code() if callable(getattr(self, "code", None)) else None
    details = self.details() if callable(getattr(self, "details", None)) else str(self)
    if code == grpc.StatusCode.UNAVAILABLE:
        return [f"DirectorUnavailable: no answer from the director ({details}): is it running, at director_host and "
                "director_port, with TLS as the notebook's ca_cert/api_cert say?"]
    return [f"DirectorRefused: {getattr(code, 'name', 'error')}: {details}"]


def install() -> None:
    """Received models arrive writable; failed calls to the director read as one line in IPython."""
    Float32NumpyArrayToBytes.backward = writable_backward
    grpc.RpcError._render_traceback_ = rpc_error_lines
