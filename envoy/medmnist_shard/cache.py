"""Memory-mapped shards: a node's rows of one split, written once to an uncompressed `.npy` and mapped.

A cache file holds exactly one node's rows of one split of one data file. Its name carries a hash
of everything that decides those rows (the data file's path, size, modification time and inode,
the split, the row indices and the scanner partition's acquisition, if any), so a changed file,
partition or seed never reuses an old cache.
Files appear only complete (written beside the target, then renamed), and making one deletes the
older caches of the same data file, split and shard.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .files import atomic_write, image_header, iter_image_rows, size_text
from .spec import DataError

FORMAT = 1  # part of every cache name: bump it when the layout changes, and old caches are never read


def default_cache_dir() -> Path:
    """Where memory-mapped shards live unless the config names a folder: $XDG_CACHE_HOME/medmnist_shard."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medmnist_shard"


def cache_path(cache_dir: Path, data_path: Path, split: str, indices: np.ndarray, shard: str,
               transform: str = "") -> Path:
    """The cache file for these rows of this split of this exact data file, as `transform` (a key naming what the
    rows pass through before they are written; empty: nothing) leaves them."""
    data_path = Path(data_path).resolve()
    stat = data_path.stat()
    where = hashlib.sha256(str(data_path).encode()).hexdigest()[:8]
    identity = json.dumps([FORMAT, str(data_path), stat.st_size, stat.st_mtime_ns, stat.st_ino, split, transform])
    key = hashlib.sha256(identity.encode() + np.asarray(indices, "<i8").tobytes()).hexdigest()[:16]
    # Everything before the key names the caches that a new one of the same file and shard replaces.
    return Path(cache_dir) / f"{data_path.stem}-{where}-{split}-{shard}-{key}.npy"


def is_complete(path: Path, n_rows: int, sample: tuple) -> bool:
    """True if path is a finished cache of n_rows images of shape `sample`."""
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return images.shape == (n_rows, *sample) and images.dtype == np.uint8


def check_cache_dir(cache_dir: Path, need_bytes: int) -> Path:
    """Create the cache folder if needed and make sure it takes need_bytes more; DataError otherwise."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass  # a write test: read-only mounts and foreign folders fail here, not halfway through
    except OSError as exc:
        raise DataError(
            f"cache_dir {cache_dir} is not a folder this node can write ({exc.strerror or exc}): set cache_dir "
            f"in the envoy config to a writable folder with {size_text(need_bytes)} free for the memory-mapped shard"
        ) from None
    free = shutil.disk_usage(cache_dir).free
    if need_bytes > free:
        raise DataError(
            f"cache_dir {cache_dir} has {size_text(free)} free, but the memory-mapped shard needs "
            f"{size_text(need_bytes)}: free space there, point cache_dir at a larger disk, or raise "
            "memory_map_above_mb to keep the shard in memory"
        )
    return cache_dir


def mapped_images(data_path: Path, split: str, indices, cache_dir: Path, shard: str, transform=None) -> np.ndarray:
    """The split's images at `indices` as a read-only memory map, written to cache_dir once and then reused;
    `transform` (scanner.Acquisition, or None), if given, is applied to them before they are written."""
    indices = np.asarray(indices, np.int64)
    target = cache_path(cache_dir, data_path, split, indices, shard, transform.cache_key if transform else "")
    shape, dtype = image_header(data_path, split)
    if not is_complete(target, len(indices), shape[1:]):
        _write(target, data_path, split, indices, (len(indices), *shape[1:]), dtype, transform)
    _remove_stale(target)
    return np.load(target, mmap_mode="r")


def _write(target: Path, data_path: Path, split: str, indices: np.ndarray, shape: tuple, dtype: np.dtype, transform):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    start = len(header.getvalue())
    row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
    with atomic_write(target) as out:
        fd = out.fileno()
        # The lock tells _remove_stale in other processes that this partial file is still being written.
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, header.getvalue())
        # Plain writes rather than writing through a map: mapped pages would count as this process's memory.
        for positions, rows in iter_image_rows(data_path, split, indices):
            rows = np.ascontiguousarray(transform(rows) if transform else rows)
            if positions[-1] - positions[0] == len(positions) - 1 and np.all(np.diff(positions) == 1):
                _write_all(fd, memoryview(rows).cast("B"), start + int(positions[0]) * row_bytes)
            else:
                for position, row in zip(positions, rows, strict=True):
                    _write_all(fd, memoryview(row).cast("B"), start + int(position) * row_bytes)
        os.ftruncate(fd, start + shape[0] * row_bytes)  # an empty shard still ends where its header says


def _write_all(fd: int, data: memoryview, offset: int):
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _remove_stale(keep: Path):
    # Older caches of the same file and shard: a changed file, partition or seed made them useless.
    # A process that still maps one keeps its pages: unlinking a mapped file does not take them away.
    prefix = keep.name[:keep.name.rindex("-") + 1]
    for entry in keep.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".npy") and entry != keep:
            with contextlib.suppress(OSError):  # gone already, or a read-only folder: nothing to clean
                entry.unlink()
        elif entry.name.startswith(f".{prefix}") and entry.name.endswith(".part"):
            _remove_abandoned(entry)


def _remove_abandoned(partial: Path):
    # A partial file nobody holds a lock on was left by a process that died while writing it.
    try:
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        partial.unlink(missing_ok=True)
    except OSError:
        pass  # still being written (locked), or not ours to delete
    finally:
        os.close(fd)
