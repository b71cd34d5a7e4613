"""Shared fixtures: import paths, tiny synthetic MedMNIST files, and a local federation."""
from __future__ import annotations

from pathlib import Path

import pytest

import roots

ROOT = Path(__file__).resolve().parents[1]
assert roots.REPOSITORY == ROOT, f"this environment's .pth names {roots.REPOSITORY}, not {ROOT}: run make venv here"
# The tests use all three roots: the repository's, the envoy's data package and the notebook's training package.
roots.join("launcher")

from medmnist_shard.synthetic import make_synthetic  # noqa: E402

TINY = {"train": 24, "val": 12, "test": 12}


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory):
    """make(flag, size, sizes=TINY) -> path of a synthetic file, written once per session."""
    root = tmp_path_factory.mktemp("synthetic")
    made = {}

    def make(flag: str, size: int = 28, sizes: dict | None = None) -> Path:
        key = (flag, size, tuple(sorted((sizes or TINY).items())))
        if key not in made:
            folder = root / f"{flag}-{size}-{len(made)}"
            made[key] = make_synthetic(flag, size, folder, sizes or TINY, seed=len(made))
        return made[key]

    return make
