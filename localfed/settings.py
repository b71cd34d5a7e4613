"""Every setting of make demo, baseline, bench, compare and stems: one name each, the notebook's, and one default
each, from its home. The make variables the README documented before (ROUNDS, ALGO, ...) are the same names in
capitals, but for the four in ALIASES.

    make demo rounds=5 algorithm=fedprox mu=0.1       (or ROUNDS=5 ALGO=fedprox MU=0.1)
    python -m localfed demo rounds=5 algorithm=fedprox mu=0.1

A notebook setting (medfl.researcher: a parameter, or a key of one of its dicts) reaches the notebook only if it
was given, so a notebook's own defaults (the HPU notebook's device) stand otherwise. docs/settings.md lists them
all; tests/test_settings.py keeps that page, this table and the homes of the defaults in step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medfl.algorithms import OPTIONS as ALGORITHM_OPTIONS
from medfl.privacy import OPTIONS as DP_OPTIONS
from medfl.researcher import DEFAULTS, RUN, RUN_CHOICES
from medmnist_shard import DataError

from .federation import ROOT

COMMANDS = ("demo", "baseline", "bench", "compare", "stems", "evaluate")
# The keys of the notebook's `run` dict that a user sets: what shapes the experiment (medfl.researcher.RUN_CHOICES),
# the log on the page and a run to resume; the launcher sets the others (director, certificates, output folder,
# experiment name, data source).
RUN_SETTINGS = (*RUN_CHOICES, "verbose", "resume_from", "tracking", "tracking_uri")
# The launcher's own settings and their defaults.
LAUNCHER = {
    "envoys": 2,
    "partition": "iid",
    "alpha": 0.5,
    "data": "download",
    "data_dir": "",
    "data_dirs": "",
    "local": False,
    "notebook": str(ROOT / "workspace" / "Pytorch_MedMNIST_2D.ipynb"),
    "tls": True,
    "health_period": 0,
    "timeout": 3600.0,
    "runs": str(ROOT / "runs"),
    "wan": "",
    "algorithms": "fedavg fedprox fedadam median",
    "envoy_policy": "",
    "envoy_state": "",
    "model": "",  # make evaluate: the saved state_dict to test
    "split": "test",  # ...on each envoy's test or val split
}
# Where one command's defaults differ: make compare is about non-IID hospitals, and a median needs more than two
# envoys to differ from the mean; make stems measures at full resolution.
COMMAND_DEFAULTS = {"compare": {"envoys": 3, "partition": "dirichlet", "alpha": 0.3}, "stems": {"size": 224}}
# The documented make variables whose name is not the setting's in capitals.
ALIASES = {"ALGO": "algorithm", "ALGOS": "algorithms", "SERVER_LR": "server_learning_rate",
           "EPSILON": "target_epsilon", "RESUME": "resume_from", "SECAGG": "secure_aggregation"}
# make demo writes the settings it was given to the run's folder; make demo resume_from=<that folder> starts from
# them, so that the resumed run has the same data, envoys and parameters (those given again win).
GIVEN_FILE = "launcher.json"
# Make's own variables, which reach the launcher with the rest of the command line and mean nothing to it.
MAKE_ONLY = ("PYTHON", "CI", "DIRECTOR_HOSTS", "RESEARCHERS", "director_hosts", "researchers")


def defaults() -> dict:
    """Every setting's default, and where the notebook takes it: None (top-level), or the dict it belongs to."""
    table = {name: (value, None) for name, value in DEFAULTS.items() if not isinstance(value, dict)}
    table.update({name: (value, "algorithm_options") for name, value in ALGORITHM_OPTIONS.items()})
    table.update({name: (value, "dp_options") for name, value in DP_OPTIONS.items()})
    table.update({name: (RUN[name], "run") for name in RUN_SETTINGS})
    table.update({name: (value, "launcher") for name, value in LAUNCHER.items()})
    return table


TABLE = defaults()


def _parse(name: str, text: str, default):
    """A setting's text as its default's type; DataError, naming it, if it is not one."""
    try:
        if name == "min_envoys":  # a number of envoys (an int) or a share of them (a float)
            return int(text) if text.isdigit() else float(text)
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return lowered in ("1", "true", "yes")
        if default is None:  # server_learning_rate: a number, or none for the algorithm's own
            return None if text.lower() in ("", "none") else float(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        kind = {bool: "1 or 0", int: "a whole number", float: "a number"}.get(type(default), "a value")
        raise DataError(f"{name}={text!r}: give {kind}") from None


@dataclass
class Settings:
    """One command's settings: every value (given or default), and which were given."""

    command: str
    values: dict
    given: set

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes) -> Settings:
        """The same settings with some values changed, as if given."""
        return Settings(self.command, {**self.values, **changes}, self.given | set(changes))

    def notebook_parameters(self) -> dict:
        """The notebook settings given: top-level ones, and the keys of its dicts (nested)."""
        parameters: dict = {}
        for name in sorted(self.given):
            home = TABLE[name][1]
            if home is None:
                parameters[name] = self.values[name]
            elif home != "launcher":
                parameters.setdefault(home, {})[name] = self.values[name]
        return parameters


def parse(argv: list[str]) -> Settings:
    """`COMMAND name=value ...` -> Settings; DataError, in one line, for an unknown command or setting."""
    if not argv or argv[0] not in COMMANDS:
        raise DataError(f"give a command: python -m localfed {{{','.join(COMMANDS)}}} [name=value ...]")
    command, values, given = argv[0], {name: default for name, (default, _) in TABLE.items()}, set()
    values.update(COMMAND_DEFAULTS.get(command, {}))
    for item in argv[1:]:
        name, equals, text = item.partition("=")
        if not equals:
            raise DataError(f"{item!r}: give settings as name=value, e.g. rounds=5 (docs/settings.md lists them)")
        if name in MAKE_ONLY or not text:  # make's own, or left empty: the default stands
            continue
        name = ALIASES.get(name, name.lower() if name.isupper() else name)
        if name not in TABLE:
            raise DataError(f"unknown setting {item.partition('=')[0]!r}: docs/settings.md lists them all")
        values[name] = _parse(name, text, TABLE[name][0])
        given.add(name)
    if "resume_from" in given:
        _resumed(command, values, given)
    if values["data_dirs"] and "envoys" not in given:  # one envoy per folder
        values["envoys"] = len(own_folders(values["data_dirs"]))
    values["runs"], values["notebook"] = str(Path(values["runs"]).resolve()), str(Path(values["notebook"]).resolve())
    for name in ("envoy_policy", "envoy_state"):  # kept in launcher.json: make audit and resume_from read them
        if values[name]:
            values[name] = str(Path(values[name]).expanduser().resolve())
    return Settings(command, values, given)


def own_folders(data_dirs: str) -> list[Path]:
    """data_dirs=a,b,c: the folders of each envoy's own file, in envoy order."""
    return [Path(d.strip()).expanduser().resolve() for d in data_dirs.split(",") if d.strip()]


def _resumed(command: str, values: dict, given: set) -> None:
    """resume_from: the run folder, made absolute, and the settings its first make demo was given, for those not
    given now; DataError for another command or a folder make demo did not write."""
    if command != "demo":
        raise DataError(f"resume_from is make demo's: make demo resume_from={values['resume_from']}")
    folder = Path(values["resume_from"]).resolve()
    if not (folder / GIVEN_FILE).is_file():
        raise DataError(f"resume_from={values['resume_from']}: not a run folder of make demo (it has no {GIVEN_FILE}); "
                        "give runs/<id> of the run to go on with")
    for name, value in json.loads((folder / GIVEN_FILE).read_text()).items():
        if name not in given and name in TABLE:
            values[name] = value
            given.add(name)
    values["resume_from"] = str(folder)
