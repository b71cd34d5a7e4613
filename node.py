"""python -m node {director,envoy} start ...: OpenFL's `fx` with this project's adjustments and security rules.

The nodes' entry point, above both packages it puts in place: openfl_adjustments (runtime adjustments to OpenFL)
and security (which builds on them), so that neither imports the other's way up. Takes the same arguments as `fx`;
start_director.sh and start_envoy.sh call it, with the PYTHONPATH `roots.py node` gives, after `python -m security
check-plaintext`, which they run first, before anything slow.
"""
from __future__ import annotations

import sys
from pathlib import Path

import openfl_adjustments
import security
from openfl_adjustments import startup
from security import policy, trust


def _option(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


def main() -> None:
    """Check the node's own settings, put the adjustments and the security rules in place, then run fx."""
    role = sys.argv[1] if len(sys.argv) > 1 else "fx"
    node = f"{role} {_option('--shard-name')}" if _option("--shard-name") else role
    if role == "director" and "start" in sys.argv:
        startup.director_port_is_free(sys.argv)
    if role == "envoy" and "start" in sys.argv:
        try:
            trust.configure(_option("--shard-name"), _option("--root-cert-path"),
                            Path(_option("--envoy-config-path")))
        except policy.PolicyError as exc:
            sys.exit(f"error: {exc}")
    openfl_adjustments.install()
    security.install()
    startup.stop_on_signals(node)
    if role == "envoy" and "start" in sys.argv:
        startup.preload_for_envoy(Path(_option("--envoy-config-path")))
    from openfl.interface.cli import entry

    sys.argv[0] = "fx"
    entry()


if __name__ == "__main__":
    main()
