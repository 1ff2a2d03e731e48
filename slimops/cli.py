"""Command line of slimops: ``python -m slimops <command> [options]``.

Commands:
  slim      train toward sparse channels, plan, compact, (fine-tune), report (slimops.pruning.pipeline)
  prune     plan and compact a trained dense.pt
  finetune  fine-tune a pruned.pt (or any model file)
  eval      accuracy, params, FLOPs and latency of a model file
  demo      proximal network slimming of a VGG on the embedded digits data, with a summary table
  info      versions, build flags and the backends of every op (slimops.info)

`python -m slimops <command> --help` lists a command's options.
"""
from __future__ import annotations

import sys

COMMANDS = {  # command -> "module:function" taking argv
    "slim": "slimops.pruning.cli:main_slim",
    "prune": "slimops.pruning.cli:main_prune",
    "finetune": "slimops.pruning.cli:main_finetune",
    "eval": "slimops.pruning.cli:main_eval",
    "demo": "slimops.demo:main",
    "info": "slimops.info:main",
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"python -m slimops: unknown command '{argv[0]}'")
        return
    import importlib

    module, func = COMMANDS[argv[0]].split(":")
    getattr(importlib.import_module(module), func)(argv[1:])
