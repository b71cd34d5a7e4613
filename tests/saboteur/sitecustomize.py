"""Test-only ways to make a node misbehave, with this folder on PYTHONPATH; no user setting reaches them.

MEDFL_TEST_SABOTEUR=ENVOY:KIND:ROUND, or several separated by commas (e.g. envoy_3:nan:2): from that round on
(counted from 1), that envoy sends trained weights that are NaN (`nan`), scaled by 1e4 (`scale`), or with its
first weight one row short (`shape`); its true weights claiming 10^9 training samples (`count`) or -600
(`negative`); its update turned around, g - (w - g) for the global model g it received (`turn`), with its true
count or claiming 10^9 (`lie`); or its true weights with every AUC it reports (validation too) set to 5.0 (`auc`);
after its own checks ran: as a node whose checks are missing, or that attacks on purpose, would. Its other metrics
stay as its real training made them. Every other process ignores it.

ENVOY:die_after_masked:ROUND (secure aggregation): that envoy kills itself (SIGKILL) once its masked update of that
round has reached the director, before it reveals its shares.

MEDFL_TEST_CAPTURE=FOLDER: the director writes every task result it receives, as it arrives, to a pickle in FOLDER
(envoy, round, task, and each tensor's name, report flag, tags and bytes): what the director's process held.

MEDFL_TEST_DIRECTOR_HOLD=EXPERIMENT:ROUNDS: the director hands out no more tasks in experiment EXPERIMENT (`*`:
in any) once ROUNDS training rounds are done, so that a test can kill it between rounds with no envoy training
(tests of resuming: what each envoy's privacy ledger holds then does not depend on timing).

MEDFL_TEST_IMPORTS=FILE: each process appends a JSON line to FILE whenever it imports `medfl` (each experiment
imports it afresh): its role (`envoy NAME`, `director`, or what it runs), `medfl.__file__`, its working folder,
and whether workspace/ was on sys.path then (tests/test_end_to_end.py: the nodes run the experiment's medfl).
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


def _hold(aggregator_class, experiment: str, rounds: int) -> None:
    from pathlib import Path

    init, get_tasks = aggregator_class.__init__, aggregator_class.get_tasks

    def noting_the_experiment(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.test_experiment = Path.cwd().name  # the director builds the aggregator in the experiment's folder

    def holding(self, collaborator_name):
        if experiment in ("*", self.test_experiment) and self.round_number >= rounds:
            return None, self.round_number, 1, False  # "sleep, then ask again"
        return get_tasks(self, collaborator_name)

    aggregator_class.__init__, aggregator_class.get_tasks = noting_the_experiment, holding


def _die_after_masked(secagg, in_round: int) -> None:
    send = secagg.Messenger.send

    def sending(self, step, payload):
        send(self, step, payload)
        if step == "masked" and self.round + 1 == in_round:
            print(f"SABOTEUR: {self.name} dies after sending its masked update of round {in_round}", flush=True)
            os.kill(os.getpid(), 9)

    secagg.Messenger.send = sending


def _capture(aggregator_class, folder: str) -> None:
    import itertools
    import pickle
    import time
    from pathlib import Path

    receive, counter = aggregator_class.send_local_task_results, itertools.count()

    def capturing(self, collaborator_name, round_number, task_name, data_size, named_tensors):
        record = {"envoy": collaborator_name, "round": round_number, "task": task_name,
                  "tensors": [{"name": t.name, "report": t.report, "tags": list(t.tags), "bytes": t.data_bytes}
                              for t in named_tensors]}
        # Named by the time, in order: each experiment imports medfl.aggregator afresh, with a fresh counter.
        path = Path(folder) / f"{time.time_ns()}-{os.getpid()}-{next(counter):06d}.pkl"
        path.write_bytes(pickle.dumps(record))
        return receive(self, collaborator_name, round_number, task_name, data_size, named_tensors)

    aggregator_class.send_local_task_results = capturing


def _record_import(module, record: str) -> None:
    import json
    from pathlib import Path

    workspace = Path(__file__).resolve().parents[2] / "workspace"
    if os.environ.get("ENVOY_NAME"):
        role = f"envoy {os.environ['ENVOY_NAME']}"
    else:
        role = "director" if sys.argv[1:2] == ["director"] else " ".join(sys.argv[:2])
    line = {"role": role, "pid": os.getpid(), "file": module.__file__, "cwd": os.getcwd(),
            "workspace_on_path": any(Path(entry or ".").resolve() == workspace for entry in sys.path)}
    with open(record, "a") as out:  # one short line per write: lines from several processes do not interleave
        out.write(json.dumps(line) + "\n")


COUNTS = {"count": 10 ** 9, "lie": 10 ** 9, "negative": -600}  # the training-set size each kind claims


def _turned(collaborator, tensor_dict: dict, round_number: int) -> dict:
    """The trained weights w turned around the global model g the envoy received: g - (w - g)."""
    from openfl.utilities import TensorKey

    turned = {}
    for key, value in tensor_dict.items():
        received = None if key.report else collaborator.tensor_db.get_tensor_from_cache(
            TensorKey(key.tensor_name, collaborator.aggregator_uuid, round_number, False, ("model",)))
        turned[key] = value if received is None or "num_batches" in key.tensor_name else \
            (2 * received.astype(value.dtype) - value)
    if all(turned[key] is value for key, value in tensor_dict.items()):  # a saboteur that turns nothing is a bug
        raise RuntimeError("SABOTEUR: found no global model in the envoy's tensor store to turn the update around")
    return turned


def _sabotage(collaborator_class, kind: str, from_round: int) -> None:
    send_task_results = collaborator_class.send_task_results

    def sending_spoiled(self, tensor_dict, round_number, task_name):
        if kind == "auc" and round_number + 1 >= from_round:
            import numpy as np

            tensor_dict = {k: np.full_like(v, 5.0) if k.report and k.tensor_name == "auc" else v
                           for k, v in tensor_dict.items()}
        if task_name == "train" and round_number + 1 >= from_round and kind != "auc":
            print(f"SABOTEUR: {self.collaborator_name} sends {kind} weights in round {round_number + 1}", flush=True)
            if kind in ("turn", "lie"):
                tensor_dict = _turned(self, tensor_dict, round_number)
            if kind in COUNTS:  # OpenFL weighs the mean by the count an envoy claims
                runner = self.task_runner
                runner.get_train_data_size = lambda: COUNTS[kind]
                try:
                    return send_task_results(self, tensor_dict, round_number, task_name)
                finally:
                    del runner.get_train_data_size
            if kind != "turn":
                tensor_dict = _spoiled(tensor_dict, kind)
        return send_task_results(self, tensor_dict, round_number, task_name)

    collaborator_class.send_task_results = sending_spoiled


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls change(module) once module `target` is imported in this process."""

    def __init__(self, target: str, change):
        self.target, self.change = target, change

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None:  # not importable in this process: the import fails as it would without this finder
            sys.meta_path.insert(0, self)
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.change(module)
            sys.meta_path.insert(0, self)  # and again if the module is imported afresh (a later experiment)

        spec.loader.exec_module = exec_module
        return spec


for _spec in filter(None, os.environ.get("MEDFL_TEST_SABOTEUR", "").split(",")):
    _envoy, _kind, _round = _spec.split(":")
    if _envoy == os.environ.get("ENVOY_NAME") and _kind == "die_after_masked":
        sys.meta_path.insert(0, _AfterImport("security.secagg_envoy", lambda module, r=int(_round):
                                             _die_after_masked(module, r)))
    elif _envoy == os.environ.get("ENVOY_NAME"):
        sys.meta_path.insert(0, _AfterImport(TARGET, lambda module, k=_kind, r=int(_round):
                                             _sabotage(module.Collaborator, k, r)))
if os.environ.get("MEDFL_TEST_CAPTURE") and not os.environ.get("ENVOY_NAME"):
    sys.meta_path.insert(0, _AfterImport("medfl.aggregator", lambda module, f=os.environ["MEDFL_TEST_CAPTURE"]:
                                         _capture(module.SelectingAggregator, f)))
if os.environ.get("MEDFL_TEST_DIRECTOR_HOLD") and not os.environ.get("ENVOY_NAME"):
    _experiment, _rounds = os.environ["MEDFL_TEST_DIRECTOR_HOLD"].rsplit(":", 1)
    sys.meta_path.insert(0, _AfterImport("medfl.aggregator", lambda module, e=_experiment, r=int(_rounds):
                                         _hold(module.SelectingAggregator, e, r)))
if os.environ.get("MEDFL_TEST_IMPORTS"):
    sys.meta_path.insert(0, _AfterImport("medfl", lambda module, f=os.environ["MEDFL_TEST_IMPORTS"]:
                                         _record_import(module, f)))
