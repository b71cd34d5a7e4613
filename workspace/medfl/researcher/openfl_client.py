"""OpenFL in the notebook's process, adjusted in one place: received models arrive as writable arrays.

OpenFL rebuilds each model it receives (get_best_model, get_last_model) from read-only views of the message's
bytes, and PyTorch then warns on this page that it does not support non-writable tensors; OpenFL also passes NumPy
a keyword it deprecated (`newshape`). Received models are small (this project's CNN is 1 MB), so each tensor is
copied once into a writable array instead. Importing medfl.researcher applies this; the nodes never import it.
"""
from __future__ import annotations

import numpy as np
from openfl.pipelines.pipeline import Float32NumpyArrayToBytes


def writable_backward(self, data, metadata, **kwargs) -> np.ndarray:
    """Float32NumpyArrayToBytes.backward: the bytes as a writable float32 array of the recorded shape."""
    return np.frombuffer(data, dtype=np.float32).reshape(tuple(metadata["int_list"])).copy()


def install() -> None:
    """Use writable_backward for every model this process receives."""
    Float32NumpyArrayToBytes.backward = writable_backward
