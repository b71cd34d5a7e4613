"""What the notebook learns about the federation before it submits anything: who is online, what each envoy
serves, whether that fits the parameters, and what the task's images look like."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import medmnist
import numpy as np

from ..model import MULTI_LABEL
from ..selection import quorum
from .parameters import ParameterError


def envoy_table(shard_registry: dict) -> list[dict]:
    """One row per registered envoy: name, online, and what its shard descriptor says it serves."""
    envoys = []
    for name, entry in sorted(shard_registry.items()):
        description = entry["shard_info"].shard_description
        try:
            served = json.loads(description)
        except ValueError:  # a shard descriptor other than this project's
            served = {"text": description}
        envoys.append({"envoy": name, "online": entry["is_online"], **served})
    return envoys


def is_synthetic(envoys: list[dict]) -> bool:
    """True if any envoy serves synthetic data."""
    return any(e.get("synthetic") or "SYNTHETIC" in e.get("text", "") for e in envoys)


def check_quorum(envoys: list[dict], min_envoys) -> None:
    """Raise ParameterError if fewer envoys are online than min_envoys asks to keep."""
    online = [e["envoy"] for e in envoys if e["online"]]
    if len(online) < quorum(min_envoys, len(online)):
        raise ParameterError(f"min_envoys={min_envoys!r}, but only {len(online)} envoys are online "
                             f"({', '.join(online) or 'none'}): start more envoys or lower min_envoys")


def check_dataset(federation, flag: str, size: int, envoys: list[dict] = ()) -> None:
    """Raise ParameterError unless the director and every envoy serve flag at size, naming the envoys."""
    served_by = {}
    for envoy in envoys:
        if "flag" in envoy:
            served_by.setdefault(f"{envoy['flag']} {envoy['size']}px", []).append(envoy["envoy"])
    if len(served_by) > 1:
        mix = "; ".join(f"{what}: {', '.join(names)}" for what, names in served_by.items())
        raise ParameterError(f"the envoys serve different datasets ({mix}): give them all the same flag and size")
    if served_by and f"{flag} {size}px" not in served_by:
        (what, names), = served_by.items()
        raise ParameterError(f"the envoys ({', '.join(names)}) serve {what}, not {flag} {size}px: "
                             "set `dataset` and `size` to what they serve")
    meta = medmnist.INFO[flag]
    sample = [str(size), str(size), str(meta["n_channels"])]
    target = [str(len(meta["label"]) if meta["task"] == MULTI_LABEL else 1)]
    served = (list(federation.sample_shape), list(federation.target_shape))
    if served != (sample, target):
        raise ParameterError(
            f"the federation serves samples {served[0]} with labels {served[1]}, but {flag} at {size} px "
            f"needs {sample} and {target}: set `dataset` and `size` to what the envoys serve"
        )


def check_envoys(shard_registry: dict, federation, flag: str, size: int, min_envoys) -> tuple[list[dict], bool]:
    """The envoy table of the director's shard registry (envoy_table), and whether they serve synthetic data, which
    is said here in one line; ParameterError, naming the envoys, if they serve another dataset than `flag` at `size`
    (check_dataset) or fewer are online than `min_envoys` asks to keep (check_quorum)."""
    envoys = envoy_table(shard_registry)
    check_dataset(federation, flag, size, envoys)
    check_quorum(envoys, min_envoys)
    synthetic = is_synthetic(envoys)
    if synthetic:
        print("NOTE: the envoys serve SYNTHETIC data; the results below say nothing about MedMNIST.")
    return envoys, synthetic


# --- a look at the task -------------------------------------------------------------------------------------
def _file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def local_copy(flag: str, size: int, folder: str | Path, synthetic: bool) -> Path | None:
    """A file of the public dataset (or, for synthetic envoys, of the synthetic stand-in) on this machine."""
    folder = Path(folder)
    kinds = ("synthetic",) if synthetic else ("medmnist", ".")
    for candidate in (folder / kind / _file_name(flag, size) for kind in kinds):
        if candidate.is_file():
            return candidate
    return None


def read_rows(path: Path, key: str, stop: int) -> np.ndarray:
    """The first `stop` rows of one array of an .npz, decompressing no more of the file than they need."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}: {key} is stored as .npy version {version}; expected 1.0 or 2.0")
        shape, fortran, dtype = read_header(member)
        if fortran:
            raise ValueError(f"{path} stores {key} in Fortran order; expected MedMNIST's C order")
        rows = min(stop, shape[0])
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        data = member.read(rows * row_items * dtype.itemsize)
    return np.frombuffer(data, dtype).reshape(rows, *shape[1:])


def sample_grid(flag: str, size: int, path: Path, per_class: int = 2, max_classes: int = 8):
    """A matplotlib figure of test images from the file at `path`: a column per class (or finding, for
    multi-label sets), `per_class` rows, each image titled with its labels' names."""
    import matplotlib.pyplot as plt

    meta = medmnist.INFO[flag]
    labels = read_rows(path, "test_labels", 1 << 30)
    multi = meta["task"] == MULTI_LABEL
    columns = []
    for k in range(min(len(meta["label"]), max_classes)):
        hits = np.flatnonzero(labels[:, k] == 1 if multi else labels[:, 0] == k)[:per_class]
        if len(hits):
            columns.append([int(i) for i in hits])
    last = max(i for column in columns for i in column)
    images = read_rows(path, "test_images", last + 1)
    fig, axes = plt.subplots(per_class, len(columns), figsize=(1.3 * len(columns), 1.45 * per_class + 0.4),
                             squeeze=False)
    for c, column in enumerate(columns):
        for r in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if r < len(column):
                i = column[r]
                ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None)
                names = [meta["label"][str(k)] for k in (np.flatnonzero(labels[i]) if multi else [labels[i, 0]])]
                ax.set_title(", ".join(_short(n, 14) for n in names), fontsize=7)
    return fig


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def show_samples(flag: str, size: int, synthetic: bool, folder: str | Path) -> None:
    """Show test images per class from a local copy of the dataset, or say why there is none to show."""
    import matplotlib.pyplot as plt

    path = local_copy(flag, size, folder, synthetic)
    what = "SYNTHETIC stand-in" if synthetic else "MedMNIST"
    if path is None:
        print(f"(no local copy of {what} {flag} {size}px under {folder} to preview: the envoys' images never "
              "leave them; `make demo` keeps one in data/)")
        return
    fig = sample_grid(flag, size, path)
    fig.suptitle(f"{flag} {size}px: {what} test images from {path.name} on this machine, not from the envoys",
                 fontsize=8)
    fig.tight_layout()
    plt.show()
