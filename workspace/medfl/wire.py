"""What crosses the wire each round: the weights as float32 (lossless, the default), or their change as float16 or
bfloat16, half the bytes (the notebook's `wire_dtype`).

A half-precision wire switches on OpenFL's delta updates, with this pipeline on both ends. An envoy sends the change
of its weights since the global model it received, cast to `dtype`; the director adds it, in float32, to the
global model it holds, and aggregates in float32 as always. Each round the director sends every envoy the change of
the global model since the round before, cast, which the envoy adds to the model it received then; the director
passes its own new model through the same cast, so both ends hold the same model to the bit. The first round's
model, integer tensors (BatchNorm's counters) and metrics travel as float32.

A change rounds to 11 significant bits (float16) or 8 (bfloat16): a few parts in 10,000 or in 1,000 of the change,
not of the weight. float16 holds changes up to 65,504 in size; a larger one arrives as infinity. bfloat16 has
float32's range.
"""
from __future__ import annotations

import numpy as np
import torch
from openfl.pipelines.pipeline import TransformationPipeline, Transformer

WIRE_DTYPES = ("float32", "float16", "bfloat16")
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CastForTheWire(Transformer):
    """Floating-point tensors to `dtype`'s bytes and back to float32; other tensors as float32, exactly."""

    def __init__(self, dtype: str):
        if dtype not in _TORCH:
            raise ValueError(f"wire dtype {dtype!r}: a half-precision wire is float16 or bfloat16")
        self.dtype, self.lossy = dtype, True

    def forward(self, data, **kwargs):
        """(bytes, metadata): the array cast to the wire's dtype if it holds floating-point numbers."""
        data = np.asarray(data)
        cast = bool(np.issubdtype(data.dtype, np.floating))
        values = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        if cast:  # torch rounds to nearest even, and keeps NaN and infinity as they are
            values = values.to(_TORCH[self.dtype]).view(torch.int16)
        return values.numpy().tobytes(), {"int_list": list(data.shape), "bool_list": [cast]}

    def backward(self, data, metadata, **kwargs):
        """The float32 array that forward's bytes stand for."""
        shape, cast = tuple(metadata["int_list"]), metadata["bool_list"][0]
        raw = np.frombuffer(data, dtype=np.int16 if cast else np.float32).copy()
        values = torch.from_numpy(raw)
        if cast:
            values = values.view(_TORCH[self.dtype]).float()
        return values.numpy().reshape(shape)


class WirePipeline(TransformationPipeline):
    """OpenFL's compression pipeline that puts weight changes on the wire as float16 or bfloat16."""

    def __init__(self, dtype: str = "float16", **kwargs):
        super().__init__(transformers=[CastForTheWire(dtype)], **kwargs)


def wire_format(wire_dtype: str) -> dict:
    """FLExperiment.start's override_config entries for a wire of `wire_dtype` (none for float32)."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype={wire_dtype!r}: give one of {', '.join(WIRE_DTYPES)}")
    if wire_dtype == "float32":
        return {}
    return {"compression_pipeline.template": "medfl.wire.WirePipeline",
            "compression_pipeline.settings.dtype": wire_dtype,
            "collaborator.settings.delta_updates": True,
            # A round's change is taken against the round before's model: both ends keep one more round of tensors.
            "aggregator.settings.db_store_rounds": 2,
            "collaborator.settings.db_store_rounds": 2}
