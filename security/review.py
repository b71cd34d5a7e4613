"""A node's operator approves an experiment's code, by hash, before anything of it runs (policy `approval: manual`).

What the code hash covers (`Code.of`, read from the signed archive without unpacking or unpickling anything):
- the notebook's cells that define the functions and classes the experiment ships (the model, the data
  interface, the tasks), as source, under review/cells/ (medfl.researcher.submit writes them), with
  review/cells/bindings.py: what the other names those functions read are (imports, or values of other cells);
- every other file of the archive: the travelling package (medfl/) and anything beside it;
- every global the pickles name and every module they import (security.pickles.references): which installed
  classes and functions the objects are made of (the aggregation, the optimizer, DP-SGD or not...);
- the plan's settings that choose code: every `template` and plugin, the serializer, the task groups, and
  CODE_PATH's settings (secure aggregation, delta updates, the wire's dtype...).
Not covered: the plan's other values and the pickles' data (rounds, learning rate, epsilon, batch size, seed, the
initial weights): the policy checks the ones that matter (policy.py), and the same code with other values needs
no new review. Loading an approved experiment runs only code compiled from this source (security.pickles).

The node's state folder keeps pending/<code>/ (the held experiment: its source, its archive, who sent it),
approved/<code>/ and refused/<code>/ (its source and the decision), so a refused code is refused at once the next
time, and a changed one is shown as a diff against the nearest approved code.

    python -m security.review [--state DIR] list | show [CODE] | approve CODE | refuse CODE --why TEXT

DIR: a node's state folder, or a folder of them, or a run's folder; default runs/node-state, where make demo's
envoys keep their state under approval: manual. Each command acts on every node found there that has the code.
make review shows what waits; make approve code=CODE and make refuse code=CODE why=TEXT decide.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import getpass
import hashlib
import importlib.util
import json
import shutil
import sys
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from . import audit
from .pickles import references
from .signing import FOLDER as SIGNATURE
from .signing import Refused, members

FORMAT = "medfl-code-v1"
CELLS = "review/cells/"
BINDINGS = CELLS + "bindings.py"
UNSHOWN = "review/unshown.txt"
PLAN = "plan/plan.yaml"
# What is not code: the signature, the plan (its code path is hashed apart), and requirements.txt, which a node with
# a policy never installs. Everything else is hashed, and shown if it is text.
NOT_CODE = (SIGNATURE, PLAN, "requirements.txt")
# Compiled Python, which would run in place of the source shown (an unchecked hash-based .pyc is never compared
# with its .py): a node under approval: manual refuses an archive that brings any.
COMPILED = (".pyc", ".pyo", ".so", ".pyd")
# Plan settings that change which code runs (beside every template and plugin): section, key.
CODE_PATH = (("collaborator", "secure_aggregation"), ("aggregator", "secure_aggregation"),
             ("collaborator", "delta_updates"), ("collaborator", "opt_treatment"),
             ("collaborator", "device_assignment_policy"), ("compression_pipeline", "dtype"))
SHORT = 12  # hex digits of a code shown in lines and accepted as a prefix (at least MIN_PREFIX)
MIN_PREFIX = 6
PENDING, APPROVED, REFUSED = "pending", "approved", "refused"
OBJECTS = "(what its objects use, and the plan's code path)"


@dataclass
class Code:
    """An experiment's code as the node reviews it."""

    source: dict[str, str]  # archive path: text, for every file shown as source
    digests: dict[str, str]  # archive path: SHA-256, for every file hashed
    uses: set[tuple[str, str]]
    imports: set[str]
    plan: dict[str, object]  # the code-path settings
    unshown: list[str] = field(default_factory=list)  # what cannot be shown as source

    @classmethod
    def of(cls, archive: Path) -> Code:
        """Read from an experiment's archive without unpacking or unpickling anything; Refused if it cannot be."""
        source, digests, unshown, uses, imports = {}, {}, [], set(), set()
        try:
            with zipfile.ZipFile(archive) as zipped:
                plan = yaml.safe_load(zipped.read(PLAN)) or {}
                for info in sorted(members(zipped), key=lambda i: i.filename):  # no name outside its folder
                    name = info.filename
                    if info.is_dir() or name.startswith(NOT_CODE):
                        continue
                    data = zipped.read(info)
                    if "/" not in name and name.endswith(".pkl"):
                        found, modules = references(data)
                        uses |= found
                        imports |= modules
                        continue
                    digests[name] = hashlib.sha256(data).hexdigest()
                    try:
                        source[name] = data.decode()
                    except UnicodeDecodeError:
                        unshown.append(f"{name}: {len(data)} bytes that are not text")
        except (KeyError, zipfile.BadZipFile, yaml.YAMLError, OSError) as exc:
            raise Refused(f"its archive cannot be read for review ({type(exc).__name__}: {exc})") from None
        if UNSHOWN in source:
            unshown += [line for line in source[UNSHOWN].splitlines() if line.strip()]
        if not any(name.startswith(CELLS) for name in source):
            unshown.append("no notebook cells: it was not submitted with medfl.researcher.submission, so its "
                           "functions cannot be checked against source")
        return cls(source, digests, uses, imports, code_path(plan), unshown)

    def manifest(self) -> str:
        """The text the code hash is the SHA-256 of."""
        lines = [FORMAT]
        lines += [f"file {name} {digest}" for name, digest in sorted(self.digests.items())]
        lines += [f"uses {module} {name}" for module, name in sorted(self.uses)]
        lines += [f"imports {module}" for module in sorted(self.imports)]
        lines += [f"plan {key} {json.dumps(value, sort_keys=True)}" for key, value in sorted(self.plan.items())]
        return "\n".join(lines) + "\n"

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.manifest().encode()).hexdigest()

    @property
    def compiled(self) -> list[str]:
        """The archive's compiled Python files."""
        return [name for name in self.digests if name.endswith(COMPILED)]

    def cells(self) -> list[str]:
        """The notebook's cells, in the order the node compiles them (bindings first)."""
        names = sorted(n for n in self.source if n.startswith(CELLS))
        names.sort(key=lambda n: n != BINDINGS)
        return [self.source[n] for n in names]

    def missing_packages(self) -> list[str]:
        """Top-level packages the code needs that neither this node nor the archive has: those its pickles name,
        its cells import, and the archive's modules they reach import."""
        shipped = {name.removesuffix(".py").removesuffix("/__init__").replace("/", "."): name
                   for name in self.source if name.endswith(".py") and not name.startswith("review/")}
        needed = {m for m, _ in self.uses} | self.imports | {v.rsplit(".", 1)[0] for k, v in self.plan.items()
                                                              if k.endswith("template") and isinstance(v, str)}
        for text in self.cells():
            needed |= _imports(text, "")
        seen, outside = set(), set()
        while needed:
            module = needed.pop()
            parts = module.split(".")
            inside = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in shipped),
                          None)
            if inside is None:
                outside.add(parts[0])
            elif inside not in seen:
                seen.add(inside)
                package = inside if shipped[inside].endswith("__init__.py") else inside.rpartition(".")[0]
                needed |= _imports(self.source[shipped[inside]], package)
        return sorted(p for p in outside if p and p not in sys.stdlib_module_names and p != "__main__"
                      and importlib.util.find_spec(p) is None)


def _imports(text: str, package: str) -> set[str]:
    """The modules a module's source imports when it is imported: its top-level imports, not those inside functions
    (a lazy, optional one like Habana's), relative ones resolved against `package`."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set()
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            found |= {f"{module}.{a.name}" for a in node.names} | {module}
    return {m for m in found if m}


def code_path(plan: dict) -> dict[str, object]:
    """The plan's settings that choose code: every template and plugin, the api layer, the task groups and
    CODE_PATH."""
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("template", "required_plugin_components"):
                    found[".".join(path + [key])] = value
                else:
                    walk(value, path + [str(key)])

    walk(plan, [])
    found["api_layer"] = plan.get("api_layer")
    found["assigner.task_groups"] = ((plan.get("assigner") or {}).get("settings") or {}).get("task_groups")
    for section, key in CODE_PATH:
        value = ((plan.get(section) or {}).get("settings") or {}).get(key)
        if value is not None:
            found[f"{section}.{key}"] = value
    return found


def templates_outside(code: Code) -> list[str]:
    """Plan templates naming code that is neither OpenFL's nor the archive's: the plan builds them on the node."""
    shipped = {PurePosixPath(n).parts[0].removesuffix(".py") for n in code.digests}
    named = [v for k, v in code.plan.items() if k.endswith("template") and isinstance(v, str)]
    named += [v for k, value in code.plan.items() if k.endswith("required_plugin_components")
              and isinstance(value, dict) for v in value.values() if isinstance(v, str)]
    named += [v for v in ((code.plan.get("api_layer") or {}).get("required_plugin_components") or {}).values()
              if isinstance(v, str)]
    return sorted({n for n in named if n.split(".")[0] not in shipped and not n.startswith("openfl.")})


# --- the node's store --------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def status(state: Path, code: str) -> tuple[str | None, dict]:
    """(pending/approved/refused or None, its decision record)."""
    for kind in (APPROVED, REFUSED, PENDING):
        folder = Path(state) / kind / code
        if folder.is_dir():
            record = folder / "decision.json"
            return kind, json.loads(record.read_text()) if record.is_file() else {}
    return None, {}


def hold(state: Path, code: Code, archive: Path, arrival: dict) -> Path:
    """Keep a held experiment in pending/<code>/: its source, the manifest, its archive, and who sent it."""
    folder = Path(state) / PENDING / code.hash
    if not folder.is_dir():
        staging = Path(state) / PENDING / f".{code.hash}-{uuid.uuid4().hex}"
        _write_source(staging, code)
        staging.rename(folder)
    shutil.copyfile(archive, folder / f"{arrival['archive_sha256']}.zip")  # not by its name, which its sender chose
    with zipfile.ZipFile(archive) as zipped:
        (folder / "plan.yaml").write_bytes(zipped.read(PLAN))  # the latest arrival's values
    with open(folder / "arrivals.jsonl", "a") as out:
        out.write(json.dumps(arrival, sort_keys=True) + "\n")
    return folder


def _write_source(folder: Path, code: Code) -> None:
    folder.mkdir(parents=True)
    for name, text in code.source.items():
        path = folder / "source" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (folder / "manifest.txt").write_text(code.manifest())
    (folder / "unshown.txt").write_text("".join(f"{line}\n" for line in code.unshown))


def decide(state: Path, code: str, decision: str, why: str, node: str) -> None:
    """Approve or refuse a pending (or earlier decided) code on one node; audited."""
    kind, _ = status(state, code)
    if kind is None:
        raise LookupError(f"{node} has no code {code[:SHORT]}")
    source = Path(state) / kind / code
    target = Path(state) / decision / code
    record = {"decision": decision, "why": why, "by": getpass.getuser(), "time": _now()}
    (source / "decision.json").write_text(json.dumps(record, sort_keys=True))
    for held in source.glob("*.zip"):
        held.unlink()  # the node keeps the source and the decision; the archive comes again with each experiment
    target.parent.mkdir(parents=True, exist_ok=True)
    if source != target:
        source.rename(target)
    audit.AuditLog(Path(state) / audit.FILE, node).append(decision, code=code, why=why, by=record["by"])


def source_files(folder: Path) -> dict[str, str]:
    root = folder / "source"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def reviewed(folder: Path) -> dict[str, str]:
    """What a diff compares: the source files, and what the objects use and the plan's code path (the manifest's
    lines other than the files')."""
    manifest = (folder / "manifest.txt").read_text().splitlines() if (folder / "manifest.txt").is_file() else []
    return {**source_files(folder), OBJECTS: "".join(f"{line}\n" for line in manifest
                                                     if line.startswith(("uses ", "imports ", "plan ")))}


def nearest_approved(state: Path, files: dict[str, str]) -> tuple[str, list[str]] | None:
    """(the approved code whose source differs least from `files` (reviewed()), the unified diff), or None."""
    best = None
    for folder in sorted((Path(state) / APPROVED).glob("*")):
        diff = []
        other = reviewed(folder)
        for name in sorted(set(files) | set(other)):
            if files.get(name) != other.get(name):
                diff += difflib.unified_diff((other.get(name) or "").splitlines(keepends=True),
                                             (files.get(name) or "").splitlines(keepends=True),
                                             f"approved/{name}", f"held/{name}")
        if best is None or len(diff) < len(best[1]):
            best = (folder.name, diff)
    return best


def screen(state: Path, code: str, node: str, shown: bool = False) -> str:
    """What the operator reads before deciding: who sent it, what changed since the nearest approved code, the
    notebook's cells, every file it brings, what its objects are made of, the plan's code path, and what cannot be
    shown as source. `shown`: the same code was shown above for another node (only who sent it, then)."""
    kind, record = status(state, code)
    folder = Path(state) / kind / code
    arrivals = [json.loads(line) for line in (folder / "arrivals.jsonl").read_text().splitlines()] \
        if (folder / "arrivals.jsonl").is_file() else []
    decided = f" by {record['by']} at {record['time']}" + (f": {record['why']}" if record.get("why") else "") \
        if record else ""
    out = [f"== {node}: code {code} ({kind}{decided})"]
    for a in arrivals:
        out.append(f"experiment {a['experiment']} from {a.get('researcher') or 'an unidentified researcher'} at "
                   f"{a['time']}; signature {a.get('signature') or 'none (plaintext)'}; certificate "
                   f"{a.get('certificate') or '-'}; archive SHA-256 {a['archive_sha256']}")
    if shown:
        return "\n".join(out + ["the same code as shown above"])
    files = source_files(folder)
    cells = {n: t for n, t in files.items() if n.startswith(CELLS)}
    package = {n: t for n, t in files.items() if n not in cells}
    manifest = (folder / "manifest.txt").read_text().splitlines()
    unshown = (folder / "unshown.txt").read_text().splitlines() if (folder / "unshown.txt").is_file() else []
    near = nearest_approved(state, reviewed(folder)) if kind != APPROVED else None
    if near is None:
        out.append("against approved code: this node has approved none yet" if kind != APPROVED else "")
    else:
        out.append(f"against the nearest approved code {near[0][:SHORT]}: " +
                   (f"{len(near[1])} lines of diff, at the end" if near[1] else "the same source"))

    def lines(texts):
        return sum(len(t.splitlines()) for t in texts.values())

    out.append(f"contents: {len(cells)} notebook cells ({lines(cells)} lines), {len(package)} files it brings "
               f"({lines(package)} lines), {sum(m.startswith(('uses ', 'imports ')) for m in manifest)} installed or "
               f"shipped names its objects use, {sum(m.startswith('plan ') for m in manifest)} plan settings that "
               f"choose code; cannot be shown as source: {len(unshown) or 'nothing'}")
    for title, group in (("the notebook's cells: the model, the data interface and the tasks as the researcher "
                          "wrote them (bindings.py: what they read from other cells)", cells),
                         ("every file it brings (the travelling package)", package)):
        out.append(f"\n-- {title} --")
        out += [f"\n--- {name} ({len(text.splitlines())} lines)\n{text.rstrip()}" for name, text in group.items()]
    out.append("\n-- what its pickled objects are made of (installed or shipped code they name) --")
    out += ["  " + line for line in manifest if line.startswith(("uses ", "imports "))]
    out.append("\n-- the plan's settings that choose code --")
    out += ["  " + line[5:] for line in manifest if line.startswith("plan ")]
    out.append("\n-- cannot be shown as source --")
    out += [f"  {line}" for line in unshown] or ["  nothing"]
    if (folder / "plan.yaml").is_file():
        out.append("\n-- the plan of its latest experiment (its values are not in the code hash; the policy checks "
                   "the rounds, DP-SGD and envoys it declares) --")
        out.append((folder / "plan.yaml").read_text().rstrip())
    if near is not None and near[1]:
        out.append(f"\n-- what changed since the approved code {near[0][:SHORT]} --")
        out += [line.rstrip("\n") for line in near[1]]
    return "\n".join(line for line in out if line != "")


# --- the command line --------------------------------------------------------------------------------------
def nodes(folder: Path) -> dict[str, Path]:
    """{node: its state folder} under a node's state folder, a folder of them, or a run's folder."""
    folder = Path(folder)
    given = folder / "launcher.json"
    if given.is_file() and (state := json.loads(given.read_text()).get("envoy_state")):
        folder = Path(state)
    found = {}
    for marker in sorted(folder.rglob(audit.FILE)) if folder.is_dir() else []:
        state = marker.parent
        node = next((e["node"] for e in audit.AuditLog(marker, "").entries() if "node" in e), state.name)
        if node != "director":
            found[node] = state
    for pending in sorted(folder.rglob(PENDING)) if folder.is_dir() else []:
        found.setdefault(pending.parent.name, pending.parent)
    return found


def _codes(state: Path, kinds=(PENDING, APPROVED, REFUSED)) -> list[tuple[str, str]]:
    return [(kind, p.name) for kind in kinds for p in sorted((Path(state) / kind).glob("*"))
            if p.is_dir() and not p.name.startswith(".")]


def _match(state: Path, prefix: str) -> str | None:
    found = {code for _, code in _codes(state) if code.startswith(prefix.lower())}
    if len(found) > 1:
        raise LookupError(f"{prefix} matches {len(found)} codes: give more of it")
    return found.pop() if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m security.review", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", default="runs/node-state",
                        help="a node's state folder, a folder of them, or a run's folder (default runs/node-state: "
                             "make demo's envoys under approval: manual)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every code each node holds, approved or refused")
    show = commands.add_parser("show", help="what the operator reads: source, sender, plan, diff")
    show.add_argument("code", nargs="?", help="a code or its first digits (default: every pending one)")
    approve = commands.add_parser("approve", help="let experiments of this code run on the node")
    approve.add_argument("code")
    refuse = commands.add_parser("refuse", help="refuse experiments of this code, with a reason shown to them")
    refuse.add_argument("code")
    refuse.add_argument("--why", required=True, help="the reason the researcher reads")
    args = parser.parse_args(argv)
    found = nodes(Path(args.state))
    if not found:
        print(f"error: no node's state folder under {args.state}: give --state a node's state folder (its "
              "MEDFL_ENVOY_STATE) or a run's folder", file=sys.stderr)
        return 2
    if getattr(args, "code", None) is not None and len(args.code) < MIN_PREFIX:
        print(f"error: give at least {MIN_PREFIX} digits of the code", file=sys.stderr)
        return 2
    acted, seen = 0, set()
    for node, state in found.items():
        try:
            code = _match(state, args.code) if getattr(args, "code", None) else None
        except LookupError as exc:
            print(f"error: {node}: {exc}", file=sys.stderr)
            return 2
        if args.command == "list":
            listed = _codes(state)
            print(f"{node} ({state}):" + ("" if listed else " nothing held or decided"))
            for kind, c in listed:
                why = status(state, c)[1].get("why")
                print(f"  {kind:<9} {c[:SHORT]}" + (f"  {why}" if why else ""))
            acted += 1
        elif args.command == "show":
            for c in [code] if code else [c for k, c in _codes(state, (PENDING,))]:
                if c:
                    print(screen(state, c, node, shown=c in seen) + "\n")
                    seen.add(c)
                    acted += 1
        elif code:
            decision = APPROVED if args.command == "approve" else REFUSED
            decide(state, code, decision, getattr(args, "why", "") or "", node)
            print(f"{node}: {decision} code {code[:SHORT]}")
            acted += 1
    if not acted:
        what = f"code {args.code}" if getattr(args, "code", None) else "anything pending"
        print(f"no node under {args.state} holds {what}", file=sys.stderr)
        return 1 if args.command != "show" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
