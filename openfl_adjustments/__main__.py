"""python -m openfl_adjustments {director,envoy} start ...: OpenFL's `fx` with this project's adjustments.

Takes the same arguments as `fx`; start_director.sh and start_envoy.sh call it.
"""
from __future__ import annotations

import sys

from . import install, startup

if __name__ == "__main__":
    if sys.argv[1:3] == ["director", "start"]:
        startup.director_port_is_free(sys.argv)
    install()
    role = sys.argv[1] if len(sys.argv) > 1 else "fx"
    if "--shard-name" in sys.argv:
        role = f"{role} {sys.argv[sys.argv.index('--shard-name') + 1]}"
    startup.stop_on_signals(role)
    if role.startswith("envoy"):
        startup.preload_for_envoy()
    from openfl.interface.cli import entry

    sys.argv[0] = "fx"
    entry()
