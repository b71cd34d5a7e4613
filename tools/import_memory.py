"""Memory of a process that imports what an envoy imports, before it holds any data or model.

usage: .venv/bin/python tools/import_memory.py [--evict]

Prints the Python and torch build, then the peak resident memory (VmHWM) and what it is made of: private
pages, and pages of shared libraries (mapped files, held once by the machine however many nodes map them).
--evict first drops this environment's and this Python's shared libraries from the page cache (they are
read back from disk as needed): right after an install, the freshly written files were seen to count more
resident pages than the same files read back from disk, so figures compare only when both are evicted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import roots

# As an envoy runs: python -m node, its data package, and the experiment's package once one arrives.
MODULES = ["node", "torch._dynamo", "openfl.interface.cli", "openfl.component.envoy.envoy",
           "medmnist_shard", "medfl"]


def evict(folders: list[str]) -> int:
    """Drop every shared library under `folders` from the page cache; returns how many files."""
    count = 0
    for folder in folders:
        for path in Path(folder).rglob("*.so*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                count += 1
    return count


def status_mb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status, in MB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                values[name] = int(value.split()[0]) // 1024
    return values


def largest_mappings(n: int) -> list[tuple[str, int]]:
    """The n mapped files with the most resident pages, in MB."""
    resident, current = Counter(), None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                current = head[5] if len(head) > 5 and head[5].startswith("/") else None
            elif head[0] == "Rss:" and current:
                resident[current] += int(head[1])
    return [(Path(path).name, kb // 1024) for path, kb in resident.most_common(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evict", action="store_true", help="drop the shared libraries from the page cache first")
    args = parser.parse_args()
    evicted = evict([sysconfig.get_paths()["purelib"], sysconfig.get_config_var("LIBDIR")]) if args.evict else None
    roots.join("launcher")  # an envoy's roots, and workspace/ for medfl, which an experiment brings it
    steps = []
    for module in MODULES:
        __import__(module)
        steps.append({"import": module, **status_mb("VmHWM")})
    import torch

    memory = status_mb("VmHWM", "RssAnon", "RssFile")
    print(json.dumps({
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "evicted_files": evicted, "peak_mb": memory["VmHWM"], "private_mb": memory["RssAnon"],
        "shared_libraries_mb": memory["RssFile"], "steps": steps,
        "largest_libraries_mb": largest_mappings(6)}, indent=1))


if __name__ == "__main__":
    main()
