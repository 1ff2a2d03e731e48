"""Command line of slimops: ``python -m slimops <command> [options]``.

Commands:
  demo   proximal training on the embedded digits data, showing channel sparsity appear (slimops.demo)
  info   versions, build flags and the backends of every op (slimops.info)
"""
from __future__ import annotations

import sys

COMMANDS = {
    "demo": "slimops.demo",
    "info": "slimops.info",
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"python -m slimops: unknown command '{argv[0]}'")
        return
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
