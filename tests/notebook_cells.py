"""The notebook's own code cells, run in this process as a kernel would run them: for tests that must act between
its steps (kill a node mid-run, start the next experiment) with exactly the notebook's code."""
from __future__ import annotations

import json
import linecache
from pathlib import Path

from conftest import ROOT

CPU_NOTEBOOK = ROOT / "workspace" / "Pytorch_MedMNIST_2D.ipynb"


def code_cells(path: Path = CPU_NOTEBOOK) -> list[tuple[str, str]]:
    """(tag, source) of every code cell, in order."""
    cells = json.loads(Path(path).read_text())["cells"]
    return [(c["metadata"]["tags"][0], "".join(c["source"])) for c in cells if c["cell_type"] == "code"]


def run_cells(tags, namespace: dict | None = None, path: Path = CPU_NOTEBOOK, **values) -> dict:
    """Run the cells with these tags, in the notebook's order, in `namespace` updated with `values`."""
    namespace = {"__name__": "__notebook__"} if namespace is None else namespace
    namespace.update(values)
    for tag, source in code_cells(path):
        if tag in tags:
            name = f"{Path(path).name}[{tag}]"
            # As a kernel does: compiled on its own (no __future__ flags of this file), its text where
            # inspect and the submission find it
            linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)
            exec(compile(source, name, "exec", dont_inherit=True), namespace)
    return namespace


def run_until(tag: str, path: Path = CPU_NOTEBOOK, **parameters) -> dict:
    """Run the cells up to and including the one tagged `tag`, the parameters overridden (a key of the notebook's
    `run` dict may be given by its name); return the namespace. output_dir must be given: the notebook's own
    (../runs) would put a test's logs beside the repository."""
    from medfl.researcher import RUN

    run = {**parameters.pop("run", {}), **{k: parameters.pop(k) for k in list(parameters) if k in RUN}}
    assert "output_dir" in run, "give run_until an output_dir in the test's tmp_path"
    parameters["run"] = run
    tags = [t for t, _ in code_cells(path)]
    namespace = run_cells(tags[:tags.index("parameters") + 1], path=path)
    return run_cells(tags[tags.index("parameters") + 1:tags.index(tag) + 1], namespace, path, **parameters)


def start_experiment(namespace: dict, experiment_name: str, rounds: int) -> object:
    """Submit a training experiment with the notebook's start cell, under this name (OpenFL's and the run's: the
    attempt of a run that resumes nothing); return its FLExperiment."""
    run_cells(["start"], namespace, experiment_name=experiment_name, attempt=experiment_name, rounds=rounds)
    return namespace["experiment"]
