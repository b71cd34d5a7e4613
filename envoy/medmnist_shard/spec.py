"""What a MedMNIST 2D dataset looks like, read from medmnist.INFO rather than written down."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _medmnist_info() -> dict:
    """medmnist.INFO, from the package's info module alone where it can: `import medmnist` also imports its datasets
    and evaluator, with torch, scikit-learn and PIL (2 s here), which describing and checking a shard never needs."""
    if "medmnist" not in sys.modules:
        package = importlib.util.find_spec("medmnist")
        where = Path((package.submodule_search_locations or [""])[0]) / "info.py" if package else None
        if where is not None and where.is_file():
            module_spec = importlib.util.spec_from_file_location("medmnist_shard._medmnist_info", where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            if isinstance(getattr(module, "INFO", None), dict):
                return module.INFO
    import medmnist

    return medmnist.INFO


INFO = _medmnist_info()
# The 12 2D datasets; INFO also describes the 3D ones, whose flags end in "3d".
FLAGS = tuple(flag for flag in INFO if not flag.endswith("3d"))
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
MULTI_LABEL = "multi-label, binary-class"


class DataError(ValueError):
    """A dataset, file or shard setting that cannot be served; the message says how to fix it."""


def check_flag(flag: str) -> str:
    """Return the flag if it is one of the 12 MedMNIST 2D datasets, else raise DataError."""
    if flag not in FLAGS:
        raise DataError(f"unknown dataset {flag!r}: choose one of {', '.join(FLAGS)}")
    return flag


def check_size(size) -> int:
    """Return the image size as an int if MedMNIST publishes it, else raise DataError."""
    try:
        value = int(size)
    except (TypeError, ValueError):
        value = None
    if value not in SIZES or str(size).strip() != str(value):
        raise DataError(f"unsupported image size {size!r}: choose one of {', '.join(map(str, SIZES))}")
    return value


def info(flag: str) -> dict:
    """medmnist.INFO's entry for a flag."""
    return INFO[check_flag(flag)]


def n_channels(flag: str) -> int:
    """1 for grayscale datasets, 3 for RGB ones."""
    return info(flag)["n_channels"]


def label_width(flag: str) -> int:
    """Columns of the label array: one per finding for multi-label, else a single class index."""
    meta = info(flag)
    return len(meta["label"]) if meta["task"] == MULTI_LABEL else 1


def sample_shape(flag: str, size) -> list[int]:
    """Shape of one served image: height, width, channels (grayscale gets a channel axis too)."""
    size = check_size(size)
    return [size, size, n_channels(flag)]


def target_shape(flag: str) -> list[int]:
    """Shape of one served label row."""
    return [label_width(flag)]


def file_name(flag: str, size) -> str:
    """MedMNIST's file name: `{flag}.npz` at 28 px, `{flag}_{size}.npz` otherwise."""
    size = check_size(size)
    return f"{check_flag(flag)}.npz" if size == 28 else f"{flag}_{size}.npz"


def url_and_md5(flag: str, size) -> tuple[str, str]:
    """The official download URL and MD5 of a flag at a size."""
    size = check_size(size)
    meta = info(flag)
    suffix = "" if size == 28 else f"_{size}"
    return meta[f"url{suffix}"], meta[f"MD5{suffix}"]
