"""Command line: `python -m medmnist_shard {check,load,download,make-synthetic,sizes} ...`."""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import yaml

from .descriptor import MedMNISTShardDescriptor, prepare
from .files import download, size_text
from .spec import FLAGS, SIZES, SPLITS, DataError, check_flag, check_size, info, n_channels
from .synthetic import make_synthetic, split_sizes


def _shard_params(config_path: Path) -> dict:
    if not config_path.is_file():
        raise DataError(f"envoy config {config_path} does not exist")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"envoy config {config_path} is not valid YAML: {exc}") from None
    params = dict((config.get("shard_descriptor") or {}).get("params") or {})
    # Relative folders are relative to the config, which is where the envoy runs.
    params["data_dir"] = config_path.parent / params.get("data_dir", "data")
    if isinstance(params.get("cache_dir"), str) and params["cache_dir"].strip():
        params["cache_dir"] = config_path.parent / Path(params["cache_dir"]).expanduser()
    return params


def _with_config(config_path: Path, make):
    try:
        return make(**_shard_params(config_path))
    except TypeError as exc:
        raise DataError(f"envoy config {config_path}: {exc}") from None


def _check(args) -> str:
    return _with_config(Path(args.config), prepare).summary()["text"]


def _memory(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))
    except (OSError, StopIteration):
        return None


def _lifetime_peak() -> int:
    # ru_maxrss counts KiB on Linux and bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _load(args) -> str:
    # The peak is measured from here: the imports above are what every envoy holds anyway.
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux: the peak (VmHWM) starts again from what the process holds now
        before, peak = _memory("VmRSS:"), lambda: _memory("VmHWM:")
    except OSError:
        # Elsewhere the lifetime peak is all there is: the rise reported is then a lower bound.
        before, peak = _lifetime_peak(), _lifetime_peak
    start = time.monotonic()
    shard = _with_config(Path(args.config), MedMNISTShardDescriptor)
    seconds = time.monotonic() - start
    rise = peak() - before
    images = shard.setup.image_bytes
    where = f"memory-mapped from {shard.setup.cache_folder}, not" if shard.setup.memory_mapped else "all"
    held = f"the shard's {size_text(images)} of images are {where} held in memory"
    if not shard.setup.memory_mapped:
        held += f"; loading cost {(rise - images) / 1e6:+.0f} MB beyond them"
    return (f"{shard.setup.summary()['text']}\nloaded in {seconds:.1f} s; peak memory rose by {rise / 1e6:,.0f} MB "
            f"over the {size_text(before)} held before loading; {held}")


def _sizes(args) -> str:
    size = check_size(args.size)
    rows = ["| dataset | channels | images (train / val / test) | train | val | test | all splits |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for flag in FLAGS:
        counts = [info(flag)["n_samples"][s] for s in SPLITS]
        image = size * size * n_channels(flag)
        cells = [size_text(n * image) for n in counts] + [size_text(sum(counts) * image)]
        rows.append(f"| {flag} | {n_channels(flag)} | {' / '.join(f'{n:,}' for n in counts)} | {' | '.join(cells)} |")
    return "\n".join(rows + ["", f"uint8 images at {size} px, counts from medmnist.INFO; GB = 10^9 bytes"])


def _download(args) -> str:
    return f"wrote {download(check_flag(args.flag), check_size(args.size), Path(args.out))}"


def _make_synthetic(args) -> str:
    flag, size = check_flag(args.flag), check_size(args.size)
    sizes = split_sizes(flag, args.scale)
    for split in SPLITS:
        if getattr(args, split) is not None:
            sizes[split] = getattr(args, split)
    path = make_synthetic(flag, size, Path(args.out), sizes, seed=args.seed, overwrite=args.overwrite)
    counts = ", ".join(f"{s} {sizes[s]}" for s in SPLITS)
    return f"wrote {path} (SYNTHETIC {flag} at {size} px: {counts})"


def main(argv=None) -> int:
    """Run one subcommand; errors print one line and exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m medmnist_shard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate an envoy config and fetch its file if missing")
    check.add_argument("config")
    check.set_defaults(run=_check)
    load = sub.add_parser("load", help="load a config's shard as its envoy would; report time and peak memory")
    load.add_argument("config")
    load.set_defaults(run=_load)
    sizes = sub.add_parser("sizes", help="image bytes of every dataset's splits at one size")
    sizes.add_argument("--size", default=224, help=", ".join(map(str, SIZES)))
    sizes.set_defaults(run=_sizes)
    get = sub.add_parser("download", help="download an official MedMNIST file (MD5-checked)")
    get.add_argument("flag", help=", ".join(FLAGS))
    get.add_argument("--size", default=28, help=", ".join(map(str, SIZES)))
    get.add_argument("--out", default="data")
    get.set_defaults(run=_download)
    synth = sub.add_parser("make-synthetic", help="write a synthetic MedMNIST-format file")
    synth.add_argument("flag", help=", ".join(FLAGS))
    synth.add_argument("--size", default=28, help=", ".join(map(str, SIZES)))
    synth.add_argument("--out", default="data")
    synth.add_argument("--scale", type=float, default=0.1, help="fraction of MedMNIST's split sizes")
    for split in SPLITS:
        synth.add_argument(f"--{split}", type=int, help=f"exact number of {split} samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(run=_make_synthetic)
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except (DataError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
