"""python -m openfl_adjustments {director,envoy} start ...: OpenFL's `fx` with this project's adjustments.

Takes the same arguments as `fx`; start_director.sh and start_envoy.sh call it, after `python -m security
check-plaintext`, which they run first, before anything slow. It applies this package's adjustments and the security
package's rules (security.install), then runs `fx`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from security import install as install_security
from security import policy, trust

from . import install, startup


def _option(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


if __name__ == "__main__":
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
    install()
    install_security()
    startup.stop_on_signals(node)
    if role == "envoy" and "start" in sys.argv:
        startup.preload_for_envoy(Path(_option("--envoy-config-path")))
    from openfl.interface.cli import entry

    sys.argv[0] = "fx"
    entry()
