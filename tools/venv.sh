#!/usr/bin/env bash
# The project's Python environments, for the Makefile.
#   tools/venv.sh make DIR     create or update the environment DIR (.venv) from requirements.txt
#   tools/venv.sh find 3.X     print the interpreter of Python 3.X on this machine, or fail
#   tools/venv.sh versions     print the tested Python versions, e.g. "3.11 3.12 3.13"
#   tools/venv.sh version DIR  print the Python version (3.X) of the environment DIR, or fail
# The tested range is requires-python in pyproject.toml. PYTHON (a command or a path) picks the interpreter;
# without it, `make` takes DIR's if DIR already has a tested one, else the first of python3.11, python3.12, ...
# and python3 that runs and is in range. A name not on PATH is also looked up among pyenv's installed versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
  echo "error: $*" >&2
  exit 2
}

# The tested minor versions of Python 3, from requires-python = ">=3.X,<3.Y" in pyproject.toml.
spec="$(sed -nE 's/^requires-python *= *"([^"]*)".*/\1/p' pyproject.toml)"
[[ "$spec" =~ ^\>=3\.([0-9]+),\ *\<3\.([0-9]+)$ ]] ||
  die "pyproject.toml: requires-python must read \">=3.X,<3.Y\", not \"$spec\""
lo="${BASH_REMATCH[1]}"
hi="$((BASH_REMATCH[2] - 1))"
range="3.$lo to 3.$hi"
candidates=()
for ((m = lo; m <= hi; m++)); do candidates+=("python3.$m"); done

# What an interpreter is, on three lines: its executable, version (3.X.Y) and installation (for comparing).
# Old-Python syntax, so that an old interpreter is reported as out of range rather than as broken.
probe='import sys; print(sys.executable); print("%d.%d.%d" % sys.version_info[:3]); print(sys.base_prefix)'

# describe COMMAND: the probe's three lines for COMMAND, or fail if it does not run.
describe() {
  local name="$1" version
  if "$name" -c "$probe" 2>/dev/null; then return 0; fi
  # A pyenv shim exists on PATH for every installed version but runs only the selected ones.
  if [[ "$name" != */* ]] && command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv whence "$name" 2>/dev/null | sort -rV); do
      if "$(pyenv root)/versions/$version/bin/$name" -c "$probe" 2>/dev/null; then return 0; fi
    done
  fi
  return 1
}

in_range() {  # VERSION (3.X.Y)
  local minor="${1#3.}"
  minor="${minor%%.*}"
  [[ "$1" == 3.* ]] && ((minor >= lo && minor <= hi))
}

# pick: set exe, version and base to the interpreter PYTHON names, or to the first candidate in range.
pick() {
  local name info seen=()
  if [[ -n "${PYTHON:-}" ]]; then
    info="$(describe "$PYTHON")" || die "PYTHON=$PYTHON does not run (not on PATH, nor an installed pyenv version)"
    { read -r exe; read -r version; read -r base; } <<<"$info"
    in_range "$version" ||
      die "PYTHON=$PYTHON is Python $version; this project is tested on Python $range only (pyproject.toml)"
    return 0
  fi
  for name in "${candidates[@]}" python3; do
    info="$(describe "$name")" || continue
    { read -r exe; read -r version; read -r base; } <<<"$info"
    if in_range "$version"; then return 0; fi
    seen+=("$name is $version")
  done
  die "no Python $range found (tried ${candidates[*]} python3${seen:+; ${seen[*]}}): install one, or make PYTHON=/path/to/python3.X"
}

install() {  # DIR: every pin of requirements.txt; OpenFL alone, past its Python cap
  local dir="$1" openfl
  openfl="$(grep -E '^openfl==' requirements.txt)" || die "requirements.txt has no openfl== line"
  grep -vE '^openfl==' requirements.txt | "$dir/bin/python" -m pip install --quiet -r /dev/stdin
  # OpenFL 1.6's metadata says Python <3.12, yet it runs on 3.12 and 3.13 (the tests pass on each); its own
  # dependencies are in requirements.txt, installed above like everything else.
  "$dir/bin/python" -m pip install --quiet --no-deps --ignore-requires-python "$openfl"
  # The repository root on this environment's path (a .pth file), the notebook's kernel included: so that
  # `import roots` works in every process, which then joins its role's other roots (roots.py says which).
  "$dir/bin/python" roots.py pth
  "$dir/bin/python" -m pip check >/dev/null || {
    "$dir/bin/python" -m pip check >&2 || true
    die "$dir: the installed packages do not satisfy each other's requirements (above)"
  }
  touch "$dir/.installed"
}

make_venv() {  # DIR
  local dir="$1" info have="" have_base="" exe version base
  if info="$(describe "$dir/bin/python")"; then
    { read -r exe; read -r have; read -r have_base; } <<<"$info"
  fi
  if [[ -z "${PYTHON:-}" && -n "$have" ]] && in_range "$have"; then
    version="$have"
    echo "$dir: Python $version (another: make PYTHON=python3.X ...)"
  else
    pick
    echo "$dir: Python $version ($exe)"
    if [[ "$have" != "$version" || "$have_base" != "$base" ]]; then
      if [[ -n "$have" ]]; then echo "$dir: replacing its Python $have"; fi
      rm -rf "$dir"
      if ! "$exe" -m venv "$dir"; then
        rm -rf "$dir"  # half made: the next make venv starts again
        die "$exe -m venv $dir failed (above); Debian and Ubuntu split venv off: apt install python${version%.*}-venv"
      fi
    fi
  fi
  if [[ ! -f "$dir/.installed" || requirements.txt -nt "$dir/.installed" ]]; then
    echo "$dir: installing requirements.txt"
    install "$dir"
  fi
}

case "${1:-}" in
  make)
    [[ $# -eq 2 ]] || die "usage: $0 make DIR"
    make_venv "$2"
    ;;
  find)
    [[ $# -eq 2 ]] || die "usage: $0 find 3.X"
    info="$(describe "python$2")" || exit 1
    { read -r exe; read -r version; read -r base; } <<<"$info"
    [[ "$version" == "$2".* ]] || exit 1
    echo "$exe"
    ;;
  versions)
    echo "${candidates[@]/#python/}"
    ;;
  version)
    [[ $# -eq 2 ]] || die "usage: $0 version DIR"
    info="$(describe "$2/bin/python")" || exit 1
    { read -r exe; read -r version; read -r base; } <<<"$info"
    echo "${version%.*}"
    ;;
  *)
    die "usage: $0 make DIR | find 3.X | versions | version DIR"
    ;;
esac
