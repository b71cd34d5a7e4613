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
    if sys.argv[1:2] == ["envoy"]:
        startup.preload_for_envoy()
    from openfl.interface.cli import entry

    sys.argv[0] = "fx"
    entry()
