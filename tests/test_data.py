"""slimops.data: the digits and CIFAR loaders, their errors, and reproducible batch-independent augmentation."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimops import data as sd
from slimops.data.image_data import ImageData, crop_flip

pytest.importorskip("sklearn")

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ---------------------------------------------------------------- fake CIFAR in the real pickle format

def _write_batch(path, n, label_key, num_classes, seed, str_keys=False, protocol=2):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"fake", label_key.encode(): rng.integers(0, num_classes, n).tolist(),
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [b"img_%d.png" % i for i in range(n)]}
    if str_keys:
        d = {k.decode(): v for k, v in d.items()}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)
    return d


def _fake_cifar10(root, n=20, **kw):
    root.mkdir(parents=True, exist_ok=True)
    return {f: _write_batch(root / f, n, "labels", 10, seed=i, **kw) for i, f in enumerate(CIFAR10_FILES)}


def _fake_cifar100(root, n=20):
    root.mkdir(parents=True, exist_ok=True)
    return {f: _write_batch(root / f, n, "fine_labels", 100, seed=i) for i, f in enumerate(["train", "test"])}


def _as_images(d):
    return torch.from_numpy(d[b"data"]).view(-1, 3, 32, 32)


def test_cifar10_fake_in_standard_subfolder(tmp_path):
    files = _fake_cifar10(tmp_path / "cifar-10-batches-py")
    d = sd.load("cifar10", tmp_path)
    assert (d.name, d.num_classes, d.in_channels, d.size, d.pad, d.flip) == ("cifar10", 10, 3, 32, 4, True)
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (20, 3, 32, 32) and d.y_test.dtype == torch.int64
    # channel-major rows: the first 1024 bytes are the red plane, in file order, batches concatenated
    assert torch.equal(d.x_train[20:40], _as_images(files["data_batch_2"]))
    assert d.y_train[20:40].tolist() == files["data_batch_2"][b"labels"]
    assert torch.equal(d.x_test, _as_images(files["test_batch"]))
    assert torch.allclose(d.mean, torch.tensor([0.4914, 0.4822, 0.4465]))
    assert torch.allclose(d.std, torch.tensor([0.2470, 0.2435, 0.2616]))


def test_cifar10_files_directly_in_data_dir_with_str_keys(tmp_path):
    files = _fake_cifar10(tmp_path, str_keys=True, protocol=4)
    d = sd.load("cifar10", str(tmp_path))
    assert torch.equal(d.x_train[:20], torch.from_numpy(files["data_batch_1"]["data"]).view(-1, 3, 32, 32))


def test_cifar_pickled_by_numpy1_names_loads(tmp_path):
    """The real files name numpy.core.multiarray (numpy 1); numpy 2 writes numpy._core: both must load."""
    _fake_cifar10(tmp_path)
    for f in CIFAR10_FILES:
        raw = (tmp_path / f).read_bytes()
        (tmp_path / f).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in (tmp_path / "test_batch").read_bytes()
    assert sd.load("cifar10", tmp_path).x_train.shape == (100, 3, 32, 32)


def test_cifar100_fake(tmp_path):
    files = _fake_cifar100(tmp_path / "cifar-100-python")
    d = sd.load("cifar100", tmp_path)
    assert (d.num_classes, d.pad, d.flip) == (100, 4, True)
    assert d.x_train.shape == (20, 3, 32, 32) and d.y_train.tolist() == files["train"][b"fine_labels"]
    assert torch.allclose(d.mean, torch.tensor([0.5071, 0.4865, 0.4409]))
    assert torch.allclose(d.std, torch.tensor([0.2673, 0.2564, 0.2762]))


def test_missing_data_dir_and_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir is None.*data_batch_1.*test_batch"):
        sd.load("cifar10")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*cifar-10-batches-py.*data_batch_5"):
        sd.load("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python.*train, test"):
        sd.load("cifar100", tmp_path / "nowhere")
    _fake_cifar10(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py lacks data_batch_3 "):
        sd.load("cifar10", tmp_path)


@pytest.mark.parametrize("corruption, message", [
    (lambda p: p.write_bytes(b"this is not a pickle"), "not a readable CIFAR pickle"),
    (lambda p: p.write_bytes(p.read_bytes()[:500]), "not a readable CIFAR pickle"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "holds a list"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})), "lacks the key 'labels'"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})),
     r"data must be uint8 of shape \(N, 3072\), got uint8 \(2, 3000\)"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]})),
     "data must be uint8"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]})),
     r"labels has shape \(3,\), expected \(2,\)"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})),
     r"labels must lie in \[0, 10\)"),
])
def test_corrupt_cifar_file_is_a_valueerror_naming_the_file(tmp_path, corruption, message):
    _fake_cifar10(tmp_path)
    corruption(tmp_path / "data_batch_4")
    with pytest.raises(ValueError, match=f"{tmp_path / 'data_batch_4'}.*{message}"):
        sd.load("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_foreign_global_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="test_batch.*refusing global"):
        sd.load("cifar10", tmp_path)
    assert not (tmp_path / "pwned.txt").exists()


def test_unknown_name_and_bad_cifar_size(tmp_path):
    with pytest.raises(ValueError, match="unknown data set name 'mnist'.*digits, cifar10, cifar100"):
        sd.load("mnist")
    assert sd.DATASETS == ("digits", "cifar10", "cifar100")
    with pytest.raises(ValueError, match="size must be 32"):
        sd.load("cifar10", tmp_path, size=64)


# ---------------------------------------------------------------- digits

def test_digits_shapes_split_and_stats():
    d = sd.load("digits")
    assert (d.num_classes, d.in_channels, d.size, d.pad, d.flip) == (10, 1, 32, 2, False)
    assert d.x_train.shape == (1347, 1, 32, 32) and d.x_test.shape == (450, 1, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    # stratified: every class contributes round(25%) of its images to the test split
    counts = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10)
    assert torch.equal(torch.bincount(d.y_test, minlength=10), (counts.double() * 0.25).round().long())
    assert torch.allclose(d.mean, d.x_train.mean().reshape(1)) and torch.allclose(d.std, d.x_train.std().reshape(1))
    # the very split (and standardisation) of load_digits
    x_tr, y_tr, x_te, y_te = sd.load_digits(size=32)
    assert torch.equal(d.y_train, y_tr) and torch.equal(d.y_test, y_te)
    torch.testing.assert_close(d.normalise(d.x_train), x_tr)
    torch.testing.assert_close(next(d.test_batches(10_000))[0], x_te)
    # another seed, another split; size 8 keeps the raw resolution
    assert not torch.equal(sd.load("digits", seed=1).x_test, d.x_test)
    assert sd.load("digits", size=8).x_test.shape == (450, 1, 8, 8)


def test_load_digits_unchanged_defaults():
    x_tr, y_tr, x_te, y_te = sd.load_digits()
    assert x_tr.shape == (1347, 1, 8, 8) and x_te.shape == (450, 1, 8, 8)
    assert abs(x_tr.mean().item()) < 1e-5 and abs(x_tr.std().item() - 1) < 1e-5


# ---------------------------------------------------------------- augmentation

def _toy(dtype=torch.uint8, n=50, c=3, size=8, pad=3, flip=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    x = x if dtype == torch.uint8 else x.float() / 255
    y = torch.arange(n) % 10
    return ImageData("toy", 10, c, size, x, y, x[:7].clone(), y[:7].clone(), torch.rand(c, generator=g),
                     torch.rand(c, generator=g) + 0.5, pad, flip)


def _reference_augment(d, i, epoch, seed):
    """Plain per-image RandomCrop(pad) + flip + Normalize with the table's parameters."""
    offsets, flips = d.augment_table(epoch, seed)
    img = d.x_train[i]
    img = img.float() / 255 if img.dtype == torch.uint8 else img
    padded = F.pad(img, (d.pad,) * 4)  # zeros in unnormalised pixel space
    oy, ox = offsets[i].tolist()
    crop = padded[:, oy:oy + d.size, ox:ox + d.size]
    if flips[i]:
        crop = crop.flip(-1)
    return (crop - d.mean[:, None, None]) / d.std[:, None, None]


@pytest.mark.parametrize("dtype, pad, flip", [(torch.uint8, 3, True), (torch.float32, 3, True),
                                               (torch.uint8, 0, True), (torch.float32, 2, False)])
def test_crop_semantics_match_per_image_reference(dtype, pad, flip):
    d = _toy(dtype, pad=pad, flip=flip)
    idx = torch.randperm(d.num_train)
    x, y = d.train_batch(idx, epoch=3, seed=7)
    assert x.dtype == torch.float32 and x.shape == (50, 3, 8, 8) and torch.equal(y, d.y_train[idx])
    ref = torch.stack([_reference_augment(d, i, 3, 7) for i in idx.tolist()])
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)


def test_crop_flip_by_hand():
    x = torch.arange(1, 10, dtype=torch.float32).view(1, 1, 3, 3)
    centre = crop_flip(x, torch.tensor([[1, 1]]), torch.tensor([False]), pad=1)
    assert torch.equal(centre, x)
    # offset (0, 0): the image moves down-right by one pixel, zeros come in at the top and left
    shifted = crop_flip(x, torch.tensor([[0, 0]]), torch.tensor([False]), pad=1)
    assert shifted[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    # crop first, then mirror the cropped window
    flipped = crop_flip(x, torch.tensor([[0, 0]]), torch.tensor([True]), pad=1)
    assert flipped[0, 0].tolist() == [[0, 0, 0], [2, 1, 0], [5, 4, 0]]


def test_augmentation_depends_on_seed_epoch_index_only():
    d = _toy()
    idx = torch.randperm(d.num_train)
    full, _ = d.train_batch(idx, epoch=2, seed=5)
    # another split of the same samples, another order, other global RNG state, a cold cache (a resumed run)
    torch.manual_seed(999)
    fresh = _toy()
    d.train_batch(idx[:3], epoch=0, seed=5)  # evicts the cached epoch-2 table
    rng_before = torch.get_rng_state()
    parts = [fresh.train_batch(idx[i:i + 7], epoch=2, seed=5)[0] for i in range(0, len(idx), 7)]
    assert torch.equal(torch.get_rng_state(), rng_before), "augmentation must not touch the global RNG"
    assert torch.equal(torch.cat(parts), full)
    rev = idx.flip(0)
    assert torch.equal(d.train_batch(rev, epoch=2, seed=5)[0], full.flip(0))
    # other epochs and other seeds give other augmentations
    assert not torch.equal(d.train_batch(idx, epoch=3, seed=5)[0], full)
    assert not torch.equal(d.train_batch(idx, epoch=2, seed=6)[0], full)


def test_augment_table_range_and_switches():
    d = _toy(n=2000, pad=2)
    offsets, flips = d.augment_table(0, 0)
    assert offsets.shape == (2000, 2) and set(offsets.unique().tolist()) == {0, 1, 2, 3, 4}
    assert 800 < int(flips.sum()) < 1200
    assert not _toy(flip=False).augment_table(0, 0)[1].any()
    assert not _toy(pad=0).augment_table(0, 0)[0].any()
    plain = _toy(pad=0, flip=False)
    idx = torch.arange(10)
    assert torch.equal(plain.train_batch(idx, 0, 0)[0], plain.normalise(plain.x_train[:10]))
    d = _toy()
    assert torch.equal(d.train_batch(idx, 0, 0, augment=False)[0], d.normalise(d.x_train[:10]))


def test_test_batches_in_order_and_train_batch_errors():
    d = _toy()
    batches = list(d.test_batches(3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([x for x, _ in batches]), d.normalise(d.x_test))
    with pytest.raises(ValueError, match=r"train_batch: idx must lie in \[0, 50\)"):
        d.train_batch(torch.tensor([0, 50]), 0, 0)
    with pytest.raises(ValueError, match="train_batch: idx must be a 1-D int64 tensor"):
        d.train_batch([0, 1], 0, 0)
    with pytest.raises(ValueError, match="x_train must have shape"):
        ImageData("bad", 10, 3, 8, d.x_train[:, :1], d.y_train, d.x_test, d.y_test, d.mean, d.std, 0, False)
    assert d.train_batch(torch.zeros(0, dtype=torch.long), 0, 0)[0].shape == (0, 3, 8, 8)
    assert "toy" in repr(d) and repr(d.to("cpu")) == repr(d)


def test_reading_batches_never_modifies_the_stored_images():
    """Regression: normalising a float32 view in place once re-normalised the stored test set on every pass."""
    from slimops.data import load

    d = load("digits")
    before_test, before_train = d.x_test.clone(), d.x_train.clone()
    first = [x.clone() for x, _ in d.test_batches(100)]
    second = [x for x, _ in d.test_batches(100)]
    d.train_batch(torch.arange(10), 0, 0, augment=False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(d.x_test, before_test) and torch.equal(d.x_train, before_train)
