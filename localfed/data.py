"""Where `make demo` and `make baseline` get their data: a given folder, a download, or synthetic."""
from __future__ import annotations

from pathlib import Path

from medmnist_shard.files import ensure_file
from medmnist_shard.spec import DataError, check_flag, check_size, file_name
from medmnist_shard.synthetic import make_synthetic

from .federation import ROOT

SOURCES = ("download", "synthetic")
CACHE = ROOT / "data"  # git-ignored; downloads and synthetic files are kept for the next run


def resolve(flag: str, size: int, data: str = "download", data_dir: str | None = None,
            command: str = "demo") -> tuple[Path, str]:
    """(folder holding the flag's file, data_source for results.json); raises DataError before any work."""
    flag, size = check_flag(flag), check_size(size)
    if data_dir:
        folder = Path(data_dir).expanduser().resolve()
        if not (folder / file_name(flag, size)).is_file():
            raise DataError(f"data_dir {folder} has no {file_name(flag, size)}: put the MedMNIST file there "
                            "(it is used as given, never written to), or leave data_dir unset")
        return folder, "file"
    if data == "synthetic":
        folder = CACHE / "synthetic"
        if not (folder / file_name(flag, size)).is_file():
            make_synthetic(flag, size, folder)
        return folder, "synthetic"
    if data != "download":
        raise DataError(f"data={data!r}: use download or synthetic, or set data_dir")
    folder = CACHE / "medmnist"
    ensure_file(flag, size, folder, offline_hint=f"make {command} data=synthetic runs the same on generated data")
    return folder, "download"
