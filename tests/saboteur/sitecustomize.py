"""A test-only way to make one envoy misbehave: put this folder on PYTHONPATH and set
MEDFL_TEST_SABOTEUR=ENVOY:KIND:ROUND, or several separated by commas (e.g. envoy_3:nan:2). From that round on
(counted from 1), that envoy sends trained weights that are NaN (`nan`), scaled by 1e4 (`scale`), or with its
first weight one row short (`shape`), after its own checks ran: as a node whose checks are missing, or that
attacks on purpose, would. Its metrics stay as its real training made them. Every other process ignores it; no
user setting reaches this.
"""
import importlib.abc
import importlib.util
import os
import sys

TARGET = "openfl.component.collaborator.collaborator"


def _spoiled(tensor_dict: dict, kind: str) -> dict:
    import numpy as np

    spoiled, first = {}, True
    for key, value in tensor_dict.items():
        if key.report:
            spoiled[key] = value
        elif kind == "nan":
            spoiled[key] = np.full_like(value, np.nan)
        elif kind == "scale":
            spoiled[key] = value * np.float32(1e4)
        elif kind == "shape" and first and value.ndim:
            spoiled[key], first = value[:-1].copy(), False
        else:
            spoiled[key] = value
    return spoiled


def _sabotage(collaborator_class, kind: str, from_round: int) -> None:
    send_task_results = collaborator_class.send_task_results

    def sending_spoiled(self, tensor_dict, round_number, task_name):
        if task_name == "train" and round_number + 1 >= from_round:
            print(f"SABOTEUR: {self.collaborator_name} sends {kind} weights in round {round_number + 1}", flush=True)
            tensor_dict = _spoiled(tensor_dict, kind)
        return send_task_results(self, tensor_dict, round_number, task_name)

    collaborator_class.send_task_results = sending_spoiled


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the collaborator's class once OpenFL imports its module in this process."""

    def __init__(self, kind: str, from_round: int):
        self.kind, self.from_round = kind, from_round

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _sabotage(module.Collaborator, self.kind, self.from_round)

        spec.loader.exec_module = exec_module
        return spec


for _spec in filter(None, os.environ.get("MEDFL_TEST_SABOTEUR", "").split(",")):
    _envoy, _kind, _round = _spec.split(":")
    if _envoy == os.environ.get("ENVOY_NAME"):
        sys.meta_path.insert(0, _AfterImport(_kind, int(_round)))
