"""Every command the README and the docs show works as written: each shell command of a fenced `sh` block, and
each command in inline code, is taken apart and checked against the project itself.

- `make TARGET name=value`: the target is the Makefile's, and each setting is read by the launcher's own parser
  (localfed.settings.parse) or is one of the Makefile's variables;
- `python -m MODULE [SUBCOMMAND] --option ...`: the module runs with the PYTHONPATH the command gives, from the
  folder it is run in, and its `--help` lists every option shown;
- scripts, notebooks, configs and every repository path named exist where the command runs; `cd` moves there;
- papermill's output goes to a folder that a fresh clone has or that the command makes, and its parameters are
  the notebook's;
- a program that is not the project's is one of the few named below, so that a new one is looked at.

What can run safely runs: the across-hosts page's `make certs` and `python -m security.certs check`, in a copy of
the repository. A last test keeps that page's commands and the multi-host test's (localfed.hosts) in step.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import roots
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Programs of the pages' sh blocks that are not the project's.
EXTERNAL = {"source", "mkdir", "export", "mlflow"}  # mlflow: MLflow's own CLI (docs/experiment.md)
# What a run writes, or the user makes: not in a fresh clone, so not checked for existence.
MADE = ("runs", "certs", "data", "envoy/data", "envoy/state", "state", "site", ".venv")
# Placeholders in a command: <run id>, ..., DIR, CONFIG, FILE, N, PROFILE, 3.X.
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\b(DIR|CONFIG|FILE|N|PROFILE|NAME)\b|3\.X")
TRACKED_DIRS = {str(Path(p).parent) for p in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                                                             text=True).stdout.split()} | {"."}


@dataclass
class Command:
    """One shell command as a page shows it: where it was, its environment assignments, its words, its folder."""

    page: str
    text: str
    env: dict
    argv: list
    cwd: Path
    made: set = field(default_factory=set)  # folders an earlier `mkdir -p` of the same block made

    def __str__(self):
        return f"{self.page}: `{self.text.strip()}`"


def _split(text: str) -> list[list[str]]:
    """Shell words of `text`, one list per simple command (split at newlines outside quotes, &&, ||, ; and |)."""
    lines, buffer = [], ""
    text = re.sub(r"<[^<>\n]*>", lambda m: m.group(0).replace(" ", "_"), text)  # <run id>: one word
    for line in text.replace("\\\n", " ").splitlines():
        buffer = f"{buffer}\n{line}" if buffer else line
        try:
            shlex.split(buffer, comments=True)
        except ValueError:  # a quote still open: the newline is part of a word
            continue
        lines.append(buffer)
        buffer = ""
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def _commands(page: Path) -> list[Command]:
    """Every command of the page's sh blocks and of its inline code, each block or span in order, sharing cd
    and mkdir."""
    text = page.read_text()
    name = page.relative_to(ROOT).as_posix()
    found = []
    for block in re.findall(r"^ *```(?:sh|bash|shell)\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL):
        found += _script(name, block)
    prose = re.sub(r"^ *```.*?^ *```", "", text, flags=re.MULTILINE | re.DOTALL)
    for span in re.findall(r"`([^`]+)`", prose):
        found += [c for c in _script(name, " ".join(span.split())) if _is_command(c)]
    return found


def _script(page: str, text: str) -> list[Command]:
    cwd, made, found = ROOT, set(), []
    for words in _split(text):
        command = _command(page, shlex.join(words), words, cwd, made)
        if command:
            found.append(command)
            if command.argv[0] == "cd" and len(command.argv) > 1:
                cwd = (cwd / command.argv[1]).resolve()
            elif command.argv[:2] == ["mkdir", "-p"]:
                made = made | {(cwd / d).resolve() for d in command.argv[2:]}
    return found


def _command(page: str, text: str, words: list[str], cwd: Path, made: set) -> Command | None:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[:1] == ["env"]:  # env -u NAME VAR=value command ...
        words = words[1:]
        while words and (words[0] == "-u" or words[0].startswith("-")):
            words = words[2:] if words[0] == "-u" else words[1:]
        return _command(page, text, words, cwd, made) if words else None
    return Command(page, text, env, words, cwd, made) if words else None


def _is_command(command: Command) -> bool:
    """Whether inline code is a command to check (not a file name or a word that happens to be a program's)."""
    program = command.argv[0]
    return (program in ("make", "python", "papermill", "jupyter", "bash", "mkdocs", "cd")
            or program.startswith(("./", ".venv/"))) and (len(command.argv) > 1 or program in ("make", "cd")
                                                           or program.startswith("./"))


ALL = [c for page in PAGES for c in _commands(page)]


def _makefile() -> tuple[set, set]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):(?!=)", text, re.MULTILINE))
    # Those it sets, and those it only reads (make review's envoy_state: make demo's setting of the same name)
    variables = set(re.findall(r"^([A-Za-z_]+)\s*(?:\?|:)?=", text, re.MULTILINE)) | set(re.findall(r"\$\(([a-z_]+)\)",
                                                                                                     text))
    return targets, variables


# The algorithms an option of algorithm_options changes anything for (the others ignore it).
OPTION_USERS = {"mu": {"fedprox"}, "ntd_beta": {"fedntd"}, "ntd_tau": {"fedntd"},
                **{f"server_{name}": {"fedadam", "fedyogi", "fedadagrad"}
                   for name in ("learning_rate", "beta1", "beta2", "tau")}}


def _check_options(command: Command, algorithm: str, options) -> None:
    """An example that sets an algorithm's option must also choose that algorithm."""
    for name in options:
        users = OPTION_USERS.get(name)
        assert users is None or algorithm in users, \
            f"{command}: {name} does nothing with algorithm {algorithm!r}; it is {' or '.join(sorted(users))}'s"


def _check_make(command: Command) -> None:
    from localfed.settings import ALIASES, COMMANDS, MAKE_ONLY, TABLE, parse

    targets, variables = _makefile()
    goals = [w for w in command.argv[1:] if "=" not in w and not w.startswith("-") and not PLACEHOLDER.search(w)]
    settings = [w for w in command.argv[1:] if "=" in w]
    assert goals or command.argv == ["make"], f"{command}: no target"
    for goal in goals:
        assert goal in targets, f"{command}: the Makefile has no target {goal!r}"
    launched = [g for g in goals if g in COMMANDS]
    for item in settings:
        name, _, value = item.partition("=")
        if name in variables or name in MAKE_ONLY:
            continue
        assert launched, f"{command}: {name} is neither a setting of {goals} nor a variable of the Makefile"
        setting = ALIASES.get(name, name.lower() if name.isupper() else name)
        assert setting in TABLE, f"{command}: {name!r} is not a setting (docs/settings.md lists them)"
        if PLACEHOLDER.search(value) or setting == "resume_from" or not value:
            continue
        try:
            parse([launched[0], item])
        except Exception as exc:  # DataError: the launcher's own words
            pytest.fail(f"{command}: {exc}")
    if launched and launched[0] != "compare":  # make compare runs several algorithms
        from localfed.settings import ALGORITHM_OPTIONS

        given = {ALIASES.get(n, n.lower() if n.isupper() else n): v
                 for n, v in (item.partition("=")[::2] for item in settings)}
        algorithm = given.get("algorithm", TABLE["algorithm"][0])
        _check_options(command, algorithm, [n for n in given if n in ALGORITHM_OPTIONS])


@functools.cache
def _help(module: str, sub: str, pythonpath: str, cwd: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    argv = [sys.executable, "-m", module, *([sub] if sub else []), "--help"]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def _check_python(command: Command) -> None:
    args = command.argv[1:]
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        sub = rest[0] if rest and not rest[0].startswith("-") and not PLACEHOLDER.search(rest[0]) else ""
        if module in ("pytest", "node"):  # its arguments are test paths / fx's own commands
            sub = ""
        code, text = _help(module, sub, command.env.get("PYTHONPATH", ""), str(command.cwd))
        assert code == 0, f"{command}: `python -m {module} {sub} --help` fails:\n{text[-1500:]}"
        for option in re.findall(r"(?<!\S)(--[a-z][\w-]*)", " ".join(rest)):
            assert option in text, f"{command}: python -m {module} {sub} takes no {option}"
        _check_paths(command, rest)
    elif args:
        script = command.cwd / args[0]
        assert script.is_file(), f"{command}: {args[0]} does not exist"
        _check_paths(command, args[1:])


def _check_paths(command: Command, words: list[str]) -> None:
    """Every word that names a path in the repository exists where the command runs."""
    for word in words:
        if word.startswith("-") or PLACEHOLDER.search(word) or "$" in word or "=" in word:
            continue
        if "/" not in word and not re.search(r"\.(ya?ml|ipynb|py|sh|md)$", word):
            continue
        path = (command.cwd / word).resolve()
        relative = os.path.relpath(path, ROOT)
        if relative.startswith(MADE) or relative.startswith(".."):  # made by a run, or outside the repository
            continue
        assert path.exists(), f"{command}: {word} does not exist (from {os.path.relpath(command.cwd, ROOT)}/)"


def _check_papermill(command: Command) -> None:
    from medfl.researcher import DEFAULTS, ParameterError, check_parameters

    notebook, output, *rest = command.argv[1:]
    assert (command.cwd / notebook).is_file(), f"{command}: {notebook} does not exist"
    folder = (command.cwd / output).parent.resolve()
    assert os.path.relpath(folder, ROOT) in TRACKED_DIRS or folder in command.made, \
        f"{command}: {os.path.relpath(folder, ROOT)}/ is not in a fresh clone; make it first (mkdir -p)"
    parameters = {}
    words = iter(rest)  # -p NAME VALUE, -y YAML
    for word in words:
        if word == "-p":
            name, text = next(words), next(words)
            parameters[name] = yaml.safe_load(text)
        elif word == "-y":
            parameters.update(yaml.safe_load(next(words)))
    _check_options(command, parameters.get("algorithm", DEFAULTS["algorithm"]),
                   parameters.get("algorithm_options") or {})
    unknown = set(parameters) - set(DEFAULTS)
    assert not unknown, f"{command}: the notebook has no parameter {sorted(unknown)}"
    run = {**parameters.get("run", {}), "ca_cert": "", "api_cert": "", "api_key": ""}  # paths checked on the page
    try:
        check_parameters(**{**DEFAULTS, **parameters, "run": run})
    except ParameterError as exc:
        pytest.fail(f"{command}: {exc}")


@pytest.mark.parametrize("command", ALL, ids=[f"{c.page}:{' '.join(c.argv)[:60]}" for c in ALL])
def test_every_command_on_the_pages_is_one_the_project_has(command):
    program = command.argv[0]
    if program == "make":
        _check_make(command)
    elif program in ("python", "python3") or program.endswith("/python"):
        if program.startswith(".venv/"):
            assert (ROOT / program).exists(), f"{command}: make venv makes no {program}"
        _check_python(command)
    elif program == "papermill":
        _check_papermill(command)
    elif program == "jupyter":
        assert command.argv[1] == "lab" and (command.cwd / command.argv[2]).is_file(), f"{command}: no such notebook"
    elif program == "cd":
        assert (command.cwd / command.argv[1]).is_dir(), f"{command}: no folder {command.argv[1]}"
    elif program in ("bash", "sh") or program.startswith("./"):
        script = command.argv[1] if program in ("bash", "sh") else program
        assert (command.cwd / script).is_file(), f"{command}: no script {script}"
        if program.startswith("./"):
            assert os.access(command.cwd / script, os.X_OK), f"{command}: {script} is not executable"
        _check_paths(command, command.argv[1:])
    elif program.startswith(".venv/bin/"):
        assert (ROOT / program).exists(), f"{command}: make venv makes no {program}"
    else:
        assert program in EXTERNAL, f"{command}: {program} is neither the project's nor a program this test knows"


def test_the_pages_show_the_commands_the_issue_found_broken():
    """The checks above would have caught each of these; keep them among what is checked."""
    shown = {" ".join(c.argv) for c in ALL}
    assert any(s.startswith("make certs director_hosts=") for s in shown)
    assert any(s.startswith("python -m medmnist_shard download") for s in shown)
    assert sum(s.startswith("papermill ") for s in shown) >= 3


def test_every_repository_path_the_pages_name_exists():
    roots = ("director/", "envoy/", "workspace/", "openfl_adjustments/", "security/", "localfed/", "tools/",
             "tests/", "docs/", "medfl/", "medmnist_shard/", "roots.py", "node.py")
    missing = []
    for page in PAGES:
        for span in re.findall(r"`([^`\s]+)`", page.read_text()):
            if not span.startswith(roots) or PLACEHOLDER.search(span) or "*" in span:
                continue
            path = span.split(":")[0].rstrip(".,")
            if path.startswith(("medfl/", "medmnist_shard/")):  # the packages, by their import names
                path = ("workspace/" if path.startswith("medfl/") else "envoy/") + path
            if path.startswith(("envoy/data", "envoy/state")):
                continue
            if not (ROOT / path).exists():
                missing.append(f"{page.name}: {span}")
    assert not missing, f"paths the pages name that do not exist: {missing}"


def test_every_pointer_to_the_readme_or_a_page_leads_somewhere():
    """`the README's Security` must be a README heading; docs/<page>.md must exist; in every tracked text file."""
    headings = set(re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.MULTILINE))
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    wrong = []
    for name in files:
        if not name.endswith((".py", ".sh", ".yaml", ".yml", ".toml", ".txt", ".ipynb", ".md", "Makefile")):
            continue
        text = (ROOT / name).read_text(errors="replace")
        for section in re.findall(r"README's ([A-Z][\w ]+?)(?:[.,;:)]|\s[a-z])", text):
            if not any(h.startswith(section.strip()) for h in headings):
                wrong.append(f"{name}: the README's {section}")
        for page in re.findall(r"docs/([\w-]+\.md)", text):
            if not (ROOT / "docs" / page).exists():
                wrong.append(f"{name}: docs/{page}")
        if re.search(r"README (shows|says|explains) how", text):
            wrong.append(f"{name}: points at the README for what a docs page says")
    assert not wrong, wrong


def test_the_pages_use_each_setting_by_its_own_name():
    """`ALGO`, `MU`, ... are accepted by make, but a page says `algorithm`, `mu` (settings.md lists the aliases)."""
    from localfed.settings import ALIASES, TABLE

    capitals = set(ALIASES) | {name.upper() for name in TABLE}
    wrong = []
    for page in PAGES:
        text = page.read_text()
        if page.name == "settings.md":
            text = text.split("## Other names", 1)[0]
        wrong += [f"{page.name}: `{word}`" for word in re.findall(r"`([A-Z_]+)`", text) if word in capitals]
        # A capitalised name may stand only as the alternative: "(or `RESUME=runs/<id>`)".
        wrong += [f"{page.name}: {m.group(1)}=" for m in re.finditer(r"\b([A-Z_]+)=", text)
                  if m.group(1) in capitals and not text[:m.start()].endswith(("or `", "or "))]
    assert not wrong, f"old capitalised names on the pages: {wrong}"


def test_make_certs_and_the_check_run_as_the_across_hosts_page_shows_them(tmp_path):
    """The page's `make certs ...` and `python -m security.certs check ...`, run in a copy of the repository: the
    check finds the certificates where the page says make certs writes them."""
    page = [c for c in _commands(ROOT / "docs" / "across-hosts.md") if c.argv[:2] in (["make", "certs"],
                                                                                     ["python", "-m"])]
    make = next(c for c in page if c.argv[:2] == ["make", "certs"])
    check = next(c for c in page if c.argv[:4] == ["python", "-m", "security.certs", "check"])
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "security"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, clone / name)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
           "PYTHONPATH": roots.pythonpath("environment", clone)}
    # -o venv: the environment is this one; make certs itself runs as written.
    made = subprocess.run(["make", "-o", "venv", *make.argv[1:]], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    checked = subprocess.run([sys.executable, *check.argv[1:]], cwd=clone, env=env, capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 0, f"{check}, after {make}: {checked.stderr.strip()}"
    assert "alice, a researcher's certificate" in checked.stdout
    assert not (clone / "certs" / "ca.key").stat().st_mode & 0o077


def test_the_multi_host_test_runs_the_across_hosts_pages_commands():
    """localfed.hosts (make test-hosts) starts each node with this page's environment, script and config, and the
    notebook with its run dict: the page and the test cannot drift apart."""
    from localfed.hosts import HOSPITALS, OnHosts, researcher_run

    commands = _commands(ROOT / "docs" / "across-hosts.md")
    starts = [c for c in commands if c.argv[0].startswith("./")]
    director = next(c for c in starts if c.argv[0] == "./director/start_director.sh")
    envoys = {c.argv[1]: c for c in starts if c.argv[0] == "./envoy/start_envoy.sh"}
    placement = OnHosts(None, Path("/hosts"), Path("/data.npz"), "bloodmnist", 28, {})
    page_name = envoys["envoy_1"].env["DIRECTOR_HOST"]  # the director's name, as every node must use it
    harness = placement.env("director", None)
    assert {k: director.env[k] for k in ("CERTS", "DIRECTOR_HOST")} == \
        {k: harness[k] for k in ("CERTS", "DIRECTOR_HOST")}
    assert sorted(envoys) == sorted(HOSPITALS.values())
    for name, command in envoys.items():
        harness = placement.env(name, None)
        assert command.env["CERTS"] == harness["CERTS"]
        assert harness["DIRECTOR_HOST"] == "director" and command.env["DIRECTOR_HOST"] == page_name
        assert command.argv[2] == f"envoy/envoy_config_{name.rsplit('_', 1)[1]}.yaml"
    notebook = next(c for c in commands if c.argv[0] == "papermill")
    run = {}
    words = iter(notebook.argv)
    for word in words:
        if word == "-y":
            run.update(yaml.safe_load(next(words))["run"])
    expected = researcher_run("alice")
    assert run["director_host"] == page_name  # the notebook names the director as the envoys reach it
    assert {**run, "director_host": "director"} == {k: v for k, v in expected.items() if k in run}
    assert set(expected) - set(run) <= {"director_port", "experiment_name", "output_dir"}
    make = next(c for c in commands if c.argv[:2] == ["make", "certs"])
    assert f"envoys={len(HOSPITALS)}" in make.argv
    director_hosts = next(w for w in make.argv if w.startswith("director_hosts=")).partition("=")[2].split()
    assert page_name in director_hosts  # the director's certificate is valid for that name


# Figures that pages quote: each must have one value on every page that quotes it (its home page has the command
# and the date). design-notes.md holds history, figures from before a change, and is left out.
FIGURES = {
    "how long make test-hosts takes": r"`make test-hosts`[^.]{0,60}?(\d+ s in all|about (?:a|\d+) minutes?)",
    "how long make demo takes": r"`make demo(?: data=synthetic)?`[^.]{0,60}? took (\d+(?: to \d+)? s)\b",
    "what an envoy sends a round in float32": r"sends (\d+\.\d+ MB) a round, the model's float32",
    "when a silent envoy is dropped by default": r"(?:within|after) (\d+ s) of its last report",
}


def test_each_figure_the_pages_quote_has_one_value():
    seen: dict[str, dict[str, list[str]]] = {name: {} for name in FIGURES}
    for page in PAGES:
        if page.name == "design-notes.md":
            continue
        text = " ".join(page.read_text().split())
        for name, pattern in FIGURES.items():
            for value in re.findall(pattern, text):
                seen[name].setdefault(value, []).append(page.name)
    assert all(seen.values()), f"no page quotes {[name for name, values in seen.items() if not values]} any more"
    differing = {name: values for name, values in seen.items() if len(values) > 1}
    assert not differing, f"figures quoted with different values: {differing}"
