"""The project's three import roots, and which process gets which: said here once, used everywhere.

- the repository root: openfl_adjustments, security, localfed, tools, node (the nodes' entry point) and this module;
- envoy/: medmnist_shard, the data node's package;
- workspace/: medfl, the package that travels with every experiment.

Which process imports from which root, and why:

- launcher: the launcher (python -m localfed), the tests and the tools use all three: they start nodes, make
  data and run what the notebook defines.
- node: the director and the envoys get the repository root and envoy/, never workspace/. A node must run the
  `medfl` the researcher sent, which OpenFL unpacks into the experiment's folder and *appends* to sys.path
  (openfl/utilities/workspace.py): a copy on the node's own path would come first and run instead.
- kernel: the notebook's kernel gets the repository root (from the environment) and workspace/, because it runs
  from workspace/; it never needs envoy/.
- environment: every process of the project's Python environment gets the repository root: tools/venv.sh runs
  `python roots.py pth`, which writes a .pth file naming it into the environment's site-packages. That is what
  makes `import roots` work anywhere; each process then joins its role's other roots with join(ROLE).

Command line, which works before the repository is on the path (it imports nothing of the project):
  python roots.py ROLE   print the PYTHONPATH of a process of ROLE: its roots, then the inherited PYTHONPATH's
                         entries, less any root the role must not have (the start scripts: `roots.py node`)
  python roots.py pth    write the environment's .pth (this interpreter's site-packages), naming the repository
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent
FOLDERS = {"repository": ".", "envoy": "envoy", "workspace": "workspace"}  # each root, inside the repository
ROLES = {
    "launcher": ("repository", "envoy", "workspace"),
    "node": ("repository", "envoy"),
    "kernel": ("repository", "workspace"),
    "environment": ("repository",),
}
PTH = "medmnist-federated.pth"


def roots(role: str, base: Path = REPOSITORY) -> list[Path]:
    """The import roots of a process of `role`, in a repository at `base` (this one, or a copy on another host)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return [Path(base) / FOLDERS[name] for name in ROLES[role]]


def pythonpath(role: str, base: Path = REPOSITORY, inherited: str = "") -> str:
    """PYTHONPATH for a process of `role`: its roots, then the `inherited` entries, less the roots it must not have."""
    own = [str(p) for p in roots(role, base)]
    excluded = {str((Path(base) / FOLDERS[name]).resolve()) for name in FOLDERS if name not in ROLES[role]}
    kept = [e for e in inherited.split(os.pathsep) if e and e not in own and str(Path(e).resolve()) not in excluded]
    return os.pathsep.join(own + kept)


def join(role: str) -> None:
    """Put the roots of `role` first on this process's sys.path, in their order."""
    own = [str(p) for p in roots(role)]
    sys.path[:] = own + [entry for entry in sys.path if entry not in own]


def write_pth() -> Path:
    """Write the .pth that names the repository root into this interpreter's site-packages; return its path."""
    import site

    path = Path(site.getsitepackages()[0]) / PTH
    path.write_text("".join(f"{p}\n" for p in roots("environment")))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in (*ROLES, "pth"):
        sys.exit(f"usage: python roots.py {{{','.join(ROLES)}}} | pth")
    if sys.argv[1] == "pth":
        write_pth()
    else:
        print(pythonpath(sys.argv[1], inherited=os.environ.get("PYTHONPATH", "")))
