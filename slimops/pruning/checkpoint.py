"""Atomic checkpoints and model files: a crash never leaves a half-written file behind, and no file we
read can run code.

Writing: every file goes to a temporary name in the same directory, is flushed and fsync'ed, then
renamed over the target (``os.replace`` is atomic on POSIX), so a run killed at any instant leaves
either the previous complete file or the new complete one. The temporary file is created private
(``mkstemp``: mode 0600) and given the mode a plain ``open`` would have (0666 minus the umask) before
the rename, so finished files carry the user's normal permissions. A failed write (disk full, I/O
error) removes the temporary file and raises; the target is untouched.

Reading: ``torch.load(weights_only=True)``. A pickle can name any Python callable and have it called
while loading, which is how a crafted ``.pt`` runs code the moment it is opened, before any format
check. The weights-only unpickler accepts tensors and plain data (dict, list, tuple, str, int, float,
bool, None, ``collections`` containers) and nothing else; slimops writes nothing else (RNG states
included, see :func:`rng_state`). Checkpoints written before 2026-12 hold numpy's RNG state as an
ndarray; the three numpy globals an ndarray needs (``ndarray``, ``dtype`` and its ``_reconstruct``
constructor, which only rebuild an array from bytes) are allowlisted so those files stay loadable.
Files carry a ``format`` tag; a file that is not a slimops file of the expected kind, truncated, or
that asks for anything outside the allowlist gives an error naming the path.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
import threading
from typing import Any

import torch

CHECKPOINT_FORMAT = "slimops-checkpoint"
MODEL_FORMAT = "slimops-model"
FORMAT_VERSION = 1
TEMP_PREFIX = ".tmp-"  # a file being written; what a killed writer leaves behind

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (POSIX offers no getter: set and restore, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str, write) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, fsyncs it and renames it over ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _os_error(cls, errno_: int, message: str) -> OSError:
    """An OSError of class ``cls`` whose ``str`` is just ``message`` (no "[Errno N]" prefix), errno kept."""
    e = cls(message)
    e.errno = errno_
    return e


def prepare_output_dir(out: str, owner: str) -> None:
    """Checks, before any work starts, that a run can write its files into ``out``.

    Creates the folder and writes and removes a probe file: a read-only or foreign folder, a path through
    a file or a full disk fail here with an ``OSError`` naming ``owner`` and the folder, not after hours of
    training. Then removes the temporary files of an earlier run killed in the middle of a write (names
    starting with ``.tmp-``; the complete files they were to replace are untouched).
    """
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="probe", dir=out)
        try:
            os.write(fd, b"slimops")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise _os_error(type(e), e.errno, f"{owner}: cannot write into the output folder '{out}' "
                                          f"({e.strerror or e})") from None
    for name in os.listdir(out):
        if name.startswith(TEMP_PREFIX):
            try:
                os.unlink(os.path.join(out, name))
            except OSError:  # pragma: no cover - raced with another writer; harmless
                pass


def check_free_space(out: str, need_bytes: int, owner: str) -> None:
    """Raises ``OSError(ENOSPC)`` naming ``owner`` when ``out``'s file system has less than ``need_bytes`` free
    (the run's own estimate of what it will write), before the work that would fill it starts."""
    import errno
    import shutil

    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise _os_error(OSError, errno.ENOSPC, f"{owner}: the output folder '{out}' has {free / 2**20:.1f} MiB free; "
                                               f"this run writes about {need_bytes / 2**20:.1f} MiB")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json_file(path: str, max_bytes: int, where: str, what: str):
    """The JSON value in ``path`` (a configuration or plan: data, never code), or a clear error naming ``where``
    and the path: FileNotFoundError, a file larger than ``max_bytes`` (refused unread: ``what`` is never that
    large), or not JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file '{path}'")
    if os.path.getsize(path) > max_bytes:
        raise ValueError(f"{where}: '{path}' is larger than {what} can be")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: '{path}' is not JSON ({e})") from None


def check_format(d, fmt: str, version: int, where: str, what: str) -> None:
    """``d`` is a dict stamped ``{"format": fmt, "version": version}`` (``what``: a description), or a ValueError
    naming ``where``."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ValueError(f"{where}: not {what} (format {fmt!r})")
    if d.get("version") != version:
        raise ValueError(f"{where}: unsupported version {d.get('version')!r}")


def _legacy_numpy_globals() -> list:
    """numpy's ndarray constructor globals, for RNG states pickled by checkpoints of before 2026-12."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    out = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 / numpy 1 spelling
        try:
            import importlib

            out.append(importlib.import_module(mod)._reconstruct)
            break
        except (ImportError, AttributeError):
            continue
    return out


def safe_load(path: str, owner: str) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name ``owner`` and the path: a file that
    needs anything beyond tensors and plain data is refused without running it."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names a refused callable "GLOBAL module.name"; other refusals (an unknown
        # opcode, a truncated stream) mean the bytes are not a torch file at all.
        culprit = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if culprit is not None:
            raise ValueError(f"{owner}: refusing to load '{path}': it holds Python objects other than tensors and "
                             f"plain data, which could run code when loaded (slimops never writes such files) "
                             f"[{culprit}]") from None
        raise ValueError(f"{owner}: '{path}' is corrupted or not a torch file "
                         f"({type(e).__name__}: {_first_line(e)})") from e
    except Exception as e:  # truncated zip, garbage bytes
        raise ValueError(f"{owner}: '{path}' is corrupted or not a torch file ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    """The message of ``e`` without the advice paragraphs torch.load appends to weights-only failures."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def load_file(path: str, kind: str, owner: str) -> dict:
    """Loads a slimops file of format ``kind``; errors name ``owner`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: no such file '{path}'")
    obj = safe_load(path, owner)
    if not isinstance(obj, dict) or obj.get("format") != kind:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{owner}: '{path}' is not a {kind} file (found {found!r})")
    if obj.get("version") != FORMAT_VERSION:
        raise ValueError(f"{owner}: '{path}' has unsupported version {obj.get('version')!r}")
    return obj


def rng_state() -> dict:
    """Every RNG a run draws from, as tensors and plain data (loadable with ``weights_only=True``)."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        s["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
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

        kind, keys, *rest = s["numpy"]
        if isinstance(keys, torch.Tensor):  # older checkpoints hold the ndarray itself
            keys = keys.numpy().astype(np.uint32)
        np.random.set_state((kind, keys, *rest))
