"""Repository hygiene that a reviewer would otherwise check by hand."""
import json

import yaml

from conftest import ROOT
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
        assert first <= 25, f"{path.name}: the first Federation( call is code line {first}"


def _researcher_names(source: str) -> set[str]:
    """The names a cell's code takes from medfl.researcher: each researcher.<name>, and each imported from it."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "researcher":
            names.add(node.attr)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medfl.researcher"):
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def _medfl_calls(module, function: str) -> set[str]:
    """The names imported from medfl (or, inside it, from its own modules) that `function` of `module` calls."""
    import ast

    imported = {alias.asname or alias.name for node in module.body if isinstance(node, ast.ImportFrom)
                and (node.level or (node.module or "").split(".")[0] == "medfl") for alias in node.names}
    (definition,) = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == function]
    called = set()
    for node in ast.walk(definition):
        if isinstance(node, ast.Call):
            root = node.func.value if isinstance(node.func, ast.Attribute) else node.func  # a module's f, or f
            if isinstance(root, ast.Name) and root.id in imported:
                called.add(ast.unparse(node.func))
    return called


def test_the_cells_call_few_helpers_and_the_tasks_read_as_plain_pytorch():
    """What a reader must look up elsewhere stays short: at most 12 names of medfl.researcher in all the cells (10
    before section 9's evaluation of a saved model and the test table with its intervals), and
    at most 3 medfl functions in each task (the rest is PyTorch; the privacy and distill objects' methods aside)."""
    import ast

    for path in NOTEBOOKS:
        sources = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        used = set().union(*map(_researcher_names, sources))
        assert len(used) <= 12, f"{path.name} uses {len(used)} names of medfl.researcher: {sorted(used)}"
    tasks = ast.parse((ROOT / "workspace" / "medfl" / "tasks.py").read_text())
    for function in ("train", "validate"):
        called = _medfl_calls(tasks, function)
        assert len(called) <= 3, f"medfl.tasks.{function} calls {len(called)} medfl functions: {sorted(called)}"
    # The counts can fail.
    assert _researcher_names("from medfl.researcher import a\nresearcher.b(x.researcher.c)\nresearcher.d\n") == \
        {"a", "b", "d"}
    made_up = ast.parse("from torch import nn\nfrom .device import to_device\nfrom medfl import checks\n"
                        "def train(m, privacy):\n    to_device(m); checks.check_trained(m); nn.Linear(1, 1)\n"
                        "    privacy.attach(m); m.to_device()\n")
    assert _medfl_calls(made_up, "train") == {"to_device", "checks.check_trained"}


def test_notebooks_are_what_tools_notebooks_writes():
    import nbformat

    from tools import notebooks

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
    from medfl.researcher import DEFAULTS, check_parameters

    for path in NOTEBOOKS:
        cells = dict(code_cells(path))
        for tag, objects in (("model", (medfl.conv_block, medfl.Net)), ("data", (medfl.MedMNISTData,)),
                             ("train-task", (medfl.train,)), ("validate-task", (medfl.validate,))):
            for obj in objects:
                assert inspect.getsource(obj).strip() in cells[tag], f"{path.name}: {obj.__name__} differs"
        ns = run_cells(["parameters"], path=path)
        # What the connect cell's first line does, without a director to connect to: each dict completed
        ns.update(zip(("algorithm_options", "dp_options", "run"), check_parameters(**ns), strict=True))
        ns = run_cells(["model", "data", "model-interface", "train-task", "validate-task"], ns, path,
                       dummy_shard_descriptor=DummyShardDescriptor(["28", "28", "3"], ["1"], 4), done=0,
                       experiment_name="a-run")
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


# --- Import roots and floors (roots.py) ----------------------------------------------------------------------------
# Where a PYTHONPATH may be set without roots.py, and why: (file, the value's source) -> reason.
PATH_EXCEPTIONS = {
    ("tests/test_docs_commands.py", "pythonpath"): "runs each documented command with the PYTHONPATH its page writes",
}


def _project_files(suffixes: tuple[str, ...]) -> list:
    """The project's files (tracked, or new and not ignored: no environment, run, data or unpacked experiment)."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        paths = [ROOT / name for name in listed.stdout.splitlines()]
    else:  # outside a git checkout
        skip = {".git", "runs", "data", "site", "certs", "__pycache__"}
        paths = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)
                 and not p.relative_to(ROOT).parts[0].startswith(".venv")]
    return sorted(p for p in set(paths) if p.suffix in suffixes and p.is_file())


def _path_settings(source: str, name: str) -> list[str]:
    """Where Python source `source` changes sys.path, or sets a PYTHONPATH other than through roots.py."""
    import ast

    def dotted(node) -> str:
        return f"{dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "")

    def allowed(value) -> bool:
        text = ast.get_source_segment(source, value) or ""
        # roots.py's own values; clearing it; the tests' hook folder, which is no import root (the start scripts
        # keep it after a node's roots); and the exceptions above.
        return ("roots." in text or text in ('""', "''") or "saboteur" in text.lower()
                or (name, text) in PATH_EXCEPTIONS)

    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call) and dotted(node.func) in ("sys.path.insert", "sys.path.append",
                                                                "sys.path.extend", "site.addsitedir"):
            found.append(f"{where}: {dotted(node.func)}")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                base = target.value if isinstance(target, ast.Subscript) else target
                if dotted(base) == "sys.path":
                    found.append(f"{where}: assigns sys.path")
                if (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
                        and target.slice.value == "PYTHONPATH" and not allowed(node.value)):
                    found.append(f"{where}: sets PYTHONPATH")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "PYTHONPATH" and not allowed(value):
                    found.append(f"{where}: sets PYTHONPATH")
        if isinstance(node, ast.Call):
            given = [k.value for k in node.keywords if k.arg == "PYTHONPATH"]
            if (dotted(node.func).endswith(("setdefault", "putenv")) and node.args[1:]
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == "PYTHONPATH"):
                given.append(node.args[1])
            found += [f"{where}: sets PYTHONPATH" for value in given if not allowed(value)]
    return found


def _shell_path_settings(text: str, name: str) -> list[str]:
    """Where shell script `text` sets PYTHONPATH other than from roots.py."""
    import re

    return [f"{name}:{number}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
            if re.search(r"\bPYTHONPATH=", line.split("#")[0]) and "roots.py" not in line]


def test_the_import_roots_are_said_once_in_roots_py_and_a_node_never_gets_workspace():
    """roots.py gives each process its roots; nothing else sets sys.path or a PYTHONPATH (tests: hooks aside)."""
    import subprocess
    import sys

    import roots

    assert roots.roots("node") == [ROOT, ROOT / "envoy"]
    assert ROOT / "workspace" in roots.roots("launcher") and ROOT / "workspace" in roots.roots("kernel")
    # What a node inherits cannot bring workspace/ back: OpenFL appends the experiment's medfl, which must win.
    inherited = f"{ROOT / 'workspace'}:/elsewhere"
    assert roots.pythonpath("node", inherited=inherited) == f"{ROOT}:{ROOT / 'envoy'}:/elsewhere"
    # The start scripts' form, before anything puts the repository on the path (-I -S: no PYTHONPATH, no .pth).
    printed = subprocess.run([sys.executable, "-I", "-S", str(ROOT / "roots.py"), "node"], cwd="/",
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed == f"{ROOT}:{ROOT / 'envoy'}"
    for script in ("envoy/start_envoy.sh", "director/start_director.sh"):
        assert '"$here/../roots.py" node' in (ROOT / script).read_text(), script

    found = []
    for path in _project_files((".py", ".sh")):
        name = path.relative_to(ROOT).as_posix()
        if name == "roots.py":
            continue
        text = path.read_text()
        found += _path_settings(text, name) if path.suffix == ".py" else _shell_path_settings(text, name)
    assert not found, f"import roots joined outside roots.py (use roots.join or roots.pythonpath): {found}"
    # The checks can fail.
    made_up = ('import sys, os\nsys.path.insert(0, "x")\nsys.path[:0] = ["y"]\nenv = {"PYTHONPATH": "envoy"}\n'
               'os.environ["PYTHONPATH"] = "w"\nok = {"PYTHONPATH": roots.pythonpath("node")}\n')
    assert len(_path_settings(made_up, "made_up.py")) == 4
    assert len(_shell_path_settings('export PYTHONPATH="$here"\nx=1  # PYTHONPATH=no\n', "made_up.sh")) == 1


# The project's packages on floors, from the bottom: a module may import only packages on a floor below its own.
# roots imports nothing of the project; openfl_adjustments changes OpenFL; security builds its rules on it; the
# data node's package and the experiment's (which uses both below it) sit side by side; the launcher, the tools and
# the nodes' entry point sit on top, and none imports another.
FLOORS = [("roots",), ("openfl_adjustments",), ("security",), ("medmnist_shard", "medfl"),
          ("localfed", "tools", "node")]
PACKAGES = {"roots": "roots.py", "openfl_adjustments": "openfl_adjustments", "security": "security",
            "medmnist_shard": "envoy/medmnist_shard", "medfl": "workspace/medfl", "localfed": "localfed",
            "tools": "tools", "node": "node.py"}


def _upward_imports(root, packages: dict[str, str], floors: list[tuple[str, ...]]) -> list[str]:
    """Each import, at a module's top or inside a function, of a package not on a floor below the importer's."""
    import ast

    floor = {package: level for level, names in enumerate(floors) for package in names}
    found = []
    for package, place in packages.items():
        path = root / place
        for module in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(module.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for target in {n.split(".")[0] for n in names} & (set(floor) - {package}):
                    if floor[target] >= floor[package]:
                        found.append(f"{module.relative_to(root)}:{node.lineno} ({package}, floor {floor[package]}) "
                                     f"imports {target} (floor {floor[target]})")
    return found


def test_no_package_imports_one_on_its_own_floor_or_above(tmp_path):
    """The project's layers: the lower floors never import the upper ones, so each can be read and tested alone."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    packages |= {p.parent.name for p in (*ROOT.glob("envoy/*/__init__.py"), *ROOT.glob("workspace/*/__init__.py"))}
    packages |= {p.stem for p in ROOT.glob("*.py")} | {"tools"}
    assert packages == set(PACKAGES) == {name for names in FLOORS for name in names}, "put every package on a floor"
    assert _upward_imports(ROOT, PACKAGES, FLOORS) == []
    # The check can fail: a lower package that imports an upper one inside a function.
    for name, source in (("low", "def f():\n    from high import x\n"), ("high", "import low\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(source)
    assert len(_upward_imports(tmp_path, {"low": "low", "high": "high"}, [("low",), ("high",)])) == 1
