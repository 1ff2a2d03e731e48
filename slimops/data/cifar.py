"""CIFAR-10 / CIFAR-100 read from local files in the standard "python version" pickle format.

Nothing is downloaded: point ``data_dir`` at a folder holding ``cifar-10-batches-py/`` (or
``cifar-100-python/``), or at that folder itself. Each file is a pickled dict with ``b"data"`` (N x 3072
uint8, channel-major: 1024 red, 1024 green, 1024 blue values per image) and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` (CIFAR-100). Pickles can run code when loaded, so the unpickler only accepts the
handful of numpy globals an array needs; anything else is reported as a corrupt file.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from slimops.data.image_data import ImageData

# name: (sub-folder, train files, test files, label key, classes, mean, std)
_SPECS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# The globals numpy arrays need, under numpy 1 (numpy.core) and numpy 2 (numpy._core) names, plus the
# codecs call Python 3 writes for bytes at pickle protocol 2.
_ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
_ALLOWED |= {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def _find_dir(name: str, data_dir) -> str:
    sub, train, test = _SPECS[name][:3]
    files = train + test
    if data_dir is None:
        raise FileNotFoundError(
            f"slimops.data.load({name!r}): data_dir is None; nothing is downloaded. Pass the folder holding "
            f"{sub}/ (the python-version archive, unpacked), which must contain {', '.join(files)}")
    for d in (os.path.join(data_dir, sub), os.fspath(data_dir)):
        if all(os.path.isfile(os.path.join(d, f)) for f in files):
            return d
    for d in (os.path.join(data_dir, sub), os.fspath(data_dir)):
        missing = [f for f in files if not os.path.isfile(os.path.join(d, f))]
        if len(missing) < len(files):  # a partial copy: say exactly what is missing there
            raise FileNotFoundError(f"slimops.data.load({name!r}): {d} lacks {', '.join(missing)} "
                                    f"(expected {', '.join(files)})")
    raise FileNotFoundError(f"slimops.data.load({name!r}): no {name} files found; searched "
                            f"{os.path.join(data_dir, sub)} and {data_dir} for {', '.join(files)} "
                            f"(the unpacked python-version archive)")


def _get(d: dict, key: str):
    """CIFAR pickles from Python 2 have bytes keys; re-pickled copies may have str keys."""
    return d[key.encode()] if key.encode() in d else d.get(key)


def _read_file(path: str, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle file: (N, 3, 32, 32) uint8 images and (N,) int64 labels, or ValueError naming the file."""
    where = f"slimops.data.load: {path}"
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any unpickling failure (truncated, not a pickle, foreign global) means corrupt
        raise ValueError(f"{where} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{where} holds a {type(d).__name__}, expected a dict with data and {label_key}")
    data, labels = _get(d, "data"), _get(d, label_key)
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise ValueError(f"{where} lacks the key {'data' if data is None else label_key!r}; it has {keys}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    try:
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {label_key} is not a list of integers ({e})") from e
    if y.shape != (data.shape[0],):
        raise ValueError(f"{where}: {label_key} has shape {tuple(y.shape)}, expected ({data.shape[0]},) to match data")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{where}: {label_key} must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return x, y


def load_cifar(name: str, data_dir=None, size: int = 32) -> ImageData:
    """CIFAR-10 or CIFAR-100 (``name`` = ``"cifar10"`` | ``"cifar100"``) as uint8 :class:`ImageData` with
    the standard per-channel mean/std and the usual augmentation (4-pixel padded crops, flips)."""
    if size != 32:
        raise ValueError(f"slimops.data.load({name!r}): size must be 32 for CIFAR (images are 32x32), got {size}")
    _, train, test, label_key, classes, mean, std = _SPECS[name]
    d = _find_dir(name, data_dir)
    parts = {split: [_read_file(os.path.join(d, f), label_key, classes) for f in files]
             for split, files in (("train", train), ("test", test))}
    (x_tr, y_tr), (x_te, y_te) = ((torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps]))
                                  for ps in (parts["train"], parts["test"]))
    return ImageData(name=name, num_classes=classes, in_channels=3, size=32, x_train=x_tr, y_train=y_tr,
                     x_test=x_te, y_test=y_te, mean=torch.tensor(mean), std=torch.tensor(std), pad=4, flip=True)
