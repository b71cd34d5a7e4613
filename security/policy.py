"""A hospital's policy: what its envoy lets run on its data, decided by code installed on the node.

The `policy:` section of an envoy's config (every key optional; without one the envoy runs what it trusts, as
before):

    policy:
      researchers: [alice]          # certificate names allowed to run experiments here (narrows the director's)
      require_dp: true              # every round trained here uses DP-SGD
      privacy_budget: {epsilon: 6, delta: 1.0e-5}   # over every experiment ever run on this node's data
      require_secure_aggregation: true
      max_rounds: 20                # training rounds per experiment
      min_envoys: 3                 # no part in a federation of fewer envoys
      approval: manual              # run only code its operator approved (review.py); default auto
      approval_timeout: 600         # seconds a held experiment waits for the operator

The envoy decides on each experiment from its signature (trust.py) and what its plan declares
(medfl.privacy.declared writes it: training rounds, epochs, batch size, DP-SGD's settings, the envoys), read from
the archive before anything in it is unpacked or unpickled. A refusal reaches the notebook as one line naming the
envoy, the rule and the numbers. While the experiment runs the node holds it to that declaration: no training
round beyond those declared, none that would overspend the budget (guard.py).
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .signing import Refused

KEYS = ("researchers", "require_dp", "privacy_budget", "require_secure_aggregation", "max_rounds", "min_envoys",
        "approval", "approval_timeout")
PLAN = "plan/plan.yaml"
DECLARED = "declared"  # the plan's section that medfl.privacy.declared writes


class PolicyError(ValueError):
    """An envoy config whose policy cannot be read; the message says what to write instead."""


@dataclass(frozen=True)
class NodePolicy:
    """One envoy's rules (the defaults: none)."""

    researchers: tuple[str, ...] | None = None
    require_dp: bool = False
    budget: tuple[float, float] | None = None  # (epsilon, delta)
    require_secure_aggregation: bool = False
    max_rounds: int | None = None
    min_envoys: int | None = None
    approval: str = "auto"  # or "manual": only code its operator approved (review.py)
    approval_timeout: float = 600.0

    @property
    def needs_declaration(self) -> bool:
        return bool(self.require_dp or self.budget or self.max_rounds or self.min_envoys)


def load(config_path: Path) -> NodePolicy:
    """The policy of an envoy config (NodePolicy() if it has none); PolicyError naming the key if it is wrong."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    if "trusted_researchers" in config:
        raise PolicyError(f"{config_path}: trusted_researchers is now the policy's researchers: write "
                          f"policy: {{researchers: {config['trusted_researchers']}}}")
    return parse(config.get("policy"), str(config_path))


def parse(section, where: str = "policy") -> NodePolicy:
    """A policy section (a dict, or None) as a NodePolicy; PolicyError naming the key and what to give."""
    if section is None:
        return NodePolicy()
    if not isinstance(section, dict):
        raise PolicyError(f"{where}: policy must be a mapping of rules, e.g. policy: {{require_dp: true}}")
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise PolicyError(f"{where}: unknown policy key {unknown[0]!r}: the keys are {', '.join(KEYS)}")

    def fail(key: str, what: str):
        raise PolicyError(f"{where}: policy {key}={section[key]!r}: give {what}")

    rules = {}
    if "researchers" in section:
        names = section["researchers"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            fail("researchers", "a list of researcher certificate names, e.g. [alice, bob]")
        rules["researchers"] = tuple(names)
    for key in ("require_dp", "require_secure_aggregation"):
        if key in section:
            if not isinstance(section[key], bool):
                fail(key, "true or false")
            rules[key] = section[key]
    for key in ("max_rounds", "min_envoys"):
        if key in section and section[key] is not None:
            if isinstance(section[key], bool) or not isinstance(section[key], int) or section[key] < 1:
                fail(key, "a whole number of at least 1")
            rules[key] = section[key]
    if "privacy_budget" in section:
        budget = section["privacy_budget"]
        try:
            if set(budget) != {"epsilon", "delta"}:
                raise TypeError
            epsilon, delta = float(budget["epsilon"]), float(budget["delta"])
        except (TypeError, ValueError):
            fail("privacy_budget", "{epsilon: E, delta: D}, e.g. {epsilon: 6, delta: 1.0e-5}")
        if not (epsilon > 0 and math.isfinite(epsilon) and 0 < delta < 1):
            fail("privacy_budget", "an epsilon above 0 and a delta between 0 and 1, e.g. {epsilon: 6, delta: 1.0e-5}")
        rules["budget"] = (epsilon, delta)
    if "approval" in section:
        if section["approval"] not in ("auto", "manual"):
            fail("approval", "auto (the node runs what its other rules admit) or manual (only code its operator "
                             "approved: make review)")
        rules["approval"] = section["approval"]
    if "approval_timeout" in section:
        timeout = section["approval_timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            fail("approval_timeout", "the seconds a held experiment waits for its operator, e.g. 600")
        rules["approval_timeout"] = float(timeout)
    return NodePolicy(**rules)


@dataclass(frozen=True)
class Declaration:
    """What an experiment's plan says it will do (None where it says nothing)."""

    train_rounds: int | None
    batch_size: int | None
    dp: dict | None  # medfl.privacy.DPSGD's settings, or None without DP-SGD
    envoys: tuple[str, ...] | None
    secure_aggregation: bool
    min_envoys: float | None  # the aggregator's: a number of envoys, or a share of them

    @classmethod
    def of(cls, plan: dict) -> Declaration:
        def settings(section: str) -> dict:
            return ((plan or {}).get(section) or {}).get("settings") or {}

        declared = settings(DECLARED)
        envoys, dp = declared.get("envoys"), declared.get("dp") or {}
        return cls(train_rounds=declared.get("train_rounds"),
                   batch_size=settings("data_loader").get("train_batch_size"), dp=dp if dp.get("enabled") else None,
                   envoys=tuple(envoys) if envoys is not None else None,
                   secure_aggregation=bool(settings("collaborator").get("secure_aggregation")),
                   min_envoys=settings("aggregator").get("min_envoys"))

    def federation_floor(self) -> int:
        """The fewest envoys the experiment's aggregator goes on with: its min_envoys, a number of envoys (an int)
        or a share of them (a float), resolved as medfl.selection.quorum does (tests/test_policy.py keeps them
        the same; the node does not import the experiment's code)."""
        n, floor = len(self.envoys or ()), self.min_envoys or 1
        if isinstance(floor, float) and floor <= 1:
            return max(1, math.ceil(floor * n - 1e-9))
        return int(floor)


def read_plan(archive: Path) -> dict:
    """The plan inside an experiment's archive, read without unpacking anything; Refused if there is none."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            return yaml.safe_load(zipped.read(PLAN)) or {}
    except (KeyError, zipfile.BadZipFile, yaml.YAMLError) as exc:
        raise Refused(f"its archive holds no readable {PLAN} ({type(exc).__name__})") from None


def decide(policy: NodePolicy, declared: Declaration, sender: str | None, spend: callable) -> tuple[str, str] | None:
    """None if the envoy runs the experiment; else (rule, why), why a sentence with the numbers.

    `spend()` gives (epsilon spent so far, epsilon after the declared rounds), both at the budget's delta; it is
    only called when the budget applies, and may raise (a damaged ledger)."""
    if policy.researchers is not None and sender not in policy.researchers:
        who = f"signed by {sender!r}" if sender else "unsigned (plaintext identifies nobody)"
        return "researchers", f"it is {who}, and its policy admits only {', '.join(policy.researchers) or 'nobody'}"
    if policy.needs_declaration and declared.train_rounds is None:
        return "declaration", ("its plan declares no training rounds or DP-SGD settings (medfl.privacy.declared), "
                               "which this node's policy needs to check it")
    trains = bool(declared.train_rounds)
    if policy.require_dp and trains and not declared.dp:
        return "require_dp", "it trains without DP-SGD, and its policy requires DP-SGD (require_dp: true)"
    if policy.require_secure_aggregation and trains and not declared.secure_aggregation:
        return "require_secure_aggregation", ("it trains without secure aggregation, and its policy requires it "
                                              "(require_secure_aggregation: true)")
    if policy.max_rounds and (declared.train_rounds or 0) > policy.max_rounds:
        return "max_rounds", (f"it declares {declared.train_rounds} training rounds, more than its max_rounds "
                              f"{policy.max_rounds}")
    if policy.min_envoys and trains:
        n = len(declared.envoys or ())
        if n < policy.min_envoys:
            return "min_envoys", (f"it federates {n} envoys, fewer than its min_envoys {policy.min_envoys}, so its "
                                  "update could be one of too few")
        if declared.federation_floor() < policy.min_envoys:
            return "min_envoys", (f"its aggregator goes on with as few as {declared.federation_floor()} envoys, fewer "
                                  f"than its min_envoys {policy.min_envoys}: give run['min_envoys'] = "
                                  f"{policy.min_envoys} or more")
    if policy.budget and trains:
        if not declared.dp:
            return "privacy_budget", (f"its privacy budget (epsilon {policy.budget[0]:g}) cannot pay for training "
                                      "without DP-SGD, whose privacy loss is unbounded")
        before, after = spend()
        if after > policy.budget[0]:
            return "privacy_budget", (f"its privacy budget (epsilon {policy.budget[0]:g}) has "
                                      f"{max(0.0, policy.budget[0] - before):.2f} left, and this experiment would "
                                      f"spend {after - before:.2f}")
    return None
