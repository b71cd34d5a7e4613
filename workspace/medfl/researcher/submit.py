"""Where OpenFL does its submitting: a temporary copy of the notebook's folder, so that folder stays as it is."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Never shipped: notebooks (with their outputs), editor and Python caches, and what OpenFL itself writes.
LEFT_OUT = ("*.ipynb", ".ipynb_checkpoints", "__pycache__", "plan", "save", "logs", "*.pkl", "requirements.txt",
            "*.zip", "data", "cert", "*.crt", "*.key", "*.pem")


@contextlib.contextmanager
def staging(folder: str | Path = ".") -> Iterator[Path]:
    """Work, for the block, in a temporary copy of `folder`'s code; the copy is removed afterwards.

    FLExperiment writes plan/, save/, pickled interface objects and requirements.txt into the working directory,
    then zips that whole directory for the director and the envoys. Created and started inside this block, it does
    so in the copy: the nodes get this folder's code (the medfl package and any module beside it) and nothing else.
    """
    source = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="medfl-submit-") as tmp:
        staged = Path(tmp) / source.name  # OpenFL names the archive after the folder
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns(*LEFT_OUT))
        previous = os.getcwd()
        os.chdir(staged)
        try:
            yield staged
        finally:
            os.chdir(previous)
