"""MedMNIST `.npz` files: find, download (MD5-checked, atomic), inspect and load."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from .spec import SPLITS, DataError, file_name, label_width, sample_shape, url_and_md5

DOWNLOAD_TIMEOUT_S = 60


def synthetic_hint(flag: str, size: int, data_dir: Path) -> str:
    """The command that writes a synthetic stand-in for a missing file."""
    package_parent = Path(__file__).resolve().parents[1]
    return f"PYTHONPATH={package_parent} python -m medmnist_shard make-synthetic {flag} --size {size} --out {data_dir}"


@contextlib.contextmanager
def atomic_write(target: Path):
    """Yield a binary file that appears at `target` only if the block completes; no half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # The partial file lives beside the target so the final rename is atomic on one filesystem.
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # mkstemp makes 0600; data files are ordinary files
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def download(flag: str, size: int, data_dir: Path) -> Path:
    """Fetch the official file into data_dir, verify its MD5 and move it into place atomically."""
    url, md5 = url_and_md5(flag, size)
    data_dir = Path(data_dir)
    target = data_dir / file_name(flag, size)
    digest = hashlib.md5()
    try:
        with atomic_write(target) as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != md5:
                raise DataError(
                    f"download of {url} is corrupt (MD5 {digest.hexdigest()}, expected {md5}); "
                    f"nothing was written to {target}. Try again, or put the file there by hand"
                )
    except (urllib.error.URLError, OSError) as exc:
        http = isinstance(exc, urllib.error.HTTPError)
        reason = f"HTTP {exc.code} {exc.reason}" if http else getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download {url} ({reason}). Put the MedMNIST file at {target}, "
            f"or use synthetic data: {synthetic_hint(flag, size, data_dir)}"
        ) from None
    return target


def ensure_file(flag: str, size: int, data_dir: Path, allow_download: bool = True) -> Path:
    """Path of the flag's file in data_dir, downloading it first when missing and allowed."""
    path = Path(data_dir) / file_name(flag, size)
    if path.is_file():
        return path
    if not allow_download:
        raise DataError(
            f"missing {path}: put the MedMNIST file there, enable downloads, "
            f"or use synthetic data: {synthetic_hint(flag, size, data_dir)}"
        )
    return download(flag, size, data_dir)


def _header(archive: zipfile.ZipFile, key: str) -> tuple[tuple, np.dtype]:
    with archive.open(f"{key}.npy") as fp:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fp)
    return shape, dtype


def inspect(path: Path, flag: str, size: int) -> dict[str, int]:
    """Check keys, shapes and dtypes from the array headers (no pixels read); return split sizes."""
    path = Path(path)
    want_image = tuple(sample_shape(flag, size))
    want_label = label_width(flag)
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
            missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in keys]
            if missing:
                raise DataError(
                    f"{path} lacks {', '.join(missing)}: it is not a MedMNIST file for {flag}; "
                    "replace it with the official one or a synthetic one"
                )
            counts = {}
            for split in SPLITS:
                image_shape, image_dtype = _header(archive, f"{split}_images")
                label_shape, _ = _header(archive, f"{split}_labels")
                # Grayscale files store (N, H, W); RGB ones (N, H, W, 3).
                image_sample = image_shape[1:] if len(image_shape) == 4 else (*image_shape[1:], 1)
                if image_sample != want_image or image_dtype != np.uint8:
                    raise DataError(
                        f"{path}: {split}_images is {image_dtype} {image_shape}, expected uint8 "
                        f"(N, {', '.join(map(str, want_image))}) for {flag} at {size} px; is the size right?"
                    )
                label_cols = label_shape[1] if len(label_shape) == 2 else 1
                if len(label_shape) not in (1, 2) or label_cols != want_label:
                    raise DataError(f"{path}: {split}_labels has shape {label_shape}, expected (N, {want_label})")
                if image_shape[0] != label_shape[0]:
                    raise DataError(
                        f"{path}: {split} has {image_shape[0]} images but {label_shape[0]} labels; "
                        "the file is inconsistent, replace it"
                    )
                counts[split] = int(image_shape[0])
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError) as exc:
        if isinstance(exc, DataError):
            raise
        raise _corrupt(path, exc) from None
    return counts


def _corrupt(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path} is corrupt or truncated ({exc}); delete it and download or generate it again")


def load_images(path: Path, split: str) -> np.ndarray:
    """One split's images as uint8 (N, H, W, C); grayscale files get their channel axis here."""
    images = _load(path, f"{split}_images")
    return images[..., None] if images.ndim == 3 else images


def load_labels(path: Path, split: str, flag: str) -> np.ndarray:
    """One split's labels as int64 (N, label width)."""
    labels = _load(path, f"{split}_labels")
    return labels.reshape(len(labels), label_width(flag)).astype(np.int64)


def _load(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path) as npz:
            return npz[key]
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise _corrupt(path, exc) from None
