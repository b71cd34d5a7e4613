"""MedMNIST `.npz` files: find, download (resumable, MD5-checked, atomic), inspect, stream rows out, write."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .spec import SPLITS, DataError, file_name, label_width, sample_shape, url_and_md5

DOWNLOAD_TIMEOUT_S = 60
RETRIES = 5  # reconnections in a row that receive nothing, once a download has started, before giving up
RETRY_PAUSE_S = 2.0  # times the number of such reconnections so far
# Decompressed bytes held at once while streaming a split's images: with the zip reader's own
# buffers, a few times this is the constant that loading a shard adds to the shard itself.
CHUNK_BYTES = 4 << 20
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
            out.flush()
            os.fsync(fd)  # a file renamed into place before its bytes reach the disk could read as zeros after a crash
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; data files are ordinary files
            os.replace(partial, target)  # while still open: a lock the caller took on it is held until then
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def write_npz(target: Path, members, compress: bool = True) -> Path:
    """Write an .npz atomically from (key, array or (shape, dtype, blocks of rows)) pairs, streamed in order."""
    # Pairs and blocks are consumed lazily, so no member needs to fit in memory.
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


def download(flag: str, size: int, data_dir: Path, progress: bool | None = None, offline_hint: str = "") -> Path:
    """Fetch the official file into data_dir, resuming a partial one; MD5-check it; move it into place atomically."""
    # progress: a progress bar on stderr; None shows it only on a terminal, where someone watches.
    url, md5 = url_and_md5(flag, size)
    data_dir = Path(data_dir)
    target = data_dir / file_name(flag, size)
    # Named after the MD5, so a partial file of another version of the data is never resumed.
    partial = data_dir / f".{target.name}.{md5}.part"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with _folder_lock(data_dir):
            if target.is_file():
                return target  # another process fetched it while this one waited
            digest, resumed = _fetch(url, partial, progress)
            if digest != md5 and resumed:
                # The bytes kept from before may be what is wrong: fetch the whole file once more.
                print(f"MD5 of the resumed download of {url} is wrong; downloading it again from the start",
                      file=sys.stderr)
                partial.unlink()
                digest, _ = _fetch(url, partial, progress)
            if digest != md5:
                partial.unlink()
                raise DataError(
                    f"download of {url} is corrupt (MD5 {digest}, expected {md5}); "
                    f"nothing was written to {target}. Try again, or put the file there by hand"
                )
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o666 & ~umask)
            os.replace(partial, target)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        http_error = isinstance(exc, urllib.error.HTTPError)
        reason = f"HTTP {exc.code} {exc.reason}" if http_error else getattr(exc, "reason", None) or exc
        kept = partial.stat().st_size if partial.is_file() else 0
        if partial.is_file() and not kept:
            partial.unlink()
        resume = f"{size_text(kept)} kept in {partial}; run again to resume. " if kept else ""
        raise DataError(
            f"cannot download {url} ({reason}). {resume}Put the MedMNIST file at {target}, "
            f"or use synthetic data: {offline_hint or synthetic_hint(flag, size, data_dir)}"
        ) from None
    return target


@contextlib.contextmanager
def _folder_lock(folder: Path):
    # Two envoys sharing a data folder must not write one partial file at once; the second waits.
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that downloads into {folder}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fetch(url: str, partial: Path, progress: bool | None) -> tuple[str, bool]:
    # Appends to `partial` until the server has sent everything, reconnecting with a Range request
    # after a dropped connection; returns the MD5 of the whole file and whether it resumed old bytes.
    name = partial.name[1:partial.name.index(".npz") + 4]  # the target's name, for messages
    have = partial.stat().st_size if partial.is_file() else 0
    resumed = have > 0
    digest = hashlib.md5()
    if have:
        with open(partial, "rb") as old:
            while chunk := old.read(1 << 20):
                digest.update(chunk)
    bar = None
    flowed, stalled = False, 0  # whether any byte arrived in this call; attempts in a row that got none
    try:
        while True:
            before = have
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                            timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    if have and (resp.status != 206 or not _range_starts_at(resp, have)):
                        # A server that ignores Range sends the whole file: keep none of the old bytes.
                        resumed, have, digest = False, 0, hashlib.md5()
                    length = resp.headers.get("Content-Length")
                    total = have + int(length) if length and length.isdigit() else None
                    on_disk = partial.stat().st_size if partial.is_file() else 0
                    if total is not None:
                        _check_space(name, partial.parent, total - on_disk)
                    if bar is None:
                        bar = _progress_bar(name, url, partial.parent, total, have, progress)
                    elif bar.n != have:
                        bar.reset(total=total)
                        bar.update(have)
                    with open(partial, "r+b" if on_disk else "wb") as out:
                        out.seek(have)
                        out.truncate()
                        while chunk := resp.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            have += len(chunk)
                            bar.update(len(chunk))
                    if total is None or have == total:
                        return digest.hexdigest(), resumed
                    raise ConnectionError(f"connection closed after {have} of {total} bytes")
            except urllib.error.HTTPError as exc:
                if exc.code != 416 or not have:
                    raise
                # "Range not satisfiable": the partial file is as long as the file, or longer. Start over.
                resumed, have, digest = False, 0, hashlib.md5()
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                flowed = flowed or have > before
                stalled = 0 if have > before else stalled + 1
                # Offline, the first attempt fails at once; once bytes flowed, a few empty retries are allowed.
                if stalled > (RETRIES if flowed else 0):
                    raise
                time.sleep(RETRY_PAUSE_S * stalled)
    finally:
        if bar is not None:
            bar.close()


def _range_starts_at(resp, offset: int) -> bool:
    return (resp.headers.get("Content-Range") or "").startswith(f"bytes {offset}-")


def _check_space(name: str, folder: Path, need: int):
    # Before the first byte of a multi-gigabyte file lands, not halfway through it.
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DataError(
            f"not enough disk space to download {name} into {folder}: it needs {size_text(need)}, "
            f"{size_text(free)} is free. Free some space there or choose another data_dir"
        )


def _progress_bar(name: str, url: str, folder: Path, total: int | None, have: int, progress: bool | None) -> tqdm:
    size = size_text(total) if total is not None else "size unknown"
    verb = f"resuming at {size_text(have)}:" if have else "downloading"
    print(f"{verb} {url} ({size}) into {folder}", file=sys.stderr)
    return tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name,
                disable=None if progress is None else not progress, file=sys.stderr, mininterval=1.0)


def ensure_file(flag: str, size: int, data_dir: Path, allow_download: bool = True, offline_hint: str = "") -> Path:
    """Path of the flag's file in data_dir, downloading it first when missing and allowed."""
    path = Path(data_dir) / file_name(flag, size)
    if path.is_file():
        return path
    if not allow_download:
        raise DataError(
            f"missing {path}: put the MedMNIST file there, enable downloads, "
            f"or use synthetic data: {synthetic_hint(flag, size, data_dir)}"
        )
    return download(flag, size, data_dir, offline_hint=offline_hint)


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
                image_sample = _sample(image_shape)
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
                yield order, load_images(path, split)[wanted]
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


def load_image_rows(path: Path, split: str, indices, transform=None) -> np.ndarray:
    """The split's images at `indices` (uint8 (len, H, W, C)), through `transform` if given (uint8 images in, the
    same shape out; scanner.Acquisition); memory: those rows plus a bounded constant."""
    shape, dtype = image_header(path, split)
    out = np.empty((len(indices), *shape[1:]), dtype)
    for positions, rows in iter_image_rows(path, split, indices):
        out[positions] = transform(rows) if transform else rows
    return out
