#!/usr/bin/env bash
# Start an envoy: ./start_envoy.sh NAME CONFIG
# Environment: DIRECTOR_HOST (default localhost), DIRECTOR_PORT (default 50051),
# OMP_NUM_THREADS (torch threads for training; give each envoy its share of the cores),
# HPU_LAZY_MODE=1 (Intel Gaudi's legacy lazy execution; eager is the default since Gaudi 1.21),
# CERTS (a folder from `make certs`: mutual TLS with ca.crt and NAME.crt/.key; unset: no TLS, which is allowed
# with a director on a loopback address only, unless ALLOW_PLAINTEXT=1),
# MEDFL_ENVOY_STATE (default: state/NAME beside CONFIG; keep it and back it up: it holds the node's privacy
# ledger, the privacy each run has spent, and its audit log).
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 NAME CONFIG   e.g. $0 envoy_1 envoy_config_1.yaml" >&2
  exit 2
fi
name="$1"
config="$(realpath -m "$2")"
certs="${CERTS:+$(realpath -m "$CERTS")}"  # resolved before the cd below
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$config" ]]; then
  echo "error: envoy config $2 not found" >&2
  exit 2
fi
bin="$(dirname "$(command -v fx || echo "$here/../.venv/bin/fx")")"
if [[ ! -x "$bin/fx" ]]; then
  echo "error: OpenFL's fx not found: activate the environment (make venv, then source .venv/bin/activate)" >&2
  exit 2
fi
# A node's import roots (roots.py): the repository's and the shard descriptor's, never workspace/.
PYTHONPATH="$("$bin/python" "$here/../roots.py" node)"  # not on export's line, so that set -e sees a failure
export PYTHONPATH
export ENVOY_NAME="$name"  # the tasks name the node in their errors
# What this envoy keeps across experiments (its privacy ledger, its audit log): beside its config.
export MEDFL_ENVOY_STATE="${MEDFL_ENVOY_STATE:-$(dirname "$config")/state/$name}"
director="${DIRECTOR_HOST:-localhost}"
# Habana reads PT_HPU_LAZY_MODE when torch is imported, so it must be set before Python starts.
if [[ -n "${HPU_LAZY_MODE:-}" ]]; then export PT_HPU_LAZY_MODE="$HPU_LAZY_MODE"; fi
tls_args=(--disable-tls)
if [[ -n "$certs" ]]; then
  # OpenFL's aggregator refuses an envoy whose certificate names another: say so before starting.
  "$bin/python" -m security.certs check --name "$name" --role envoy --cert "$certs/$name.crt" --key "$certs/$name.key" \
    --ca "$certs/ca.crt"
  tls_args=(--root-cert-path "$certs/ca.crt" --private-key-path "$certs/$name.key"
            --public-cert-path "$certs/$name.crt")
else
  "$bin/python" -m security check-plaintext envoy "$director"
fi
# The envoy runs where its config is: relative data folders and experiment folders land there,
# and OpenFL insists that the config lies inside the working directory.
cd "$(dirname "$config")"
# Check the shard (and fetch a missing file) first, so a bad config ends in one clear line.
"$bin/python" -m medmnist_shard check "$config"
# fx, with this project's adjustments to OpenFL and its security rules (see node.py).
exec "$bin/python" -m node envoy start --shard-name "$name" "${tls_args[@]}" \
  --director-host "$director" --director-port "${DIRECTOR_PORT:-50051}" \
  --envoy-config-path "$(basename "$config")"
