"""Loading a shard costs the shard plus a constant: streamed rows, memory-mapped caches, identical images."""
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import roots
from medmnist_shard import FLAGS, MedMNISTShardDescriptor, files, prepare
from medmnist_shard import cache as shard_cache
from medmnist_shard.__main__ import main
from medmnist_shard.files import iter_image_rows, load_image_rows, write_npz
from medmnist_shard.spec import SPLITS, DataError

FLAG, SIZE, WORLD = "pathmnist", 128, 4
ROW = SIZE * SIZE * 3
TRAIN = 6000  # 295 MB of train images, 74 MB a shard
CONSTANT = 40 << 20  # what loading may add to the shard itself: chunk buffers, zip and zlib state
# A byte pattern that deflate squeezes quickly (the test is about memory, not compression), made
# distinct per row by an offset and the row's number in its first bytes.
PATTERN = np.tile(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8), ROW // 4096)


def _rows(n: int, block: int = 256):
    for start in range(0, n, block):
        i = np.arange(start, min(n, start + block))
        rows = PATTERN[None] + (i[:, None] % 256).astype(np.uint8)
        rows[:, :4] = i.astype("<u4").view(np.uint8).reshape(len(i), 4)
        yield rows.reshape(len(i), SIZE, SIZE, 3)


def _members(train: int):
    for split, n in (("train", train), ("val", 100), ("test", 100)):
        yield f"{split}_images", ((n, SIZE, SIZE, 3), np.uint8, _rows(n))
        yield f"{split}_labels", (np.arange(n) % 9).astype(np.uint8).reshape(n, 1)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory):
    """{"deflated": folder, "stored": folder}, each holding a pathmnist_128.npz with 6,000 train images."""
    root = tmp_path_factory.mktemp("big")
    folders = {}
    for kind in ("deflated", "stored"):
        folders[kind] = root / kind
        write_npz(folders[kind] / f"{FLAG}_{SIZE}.npz", _members(TRAIN), compress=kind == "deflated")
    return folders


MEASURE = """
import gc, hashlib, json, sys
import numpy as np
from medmnist_shard import MedMNISTShardDescriptor

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

report = []
for folder, rank, above, cache_dir in json.loads(sys.argv[1]):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from what the process holds now
    before = status("VmRSS:")
    shard = MedMNISTShardDescriptor("pathmnist", 128, folder, f"{rank},4", download=False,
                                    memory_map_above_mb=above, cache_dir=cache_dir)
    rise = status("VmHWM:") - before
    report.append({"rise": rise, "shard": shard.setup.image_bytes, "mapped": shard.setup.memory_mapped,
                   "types": [type(shard.get_dataset(s).images).__name__ for s in ("train", "val", "test")],
                   "digests": [hashlib.sha256(shard.get_dataset(s).images).hexdigest()
                               for s in ("train", "val", "test")]})
    del shard
print(json.dumps(report))
"""


def _measure(loads: list) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": roots.pythonpath("node")}
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(loads)], env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _plain_digests(folder) -> dict[int, list[str]]:
    # What the envoy served before streaming: each whole split loaded, then a node's rows picked.
    setups = {rank: prepare(FLAG, SIZE, folder, f"{rank},{WORLD}", download=False) for rank in range(1, WORLD + 1)}
    digests = {rank: [] for rank in setups}
    with np.load(setups[1].path) as npz:
        for split in SPLITS:
            images = npz[f"{split}_images"]
            for rank, setup in setups.items():
                digests[rank].append(hashlib.sha256(images[setup.indices[split]]).hexdigest())
    return digests


def test_each_shard_costs_its_own_bytes_plus_a_constant_and_serves_the_same_images(big_files, tmp_path):
    loads = [[str(big_files[kind]), rank, 4096, None] for kind in ("deflated", "stored") for rank in range(1, 5)]
    # Memory-mapped: building the cache streams too, and the shard is not held in memory at all.
    loads += [[str(big_files[kind]), 2, 0, str(tmp_path / "cache")] for kind in ("deflated", "stored")]
    report = _measure(loads)
    plain = {str(folder): _plain_digests(folder) for folder in big_files.values()}
    for (folder, rank, above, _), load in zip(loads, report, strict=True):
        where = f"{folder} shard {rank}/4 ({'memory-mapped' if above == 0 else 'in memory'})"
        assert load["mapped"] == (above == 0), where
        kept = 0 if load["mapped"] else load["shard"]
        assert load["rise"] <= kept + CONSTANT, f"{where}: peak rose {load['rise'] / 2**20:.0f} MiB"
        assert load["digests"] == plain[folder][rank], where
        assert load["types"] == (["memmap"] * 3 if load["mapped"] else ["ndarray"] * 3), where
    # Else the bounds could not tell a streamed shard from a whole split, or a mapped shard from a resident one.
    assert report[0]["shard"] + CONSTANT < TRAIN * ROW and report[0]["shard"] > CONSTANT


@pytest.mark.parametrize("compress", [True, False])
def test_streamed_rows_equal_a_plain_load_in_any_order_across_chunks(tmp_path, monkeypatch, compress):
    monkeypatch.setattr(files, "CHUNK_BYTES", 3 * 28 * 28 + 5)  # chunks of 3 rows: many chunks, ragged end
    images = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)  # grayscale: (N, H, W)
    path = write_npz(tmp_path / "f.npz", [("train_images", images)], compress=compress)
    wanted = np.array([49, 0, 7, 8, 9, 3, 48, 21])
    assert np.array_equal(load_image_rows(path, "train", wanted), images[wanted][..., None])
    assert load_image_rows(path, "train", []).shape == (0, 28, 28, 1)


def test_fortran_ordered_images_are_still_served_right(tmp_path):
    images = np.asfortranarray(np.random.default_rng(2).integers(0, 256, (10, 28, 28, 3), dtype=np.uint8))
    np.savez(tmp_path / "f.npz", train_images=images)
    assert np.array_equal(load_image_rows(tmp_path / "f.npz", "train", [9, 2]), images[[9, 2]])


def test_streaming_a_truncated_or_out_of_range_split_is_a_clear_error(tmp_path, tiny_file):
    payload = tiny_file("bloodmnist").read_bytes()
    # Cut inside train_images, keeping the zip's local header but not the whole member.
    broken = tmp_path / "bloodmnist.npz"
    broken.write_bytes(payload[: len(payload) // 3])
    with pytest.raises(DataError, match="corrupt or truncated.*delete it"):
        list(iter_image_rows(broken, "train", [0]))
    with pytest.raises(DataError, match="train_images has 24 images, so indices must lie in 0..23"):
        list(iter_image_rows(tiny_file("bloodmnist"), "train", [3, 24]))


def _pair(tiny_file, tmp_path, **params):
    path = tiny_file("dermamnist", 64, {"train": 30, "val": 9, "test": 9})  # this file's mtime is changed below
    settings = {"flag": "dermamnist", "size": 64, "data_dir": path.parent, "rank_worldsize": "2,3",
                "download": False, **params}
    resident = MedMNISTShardDescriptor(**settings)
    mapped = MedMNISTShardDescriptor(**settings, memory_map_above_mb=0, cache_dir=tmp_path / "cache")
    return resident, mapped


def test_the_memory_mapped_mode_serves_identical_batches(tiny_file, tmp_path):
    resident, mapped = _pair(tiny_file, tmp_path)
    assert not resident.setup.memory_mapped and mapped.setup.memory_mapped
    assert "memory-mapped from" in mapped.dataset_description
    for split in SPLITS:
        a, b = resident.get_dataset(split), mapped.get_dataset(split)
        assert isinstance(b.images, np.memmap) and len(a) == len(b)
        batch = list(range(len(a)))[::-1]
        for x, y in zip(a[batch], b[batch], strict=True):
            assert type(y) is np.ndarray and np.array_equal(x, y)
        image, label = b[1]  # one sample: a writable copy, as torch wants, not a view of the read-only map
        assert image.flags.writeable and np.array_equal(image, a[1][0]) and np.array_equal(label, a[1][1])


def test_caches_are_reused_while_valid_and_replaced_when_anything_changes(tiny_file, tmp_path):
    _, mapped = _pair(tiny_file, tmp_path)
    cache_dir = tmp_path / "cache"
    first = sorted(cache_dir.iterdir())
    assert len(first) == 3 and all(p.suffix == ".npy" and not p.name.startswith(".") for p in first)
    inodes = {p: p.stat().st_ino for p in first}
    _pair(tiny_file, tmp_path)  # same file, same shard: the same files, not rewritten
    assert {p: p.stat().st_ino for p in sorted(cache_dir.iterdir())} == inodes
    _, reseeded = _pair(tiny_file, tmp_path, seed=1)  # other rows: new caches, and the old ones go
    assert not set(cache_dir.iterdir()) & set(first) and len(list(cache_dir.iterdir())) == 3
    data, before = reseeded.setup.path, reseeded.setup.cache_files()
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))  # the file changed
    _, touched = _pair(tiny_file, tmp_path, seed=1)
    assert not set(touched.setup.cache_files().values()) & set(before.values())
    assert sorted(cache_dir.iterdir()) == sorted(touched.setup.cache_files().values())


def test_a_partial_cache_left_by_a_dead_writer_is_removed(tiny_file, tmp_path):
    _, mapped = _pair(tiny_file, tmp_path)
    train = mapped.setup.cache_files()["train"]
    leftover = train.parent / f".{train.name}.abc123.part"
    leftover.write_bytes(b"half")
    train.unlink()
    _pair(tiny_file, tmp_path)
    assert not leftover.exists() and train.is_file()


@pytest.mark.parametrize("params,message", [
    ({"memory_map_above_mb": "lots"}, "memory_map_above_mb 'lots' must be a number of megabytes, 0 or more"),
    ({"memory_map_above_mb": -1}, "memory_map_above_mb -1 must be a number of megabytes"),
    ({"memory_map_above_mb": True}, "memory_map_above_mb True must be a number of megabytes"),
    ({"cache_dir": 5}, "cache_dir 5 must be a folder path"),
    ({"memory_map_above_mb": 0, "cache_dir": "{file}/cache"}, "cache_dir .* is not a folder this node can write"),
])
def test_bad_memory_map_settings_are_refused(tiny_file, params, message):
    path = tiny_file("bloodmnist")
    params = {k: v.format(file=path) if isinstance(v, str) else v for k, v in params.items()}
    with pytest.raises(DataError, match=message) as err:
        MedMNISTShardDescriptor("bloodmnist", 28, path.parent, download=False, **params)
    assert len(str(err.value).splitlines()) == 1


def test_a_cache_folder_without_room_is_refused_before_writing(tiny_file, tmp_path, monkeypatch):
    path = tiny_file("bloodmnist")
    monkeypatch.setattr(shard_cache.shutil, "disk_usage", lambda folder: SimpleNamespace(free=5000))
    with pytest.raises(DataError) as err:
        MedMNISTShardDescriptor("bloodmnist", 28, path.parent, download=False, memory_map_above_mb=0,
                                cache_dir=tmp_path / "cache")
    need = 48 * 28 * 28 * 3  # every image of the tiny file: this node is shard 1 of 1
    assert str(err.value) == (f"cache_dir {tmp_path / 'cache'} has 5000 bytes free, but the memory-mapped shard "
                              f"needs {need} bytes: free space there, point cache_dir at a larger disk, or "
                              "raise memory_map_above_mb to keep the shard in memory")
    assert list((tmp_path / "cache").iterdir()) == []


def test_check_command_gives_one_line_for_bad_memory_map_settings(tiny_file, tmp_path):
    # start_envoy.sh runs this same command first and stops with its output (tested for other settings).
    config = tmp_path / "envoy_config.yaml"
    config.write_text(json.dumps({"shard_descriptor": {"params": {
        "flag": "bloodmnist", "data_dir": str(tiny_file("bloodmnist").parent), "memory_map_above_mb": "4 GB"}}}))
    env = {**os.environ, "PYTHONPATH": roots.pythonpath("node")}
    result = subprocess.run([sys.executable, "-m", "medmnist_shard", "check", str(config)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: memory_map_above_mb '4 GB' must be a number of megabytes, 0 or more: for example 4096 "
        "(0 memory-maps every shard, .inf none)"]


def test_sizes_command_prints_every_datasets_bytes_per_split(capsys):
    assert main(["sizes", "--size", "224"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")}
    assert set(FLAGS) <= set(rows)
    # PathMNIST's train split: 89,996 x 224 x 224 x 3 bytes.
    assert rows["pathmnist"].startswith("| pathmnist | 3 | 89,996 / 10,004 / 7,180 | 13.5 GB | 1.5 GB | 1.1 GB |")


def test_load_command_reports_time_peak_memory_and_a_relative_cache_dir(tiny_file, tmp_path, capsys):
    config = tmp_path / "envoy_config.yaml"
    config.write_text(json.dumps({"shard_descriptor": {"params": {
        "flag": "bloodmnist", "data_dir": str(tiny_file("bloodmnist").parent), "rank_worldsize": "1,2",
        "memory_map_above_mb": 0, "cache_dir": "cache"}}}))
    assert main(["load", str(config)]) == 0
    summary, report = capsys.readouterr().out.strip().splitlines()
    assert "shard 1/2" in summary and f"memory-mapped from {tmp_path / 'cache'}" in summary
    assert report.startswith("loaded in ") and "peak memory rose by " in report
    assert report.endswith(f"images are memory-mapped from {tmp_path / 'cache'}, not held in memory")
    assert len(list((tmp_path / "cache").glob("bloodmnist-*.npy"))) == 3  # beside the config, not in the cwd
