"""Testing a saved model on every envoy without training it (external validation): the notebook's section 9 and
make evaluate. The model is checked here against the network the notebook builds; the evaluation is a
validation-only experiment, like the test of a run's best model; evaluation.json says what was tested on what."""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch

from .checkpoint import write_atomically
from .follow import Followed
from .parameters import ParameterError
from .report import ExperimentFailed, test_block

FILE = "evaluation.json"


class SavedModel:
    """A saved model to evaluate: `model` (a copy of the network given) with the weights saved at `path` (a
    state_dict, e.g. a run's best_model.pt). ParameterError, in one line, if the file is missing, not a state_dict,
    or of another network than the one given (`what` says which: dataset, size, stem, normalization)."""

    def __init__(self, path, network: torch.nn.Module, what: str):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise ParameterError(f"evaluate_model={str(path)!r}: no such file; give a saved state_dict, e.g. "
                                 "\"../runs/latest/best_model.pt\" (make evaluate model=runs/latest/best_model.pt)")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, or one that holds more than tensors
            raise ParameterError(f"evaluate_model={str(path)!r} is not a PyTorch state_dict ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ParameterError(f"evaluate_model={str(path)!r} holds a {type(state).__name__}, not a state_dict of "
                                 "tensors: save one with torch.save(model.state_dict(), path)")
        if problem := mismatch(state, network.state_dict()):
            raise ParameterError(f"evaluate_model={str(path)!r} is not the weights of this network ({what}): {problem}")
        self.model = copy.deepcopy(network)
        self.model.load_state_dict(state)

    def write(self, run_dir, evaluated: Followed, *, split: str, params: dict, envoys: list[dict],
              data_source: str, **_) -> dict:
        """evaluation.json in run_dir: the model (path and SHA-256), the split, the data and every envoy's scores
        with their intervals, pooled too (the test block's form); ExperimentFailed, after writing, if the experiment
        failed."""
        samples = {e["envoy"]: e.get("samples", {}).get(split) for e in envoys}
        evaluation = {
            "status": "failed" if evaluated.error else "completed", "error": evaluated.error,
            "model": str(self.path), "model_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "split": split, "dataset": params["dataset"], "size": params["size"], "stem": params["stem"],
            "data_source": data_source, "experiment": evaluated.name, "bootstrap": params["bootstrap"],
            "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **test_block(evaluated.metrics, samples),
            "dropouts": evaluated.dropouts, "rejected_updates": evaluated.rejected,
        }
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(run_dir) / FILE, json.dumps(evaluation, indent=1, default=str).encode())
        if evaluated.error:
            raise ExperimentFailed(f"experiment {evaluated.name} failed: {evaluated.error}; what arrived is in "
                                   f"{Path(run_dir).resolve() / FILE}")
        return evaluation


def mismatch(state: dict, expected: dict) -> str | None:
    """What differs between a state_dict and the network's, in a few words, or None."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        parts = [f"it lacks {_few(missing)}" if missing else "", f"it has {_few(extra)}, which this one has not"
                 if extra else ""]
        return "; ".join(p for p in parts if p) + " (another architecture, stem or normalization?)"
    for name, value in expected.items():
        if tuple(state[name].shape) != tuple(value.shape):
            return (f"{name} is {tuple(state[name].shape)} there and {tuple(value.shape)} here (another dataset, "
                    "number of classes or channels, or image size?)")
    return None


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
