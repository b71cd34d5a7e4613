"""Each node's audit log: what arrived, what its policy decided, and what left, in a file that shows any edit.

`audit.jsonl` in a node's state folder (an envoy's MEDFL_ENVOY_STATE, the director's MEDFL_DIRECTOR_STATE) is
appended to, one JSON object per line, and never rewritten. Each line carries its number (`seq`), the hash of the
line before it (`prev`) and its own (`hash`, SHA-256 of the line without that field), so a line edited, removed
or moved breaks the chain where it was. Someone who can write the file can still rewrite every hash after an
edit; what they cannot rewrite is the other side's log: every payload an envoy sent (`sent`: its SHA-256, bytes,
tensors, metrics and the sample count it claimed) is also in the director's log as `received`, and `make audit`
matches the two.

    python -m security.audit [FOLDER]    (make audit [state=FOLDER]; default runs/latest)

FOLDER is a run's folder, a node's state folder, or a folder of them (an envoy_state): every audit.jsonl under it
is checked. It prints, per node, the experiments that arrived, who sent them, what the policy decided, what left
and the epsilon spent; it exits 1 naming the node and the line of every break, and every payload sent that the
director's log does not show received (or the reverse).
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import sys
import threading
from collections import defaultdict
from pathlib import Path

FILE = "audit.jsonl"
GENESIS = "0" * 64
_LOCK = threading.Lock()  # one node writes its log from several threads (the envoy's sends, the director's server)


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    """A node's audit log, appended to as things happen."""

    def __init__(self, path: Path, node: str):
        self.path, self.node = Path(path), node
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _last(descriptor: int) -> tuple[int, str]:
        """(seq, hash) of the log's last line; a torn last line (a crash while writing) is carried on after, and
        the check names it."""
        end = os.lseek(descriptor, 0, os.SEEK_END)
        if end == 0:
            return 0, GENESIS
        tail = os.pread(descriptor, min(end, 1 << 16), max(0, end - (1 << 16)))
        lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
        try:
            last = json.loads(lines[-1])
            return int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError):
            count = len(os.pread(descriptor, end, 0).splitlines())
            return count, hashlib.sha256(lines[-1]).hexdigest()

    def entries(self, event: str | None = None) -> list[dict]:
        """The log's readable lines (of one event, if given)."""
        if not self.path.is_file():
            return []
        return [e for e in _read(self.path)[0] if event is None or e.get("event") == event]

    def append(self, event: str, **fields) -> None:
        """Add one line, on disk before this returns. Several processes may write one node's log (the envoy, and
        its operator's review commands): each holds the file's lock from reading the last line to writing."""
        with _LOCK:
            descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                seq, prev = self._last(descriptor)
                entry = {"seq": seq + 1, "time": datetime.datetime.now(datetime.UTC).isoformat(
                    timespec="milliseconds"), "node": self.node, "event": event, **fields, "prev": prev}
                entry["hash"] = _digest(entry)
                os.write(descriptor, (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode())
                os.fsync(descriptor)
            finally:
                os.close(descriptor)  # and with it the lock


def payload(named_tensors) -> dict:
    """What one task's results carry: SHA-256 over its tensors (each as protobuf serializes it, by name), their
    names and bytes, and the metrics among them."""
    import numpy as np

    content, tensors, metrics = hashlib.sha256(), [], {}
    for tensor in sorted(named_tensors, key=lambda t: t.name):
        content.update(tensor.SerializeToString(deterministic=True))
        tensors.append([tensor.name, len(tensor.data_bytes)])
        if tensor.report and len(tensor.data_bytes) in (4, 8):
            metrics[tensor.name] = float(np.frombuffer(tensor.data_bytes, np.float32 if len(tensor.data_bytes) == 4
                                                       else np.float64)[0])
    return {"payload_sha256": content.hexdigest(), "bytes": sum(size for _, size in tensors), "tensors": tensors,
            "metrics": metrics}


# --- checking ------------------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[list[dict], list[str]]:
    """(the entries, the breaks of the chain, each naming its line)."""
    entries, breaks, prev, seq = [], [], GENESIS, 0
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(raw)
            fields = {k: v for k, v in entry.items() if k != "hash"}
        except (ValueError, AttributeError):
            breaks.append(f"line {number} is not a log entry (cut short or overwritten)")
            prev = None
            continue
        if _digest(fields) != entry.get("hash"):
            breaks.append(f"line {number} was changed after it was written (its hash does not match it)")
        elif entry.get("seq") != seq + 1:
            breaks.append(f"line {number} is entry {entry.get('seq')} where entry {seq + 1} belongs: lines were "
                          "removed or moved")
        elif prev is not None and entry.get("prev") != prev:
            breaks.append(f"line {number} does not follow line {number - 1}: a line between them was removed, or "
                          "the lines were reordered")
        entries.append(entry)
        prev, seq = entry.get("hash"), entry.get("seq") if isinstance(entry.get("seq"), int) else seq + 1
    return entries, breaks


def logs(folder: Path) -> list[Path]:
    """Every audit log under `folder` (or `folder` itself, if it is one)."""
    folder = Path(folder)
    return [folder] if folder.is_file() else sorted(folder.rglob(FILE))


def check(folder: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """({node: its entries}, problems): each log's chain, and each envoy's `sent` against the director's
    `received`."""
    nodes, problems = {}, []
    for path in logs(folder):
        entries, breaks = _read(path)
        node = next((e["node"] for e in entries if "node" in e), path.parent.name)
        problems += [f"{node} ({path}): {why}" for why in breaks]
        nodes.setdefault(node, []).extend(entries)
    director = [e for e in nodes.get("director", []) if e.get("event") == "received"]
    if director:
        received = {_key(e["envoy"], e) for e in director}
        sent = set()
        for node, entries in nodes.items():
            for e in entries:
                if e.get("event") == "sent":
                    sent.add(_key(node, e))
                    if _key(node, e) not in received:
                        problems.append(f"{node}: line {e['seq']}: sent {e['task']} of round {e['round']} in "
                                        f"{e['experiment']} (SHA-256 {e['payload_sha256'][:12]}), which the "
                                        "director's log does not show received")
        for e in director:
            if _key(e["envoy"], e) not in sent and e["envoy"] in nodes:
                problems.append(f"director: line {e['seq']}: received {e['task']} of round {e['round']} in "
                                f"{e['experiment']} from {e['envoy']} (SHA-256 {e['payload_sha256'][:12]}), which "
                                f"{e['envoy']}'s log does not show sent")
    return nodes, problems


def _key(envoy: str, e: dict) -> tuple:
    return envoy, e.get("experiment"), e.get("round"), e.get("task"), e.get("payload_sha256"), e.get("samples")


def summary(nodes: dict[str, list[dict]]) -> str:
    """Per node: each experiment that arrived, from whom, the decision, what left and the epsilon spent."""
    lines = []
    for node in sorted(nodes, key=lambda n: (n != "director", n)):
        entries = nodes[node]
        lines.append(f"{node}: {len(entries)} entries")
        experiments: dict[str, dict] = defaultdict(lambda: {"sent": 0, "bytes": 0, "received": 0, "epsilon": None})
        for e in entries:
            if "experiment" not in e:
                continue
            x = experiments[e["experiment"]]
            if e["event"] == "arrived":
                x.update(researcher=e.get("researcher") or "unidentified (plaintext)", decision=e.get("decision"),
                         rule=e.get("rule"))
            elif e["event"] == "sent":
                x["sent"] += 1
                x["bytes"] += e["bytes"]
                x["epsilon"] = e.get("epsilon", x["epsilon"])
            elif e["event"] == "received":
                x["received"] += 1
                x["bytes"] += e["bytes"]
            elif e["event"] == "ended":
                x["ended"] = e.get("status")
        for name, x in experiments.items():
            who = f"from {x['researcher']}" if "researcher" in x else ""
            if x.get("decision"):
                who += f", {x['decision']}" + (f" ({x['rule']})" if x.get("rule") else "")
            if x.get("decision") == "refused":
                lines.append(f"  {name}: {who}")
                continue
            moved = (f"received {x['received']} results, {x['bytes'] / 1e6:.2f} MB" if node == "director" else
                     f"sent {x['sent']} results, {x['bytes'] / 1e6:.2f} MB")
            spent = f", epsilon {x['epsilon']:.2f}" if x["epsilon"] is not None else ""
            ended = f", {x['ended']}" if x.get("ended") else ""
            lines.append(f"  {name}: {', '.join(p for p in (who, moved) if p)}{spent}{ended}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m security.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="runs/latest",
                        help="a run's folder, a node's state folder, or a folder of them (default runs/latest)")
    folder = Path(parser.parse_args(argv).folder)
    given = folder / "launcher.json"  # a make demo run whose nodes kept their state elsewhere (envoy_state=)
    if given.is_file() and (state := json.loads(given.read_text()).get("envoy_state")):
        print(f"{folder} ran with envoy_state={state}: checking that folder")
        folder = Path(state)
    if not folder.exists():
        print(f"error: {folder} does not exist: give a run's folder or a node's state folder", file=sys.stderr)
        return 2
    nodes, problems = check(folder)
    if not nodes:
        print(f"error: no {FILE} under {folder}: give a run's folder or a node's state folder", file=sys.stderr)
        return 2
    print(summary(nodes))
    for problem in problems:
        print(f"AUDIT FAILED: {problem}")
    if not problems:
        print(f"audit passed: {sum(len(e) for e in nodes.values())} entries of {len(nodes)} nodes, every chain "
              "unbroken" + (", every payload sent received by the director" if "director" in nodes else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
