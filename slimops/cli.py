"""Command line of slimops: ``slimops <command> [options]`` (or ``python -m slimops <command>``).

Commands:
  slim      train toward sparse channels, plan, compact, (fine-tune), report (slimops.pruning.pipeline)
  prune     plan and compact a trained dense.pt
  finetune  fine-tune a pruned.pt (or any model file)
  eval      accuracy, params, FLOPs and latency of a model file
  quantize  distil a trained model into a quantised (LSQ) or binary (FDA) student, export packed weights
  demo      proximal network slimming of a VGG on the embedded digits data, with a summary table
  info      versions, build flags and the backends of every op (slimops.info)

`slimops <command> --help` lists a command's options. Bad input (a missing or foreign file, an argument
out of range, a plan for another model) prints one line `slimops <command>: error: ...` and exits with
status 2; a run stopped by a NaN/inf loss or gradient (`--on-nonfinite stop`) prints one line and exits
with status 1; `--debug` (anywhere on the line) shows the traceback instead.
"""
from __future__ import annotations

import sys

COMMANDS = {  # command -> "module:function" taking argv
    "slim": "slimops.pruning.cli:main_slim",
    "prune": "slimops.pruning.cli:main_prune",
    "finetune": "slimops.pruning.cli:main_finetune",
    "eval": "slimops.pruning.cli:main_eval",
    "quantize": "slimops.quant.cli:main_quantize",
    "demo": "slimops.demo:main",
    "info": "slimops.info:main",
}

# What bad input raises in slimops: ValueError (arguments, plans, file contents; the messages name the op and the
# argument) and OSError (missing files, permissions, a full disk). Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError)


def fail(command: str, message: str, status: int = 2) -> "NoReturn":  # noqa: F821
    """Prints ``slimops <command>: error: <message>`` to stderr and exits with ``status`` (2: argparse's
    convention for bad input)."""
    print(f"slimops {command}: error: {message}", file=sys.stderr)
    sys.exit(status)


def _one_line(e: BaseException) -> str:
    text = str(e) if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{text} ('{e.filename}')"
    lines = []
    for ln in text.splitlines():
        if ln.startswith("Exception raised from"):  # torch's C++ stack trace: not for a user's terminal
            break
        if ln.strip():
            lines.append(ln.strip())
    line = "; ".join(lines) if lines else type(e).__name__
    return line if len(line) <= 2000 else line[:2000] + " ..."


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command = argv[0]
    if command not in COMMANDS:
        print("usage: slimops <command> [options]   (slimops --help lists the commands)", file=sys.stderr)
        print(f"slimops: error: unknown command '{command}' (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    import importlib

    module, func = COMMANDS[command].split(":")
    try:
        getattr(importlib.import_module(module), func)(argv[1:])
    except FloatingPointError as e:  # slimops.pruning.guard.NonFiniteError: the run diverged, not bad input
        if debug:
            raise
        fail(command, _one_line(e), status=1)
    except INPUT_ERRORS as e:
        if debug:
            raise
        fail(command, _one_line(e))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"slimops {command}: interrupted", file=sys.stderr)
        sys.exit(130)
