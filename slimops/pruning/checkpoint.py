"""Atomic checkpoints and model files: a crash never leaves a half-written file behind.

Every file is written to a temporary name in the same directory, flushed and fsync'ed, then renamed
over the target (``os.replace`` is atomic on POSIX), so a run killed at any instant leaves either the
previous complete file or the new complete one. Files carry a ``format`` tag; loading a file that is
not a slimops file of the expected kind, or that is truncated, gives an error naming the path.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import torch

CHECKPOINT_FORMAT = "slimops-checkpoint"
MODEL_FORMAT = "slimops-model"
FORMAT_VERSION = 1


def _atomic_write(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_file(path: str, kind: str, owner: str) -> dict:
    """Loads a slimops file of format ``kind``; errors name ``owner`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: no such file '{path}'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, pickle errors
        raise ValueError(f"{owner}: '{path}' is corrupted or not a torch file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != kind:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{owner}: '{path}' is not a {kind} file (found {found!r})")
    if obj.get("version") != FORMAT_VERSION:
        raise ValueError(f"{owner}: '{path}' has unsupported version {obj.get('version')!r}")
    return obj


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        s["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if "numpy" in s:
        import numpy as np

        np.random.set_state(s["numpy"])
