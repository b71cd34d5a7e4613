#!/usr/bin/env bash
# The CUDA checks of docs/gpus-and-gaudi.md, "Measuring a GPU", as one bounded script for a lent GPU machine that has Python 3.12,
# a CUDA torch and no package registry (this workplace's H100/H200 image).
#   tools/gpu_check.sh wheels   here, with a registry: the wheels that image lacks, into .whl/ (about 52 MB)
#   tools/gpu_check.sh run      there, from the repository root with .whl/ beside it: install them, then the
#                               device-sensitive tests, make bench device=cuda on three workloads, both stems at
#                               224 px, the rest of the suite; each step bounded, its log in $OUT (or runs/gpu).
# BUDGET (seconds, default 540) bounds the whole run; a step that would start with under 20 s left is skipped.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

wheels() {
  local platforms=() p
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
  done
  # The image's numpy (2.5) and protobuf break OpenFL 1.6; the rest are missing there. OpenFL alone is fetched
  # for 3.11, its metadata's cap, and installed past it.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl numpy==2.3.5 protobuf==4.25.8 medmnist==3.0.2 fire termcolor dynaconf==3.2.6 \
    flatten-json tensorboardX click==8.1.7 cryptography cffi pycparser docker opacus==1.6.0 papermill==2.6.0 \
    ansicolors nbformat nbclient fastjsonschema jsonschema jsonschema-specifications referencing rpds-py \
    jupyter_core jupyter_client traitlets platformdirs pyzmq==26.2.0 tornado ipykernel comm debugpy ipython \
    ipython_pygments_lexers matplotlib-inline nest_asyncio decorator jedi parso pexpect ptyprocess prompt_toolkit \
    wcwidth stack_data asttokens executing pure_eval entrypoints tenacity ipywidgets==8.1.7 widgetsnbextension \
    jupyterlab_widgets tqdm==4.70.1 pytest-timeout==2.4.0 &&
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d .whl openfl==1.6
}

run() {
  local out="${OUT:-runs/gpu}" start
  start=$(date +%s)
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python \
    --target /tmp/site .whl/*.whl || exit 1
  # The start scripts run the python beside fx; the repository is on the path as make venv's .pth puts it.
  printf '#!/bin/sh\nexec python3 "$@"\n' >/tmp/site/bin/python && chmod +x /tmp/site/bin/python
  export PYTHONPATH="/tmp/site:$(python3 roots.py environment)" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
  nvidia-smi -L
  python3 -c 'import torch, numpy, openfl, papermill, colors; print(torch.__version__, numpy.__version__)' || exit 1
  step() {  # NAME SECONDS COMMAND...
    local name="$1" limit="$2" left t rc
    shift 2
    left=$((${BUDGET:-540} - ($(date +%s) - start)))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then echo "== $name: skipped, $left s left"; return; fi
    echo "== $name (at most $limit s)"
    t=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    grep -v '^ \|INFO\|^\[' "$out/$name.log" | tail -n 20
    echo "== $name: exit $rc after $(($(date +%s) - t)) s"
  }
  local bench=(python3 -m localfed bench device=cuda rounds=3 epochs=1)
  step unit 90 python3 -m pytest -q -p no:cacheprovider tests/test_model_and_metrics.py tests/test_tasks.py \
    tests/test_devices.py tests/test_stems.py tests/test_algorithms.py
  step bench-bloodmnist-28 100 "${bench[@]}" dataset=bloodmnist size=28
  step bench-pneumoniamnist-224-bf16 100 "${bench[@]}" dataset=pneumoniamnist size=224 bf16=1
  step bench-organamnist-28 110 "${bench[@]}" dataset=organamnist size=28
  step bench-pneumoniamnist-224-full 100 "${bench[@]}" dataset=pneumoniamnist size=224 stem=full
  step stems 60 python3 -m localfed.stems --size 224 --device cuda --epochs 4 --samples 8000 --amplitude 2
  step suite 400 python3 -m pytest -q -p no:cacheprovider -m "not slow" --timeout 120
  echo "== done after $(($(date +%s) - start)) s"
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  *) echo "usage: tools/gpu_check.sh wheels|run" >&2; exit 2 ;;
esac
