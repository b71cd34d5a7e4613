"""Shared fixtures: import paths, tiny synthetic MedMNIST files, and a local federation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The envoy's data package and the notebook's training package, as the nodes import them.
sys.path[:0] = [str(ROOT), str(ROOT / "envoy"), str(ROOT / "workspace")]

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
