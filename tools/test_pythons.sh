#!/usr/bin/env bash
# make test-pythons, which `make test` runs when CI=true: the tests on every other tested Python this machine
# has (pyproject.toml's requires-python), each in its own environment .venv-3.X made as make venv makes .venv.
# The default Python (.venv's) runs the whole suite in `make test` itself; the others run all but the tests
# marked slow (long scenarios, and tests that start a federation of their own): the unit and script tests and
# the end-to-end federation with mutual TLS, within CI's time. Prints one line per tested version: passed,
# FAILED or SKIPPED (not on this machine).
# Usage: tools/test_pythons.sh [STATUS]   STATUS: the default Python's pytest exit status, for the summary.
#        tools/test_pythons.sh prepare    make every other tested Python's environment now, at the lowest CPU
#                                         priority: `make test` under CI=true runs this in the background while the
#                                         default Python's suite runs (installing is mostly waiting on the disk and
#                                         the package index), so that afterwards only their tests take time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${1:-}" == "prepare" ]]; then
  default="$(bash tools/venv.sh version .venv 2>/dev/null || true)"
  for version in $(bash tools/venv.sh versions); do
    [[ "$version" != "$default" ]] || continue
    python="$(bash tools/venv.sh find "$version")" || continue  # reported as SKIPPED by the run itself
    start=$SECONDS
    if PYTHON="$python" nice -n 19 bash tools/venv.sh make ".venv-$version"; then
      echo "== Python $version: .venv-$version prepared in $((SECONDS - start)) s"
    else
      echo "== Python $version: preparing .venv-$version FAILED; the run below tries again"
    fi
  done
  exit 0
fi

default_status="${1:-}"
default="$(bash tools/venv.sh version .venv)" ||
  { echo "error: .venv has no working Python: run make venv first" >&2; exit 2; }

clock() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

summary=()
failed=0
case "$default_status" in
  "") summary+=("Python $default  .venv       the whole suite: see make test") ;;
  0) summary+=("Python $default  .venv       the whole suite: passed") ;;
  *) summary+=("Python $default  .venv       the whole suite: FAILED (pytest status $default_status)"); failed=1 ;;
esac
for version in $(bash tools/venv.sh versions); do
  [[ "$version" != "$default" ]] || continue
  venv=".venv-$version"
  if ! python="$(bash tools/venv.sh find "$version")"; then
    summary+=("Python $version  $venv  SKIPPED: no python$version on this machine (PATH, pyenv)")
    echo "== Python $version: SKIPPED, not on this machine"
    continue
  fi
  echo "== Python $version ($python): $venv"
  start=$SECONDS
  if ! PYTHON="$python" bash tools/venv.sh make "$venv"; then
    summary+=("Python $version  $venv  FAILED: make venv ($(clock $((SECONDS - start))))")
    failed=1
    continue
  fi
  installed=$((SECONDS - start))
  # As if activated: the start scripts find OpenFL's fx on PATH, so the nodes run on this Python too.
  if PATH="$PWD/$venv/bin:$PATH" VIRTUAL_ENV="$PWD/$venv" "$venv/bin/python" -m pytest -m "not slow" \
      -p no:cacheprovider; then
    result="passed"
  else
    result="FAILED"
    failed=1
  fi
  summary+=("Python $version  $venv  all but the slow tests: $result ($(clock $((SECONDS - start))), \
of which environment $(clock "$installed"))")
done
echo "== Tested Pythons ($(sed -nE 's/^requires-python *= *"([^"]*)".*/\1/p' pyproject.toml) in pyproject.toml)"
printf '%s\n' "${summary[@]}"
exit "$failed"
