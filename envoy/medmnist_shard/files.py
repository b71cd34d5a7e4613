"""MedMNIST `.npz` files: find, download (MD5-checked, atomic), inspect and load."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .spec import SPLITS, DataError, file_name, label_width, sample_shape, url_and_md5

DOWNLOAD_TIMEOUT_S = 60
# Decompressed bytes held at once while streaming a split's images: with the zip reader's own
# buffers, a few times this is the constant that loading a shard adds to the shard itself.
CHUNK_BYTES = 8 << 20
# What a damaged file raises while it is read: zipfile, numpy's header parser and zlib.
CORRUPT = (zipfile.BadZipFile, EOFError, ValueError, KeyError, zlib.error)

logger = logging.getLogger(__name__)


def size_text(n_bytes: float) -> str:
    """Bytes for messages, in decimal units: '13.5 GB', '230 MB', '512 bytes'."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes >= 1e6 else f"{int(n_bytes)} bytes"


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


def write_npz(target: Path, members, compress: bool = True) -> Path:
    """Write an .npz atomically from (key, value) pairs, consumed in order; a value is an array, or
    (shape, dtype, blocks) whose blocks of rows are streamed, so no member need fit in memory."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_write(Path(target)) as fp, zipfile.ZipFile(fp, "w", method, allowZip64=True) as archive:
        for key, value in members:
            shape, dtype, blocks = value if isinstance(value, tuple) else (value.shape, value.dtype, None)
            dtype, rows = np.dtype(dtype), 0
            with archive.open(f"{key}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(
                    out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
                if blocks is None:
                    out.write(np.ascontiguousarray(value).tobytes())
                    continue
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype)
                    if block.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{key}: a block of shape {block.shape} in an array of shape {shape}")
                    out.write(memoryview(block).cast("B"))
                    rows += len(block)
            if rows != shape[0]:
                raise ValueError(f"{key}: {rows} rows written, but its header says {shape[0]}")
    return Path(target)


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


def _read_header(fp) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(fp)


def _header(archive: zipfile.ZipFile, key: str) -> tuple[tuple, np.dtype]:
    with archive.open(f"{key}.npy") as fp:
        shape, _, dtype = _read_header(fp)
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
    except CORRUPT as exc:
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
    except (*CORRUPT, OSError) as exc:
        raise _corrupt(path, exc) from None


def _sample(shape: tuple) -> tuple:
    # Grayscale files store (N, H, W); served images always have a channel axis.
    return tuple(shape[1:]) if len(shape) == 4 else (*shape[1:], 1)


def image_header(path: Path, split: str) -> tuple[tuple, np.dtype]:
    """(N, H, W, C) and dtype of a split's images, from the array header alone."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{split}_images.npy") as fp:
            shape, _, dtype = _read_header(fp)
    except (*CORRUPT, OSError) as exc:
        raise _corrupt(path, exc) from None
    return (shape[0], *_sample(shape)), dtype


def iter_image_rows(path: Path, split: str, indices):
    """Yield (positions, rows) until rows[j] == images[indices[positions[j]]] for every position.

    The split is read once, front to back, CHUNK_BYTES of decompressed pixels at a time, from a
    deflated or a stored member alike; only the rows asked for are copied out of each chunk.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    order = np.argsort(indices, kind="stable")
    wanted = indices[order]
    key = f"{split}_images"
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fp:
            shape, fortran, dtype = _read_header(fp)
            n, sample = shape[0], _sample(shape)
            if len(wanted) and (wanted[0] < 0 or wanted[-1] >= n):
                raise DataError(f"{path}: {key} has {n} images, so indices must lie in 0..{n - 1}")
            if fortran and len(shape) > 1:
                # Column-major pixels put no image in one contiguous run: nothing to stream by rows.
                logger.warning("%s: %s is stored in Fortran order; loading the whole split to pick rows", path, key)
                yield order, _load(path, key).reshape(n, *sample)[wanted]
                return
            row_bytes = dtype.itemsize * math.prod(sample)
            step = max(1, CHUNK_BYTES // max(row_bytes, 1))
            done = 0
            for start in range(0, n, step):
                count = min(step, n - start)
                data = fp.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise EOFError(f"{key} ends after {start + len(data) // row_bytes} of {n} images")
                end = done + int(np.searchsorted(wanted[done:], start + count))
                if end > done:
                    block = np.frombuffer(data, dtype).reshape(count, *sample)
                    yield order[done:end], block[wanted[done:end] - start]
                    done = end
            fp.read()  # reaching the end makes zipfile check the member's CRC
    except (*CORRUPT, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise _corrupt(path, exc) from None


def load_image_rows(path: Path, split: str, indices) -> np.ndarray:
    """The split's images at `indices` (uint8 (len, H, W, C)); memory: those rows plus a bounded constant."""
    shape, dtype = image_header(path, split)
    out = np.empty((len(indices), *shape[1:]), dtype)
    for positions, rows in iter_image_rows(path, split, indices):
        out[positions] = rows
    return out
