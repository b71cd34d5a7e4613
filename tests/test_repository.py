"""Repository hygiene that a reviewer would otherwise check by hand."""
import json
import sys

import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from medmnist_shard.partition import parse_rank_worldsize
from medmnist_shard.spec import sample_shape, target_shape

NOTEBOOKS = sorted((ROOT / "workspace").glob("*.ipynb"))


def committed(path) -> str:
    """A file as git has it staged for the next commit (the file itself outside a git checkout): running the
    notebook and saving it changes the working copy, not what this checks."""
    import subprocess

    shown = subprocess.run(["git", "show", f":{path.relative_to(ROOT)}"], cwd=ROOT, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else path.read_text()


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        for cell in json.loads(committed(path))["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, \
                    f"{path.name} is staged with outputs: clear them (JupyterLab: Edit > Clear Outputs of All Cells)"


def test_one_short_parameters_cell_that_a_runner_can_fill_and_the_federation_within_a_screen():
    from medfl.researcher import DEFAULTS

    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, path.name
        source = "".join(tagged[0]["source"])
        names = [line.split(" = ")[0] for line in source.splitlines() if " = " in line and not line.startswith(" ")]
        assert names == list(DEFAULTS) and len(names) <= 17, path.name  # what a reader tunes; the rest in run
        code = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()
                if line.strip()]
        first = next(i for i, line in enumerate(code, 1) if "Federation(" in line)
        assert first <= 40, f"{path.name}: the first Federation( call is code line {first}"


def test_notebooks_are_what_tools_notebooks_writes():
    import nbformat
    import notebooks

    for path in NOTEBOOKS:
        on_disk = nbformat.read(path, as_version=4)
        assert [c.source for c in on_disk.cells] == [c.source for c in notebooks.notebook(path.name).cells], \
            (f"{path.name}'s cells differ from what tools/notebooks.py writes from the medfl package: change the "
             "package or the generator and run it (python tools/notebooks.py); keep experiments in a copy")


def test_cpu_and_hpu_notebooks_differ_only_in_narrative_and_parameters():
    cpu, hpu = (json.loads((ROOT / "workspace" / name).read_text())["cells"]
                for name in ("Pytorch_MedMNIST_2D.ipynb", "HPU_Pytorch_MedMNIST_2D.ipynb"))
    code = [["".join(c["source"]) for c in cells if c["cell_type"] == "code"] for cells in (cpu, hpu)]
    assert code[0][1:] == code[1][1:]  # every cell after the parameters: the same package calls
    assert 'device = "auto"' in code[0][0] and 'device = "hpu"' in code[1][0] and "bf16 = True" in code[1][0]
    assert code[0][0].replace('"auto"', '"hpu"').splitlines()[:10] == code[1][0].splitlines()[:10]


# Every step of OpenFL's interactive API, as a reader must find it in a code cell of each notebook.
API_STEPS = ("Federation(", ".get_shard_registry()", ".get_dummy_shard_descriptor(", "(DataInterface):",
             "ModelInterface(model=", "optimizer=", "framework_plugin=", "TaskInterface()", "@TI.register_fl_task(",
             "@TI.add_kwargs(", "@TI.set_aggregation_function(", "FLExperiment(federation=", ".start(",
             "researcher.follow(", ".get_best_model", ".get_last_model()", "class Net(nn.Module)", "def train(",
             "def validate(")


def test_every_interactive_api_step_is_in_a_code_cell_of_both_notebooks():
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        missing = [step for step in API_STEPS if step not in code]
        assert not missing, f"{path.name} lacks {missing}"
        assert "!pip" not in code


def test_the_notebooks_define_what_the_package_runs_elsewhere(tmp_path):
    """One source of truth: the model, data interface and task cells are the package's code, and register the
    tasks as medfl.build_tasks does for the baseline, the benchmark and the tests."""
    import inspect

    from notebook_cells import code_cells, run_cells
    from openfl.interface.interactive_api.shard_descriptor import DummyShardDescriptor

    import medfl
    from medfl.researcher import DEFAULTS

    for path in NOTEBOOKS:
        cells = dict(code_cells(path))
        for tag, objects in (("model", (medfl.conv_block, medfl.Net)), ("data", (medfl.MedMNISTData,)),
                             ("train-task", (medfl.train,)), ("validate-task", (medfl.validate,))):
            for obj in objects:
                assert inspect.getsource(obj).strip() in cells[tag], f"{path.name}: {obj.__name__} differs"
        ns = run_cells(["parameters"], path=path)
        # The imports cell opens the run's OpenFL log under output_dir, which is relative to the notebook's folder.
        ns = run_cells(["imports", "model", "data", "model-interface", "train-task", "validate-task"], ns, path,
                       dummy_shard_descriptor=DummyShardDescriptor(["28", "28", "3"], ["1"], 4), done=0,
                       run={"output_dir": str(tmp_path / "runs")})
        package = medfl.build_tasks(DEFAULTS["dataset"], DEFAULTS["epochs"], ns["device"], ns["bf16"],
                                    aggregation=medfl.aggregation_function(DEFAULTS["algorithm"], ns["model"]))
        assert ns["TI"].task_contract == package.task_contract
        assert ns["TI"].task_settings == package.task_settings
        assert set(ns["TI"].get_registered_tasks()) == set(package.get_registered_tasks())
        assert {name: type(f) for name, f in ns["TI"].aggregation_functions.items()} == \
            {name: type(f) for name, f in package.aggregation_functions.items()}
        # The algorithm shows where OpenFL's API takes it: the envoys' optimizer and the train task's aggregation.
        for algorithm, optimizer, aggregation in (("fedprox", "FedProxAdam", "WeightedMean"),
                                                  ("fedadam", "Adam", "ServerOptimizer"),
                                                  ("geomedian", "Adam", "GeometricMedian")):
            ns = run_cells(["model-interface", "train-task"], ns, path, algorithm=algorithm)
            assert type(ns["MI"].optimizer).__name__ == optimizer
            assert type(ns["TI"].aggregation_functions["train"]).__name__ == aggregation


def test_every_pin_lives_in_requirements():
    pins = (ROOT / "requirements.txt").read_text()
    for pin in ("openfl==1.6", "torch==2.13.0", "torchvision==0.28.0", "medmnist==3.0.2", "numpy>=1.26,<2.4"):
        assert pin in pins


def test_shipped_configs_agree_and_shard_disjointly():
    director = yaml.safe_load((ROOT / "director" / "director_config.yaml").read_text())["settings"]
    envoys = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "envoy").glob("envoy_config_*.yaml"))]
    shards = [e["shard_descriptor"]["params"] for e in envoys]
    assert len(shards) == 2
    for envoy, shard in zip(envoys, shards, strict=True):
        assert envoy["params"]["install_requirements"] is False
        assert director["sample_shape"] == [str(d) for d in sample_shape(shard["flag"], shard["size"])]
        assert director["target_shape"] == [str(d) for d in target_shape(shard["flag"])]
    assert sorted(parse_rank_worldsize(s["rank_worldsize"]) for s in shards) == [(1, 2), (2, 2)]
    assert len({(s["flag"], s["size"], s["seed"], s["partition"]) for s in shards}) == 1


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a module graph, as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        if state.get(module) == "open":
            return trail + [module]
        if state.get(module) == "done":
            return None
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            found = visit(target, trail + [module])
            if found:
                return found
        state[module] = "done"
        return None

    return next((c for c in (visit(m, []) for m in sorted(graph)) if c), None)


def test_no_package_of_the_project_imports_itself_in_a_circle():
    """Every import between a package's modules, at the top or inside a function, leads one way only."""
    import ast

    for package in ("localfed", "openfl_adjustments", "security", "workspace/medfl", "workspace/medfl/researcher",
                    "envoy/medmnist_shard"):
        folder = ROOT / package
        modules = {p.stem for p in folder.glob("*.py")}
        graph: dict[str, set[str]] = {}
        for path in folder.glob("*.py"):
            edges = graph.setdefault(path.stem, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 1:
                    if node.module:
                        edges.add(node.module.split(".")[0])
                    else:  # from . import X: the module X, or a name the package's __init__ defines
                        edges.update(a.name if a.name in modules else "__init__" for a in node.names)
            edges.discard(path.stem)
        assert _circle(graph) is None, f"{package}: import circle {' -> '.join(_circle(graph))}"
    assert _circle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check can fail
