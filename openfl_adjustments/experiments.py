"""Code that an experiment brings leaves with it.

OpenFL unpacks each experiment into a folder, puts that folder on sys.path, and deletes it when the experiment
ends; but the modules imported from it stay in sys.modules. The next experiment's `import medfl` would then get the
first experiment's code, however the researcher changed it since (and a submodule first imported later would not
be found in the deleted folder). Here those modules are forgotten when their folder goes.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from .patching import replace


def modules_from(folder: Path) -> list[str]:
    """Names of the imported modules whose files lie inside `folder`."""
    folder = Path(folder).resolve()
    found = []
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if source and Path(source).resolve().is_relative_to(folder):
            found.append(name)
    return found


def forgetting_modules(exit_workspace):
    """ExperimentWorkspace.__exit__ that also forgets the modules imported from the experiment's folder."""

    def wrapper(self, *exc):
        try:
            return exit_workspace(self, *exc)
        finally:
            for name in modules_from(self.experiment_work_dir):
                del sys.modules[name]
            importlib.invalidate_caches()

    return wrapper


def install() -> None:
    """Forget an experiment's modules when its workspace is removed."""
    from openfl.utilities.workspace import ExperimentWorkspace

    replace(ExperimentWorkspace, "__exit__", forgetting_modules)
