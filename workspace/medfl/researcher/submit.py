"""Where and how OpenFL submits: from a temporary copy of the notebook's folder (so that folder stays as it is),
and signed with the researcher's key (so the director and the envoys can tell who sent the code)."""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from security.signing import signing

# Never shipped: notebooks (with their outputs), editor and Python caches, and what OpenFL itself writes.
LEFT_OUT = ("*.ipynb", ".ipynb_checkpoints", "__pycache__", "plan", "save", "logs", "*.pkl", "requirements.txt",
            "*.zip", "data", "cert", "*.crt", "*.key", "*.pem")


def personalizing(tasks, epochs: int):
    """A copy of the notebook's TaskInterface whose train task fine-tunes for `epochs` epochs on the plain loss
    (no DP-SGD, no distillation): each envoy's own model, which never leaves it (algorithms.local_plan's personalize),
    so that only its test scores do."""
    copied = copy.copy(tasks)
    copied.task_settings = copy.copy(tasks.task_settings)
    copied.task_settings["train"] = {**tasks.task_settings["train"], "epochs": epochs, "privacy": None,
                                     "distill": None}
    return copied


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
            with signing(api_cert, api_key) if api_cert else contextlib.nullcontext():
                yield staged
        finally:
            os.chdir(previous)
