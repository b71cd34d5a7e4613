"""The notebook's own definitions, for what runs the same experiment outside it: make baseline's centralized
training (and make compare's) and make bench's compute limit. A reader changes the model, the data interface and
the tasks in the notebook's cells; these run what the cells say, not the package's copies.

definitions() runs, in a namespace of its own: every import statement of the notebook's code cells, its parameters
cell (with the values given), the model cell as it stands (it builds `model` from the parameters alone), and the
functions and classes the data and task cells define, without the decorators that register them with OpenFL's
TaskInterface (torch.no_grad and the like stay).
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

from medfl.researcher import ParameterError, check_parameters
from medmnist_shard import DataError

DEFINING = ("model", "data", "train-task", "validate-task")  # the cells whose definitions run elsewhere
NEEDED = ("model", "MedMNISTData", "train", "validate")


def cells(notebook: Path) -> dict[str, str]:
    """{tag: source} of the notebook's code cells."""
    found = json.loads(Path(notebook).read_text())["cells"]
    return {(c.get("metadata", {}).get("tags") or [""])[0]: "".join(c["source"])
            for c in found if c["cell_type"] == "code"}


def _root(node: ast.expr) -> str | None:
    """The name an expression like TI.add_kwargs(...) starts from."""
    while isinstance(node, (ast.Call, ast.Attribute)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _task_interfaces(trees) -> set[str]:
    """The names the notebook binds to a TaskInterface() (TI)."""
    return {target.id for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Assign)
            and _root(node.value) == "TaskInterface" for target in node.targets if isinstance(target, ast.Name)}


def _only(tree: ast.Module, kinds: tuple, registrars: set[str] = frozenset()) -> ast.Module:
    """The statements of these kinds; functions without the decorators that register them with a TaskInterface."""
    body = [node for node in tree.body if isinstance(node, kinds)]
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            node.decorator_list = [d for d in node.decorator_list if _root(d) not in registrars]
    return ast.Module(body=body, type_ignores=[])


def definitions(notebook: Path, **parameters) -> SimpleNamespace:
    """The notebook's model (built as its model cell builds it, from its parameters overridden by `parameters`; a
    dict parameter given is merged into its defaults), its data interface class and its train and validate tasks.
    DataError, in one line, if the notebook lacks one or its model cell needs more than the parameters."""
    notebook = Path(notebook)
    sources = cells(notebook)
    missing = [tag for tag in ("parameters", *DEFINING) if tag not in sources]
    if missing:
        raise DataError(f"{notebook.name} has no cell tagged {', '.join(missing)}: the baseline and the benchmark "
                        "take the model, data interface and tasks from those cells")
    namespace: dict = {"__name__": "__notebook__"}
    trees = {tag: ast.parse(source, f"{notebook.name}[{tag}]") for tag, source in sources.items()}
    for tree in trees.values():  # every import statement of the notebook, first
        exec(compile(_only(tree, (ast.Import, ast.ImportFrom)), notebook.name, "exec"), namespace)
    exec(compile(trees["parameters"], f"{notebook.name}[parameters]", "exec"), namespace)
    for name, value in parameters.items():
        namespace[name] = {**namespace.get(name, {}), **value} if isinstance(value, dict) else value
    try:
        completed = check_parameters(**namespace)
    except ParameterError as exc:
        raise DataError(str(exc)) from None
    namespace.update(zip(("algorithm_options", "dp_options", "run"), completed, strict=True))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the model cell prints its summary
            exec(compile(trees["model"], f"{notebook.name}[model]", "exec"), namespace)
    except Exception as exc:
        raise DataError(f"{notebook.name}'s model cell cannot build the model from the parameters alone "
                        f"({type(exc).__name__}: {exc}): the baseline and the benchmark build it as that cell "
                        "does") from None
    registrars = _task_interfaces(trees.values())
    for tag in DEFINING[1:]:
        exec(compile(_only(trees[tag], (ast.FunctionDef, ast.ClassDef), registrars), f"{notebook.name}[{tag}]",
                     "exec"), namespace)
    absent = [name for name in NEEDED if name not in namespace]
    if absent:
        raise DataError(f"{notebook.name} defines no {', '.join(absent)}: its cells must define the model, the "
                        "MedMNISTData interface and the train and validate tasks")
    return SimpleNamespace(**{name: namespace[name] for name in NEEDED}, run=namespace["run"])
