"""Command line: `python -m medmnist_shard {check,download,make-synthetic} ...`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .descriptor import prepare
from .files import download
from .spec import FLAGS, SIZES, SPLITS, DataError, check_flag, check_size
from .synthetic import make_synthetic, split_sizes


def _check(args) -> str:
    config_path = Path(args.config)
    if not config_path.is_file():
        raise DataError(f"envoy config {config_path} does not exist")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"envoy config {config_path} is not valid YAML: {exc}") from None
    params = dict((config.get("shard_descriptor") or {}).get("params") or {})
    # Relative data folders are relative to the config, which is where the envoy runs.
    params["data_dir"] = config_path.parent / params.get("data_dir", "data")
    try:
        return prepare(**params).summary()["text"]
    except TypeError as exc:
        raise DataError(f"envoy config {config_path}: {exc}") from None


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
