"""The tested Python range, one source of truth (pyproject.toml), and how make venv picks and installs Python.

tools/venv.sh is run here against stand-in interpreters (shell scripts that answer its questions and log what
pip is asked to do), so every choice and refusal is checked without creating a real environment."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import ROOT

REQUIRES_PYTHON = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
LO, HI = (int(m) for m in re.fullmatch(r">=3\.(\d+),<3\.(\d+)", REQUIRES_PYTHON).groups())
TESTED = [f"3.{m}" for m in range(LO, HI)]
RANGE = f"Python {TESTED[0]} to {TESTED[-1]}"


def _requirement(text):
    r = Requirement(text)
    return r.name.lower().replace("_", "-"), str(r.specifier), str(r.marker or ""), tuple(sorted(r.extras))


def test_this_interpreter_is_one_of_the_tested():
    assert sys.version.split()[0] in SpecifierSet(REQUIRES_PYTHON)


def test_requirements_list_openfls_own_dependencies_exactly():
    """make venv installs OpenFL with --no-deps, so requirements.txt must name what OpenFL itself requires."""
    text = (ROOT / "requirements.txt").read_text()
    block = text.split("# openfl-requires-dist: begin\n")[1].split("# openfl-requires-dist: end\n")[0]
    listed = sorted(_requirement(line) for line in block.splitlines() if line and not line.startswith("#"))
    assert listed == sorted(_requirement(r) for r in importlib.metadata.requires("openfl"))
    (pin,) = re.findall(r"^openfl==(\S+)$", text, re.MULTILINE)
    assert importlib.metadata.version("openfl") == pin


def test_the_docs_state_the_tested_range_and_no_other():
    page = (ROOT / "docs" / "python-versions.md").read_text()
    assert RANGE in page and REQUIRES_PYTHON in page
    for text in (page, (ROOT / "README.md").read_text()):
        assert not re.search(r"3\.8 to 3\.11|3\.8-3\.11", text)


# --- tools/venv.sh against stand-in interpreters ---------------------------------------------------------------
FAKE = """#!/usr/bin/env bash
# A stand-in for Python {version}: answers tools/venv.sh's probe, makes "venvs" of itself, logs pip's arguments.
case "$1" in
  -c) printf '%s\\n' "$0" {version} {prefix} ;;
  -m) case "$2" in
        venv) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "$0" "$3/bin/fx" && echo "venv $3" >> {log}
              if [[ -n "${{VENV_FAILS:-}}" ]]; then echo "Error: ensurepip is not available" >&2; exit 1; fi ;;
        pip) echo "pip ${{*:3}}" >> {log}; if [[ "$*" == *"-r /dev/stdin"* ]]; then sed 's/^/  /' >> {log}; fi ;;
        pytest) echo "pytest ${{*:3}} on PATH: $(command -v fx)" >> {log}; exit "${{PYTEST_STATUS:-0}}" ;;
      esac ;;
esac
"""


@pytest.fixture
def sandbox(tmp_path):
    """A copy of the three files tools/venv.sh reads, and a bin folder that comes first on PATH."""
    for name in ("tools/venv.sh", "tools/test_pythons.sh", "pyproject.toml", "requirements.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "bin").mkdir()
    # Not the machine's interpreters or pyenv: only what a test puts in bin/ (a failing pyenv hides the real one).
    for name in [f"python{v}" for v in TESTED] + ["python3", "pyenv"]:
        fake(tmp_path, name, None)
    return tmp_path


def fake(sandbox, name, version):
    """bin/NAME answers as Python `version`; version None: it fails as a pyenv shim of an unselected version."""
    path = sandbox / "bin" / name
    if version is None:
        path.write_text(f"#!/usr/bin/env bash\necho 'pyenv: {name}: command not found' >&2\nexit 127\n")
    else:
        path.write_text(FAKE.format(version=version, prefix=f"/opt/python-{version}", log=sandbox / "log"))
    path.chmod(0o755)


def venv_sh(sandbox, *args, python=None, script="venv.sh", **env):
    env = {**os.environ, "PATH": f"{sandbox / 'bin'}:{os.environ['PATH']}", "PYTHON": python or "", **env}
    return subprocess.run(["bash", str(sandbox / "tools" / script), *args], cwd=sandbox, env=env,
                          capture_output=True, text=True, timeout=60)


def log(sandbox):
    return (sandbox / "log").read_text() if (sandbox / "log").exists() else ""


def test_the_tested_versions_come_from_pyproject(sandbox):
    assert venv_sh(sandbox, "versions").stdout.split() == TESTED


def test_the_first_tested_interpreter_that_runs_is_taken_and_named(sandbox):
    fake(sandbox, f"python{TESTED[1]}", f"{TESTED[1]}.4")
    fake(sandbox, f"python{TESTED[2]}", f"{TESTED[2]}.0")
    result = venv_sh(sandbox, "make", ".venv")
    assert result.returncode == 0, result.stderr
    assert f".venv: Python {TESTED[1]}.4 ({sandbox / 'bin' / f'python{TESTED[1]}'})" in result.stdout
    assert log(sandbox).startswith("venv .venv\n")


def test_python3_is_the_last_resort_and_an_untested_one_is_refused_naming_the_range(sandbox):
    fake(sandbox, "python3", "3.10.12")
    result = venv_sh(sandbox, "make", ".venv")
    assert result.returncode == 2 and not (sandbox / ".venv").exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: no {RANGE} found (tried ") and "python3 is 3.10.12" in line
    fake(sandbox, "python3", f"{TESTED[-1]}.1")
    assert f"Python {TESTED[-1]}.1" in venv_sh(sandbox, "make", ".venv").stdout


@pytest.mark.parametrize("version", ["3.10.13", f"3.{HI}.0", "2.7.18"])
def test_a_python_outside_the_range_is_refused_in_one_line(sandbox, version):
    fake(sandbox, "python-x", version)
    result = venv_sh(sandbox, "make", ".venv", python="python-x")
    assert result.returncode == 2 and not (sandbox / ".venv").exists()
    assert result.stderr.splitlines() == [f"error: PYTHON=python-x is Python {version}; this project is tested on "
                                          f"{RANGE} only (pyproject.toml)"]


def test_a_python_that_does_not_run_is_refused_in_one_line(sandbox):
    result = venv_sh(sandbox, "make", ".venv", python="python3.99")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: PYTHON=python3.99 does not run (not on PATH, nor an installed "
                                          "pyenv version)"]


def test_a_venv_python_cannot_make_is_removed_and_the_fix_named(sandbox):
    fake(sandbox, f"python{TESTED[1]}", f"{TESTED[1]}.3")
    result = venv_sh(sandbox, "make", ".venv", VENV_FAILS="1")
    assert result.returncode == 2 and not (sandbox / ".venv").exists()  # the next make venv starts again
    assert result.stderr.splitlines()[-1].endswith(f"failed (above); Debian and Ubuntu split venv off: apt install "
                                                   f"python{TESTED[1]}-venv")


def test_openfl_alone_skips_its_python_cap_and_everything_else_installs_normally(sandbox):
    fake(sandbox, f"python{TESTED[-1]}", f"{TESTED[-1]}.0")
    assert venv_sh(sandbox, "make", ".venv").returncode == 0
    lines = log(sandbox).splitlines()
    first = lines.index("pip install --quiet -r /dev/stdin")
    rest = [line.strip() for line in lines[first + 1:] if line.startswith("  ")]
    assert "openfl==1.6" not in rest and "torch==2.13.0" in rest and "Click==8.1.7" in rest
    assert "pip install --quiet --no-deps --ignore-requires-python openfl==1.6" in lines
    assert lines[-1] == "pip check" and (sandbox / ".venv" / ".installed").exists()
    assert not any("ignore-requires-python" in line for line in lines[:first + 1])


def test_installs_again_only_when_requirements_change_and_keeps_its_python_unless_told(sandbox):
    fake(sandbox, f"python{TESTED[0]}", f"{TESTED[0]}.7")
    fake(sandbox, f"python{TESTED[1]}", f"{TESTED[1]}.1")
    assert venv_sh(sandbox, "make", ".venv", python=f"python{TESTED[1]}").returncode == 0
    (sandbox / "log").unlink()
    again = venv_sh(sandbox, "make", ".venv")  # no PYTHON: the environment's tested Python stays
    assert f".venv: Python {TESTED[1]}.1" in again.stdout and not log(sandbox)

    installed = sandbox / ".venv" / ".installed"
    os.utime(installed, (installed.stat().st_mtime - 10,) * 2)  # requirements.txt is now the newer
    venv_sh(sandbox, "make", ".venv")
    assert log(sandbox).startswith("pip install") and "venv .venv" not in log(sandbox)  # updated in place

    (sandbox / "log").unlink()
    moved = venv_sh(sandbox, "make", ".venv", python=f"python{TESTED[0]}")
    assert f".venv: replacing its Python {TESTED[1]}.1" in moved.stdout
    assert log(sandbox).startswith("venv .venv\npip install")


def test_find_names_the_interpreter_of_one_version_or_fails(sandbox):
    fake(sandbox, f"python{TESTED[1]}", f"{TESTED[1]}.2")
    assert venv_sh(sandbox, "find", TESTED[1]).stdout.strip() == str(sandbox / "bin" / f"python{TESTED[1]}")
    assert venv_sh(sandbox, "find", TESTED[2]).returncode == 1  # a pyenv shim of an unselected version


# --- tools/test_pythons.sh (make test-pythons; make test runs it when CI=true) ---------------------------------
@pytest.fixture
def default_venv(sandbox):
    """.venv on the first tested version, as make venv would have made it before make test."""
    fake(sandbox, f"python{TESTED[0]}", f"{TESTED[0]}.7")
    assert venv_sh(sandbox, "make", ".venv").returncode == 0
    (sandbox / "log").unlink()
    fake(sandbox, f"python{TESTED[0]}", None)
    return sandbox


def test_each_version_the_machine_lacks_is_reported_as_skipped(default_venv):
    result = venv_sh(default_venv, "0", script="test_pythons.sh")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.split("== Tested Pythons")[1]
    assert f"Python {TESTED[0]}  .venv       the whole suite: passed" in summary
    for version in TESTED[1:]:
        assert f"Python {version}  .venv-{version}  SKIPPED: no python{version} on this machine" in summary
    assert not log(default_venv)


def test_the_other_versions_run_all_but_the_slow_tests_in_their_own_environment_with_their_own_nodes(default_venv):
    fake(default_venv, f"python{TESTED[1]}", f"{TESTED[1]}.1")
    result = venv_sh(default_venv, script="test_pythons.sh")
    assert result.returncode == 0, result.stderr
    own = default_venv / f".venv-{TESTED[1]}"
    assert f"pytest -m not slow -p no:cacheprovider on PATH: {own}/bin/fx" in log(default_venv)
    assert f"Python {TESTED[1]}  .venv-{TESTED[1]}  all but the slow tests: passed (" in result.stdout


def test_a_failure_on_any_version_fails_the_run_and_says_which(default_venv):
    fake(default_venv, f"python{TESTED[1]}", f"{TESTED[1]}.1")
    result = venv_sh(default_venv, "0", script="test_pythons.sh", PYTEST_STATUS="1")
    assert result.returncode == 1
    assert f"Python {TESTED[1]}  .venv-{TESTED[1]}  all but the slow tests: FAILED (" in result.stdout
    failed_default = venv_sh(default_venv, "1", script="test_pythons.sh")
    assert failed_default.returncode == 1 and "the whole suite: FAILED (pytest status 1)" in failed_default.stdout


def test_prepare_makes_the_other_environments_only_and_the_run_then_just_tests(default_venv):
    """make test (CI=true) runs `prepare` in the background during the default Python's suite: it makes each other
    version's environment and runs no test; the run after it finds them made and only tests."""
    fake(default_venv, f"python{TESTED[1]}", f"{TESTED[1]}.1")
    prepared = venv_sh(default_venv, "prepare", script="test_pythons.sh")
    assert prepared.returncode == 0, prepared.stderr
    assert f"== Python {TESTED[1]}: .venv-{TESTED[1]} prepared in" in prepared.stdout
    made = log(default_venv)
    assert f"venv .venv-{TESTED[1]}" in made and "on PATH" not in made  # made, and no test run
    (default_venv / "log").unlink()
    result = venv_sh(default_venv, "0", script="test_pythons.sh")
    assert result.returncode == 0, result.stderr
    assert not log(default_venv).startswith("venv ") and "pip install" not in log(default_venv)
    assert f"pytest -m not slow -p no:cacheprovider on PATH: {default_venv / f'.venv-{TESTED[1]}'}/bin/fx" in \
        log(default_venv)
