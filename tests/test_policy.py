"""A hospital's policy, privacy budget and audit log, enforced by the node's own code (security.policy, budget,
guard, audit).

The attacker: a researcher whom the node admits, who controls the experiment (its code, its plan, its name, how
often it is sent) and wants more from the node's data than its policy allows: training without DP-SGD, more
rounds or privacy than it declared, a fresh budget under a new name. And anyone who edits a node's audit log
afterwards. The end-to-end tests play both against real processes."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from medfl import MedMNISTData, build_model, train
from medfl.privacy import DPSGD, declared
from medmnist_shard import DataError, MedMNISTShardDescriptor
from security import audit, budget, guard, policy
from security.signing import Refused

BUDGET = {"epsilon": 6, "delta": 1e-5}


# --- the policy section ---------------------------------------------------------------------------------------
def test_a_policy_reads_every_key_and_none_is_no_rule():
    assert policy.parse(None) == policy.NodePolicy()
    rules = policy.parse({"researchers": ["alice"], "require_dp": True, "privacy_budget": BUDGET,
                          "require_secure_aggregation": True, "max_rounds": 20, "min_envoys": 3, "approval": "auto"})
    assert rules == policy.NodePolicy(("alice",), True, (6.0, 1e-5), True, 20, 3, "auto")
    assert guard.describe(rules) == ("researchers alice; DP-SGD required; privacy budget epsilon 6 at delta 1e-05; "
                                     "secure aggregation required; at most 20 rounds; at least 3 envoys")


@pytest.mark.parametrize("section, message", [
    ({"require_pd": True}, "unknown policy key 'require_pd': the keys are researchers, require_dp"),
    ({"require_dp": "yes"}, "policy require_dp='yes': give true or false"),
    ({"researchers": "alice"}, "policy researchers='alice': give a list of researcher certificate names"),
    ({"max_rounds": 0}, "policy max_rounds=0: give a whole number of at least 1"),
    ({"min_envoys": 2.5}, "policy min_envoys=2.5: give a whole number"),
    ({"privacy_budget": 6}, r"policy privacy_budget=6: give \{epsilon: E, delta: D\}"),
    ({"privacy_budget": {"epsilon": 6}}, "give {epsilon: E, delta: D}"),
    ({"privacy_budget": {"epsilon": -1, "delta": 1e-5}}, "an epsilon above 0 and a delta between 0 and 1"),
    ({"privacy_budget": {"epsilon": 6, "delta": 2}}, "an epsilon above 0 and a delta between 0 and 1"),
    ({"approval": "manual", "approval_timeout": "soon"}, "policy approval_timeout=.soon.: give the seconds"),
    (["require_dp"], "policy must be a mapping of rules"),
])
def test_a_wrong_policy_says_which_key_and_what_to_write(section, message):
    with pytest.raises(policy.PolicyError, match=message.replace("{", r"\{").replace("}", r"\}")
                       if "\\" not in message else message):
        policy.parse(section, "envoy_config.yaml")


def test_trusted_researchers_moved_into_the_policy_and_researchers_need_tls(tmp_path, monkeypatch):
    monkeypatch.setattr(guard, "_ENVOY", [])  # this process is no envoy: leave it so
    config = tmp_path / "envoy_config.yaml"
    config.write_text("trusted_researchers: [alice]\n")
    with pytest.raises(policy.PolicyError, match=r"now the policy's researchers: write policy: \{researchers: "
                                                 r"\['alice'\]\}"):
        policy.load(config)
    config.write_text("policy: {researchers: [alice]}\nshard_descriptor: {params: {flag: bloodmnist, size: 28}}\n")
    monkeypatch.setenv(guard.ENVOY_STATE, str(tmp_path / "state"))
    with pytest.raises(policy.PolicyError, match="lists researchers, but without mutual TLS nobody can be identified"):
        guard.configure_envoy("envoy_1", config, tls=False)
    config.write_text(f"policy: {{privacy_budget: {json.dumps(BUDGET)}}}\n")
    monkeypatch.delenv(guard.ENVOY_STATE)
    with pytest.raises(policy.PolicyError, match="privacy_budget, which the node keeps in its state folder"):
        guard.configure_envoy("envoy_1", config, tls=False)


def _plan(train_rounds=2, privacy=None, secure=False, min_envoys=0.5, envoys=("envoy_1", "envoy_2", "envoy_3")):
    """The plan the notebook's start cell writes (OpenFL's own override mechanism), as the envoy reads it."""
    from openfl.federated import Plan
    from openfl.native.native import update_plan

    from security.secagg import plan as secure_plan

    plan = Plan()
    plan.config = {"data_loader": {"settings": {"train_batch_size": 20}}}
    overrides = {"aggregator.settings.min_envoys": min_envoys, **secure_plan(secure, 0, 100.0),
                 **declared(train_rounds, privacy, [{"envoy": e, "online": True} for e in envoys]
                            + [{"envoy": "envoy_9", "online": False}])}
    return update_plan(overrides, plan=plan, resolve=False).config


def test_the_plan_declares_what_each_node_checks():
    dp = DPSGD(max_grad_norm=1.0, target_epsilon=4.0, rounds=3, epochs_per_round=2)
    d = policy.Declaration.of(_plan(3, dp, secure=True))
    assert (d.train_rounds, d.batch_size, d.envoys, d.secure_aggregation, d.federation_floor()) == \
        (3, 20, ("envoy_1", "envoy_2", "envoy_3"), True, 2)
    assert d.dp == {"enabled": True, "max_grad_norm": 1.0, "noise_multiplier": 0.0, "target_epsilon": 4.0,
                    "delta": 0.0, "rounds": 3, "epochs_per_round": 2}
    assert policy.Declaration.of(_plan(0)).dp is None  # the test experiment: no training, no DP-SGD
    assert policy.Declaration.of({}).train_rounds is None  # a plan from elsewhere declares nothing


@pytest.mark.parametrize("rules, plan, rule, why", [
    ({"researchers": ["bob"]}, {}, "researchers", "it is signed by 'alice', and its policy admits only bob"),
    ({"require_dp": True}, {}, "require_dp", "it trains without DP-SGD, and its policy requires DP-SGD (require_dp: "
                                             "true)"),
    ({"require_secure_aggregation": True}, {}, "require_secure_aggregation", "it trains without secure aggregation, "
     "and its policy requires it (require_secure_aggregation: true)"),
    ({"max_rounds": 1}, {}, "max_rounds", "it declares 2 training rounds, more than its max_rounds 1"),
    ({"min_envoys": 4}, {}, "min_envoys", "it federates 3 envoys, fewer than its min_envoys 4, so its "
                                          "update could be one of too few"),
    ({"min_envoys": 3}, {}, "min_envoys", "its aggregator goes on with as few as 2 envoys, fewer than its min_envoys 3"
                                          ": give run['min_envoys'] = 3 or more"),
    ({"privacy_budget": BUDGET}, {}, "privacy_budget", "its privacy budget (epsilon 6) cannot pay for training "
                                                       "without DP-SGD, whose privacy loss is unbounded"),
    ({"privacy_budget": BUDGET}, {"privacy": DPSGD(noise_multiplier=1.0)}, "privacy_budget",
     "its privacy budget (epsilon 6) has 1.00 left, and this experiment would spend 9.00"),
])
def test_each_rule_refuses_in_one_sentence_with_its_numbers(rules, plan, rule, why):
    declaration = policy.Declaration.of(_plan(**plan))
    assert policy.decide(policy.parse(rules), declaration, "alice", lambda: (5.0, 14.0)) == (rule, why)
    assert policy.decide(policy.NodePolicy(), declaration, "alice", lambda: (5.0, 14.0)) is None


def test_what_trains_nothing_passes_the_dp_rules_and_what_declares_nothing_is_refused():
    strict = policy.parse({"require_dp": True, "privacy_budget": BUDGET, "require_secure_aggregation": True})
    assert policy.decide(strict, policy.Declaration.of(_plan(0)), None, lambda: 1 / 0) is None
    assert policy.decide(strict, policy.Declaration.of({}), None, lambda: 1 / 0)[0] == "declaration"
    assert policy.decide(policy.NodePolicy(), policy.Declaration.of({}), None, lambda: 1 / 0) is None


def test_the_node_resolves_min_envoys_as_the_experiments_aggregator_does():
    from medfl.selection import quorum

    envoys = [f"envoy_{i}" for i in range(1, 8)]
    for n in range(1, 8):
        for min_envoys in (1, 2, 3, 0.1, 0.5, 0.51, 2 / 3, 1.0):
            declared = policy.Declaration.of(_plan(min_envoys=min_envoys, envoys=envoys[:n]))
            assert declared.federation_floor() == quorum(min_envoys, n), (min_envoys, n)
    # A plan that keeps every envoy (1.0, a share) satisfies a node that wants all three.
    assert policy.decide(policy.parse({"min_envoys": 3}), policy.Declaration.of(_plan(min_envoys=1.0)), "alice",
                         lambda: 1 / 0) is None


def test_the_plan_is_read_from_the_archive_without_unpacking(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "x.zip", "w") as z:
        z.writestr("plan/plan.yaml", "declared: {settings: {train_rounds: 4}}\n")
        z.writestr("evil.pkl", b"not to be touched")
    assert policy.read_plan(tmp_path / "x.zip") == {"declared": {"settings": {"train_rounds": 4}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zip"]
    (tmp_path / "broken.zip").write_bytes(b"PK garbage")
    with pytest.raises(Refused, match="its archive holds no readable plan/plan.yaml"):
        policy.read_plan(tmp_path / "broken.zip")


# --- the privacy budget ---------------------------------------------------------------------------------------
def test_rdp_across_experiments_is_one_accountant_over_every_step_not_the_sum_of_epsilons():
    from opacus.accountants import RDPAccountant

    first = budget.round_step({"noise_multiplier": 1.1, "epochs_per_round": 2, "rounds": 3}, 32, 1000)
    second = budget.round_step({"target_epsilon": 3.0, "epochs_per_round": 1, "rounds": 2}, 64, 1000)
    assert first == (1.1, 0.032, 64)
    one = RDPAccountant()
    for noise, rate, steps in [first] * 3 + [second] * 2:
        for _ in range(steps):
            one.step(noise_multiplier=noise, sample_rate=rate)
    joined = budget.epsilon([first] * 3 + [second] * 2, 1e-5)
    assert joined == pytest.approx(one.get_epsilon(1e-5, alphas=budget.ALPHAS), rel=1e-12)
    assert joined < budget.epsilon([first] * 3, 1e-5) + budget.epsilon([second] * 2, 1e-5)
    assert budget.epsilon([], 1e-5) == 0.0


def test_the_node_counts_exactly_what_the_experiments_dp_sgd_spends(tiny_file):
    from medfl import privacy as experiment_privacy

    assert budget.ALPHAS == experiment_privacy.ALPHAS
    shard = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist", 28, {"train": 200, "val": 20,
                                                                                  "test": 20}).parent, "1,1")
    data = MedMNISTData(train_batch_size=20, device="cpu")
    data.shard_descriptor = shard
    torch.manual_seed(0)
    model = build_model("bloodmnist", 28, norm="group")
    dp = DPSGD(max_grad_norm=1.0, target_epsilon=4.0, rounds=2, epochs_per_round=1)
    declaration = policy.Declaration.of(_plan(2, dp)).dp
    for _ in range(2):
        train(model, data.get_train_loader(), torch.optim.Adam(model.parameters()), "cpu", task="multi-class",
              device_request="cpu", privacy=dp)
    step = budget.round_step(declaration, 20, 200)
    assert step[0] == dp.noise_multiplier and dp.accountant.history == [(step[0], step[1], 2 * step[2])]
    assert budget.epsilon([step] * 2, dp.delta) == pytest.approx(dp.spent()["epsilon"], rel=1e-9)


def test_the_ledger_is_written_whole_and_a_damaged_or_missing_one_is_never_zero(tmp_path):
    path = budget.Ledger.of(tmp_path, "bloodmnist-28")
    ledger = budget.Ledger.load(path, must_exist=False)
    ledger.add((1.0, 0.1, 10))
    ledger.mark_unbounded("plain-run")
    assert json.loads(path.read_text()) == {"history": [[1.0, 0.1, 10]], "unbounded": ["plain-run"]}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert budget.Ledger.load(path, must_exist=True).history == [(1.0, 0.1, 10)]
    for damage in ('{"history": [[1.0, 0.1', '{"history": [[-1.0, 0.1, 10]]}', "{}"):
        path.write_text(damage)
        with pytest.raises(budget.LedgerError, match=f"its privacy ledger {path} is damaged .*restore it from a "
                                                     "backup"):
            budget.Ledger.load(path, must_exist=False)
    path.unlink()
    with pytest.raises(budget.LedgerError, match="is missing, but its audit log shows one was kept"):
        budget.Ledger.load(path, must_exist=True)


def _node(tmp_path, rules, train_rounds=2, dp=None, n=200):
    node = guard.Envoy("envoy_1", policy.parse(rules), audit.AuditLog(tmp_path / audit.FILE, "envoy_1"),
                       "bloodmnist-28", train_size=n)
    node.running = guard.Running("exp", policy.Declaration.of(_plan(train_rounds, dp)))
    return node


def _collaborator():
    contract = {"train": {"optimizer": "optimizer"}, "validate": {"optimizer": None}}
    return SimpleNamespace(task_runner=SimpleNamespace(task_provider=SimpleNamespace(task_contract=contract)))


def _task(name):
    return SimpleNamespace(function_name=name)


def test_the_node_spends_each_round_before_it_trains_and_stops_the_round_that_would_overspend(tmp_path):
    dp = DPSGD(noise_multiplier=1.0, rounds=5)
    step = budget.round_step(policy.Declaration.of(_plan(5, dp)).dp, 20, 200)
    limit = (budget.epsilon([step] * 2, 1e-5) + budget.epsilon([step] * 3, 1e-5)) / 2  # room for two rounds
    node = _node(tmp_path, {"privacy_budget": {"epsilon": limit, "delta": 1e-5}}, train_rounds=5, dp=dp)
    ledger = budget.Ledger.of(tmp_path, "bloodmnist-28")
    guard.before_task(node, _collaborator(), _task("validate"), 0)  # validation spends nothing
    assert not ledger.exists()
    for r in range(2):
        guard.before_task(node, _collaborator(), _task("train"), r)
        assert len(json.loads(ledger.read_text())["history"]) == r + 1  # on disk before the round trains
    with pytest.raises(guard.Refusal, match=rf"envoy_1 stops experiment exp before round 3: its privacy budget "
                                            rf"\(epsilon {limit:g}\) has 0.\d\d left, and this round would take the "
                                            r"total to \d+\.\d\d"):
        guard.before_task(node, _collaborator(), _task("train"), 2)
    assert budget.epsilon(budget.Ledger.load(ledger, True).history, 1e-5) <= limit
    trained = node.log.entries("trained")
    assert [(e["round"], e["steps"], e["epsilon"] <= limit) for e in trained] == [(1, step[2], True),
                                                                                   (2, step[2], True)]


def test_an_experiment_that_declares_no_training_to_pass_require_dp_cannot_train(tmp_path):
    node = _node(tmp_path, {"require_dp": True, "privacy_budget": BUDGET}, train_rounds=0)
    assert policy.decide(node.rules, node.running.declared, "alice", lambda: 1 / 0) is None  # it trains nothing
    guard.before_task(node, _collaborator(), _task("validate"), 0)
    with pytest.raises(guard.Refusal, match="envoy_1 stops experiment exp before round 1: it asks for training round "
                                            "1, but its plan declared 0"):
        guard.before_task(node, _collaborator(), _task("train"), 0)
    assert not budget.Ledger.of(tmp_path, "bloodmnist-28").exists()  # nothing spent, nothing marked


def test_the_node_holds_an_experiment_to_its_declared_rounds_and_max_rounds(tmp_path):
    node = _node(tmp_path, {}, train_rounds=1)
    guard.before_task(node, _collaborator(), _task("train"), 0)
    with pytest.raises(guard.Refusal, match="envoy_1 stops experiment exp before round 2: it asks for training round "
                                            "2, but its plan declared 1"):
        guard.before_task(node, _collaborator(), _task("train"), 1)
    capped = _node(tmp_path / "capped", {"max_rounds": 1}, train_rounds=3)
    guard.before_task(capped, _collaborator(), _task("train"), 0)
    with pytest.raises(guard.Refusal, match="but its max_rounds allows 1"):
        guard.before_task(capped, _collaborator(), _task("train"), 1)
    # Training without DP-SGD is marked: no budget can be kept on this data afterwards.
    ledger = budget.Ledger.load(budget.Ledger.of(tmp_path, "bloodmnist-28"), must_exist=True)
    assert ledger.unbounded == ["exp"] and node.spent() is None


def test_a_damaged_ledger_refuses_every_experiment_on_a_node_with_a_budget(tmp_path):
    dp = DPSGD(noise_multiplier=1.0, rounds=1)
    node = _node(tmp_path, {"privacy_budget": BUDGET}, train_rounds=1, dp=dp)
    guard.before_task(node, _collaborator(), _task("train"), 0)
    budget.Ledger.of(tmp_path, "bloodmnist-28").write_text("garbage")
    fresh = _node(tmp_path, {"privacy_budget": BUDGET}, train_rounds=1, dp=dp)  # the envoy, started again
    with pytest.raises(guard.Refusal, match="before round 1: its privacy ledger .* is damaged"):
        guard.before_task(fresh, _collaborator(), _task("train"), 0)
    budget.Ledger.of(tmp_path, "bloodmnist-28").unlink()
    fresh = _node(tmp_path, {"privacy_budget": BUDGET}, train_rounds=1, dp=dp)
    with pytest.raises(guard.Refusal, match="is missing, but its audit log shows one was kept"):
        guard.before_task(fresh, _collaborator(), _task("train"), 0)


# --- the audit log --------------------------------------------------------------------------------------------
def _log(tmp_path, n=5):
    log = audit.AuditLog(tmp_path / "envoy_1" / audit.FILE, "envoy_1")
    for i in range(n):
        log.append("sent", experiment="exp", round=i + 1, task="train", payload_sha256=f"{i:064x}", samples=10,
                   bytes=100, tensors=[], metrics={})
    return log.path


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines.__setitem__(2, lines[2].replace('"samples":10', '"samples":99')),
     "line 3 was changed after it was written"),
    (lambda lines: lines.pop(2), "line 3 is entry 4 where entry 3 belongs: lines were removed or moved"),
    (lambda lines: lines.insert(1, lines.pop(3)), "line 2 is entry 4 where entry 2 belongs"),
    (lambda lines: lines.__setitem__(4, lines[4][:40]), "line 5 is not a log entry"),
])
def test_an_edited_removed_reordered_or_torn_line_breaks_the_chain_where_it_is(tmp_path, edit, message):
    path = _log(tmp_path)
    assert audit.check(tmp_path)[1] == []
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    problems = audit.check(tmp_path)[1]
    assert problems and problems[0].startswith("envoy_1 (") and message in problems[0]


def test_a_log_goes_on_after_a_restart_and_a_recomputed_chain_still_fails_the_cross_check(tmp_path):
    path = _log(tmp_path, 2)
    audit.AuditLog(path, "envoy_1").append("ended", experiment="exp", status="completed")
    assert [e["seq"] for e in audit.AuditLog(path, "envoy_1").entries()] == [1, 2, 3]
    director = audit.AuditLog(tmp_path / "director" / audit.FILE, "director")
    for i in range(2):
        director.append("received", experiment="exp", envoy="envoy_1", round=i + 1, task="train",
                        payload_sha256=f"{i:064x}", samples=10, bytes=100, metrics={})
    assert audit.check(tmp_path)[1] == []
    # Whoever rewrites the envoy's log with fresh hashes still disagrees with the director's.
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    path.unlink()
    rewritten = audit.AuditLog(path, "envoy_1")
    for e in entries:
        rewritten.append(e["event"], **{k: v for k, v in e.items() if k not in ("seq", "time", "node", "event", "prev",
                                                                                "hash")} | (
            {"samples": 1000} if e.get("round") == 2 else {}))
    problems = audit.check(tmp_path)[1]
    assert len(problems) == 2 and "envoy_1: line 2: sent train of round 2 in exp" in problems[0]
    assert "director: line 2: received train of round 2 in exp from envoy_1" in problems[1]


def test_the_payload_hash_is_the_same_on_both_sides_of_the_wire():
    from openfl.protocols import aggregator_pb2, base_pb2

    tensors = [base_pb2.NamedTensor(name="b", round_number=1, report=False, tags=["trained"], data_bytes=b"\x01" * 8),
               base_pb2.NamedTensor(name="acc", round_number=1, report=True, tags=["metric"],
                                    data_bytes=torch.tensor([0.5]).numpy().tobytes())]
    sent = audit.payload(tensors)
    wire = aggregator_pb2.TaskResults(tensors=tensors).SerializeToString()
    received = aggregator_pb2.TaskResults.FromString(wire)
    assert audit.payload(received.tensors) == sent
    assert sent["metrics"] == {"acc": 0.5} and sent["bytes"] == 12 and sent["tensors"] == [["acc", 4], ["b", 8]]
    assert audit.payload(tensors[:1])["payload_sha256"] != sent["payload_sha256"]


def test_the_refusal_marker_and_the_orders_are_the_same_on_the_nodes_and_in_the_experiment():
    from medfl.events import REFUSED as experiment_side
    from openfl_adjustments.contract import REFUSED

    assert experiment_side == REFUSED


def test_the_launcher_checks_envoy_policy_before_anything_starts(tmp_path):
    from localfed.run import check, envoy_policy
    from localfed.settings import parse

    file = tmp_path / "policy.yaml"
    file.write_text("require_dp: true\nprivacy_budget: {epsilon: 6, delta: 1.0e-5}\n")
    assert envoy_policy(str(file)) == {"require_dp": True, "privacy_budget": {"epsilon": 6, "delta": 1e-5}}
    file.write_text("policy: {max_rounds: 3}\nparams: {}\n")  # a whole envoy config: its policy section
    assert envoy_policy(str(file)) == {"max_rounds": 3}
    file.write_text("require_dp: maybe\n")
    with pytest.raises(DataError, match=f"envoy_policy={file}: policy require_dp='maybe': give true or false"):
        check(parse(["demo", f"envoy_policy={file}"]))
    with pytest.raises(DataError, match="envoy_policy=/.*/nowhere.yaml: cannot read it"):
        check(parse(["demo", "envoy_policy=nowhere.yaml"]))
    file.write_text("researchers: [alice]\n")
    with pytest.raises(DataError, match="names researchers, whom only mutual TLS identifies: leave tls=0 out"):
        check(parse(["demo", f"envoy_policy={file}", "tls=0"]))


def test_make_demo_gives_every_envoy_the_policy_and_keeps_the_nodes_state_where_asked(tmp_path):
    """envoy_policy= and envoy_state= reach each node (the federation tests below run such nodes), and make audit of
    the run's folder finds the state through the run's launcher.json."""
    from localfed.run import local_federation
    from localfed.settings import parse

    (tmp_path / "policy.yaml").write_text("require_dp: true\n")
    settings = parse(["demo", f"envoy_policy={tmp_path / 'policy.yaml'}", f"envoy_state={tmp_path / 'state'}", "tls=0"])
    fed = local_federation(settings, tmp_path / "run", {"envoy_1": {}, "envoy_2": {}})
    assert fed.policies == {"envoy_1": {"require_dp": True}, "envoy_2": {"require_dp": True}}
    assert fed._state_env("envoy_2", guard.ENVOY_STATE) == {guard.ENVOY_STATE: str(tmp_path / "state" / "envoy_2")}
    assert fed._state_env("director", guard.DIRECTOR_STATE) == {guard.DIRECTOR_STATE: str(tmp_path / "state" /
                                                                                         "director")}
    run_dir = tmp_path / "runs" / "20261206-120000-bloodmnist-28"
    run_dir.mkdir(parents=True)
    (run_dir / "launcher.json").write_text(json.dumps({"envoy_state": str(tmp_path / "state")}))
    _log(tmp_path / "state")
    audited = subprocess.run([sys.executable, "-m", "security.audit", str(run_dir)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert f"ran with envoy_state={tmp_path / 'state'}: checking that folder" in audited.stdout
    assert "envoy_1: 5 entries" in audited.stdout


# --- end to end, real processes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hospitals(tiny_file, tmp_path_factory):
    """Two envoys under one policy (DP-SGD required, a budget with room for two rounds of the tests' DP-SGD), each
    keeping its state in its own folder across experiments, as hospitals' nodes do."""
    from localfed.federation import LocalFederation
    from medmnist_shard.descriptor import prepare

    data_dir = tiny_file("bloodmnist", 28, {"train": 200, "val": 20, "test": 20}).parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},2",
                             "download": False} for r in (1, 2)}
    sizes = [len(prepare(**params).indices["train"]) for params in shards.values()]
    steps = [budget.round_step({"noise_multiplier": 1.0, "epochs_per_round": 1, "rounds": 1}, 32, n) for n in sizes]
    limit = max((budget.epsilon([s] * 2, 1e-5) + budget.epsilon([s] * 3, 1e-5)) / 2 for s in steps)
    assert all(budget.epsilon([s] * 3, 1e-5) > limit for s in steps)
    rules = {"require_dp": True, "privacy_budget": {"epsilon": round(limit, 3), "delta": 1e-5}}
    workdir = tmp_path_factory.mktemp("hospitals")
    with LocalFederation(workdir, shards, [28, 28, 3], [1], policies=dict.fromkeys(shards, rules),
                         state=workdir / "state") as fed:
        yield fed, rules["privacy_budget"]["epsilon"]


def _submit(fed, tmp_path, name, rounds, echo=lambda line: None, **parameters):
    """The notebook's cells submit a `rounds`-round experiment named `name`; follow it to its end."""
    from notebook_cells import run_until, start_experiment

    from medfl.researcher import follow

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT / "workspace")
        cells = run_until("validate-task", director_host=fed.host, director_port=fed.port, device="cpu",
                          output_dir=str(tmp_path / "runs"), preview_dir=str(tmp_path), train_batch_size=32,
                          rounds=rounds, **parameters)
        return follow(start_experiment(cells, name, rounds=rounds), rounds, echo=echo)


@pytest.mark.slow
def test_an_experiment_without_dp_is_refused_by_each_envoy_before_anything_of_it_is_unpickled(hospitals, tmp_path):
    fed, _ = hospitals
    lines = []
    run = _submit(fed, tmp_path, "no-dp", 1, echo=lines.append)
    assert run.error.startswith("only 0 of 2 envoys remain")
    assert sorted(line for line in lines if "REFUSED" in line) == [  # what the notebook and make demo show
        f"round 1/1        {e}     REFUSED: {e} refuses experiment no-dp: it trains without DP-SGD, and its policy "
        "requires DP-SGD (require_dp: true); the experiment goes on without it" for e in ("envoy_1", "envoy_2")]
    assert sorted((d["envoy"], d["reason"]) for d in run.dropouts) == [
        (e, f"refused: {e} refuses experiment no-dp: it trains without DP-SGD, and its policy requires DP-SGD "
            "(require_dp: true)") for e in ("envoy_1", "envoy_2")]
    for envoy in ("envoy_1", "envoy_2"):
        component = next(c for c in fed.components if c.name == envoy)
        log = component.log.read_text()
        assert "Refused experiment no-dp, unpacking nothing of it" in log
        if "Starting the Collaborator Service" in log:  # another test of this module ran first
            assert log.index("Refused experiment no-dp") > log.rindex("Starting the Collaborator Service")
        assert not list(component.log.parent.parent.rglob(f"{envoy}_no-dp"))  # never unpacked


@pytest.mark.slow
def test_a_researcher_who_declares_fewer_rounds_than_she_runs_is_stopped_at_the_first_undeclared(hospitals,
                                                                                               tmp_path,
                                                                                               monkeypatch):
    import medfl.privacy

    fed, _ = hospitals
    honest = medfl.privacy.declared
    monkeypatch.setattr(medfl.privacy, "declared", lambda train_rounds, *a: honest(train_rounds - 1, *a))
    run = _submit(fed, tmp_path, "declares-one-runs-two", 2, dp=True, dp_options={"noise_multiplier": 1.0})
    assert sorted(d["envoy"] for d in run.dropouts) == ["envoy_1", "envoy_2"]
    for d in run.dropouts:
        assert d["round"] == 2 and d["reason"] == (
            f"refused: {d['envoy']} stops experiment declares-one-runs-two before round 2: it asks for training "
            "round 2, but its plan declared 1")
    assert run.error.startswith("only 0 of 2 envoys remain")


@pytest.mark.slow
def test_the_budget_counts_every_experiment_whatever_its_name(hospitals, tmp_path):
    fed, limit = hospitals
    # One round was spent by the test above if it ran first; this run spends one more, or two.
    first = _submit(fed, tmp_path, "first", 1, dp=True, dp_options={"noise_multiplier": 1.0})
    assert first.error is None and not first.dropouts
    again = _submit(fed, tmp_path, "renamed", 1, dp=True, dp_options={"noise_multiplier": 1.0})
    if again.error is None:  # the first test did not run: room for this one, and not another
        again = _submit(fed, tmp_path, "renamed-again", 1, dp=True, dp_options={"noise_multiplier": 1.0})
    assert again.error.startswith("only 0 of 2 envoys remain")
    for d in again.dropouts:
        assert d["round"] == 1 and f"its privacy budget (epsilon {limit:g}) has" in d["reason"] \
            and "left, and this experiment would spend" in d["reason"]
    for envoy in ("envoy_1", "envoy_2"):
        ledger = budget.Ledger.load(budget.Ledger.of(fed.state / envoy, "bloodmnist-28"), must_exist=True)
        assert len(ledger.history) == 2 and budget.epsilon(ledger.history, 1e-5) <= limit


@pytest.mark.slow
def test_make_audit_passes_then_names_the_line_someone_edited(hospitals, tmp_path):
    fed, _ = hospitals
    import time

    _submit(fed, tmp_path, "audited", 1, dp=True, dp_options={"noise_multiplier": 1.0})  # refused or not: logged

    def settled(envoy):  # its part ended (or it refused), so its last payload sent is in its log
        entries = audit.AuditLog(fed.state / envoy / audit.FILE, envoy).entries()
        return any(e.get("experiment") == "audited" and (e["event"] == "ended" or e.get("decision") == "refused")
                   for e in entries)

    deadline = time.monotonic() + 60
    while not all(settled(e) for e in ("envoy_1", "envoy_2")) and time.monotonic() < deadline:
        time.sleep(0.2)
    state = tmp_path / "state"
    shutil.copytree(fed.state, state)

    def audit_run():
        return subprocess.run(["make", "--no-print-directory", "audit", f"state={state}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    passed = audit_run()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "every chain unbroken, every payload sent received by the director" in passed.stdout
    log = state / "envoy_2" / audit.FILE
    lines = log.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if '"event":"sent"' in line)
    lines[number - 1] = lines[number - 1].replace('"samples":', '"samples":1')
    log.write_text("\n".join(lines) + "\n")
    failed = audit_run()
    assert failed.returncode != 0
    assert f"AUDIT FAILED: envoy_2 ({log}): line {number} was changed after it was written" in failed.stdout
    assert f"AUDIT FAILED: envoy_2: line {number}: sent " in failed.stdout  # and the director's log disagrees


def test_the_docs_show_a_policy_an_envoy_accepts():
    text = (ROOT / "docs" / "privacy.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    import yaml

    assert policy.parse(yaml.safe_load(block)["policy"]).budget is not None
    for page in ("across-hosts.md", "security.md"):
        assert "policy:" in (ROOT / "docs" / page).read_text()
    assert Path(ROOT / "envoy" / "envoy_config_1.yaml").read_text().count("policy") >= 1


def test_an_arrived_experiment_is_decided_from_its_archive_and_logged_either_way(tmp_path, monkeypatch):
    import zipfile

    import yaml

    def archive(name, **plan):
        path = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("plan/plan.yaml", yaml.safe_dump(_plan(**plan)))
        return path

    node = guard.Envoy("envoy_1", policy.parse({"require_dp": True, "privacy_budget": BUDGET}),
                       audit.AuditLog(tmp_path / "state" / audit.FILE, "envoy_1"), "bloodmnist-28", train_size=200)
    monkeypatch.setattr(guard, "_ENVOY", [node])
    with pytest.raises(Refused, match="^envoy_1 refuses experiment plain: it trains without DP-SGD"):
        guard.admit("plain", archive("plain"), "ab" * 32, "alice", True)
    with pytest.raises(Refused, match="^envoy_1 refuses experiment forged: its signature by 'alice' does not match"):
        guard.admit("forged", archive("forged"), "cd" * 32, None, False, "its signature by 'alice' does not match")
    guard.admit("private", archive("private", privacy=DPSGD(noise_multiplier=2.0, rounds=2)), "ef" * 32, "alice",
                True)
    assert node.running.name == "private" and node.running.declared.train_rounds == 2
    arrived = node.log.entries("arrived")
    assert [(e["experiment"], e["decision"], e["rule"], e["signature"]) for e in arrived] == [
        ("plain", "refused", "require_dp", True), ("forged", "refused", "signature", False),
        ("private", "accepted", None, True)]
    # Data once trained on without DP-SGD can keep no budget.
    budget.Ledger.load(budget.Ledger.of(tmp_path / "state", "bloodmnist-28"), False).mark_unbounded("long-ago")
    node._ledger = None
    with pytest.raises(Refused, match="its data was trained on without DP-SGD \\(long-ago\\), whose privacy loss is "
                                      "unbounded: its privacy budget cannot be kept"):
        guard.admit("again", archive("again", privacy=DPSGD(noise_multiplier=2.0, rounds=2)), "01" * 32, "alice",
                    True)
