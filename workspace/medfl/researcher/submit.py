"""Where and how OpenFL submits: from a temporary copy of the notebook's folder (so that folder stays as it is),
with the notebook's code as source (so a hospital's operator can read what will run: security.review), and signed
with the researcher's key (so the director and the envoys can tell who sent the code)."""
from __future__ import annotations

import ast
import contextlib
import io
import linecache
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import cloudpickle

from security.pickles import CELL_MODULES, bound_names, names_read
from security.review import BINDINGS, CELLS, UNSHOWN
from security.signing import signing

# Never shipped: notebooks (with their outputs), editor and Python caches, and what OpenFL itself writes.
LEFT_OUT = ("*.ipynb", ".ipynb_checkpoints", "__pycache__", "plan", "save", "logs", "*.pkl", "requirements.txt",
            "*.zip", "data", "cert", "*.crt", "*.key", "*.pem", "review")


class _Finder(cloudpickle.Pickler):
    """A pickling that keeps every function it meets (by value or by reference) and writes nothing."""

    def __init__(self):
        super().__init__(io.BytesIO())
        self.functions: list[types.FunctionType] = []

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType):
            self.functions.append(obj)
        return super().reducer_override(obj)


def review_files(objects) -> dict[str, str]:
    """The notebook's code that `objects` carry by value, as source: each cell that defines one of their functions
    or classes (review/cells/NN.py, in the order met), what those functions read from other cells
    (review/cells/bindings.py: imports, or values) and what has no source here (review/unshown.txt)."""
    finder = _Finder()
    for obj in objects:
        finder.dump(obj)
    cells, functions, unshown = {}, [], []
    for function in finder.functions:
        module = function.__module__ or ""
        if module not in CELL_MODULES and module in sys.modules:
            continue  # installed or shipped code: the node reads it where it is
        filename = function.__code__.co_filename
        text = "".join(linecache.getlines(filename))
        if not text:
            unshown.append(f"function {function.__qualname__} (from {filename}): its source is not available")
            continue
        cells.setdefault(filename, text)
        functions.append(function)
    bound, classes = bound_names(list(cells.values()))
    # The names the functions read, and those the class statements' bases start from, in the notebook's namespace
    needed = [(name, function.__globals__) for function in functions for name in sorted(names_read(function.__code__))]
    needed += [(base.id, functions[0].__globals__) for statement in classes.values() for base in
               ast.walk(ast.Module(body=[ast.Expr(b) for b in statement.bases], type_ignores=[]))
               if isinstance(base, ast.Name)]
    bindings = {}
    for name, namespace in needed:
        if name in bound or name in bindings or name not in namespace or name.startswith("__"):
            continue
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            bindings[name] = f"import {value.__name__}" + (f" as {name}" if value.__name__ != name else "")
        elif callable(value) and getattr(value, "__module__", None) in sys.modules and \
                value.__module__ not in CELL_MODULES and "." not in value.__qualname__:
            bindings[name] = f"from {value.__module__} import {value.__qualname__}" + (
                f" as {name}" if value.__qualname__ != name else "")
        else:
            bindings[name] = f"{name} = ...  # a {type(value).__name__} that another cell makes"
    files = {f"{CELLS}{n:02d}.py": text for n, text in enumerate(cells.values(), start=1)}
    files[BINDINGS] = ("# What the functions of these cells read that other cells of the notebook bind; the node "
                       "checks\n# every one against what it finds in the experiment's objects.\n"
                       + "".join(f"{line}\n" for line in bindings.values()))
    if unshown:
        files[UNSHOWN] = "".join(f"{line}\n" for line in unshown)
    return files


@contextlib.contextmanager
def _with_source() -> Iterator[None]:
    """Have every experiment packed in the block carry its notebook code as source (review_files)."""
    from openfl.interface.interactive_api.experiment import FLExperiment

    original = FLExperiment._serialize_interface_objects

    def serialize(self, model_provider, task_keeper, data_loader, task_assigner):
        original(self, model_provider, task_keeper, data_loader, task_assigner)
        objects = (model_provider, task_keeper, data_loader, task_keeper.aggregation_functions, task_assigner)
        for name, text in review_files(objects).items():
            Path(name).parent.mkdir(parents=True, exist_ok=True)
            Path(name).write_text(text)

    FLExperiment._serialize_interface_objects = serialize
    try:
        yield
    finally:
        FLExperiment._serialize_interface_objects = original


@contextlib.contextmanager
def submission(api_cert: str = "", api_key: str = "", folder: str | Path = ".") -> Iterator[Path]:
    """Submit, for the block, from a temporary copy of `folder`'s code, signed with this certificate and key if
    given (mutual TLS); the copy is removed afterwards.

    FLExperiment writes plan/, save/, pickled interface objects and requirements.txt into the working directory,
    then zips that whole directory for the director and the envoys. Created and started inside this block, it does
    so in the copy: the nodes get this folder's code (the medfl package and any module beside it) and nothing else.
    """
    source = Path(folder).resolve()
    # The block runs in the copy: certificate paths relative to where the notebook runs must not follow it there.
    api_cert, api_key = (str(Path(p).resolve()) if p else "" for p in (api_cert, api_key))
    with tempfile.TemporaryDirectory(prefix="medfl-submit-") as tmp:
        staged = Path(tmp) / source.name  # OpenFL names the archive after the folder
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns(*LEFT_OUT))
        previous = os.getcwd()
        os.chdir(staged)
        try:
            with _with_source(), signing(api_cert, api_key) if api_cert else contextlib.nullcontext():
                yield staged
        finally:
            os.chdir(previous)
