"""The serving process the supervisor starts (plugin/supervisor.py):

    python -m token_meter_plugin.serving <plugin name> <Kong's arguments> --listen-fd N

A module file rather than `python -c`: kong-pdk stats `sys.argv[0]` when it loads a plugin
(`kong_pdk/module.py`), and `-m` sets it to this file. It runs as `__main__` beside the modules it
imports, never as one of them.
"""

from __future__ import annotations

import sys

from .server import serve_plugin

if __name__ == "__main__":
    serve_plugin(sys.argv[1], sys.argv[2:])
