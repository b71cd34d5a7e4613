"""OpenFL in the notebook's process, adjusted (medfl.researcher applies this when imported; the nodes never do).

- Signing. Inside signing(cert, key), every experiment FLExperiment submits is signed with the researcher's key
  (signing.py) after OpenFL packs it and before it leaves: the director and the envoys check that signature.
- Received models. OpenFL rebuilds each model it receives (get_best_model, get_last_model) from read-only views of
  the message's bytes, and PyTorch then warns on the page that it does not support non-writable tensors; OpenFL
  also passes NumPy a keyword it deprecated (`newshape`). Received models are small (this project's CNN is 1 MB),
  so each tensor is copied once into a writable array instead.
- Errors. A call the director refuses or never answers shows in the notebook as one line (what the director said),
  not as a wall of gRPC traceback.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from openfl.pipelines.pipeline import Float32NumpyArrayToBytes

from .signing import sign


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


@contextlib.contextmanager
def signing(cert: str | Path, key: str | Path) -> Iterator[None]:
    """Sign, for the block, every experiment FLExperiment packs, with this researcher's certificate and key."""
    from openfl.interface.interactive_api.experiment import FLExperiment

    original = FLExperiment.prepare_workspace_distribution

    def signed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sign(Path(self.arch_path), self.experiment_name, Path(cert), Path(key))

    FLExperiment.prepare_workspace_distribution = signed
    try:
        yield
    finally:
        FLExperiment.prepare_workspace_distribution = original


def install() -> None:
    """Received models arrive writable; failed calls to the director read as one line in IPython."""
    Float32NumpyArrayToBytes.backward = writable_backward
    grpc.RpcError._render_traceback_ = rpc_error_lines
