"""The node's side of its policy and audit, at run time, in the node's own process (never the experiment's code).

On an envoy:
- admit: before anything of an experiment is unpacked (trust.checking_wait calls it with the signature's
  verdict), the policy (policy.py) decides from the archive's plan; the decision goes to the audit log.
- each training task: the node counts the experiment's training rounds and refuses one beyond those declared or
  max_rounds; under DP-SGD it adds the round's steps to its privacy ledger (budget.py), on disk before the round
  trains, and refuses a round that would take the ledger past the budget. A refusal stops the node's part in the
  experiment (contract.Refusal), named in one line in the notebook.
- each task's results: what left (payload SHA-256, tensors, bytes, metrics, claimed sample count) and the epsilon
  spent so far go to the audit log, once sent.
On the director: every experiment submitted, every payload received, and how each experiment ended.

Each node's state folder (MEDFL_ENVOY_STATE, MEDFL_DIRECTOR_STATE; the start scripts set them) holds its
audit.jsonl and, on an envoy, one privacy ledger per dataset it serves. A node started without one keeps neither.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from openfl_adjustments.contract import Refusal
from openfl_adjustments.patching import replace

from . import audit, budget, pickles, policy, review
from .signing import Refused

logger = logging.getLogger("openfl_adjustments")
ENVOY_STATE, DIRECTOR_STATE = "MEDFL_ENVOY_STATE", "MEDFL_DIRECTOR_STATE"


@dataclass
class Running:
    """The experiment an envoy runs now, as declared, and its training rounds so far."""

    name: str
    declared: policy.Declaration
    trained: int = 0
    step: tuple | None = None  # one round's DP-SGD (noise, rate, steps) here: computed once (up to a second)
    code: review.Code | None = None  # under approval: manual, the approved code its objects are loaded from
    source: pickles.Source | None = None  # that code compiled here, once per experiment (restore)

    def round_step(self, train_size: int) -> tuple:
        if self.step is None:
            self.step = budget.round_step(self.declared.dp, self.declared.batch_size or 1, train_size or 1)
        return self.step


@dataclass
class Envoy:
    """This envoy's policy, audit log and privacy ledger."""

    name: str
    rules: policy.NodePolicy
    log: audit.AuditLog | None
    dataset: str
    state: Path | None = None  # the node's state folder
    train_size: int | None = None  # set once the shard is loaded
    running: Running | None = None
    _ledger: budget.Ledger | None = field(default=None, repr=False)
    _spent: tuple = field(default=(-1, None), repr=False)  # (ledger length, its epsilon)

    @property
    def delta(self) -> float:
        """The delta the node states its epsilon at: its budget's, or 1 / (10 x its training-set size)."""
        return self.rules.budget[1] if self.rules.budget else 1 / (10 * max(1, self.train_size or 1))

    def ledger(self) -> budget.Ledger | None:
        """The node's privacy ledger of its dataset, None without a state folder (LedgerError if it is damaged, or
        missing though the audit log shows it was kept)."""
        if self._ledger is None and self.log is not None:
            path = budget.Ledger.of(self.log.path.parent, self.dataset)
            kept = any(e.get("dataset") == self.dataset for e in self.log.entries("trained"))
            self._ledger = budget.Ledger.load(path, must_exist=kept)
        return self._ledger

    def spent(self) -> float | None:
        """Epsilon spent on the node's data so far, at self.delta; None if unknown or unbounded."""
        try:
            ledger = self.ledger()
        except budget.LedgerError:
            return None
        if ledger is None or ledger.unbounded:
            return None
        if self._spent[0] != len(ledger.history):
            self._spent = (len(ledger.history), budget.epsilon(ledger.history, self.delta))
        return self._spent[1]


_ENVOY: list[Envoy] = []
_DIRECTOR: list[audit.AuditLog] = []


def configure_envoy(name: str, config_path: Path, tls: bool) -> policy.NodePolicy:
    """Set this envoy's policy (policy.PolicyError if its config's is wrong) and its audit log; return the policy."""
    rules = policy.load(config_path)
    if rules.researchers is not None and not tls:
        raise policy.PolicyError(f"{config_path}: its policy lists researchers, but without mutual TLS nobody can be "
                                 "identified: start the envoy with CERTS=... (make certs)")
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    params = (config.get("shard_descriptor") or {}).get("params") or {}
    state = os.environ.get(ENVOY_STATE)
    for needed, what in ((rules.budget, "a privacy_budget, which the node keeps"),
                         (rules.approval == "manual", "approval: manual, whose approvals the node keeps")):
        if needed and not state:
            raise policy.PolicyError(f"{config_path}: its policy has {what} in its state folder: set {ENVOY_STATE} "
                                     "(start_envoy.sh does)")
    if rules != policy.NodePolicy() and (config.get("params") or {}).get("install_requirements"):
        raise policy.PolicyError(f"{config_path}: params.install_requirements is true, but a node with a policy "
                                 "installs nothing an experiment asks for: remove it, and install what the node's "
                                 "experiments need yourself")
    log = audit.AuditLog(Path(state) / audit.FILE, name) if state else None
    _ENVOY[:] = [Envoy(name, rules, log, f"{params.get('flag', 'data')}-{params.get('size', 28)}",
                       Path(state) if state else None)]
    if rules != policy.NodePolicy():
        print(f"envoy {name} enforces its policy: {describe(rules)}", file=sys.stderr, flush=True)
    return rules


def describe(rules: policy.NodePolicy) -> str:
    """The policy in one line."""
    parts = [f"researchers {', '.join(rules.researchers) or 'none'}" if rules.researchers is not None else "",
             "DP-SGD required" if rules.require_dp else "",
             f"privacy budget epsilon {rules.budget[0]:g} at delta {rules.budget[1]:g}" if rules.budget else "",
             "secure aggregation required" if rules.require_secure_aggregation else "",
             f"at most {rules.max_rounds} rounds" if rules.max_rounds else "",
             f"at least {rules.min_envoys} envoys" if rules.min_envoys else "",
             f"only code its operator approved (waits {rules.approval_timeout:g} s)" if rules.approval == "manual"
             else ""]
    return "; ".join(p for p in parts if p)


# --- on the envoy -----------------------------------------------------------------------------------------------
def watching() -> bool:
    """Whether this process is an envoy with a policy or an audit log to keep."""
    return bool(_ENVOY)


def admit(experiment: str, archive: Path, sha256: str, sender: str | None, verified: bool | None,
          problem: str | None = None, certificate: str | None = None) -> review.Code | None:
    """On a configured envoy, decide on an arrived experiment before anything of it is unpacked; raise Refused (one
    line: the envoy, the rule, the numbers) if this node does not run it. `verified`: whether its signature verified
    (None: plaintext, nothing checked), and if not, the `problem`. Either way, the decision goes to the audit log.
    Under approval: manual, return its Code if it must wait for its operator (held: saved under pending/)."""
    node = _ENVOY[0]
    rule = why = code = None
    held = False
    try:
        if problem:
            raise Refused(problem)
        try:
            plan = policy.read_plan(archive)
        except Refused:
            if node.rules != policy.NodePolicy():
                raise
            plan = {}  # without a policy nothing needs it; OpenFL says what it misses
        running = Running(experiment, policy.Declaration.of(plan))
        decision = policy.decide(node.rules, running.declared, sender, lambda: _spend(node, running))
        if decision is None and node.rules != policy.NodePolicy():
            code = review.Code.of(archive)
            decision = _code_rules(node, code)
            held = decision is None and node.rules.approval == "manual" and \
                review.status(node.state, code.hash)[0] != review.APPROVED
            running.code = code if node.rules.approval == "manual" else None
        if decision:
            rule, why = decision
    except Refused as exc:
        rule, why = ("signature" if problem else "archive"), str(exc)
    except budget.LedgerError as exc:
        rule, why = "privacy_budget", str(exc)
    if node.log is not None:
        node.log.append("arrived", experiment=experiment, researcher=sender, signature=verified,
                        archive_sha256=sha256, code=code.hash if code else None,
                        decision="refused" if rule else "held" if held else "accepted", rule=rule, detail=why)
    if rule:
        raise Refused(f"{node.name} refuses experiment {experiment}: {why}")
    if held:
        review.hold(node.state, code, archive, {"experiment": experiment, "researcher": sender, "time": review._now(),
                                                "signature": "verified" if verified else None,
                                                "certificate": certificate, "archive_sha256": sha256})
    node.running = running
    return code if held else None


def _code_rules(node: Envoy, code: review.Code) -> tuple[str, str] | None:
    """What a node with a policy checks of an experiment's code before anything of it runs."""
    if missing := code.missing_packages():
        return "packages", (f"it needs {', '.join(missing)}, which this node does not have, and a node with a policy "
                            "installs nothing an experiment asks for: its operator installs them, or the "
                            "experiment does without")
    if node.rules.approval != "manual":
        return None
    if code.compiled:
        return "approval", (f"it brings compiled Python ({', '.join(code.compiled)}), which would run in place of "
                            "the source its operator reads")
    if outside := review.templates_outside(code):
        return "approval", (f"its plan builds {', '.join(outside)}, which is neither OpenFL's nor its own reviewed "
                            "code")
    kind, record = review.status(node.state, code.hash)
    if kind == review.REFUSED:
        return "approval", (f"its operator refused its code {code.hash[:review.SHORT]}: "
                            f"{record.get('why') or 'no reason given'}")
    return None


def held_line(experiment: str, code: review.Code) -> str:
    """The line the notebook shows for a held experiment."""
    return (f"{_ENVOY[0].name} holds experiment {experiment} for review (code {code.hash[:review.SHORT]}...): its "
            "operator runs make review on that node")


def wait_for_review(experiment: str, code: review.Code, poll: float = 0.5) -> None:
    """Wait up to approval_timeout for the operator to approve a held experiment's code; Refused if it is refused
    or not decided in time (it stays pending for the operator)."""
    node = _ENVOY[0]
    deadline = time.monotonic() + node.rules.approval_timeout
    while True:
        kind, record = review.status(node.state, code.hash)
        if kind == review.APPROVED:
            if node.log is not None:
                node.log.append("released", experiment=experiment, code=code.hash, by=record.get("by"))
            return
        why = None
        if kind == review.REFUSED:
            why = f"its operator refused its code {code.hash[:review.SHORT]}: {record.get('why') or 'no reason given'}"
        elif time.monotonic() > deadline:
            why = (f"its operator did not approve its code {code.hash[:review.SHORT]} within approval_timeout "
                   f"{node.rules.approval_timeout:g} s; it stays pending on the node (make review)")
        if why:
            node.running = None
            if node.log is not None:
                node.log.append("released", experiment=experiment, code=code.hash, decision="refused", detail=why)
            raise Refused(f"{node.name} refuses experiment {experiment}: {why}")
        time.sleep(poll)


def restore(original):
    """Plan.restore_object that, for an experiment this node approved by its code, loads its pickles so that only
    reviewed source runs (security.pickles)."""

    def wrapper(self, filename):
        running = _ENVOY[0].running if _ENVOY else None
        if running is None or running.code is None:
            return original(self, filename)
        if "/" in str(filename) or not str(filename).endswith(".pkl"):
            raise Refused(f"its plan names {filename} as a pickle, which its review did not read")
        code = running.code
        if running.source is None:  # in the experiment's unpacked folder, where OpenFL restores its objects
            running.source = pickles.Source(code.cells(), Path.cwd(), code.uses, code.imports)
        try:
            return pickles.load(Path(filename), running.source)
        except Refused as why:  # reported as this node's refusal: REFUSED in the notebook, not a failed task
            raise Refusal(f"{_ENVOY[0].name} refuses experiment {running.name}: {why}") from None

    return wrapper


def _spend(node: Envoy, running: Running) -> tuple[float, float]:
    """(epsilon spent on the node's data so far, epsilon after the experiment's declared rounds), at the budget's
    delta."""
    ledger = node.ledger()
    if ledger.unbounded:
        raise budget.LedgerError(f"its data was trained on without DP-SGD ({', '.join(ledger.unbounded)}), whose "
                                 "privacy loss is unbounded: its privacy budget cannot be kept")
    step, delta = running.round_step(node.train_size), node.rules.budget[1]
    return (budget.epsilon(ledger.history, delta),
            budget.epsilon(ledger.history + [step] * int(running.declared.train_rounds), delta))


def before_task(node: Envoy, collaborator, task, round_number: int) -> None:
    """Before a training task: hold the experiment to its declared rounds and the node's max_rounds, and spend
    the round's privacy in the ledger first (Refusal if it would pass the budget)."""
    contract = collaborator.task_runner.task_provider.task_contract.get(getattr(task, "function_name", task)) or {}
    running = node.running
    if running is None or contract.get("optimizer") is None:
        return  # validation
    declared, r = running.declared, round_number + 1
    limits = [(n, what) for n, what in ((declared.train_rounds, "its plan declared"),
                                         (node.rules.max_rounds, "its max_rounds allows")) if n is not None]
    for n, what in limits:
        if running.trained >= n:
            raise Refusal(f"{node.name} stops experiment {running.name} before round {r}: it asks for training round "
                          f"{running.trained + 1}, but {what} {n}")
    entry = {"experiment": running.name, "round": r, "dataset": node.dataset}
    try:
        ledger = node.ledger()
    except budget.LedgerError as exc:
        if node.rules.budget:
            raise Refusal(f"{node.name} stops experiment {running.name} before round {r}: {exc}") from None
        ledger = None  # no budget to keep: the round trains, and the audit log says the ledger was unreadable
        entry["ledger"] = str(exc)
    if declared.dp and ledger is not None:
        step = running.round_step(node.train_size)
        before, after = node.spent(), budget.epsilon(ledger.history + [step], node.delta)
        if node.rules.budget and (before is None or after > node.rules.budget[0]):
            left = "none" if before is None else f"{max(0.0, node.rules.budget[0] - before):.2f}"
            raise Refusal(f"{node.name} stops experiment {running.name} before round {r}: its privacy budget "
                          f"(epsilon {node.rules.budget[0]:g}) has {left} left, and this round would take the "
                          f"total to {after:.2f}")
        ledger.add(step)
        node._spent = (len(ledger.history), after)
        entry.update(noise=step[0], rate=step[1], steps=step[2], epsilon=after, delta=node.delta)
    elif ledger is not None:
        ledger.mark_unbounded(running.name)
    running.trained += 1
    if node.log is not None:
        node.log.append("trained", **entry)


def sent(node: Envoy, round_number: int, task_name: str, data_size: int, named_tensors) -> None:
    """Log one task's results, once they reached the aggregator."""
    if node.log is not None and node.running is not None:
        node.log.append("sent", experiment=node.running.name, round=round_number + 1, task=task_name,
                        samples=int(data_size), epsilon=node.spent(),
                        **audit.payload(named_tensors))


# --- on the director --------------------------------------------------------------------------------------------
def director_log() -> audit.AuditLog | None:
    """The director's audit log (None without MEDFL_DIRECTOR_STATE)."""
    if not _DIRECTOR and os.environ.get(DIRECTOR_STATE):
        _DIRECTOR.append(audit.AuditLog(Path(os.environ[DIRECTOR_STATE]) / audit.FILE, "director"))
    return _DIRECTOR[0] if _DIRECTOR else None


def _sha256(path) -> str:
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


# --- hooks ------------------------------------------------------------------------------------------------------
def install() -> None:
    """Put the envoy's and the director's halves in place in this process."""
    from openfl.component.collaborator.collaborator import Collaborator
    from openfl.component.director.director import Director
    from openfl.component.director.experiment import Experiment
    from openfl.component.envoy.envoy import Envoy as OpenFLEnvoy
    from openfl.federated.plan.plan import Plan
    from openfl.transport.grpc.aggregator_client import AggregatorGRPCClient

    def knowing_the_shard(init):
        def wrapper(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if _ENVOY:
                _ENVOY[0].train_size = len(self.shard_descriptor.get_dataset("train"))
                if _ENVOY[0].rules != policy.NodePolicy():
                    self.install_requirements = False  # a node with a policy installs nothing an experiment asks for

        return wrapper

    def guarding(do_task):
        def wrapper(self, task, round_number):
            if _ENVOY:
                before_task(_ENVOY[0], self, task, round_number)
            return do_task(self, task, round_number)

        return wrapper

    def logging_sent(send):
        def wrapper(self, collaborator_name, round_number, task_name, data_size, named_tensors):
            result = send(self, collaborator_name, round_number, task_name, data_size, named_tensors)
            if _ENVOY:
                sent(_ENVOY[0], round_number, task_name, data_size, named_tensors)
            return result

        return wrapper

    def logging_the_end(run_collaborator):
        def wrapper(self, *args, **kwargs):
            node = _ENVOY[0] if _ENVOY else None
            status = "failed"
            try:
                result = run_collaborator(self, *args, **kwargs)
                status = "completed"
                return result
            except Refusal:
                status = "stopped by its policy"
                raise
            finally:
                if node is not None and node.running is not None:
                    if node.log is not None:
                        node.log.append("ended", experiment=node.running.name, status=status,
                                        trained_rounds=node.running.trained)
                    node.running = None

        return wrapper

    def logging_submissions(set_new_experiment):
        async def wrapper(self, *, experiment_name, sender_name, experiment_archive_path, collaborator_names,
                          **kwargs):
            if log := director_log():
                log.append("arrived", experiment=experiment_name, researcher=sender_name,
                           archive_sha256=_sha256(experiment_archive_path), envoys=list(collaborator_names))
            return await set_new_experiment(self, experiment_name=experiment_name, sender_name=sender_name,
                                            experiment_archive_path=experiment_archive_path,
                                            collaborator_names=collaborator_names, **kwargs)

        return wrapper

    def logging_received(create):
        # The aggregator's server has parsed and checked each request by the time it hands it to the aggregator.
        def wrapper(self, **kwargs):
            server = create(self, **kwargs)
            receive, experiment = server.aggregator.send_local_task_results, self.name

            def logged(collaborator_name, round_number, task_name, data_size, named_tensors):
                if log := director_log():
                    what = audit.payload(named_tensors)
                    log.append("received", experiment=experiment, envoy=collaborator_name, round=round_number + 1,
                               task=task_name, samples=int(data_size),
                               **{k: what[k] for k in ("payload_sha256", "bytes", "metrics")})
                return receive(collaborator_name, round_number, task_name, data_size, named_tensors)

            server.aggregator.send_local_task_results = logged
            return server

        return wrapper

    def logging_ends(start):
        async def wrapper(self, **kwargs):
            try:
                return await start(self, **kwargs)
            finally:
                if log := director_log():
                    log.append("ended", experiment=self.name, status=str(getattr(self.status, "value", self.status)))

        return wrapper

    replace(OpenFLEnvoy, "__init__", knowing_the_shard)
    replace(Plan, "restore_object", restore)
    replace(OpenFLEnvoy, "_run_collaborator", logging_the_end)
    replace(Collaborator, "do_task", guarding)
    replace(AggregatorGRPCClient, "send_local_task_results", logging_sent)
    replace(Director, "set_new_experiment", logging_submissions)
    replace(Experiment, "_create_aggregator_grpc_server", logging_received)
    replace(Experiment, "start", logging_ends)
