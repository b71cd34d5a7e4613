#!/usr/bin/env bash
# Start the director. Environment: DIRECTOR_HOST, DIRECTOR_PORT (override the config),
# DIRECTOR_CONFIG (default: director_config.yaml beside this script),
# CERTS (a folder from `make certs`: mutual TLS with ca.crt and director.crt/.key; unset: no TLS, which is allowed
# on a loopback address only, unless ALLOW_PLAINTEXT=1),
# MEDFL_DIRECTOR_STATE (default: state/director beside the config; it holds the director's audit log).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$(realpath -m "${DIRECTOR_CONFIG:-$here/director_config.yaml}")"
certs="${CERTS:+$(realpath -m "$CERTS")}"  # resolved before the cd below
if [[ ! -f "$config" ]]; then
  echo "error: director config $config not found; set DIRECTOR_CONFIG to an existing file" >&2
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
# What the director keeps across experiments: its audit log of every experiment and payload received.
export MEDFL_DIRECTOR_STATE="${MEDFL_DIRECTOR_STATE:-$(dirname "$config")/state/director}"
# OpenFL reads the config with dynaconf, which takes DYNACONF_SETTINGS__* variables as overrides.
if [[ -n "${DIRECTOR_HOST:-}" ]]; then export DYNACONF_SETTINGS__LISTEN_HOST="$DIRECTOR_HOST"; fi
if [[ -n "${DIRECTOR_PORT:-}" ]]; then export DYNACONF_SETTINGS__LISTEN_PORT="$DIRECTOR_PORT"; fi
tls_args=(--disable-tls)
if [[ -n "$certs" ]]; then
  "$bin/python" -m security.certs check --role director --cert "$certs/director.crt" --key "$certs/director.key" \
    --ca "$certs/ca.crt"
  tls_args=(--root-cert-path "$certs/ca.crt" --private-key-path "$certs/director.key"
            --public-cert-path "$certs/director.crt")
else
  "$bin/python" -m security check-plaintext director "$config"
fi
# OpenFL insists that the config lies inside the working directory.
cd "$(dirname "$config")"
# fx, with this project's adjustments to OpenFL and its security rules (see node.py).
exec "$bin/python" -m node director start "${tls_args[@]}" \
  --director-config-path "$(basename "$config")"
