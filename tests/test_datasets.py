"""torchvision loaders on tiny files written in the real on-disk formats."""
import pickle
import struct

import numpy as np
import pytest
import torch

from trainables.data import AUGMENTS, augment, load_splits
from trainables.datasets import DatasetMissing, DatasetUnreadable, check_available
from trainables.models import build_model
from trainables.pretrain_probe import run

RNG = np.random.default_rng(0)


def _labels(n, k=10):
    return [i % k for i in range(n)]


def write_cifar10(root, n=40):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": _labels(n)}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def write_cifar100(root, n=200):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name in ("train", "test"):
        with open(d / name, "wb") as f:
            pickle.dump({"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": _labels(n, 100)}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)


def write_idx(root, folder, n=60):
    d = root / folder / "raw"
    d.mkdir(parents=True)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        with open(d / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28))
            f.write(RNG.integers(0, 256, count * 28 * 28, dtype=np.uint8).tobytes())
        with open(d / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, count))
            f.write(bytes(_labels(count)))


def write_svhn(root, n=50):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        savemat(root / f"{split}_32x32.mat", {"X": RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                              "y": np.array([[1 + i % 10] for i in range(n)], dtype=np.uint8)})


def write_stl10(root, n=30, n_unlabeled=20):
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    for split, count in (("train", n), ("test", n), ("unlabeled", n_unlabeled)):
        (d / f"{split}_X.bin").write_bytes(RNG.integers(0, 256, count * 3 * 96 * 96, dtype=np.uint8).tobytes())
        if split != "unlabeled":
            (d / f"{split}_y.bin").write_bytes(bytes([1 + i % 10 for i in range(count)]))


WRITERS = {"cifar10": (write_cifar10, (3, 32, 32), 10), "cifar100": (write_cifar100, (3, 32, 32), 100),
           "mnist": (lambda r: write_idx(r, "MNIST"), (1, 28, 28), 10),
           "fashion_mnist": (lambda r: write_idx(r, "FashionMNIST"), (1, 28, 28), 10),
           "svhn": (write_svhn, (3, 32, 32), 10), "stl10": (write_stl10, (3, 96, 96), 10)}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_loader_reads_real_format_files(tmp_path, name):
    writer, shape, n_classes = WRITERS[name]
    writer(tmp_path)
    s = load_splits(name, str(tmp_path), verify_data=False)
    assert s.train_x.shape[1:] == shape and s.train_x.dtype == torch.uint8
    assert s.n_classes == n_classes
    assert int(s.train_y.min()) >= 0 and int(s.test_y.max()) < n_classes
    assert len(s.val_x) > 0 and len(s.test_x) > 0
    if name == "stl10":
        assert s.extra_x is not None and len(s.pretrain_x) == len(s.train_x) + 20


def test_md5_check_is_the_default(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DatasetMissing, match="verify_data: false accepts files by presence"):
        load_splits("cifar10", str(tmp_path))


@pytest.mark.parametrize("name", sorted(WRITERS) + ["image_folder"])
def test_missing_dataset_names_the_path_and_the_fix(tmp_path, name):
    with pytest.raises(DatasetMissing, match=str(tmp_path)):
        check_available(name, str(tmp_path))
    with pytest.raises(DatasetMissing, match="needs data_root"):
        check_available(name, None)


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(10):
                Image.fromarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    s = load_splits("image_folder", str(tmp_path), image_size=16)
    assert s.train_x.shape[1:] == (3, 16, 16) and s.n_classes == 2 and len(s.test_x) == 20


@pytest.mark.parametrize("name, write, victim", [
    ("cifar10", write_cifar10, "cifar-10-batches-py/data_batch_3"),
    ("mnist", lambda root: write_idx(root, "MNIST"), "MNIST/raw/train-images-idx3-ubyte"),
])
def test_a_dataset_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, name, write, victim):
    write(tmp_path)
    path = tmp_path / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by an interrupted copy
    with pytest.raises(DatasetUnreadable) as info:
        load_splits(name, str(tmp_path), verify_data=False)
    message = str(info.value)
    assert message.startswith(f"dataset {name}: {path} cannot be read (") and "\n" not in message


def test_trainable_runs_on_fake_cifar(tmp_path):
    write_cifar10(tmp_path, n=40)
    seen = []
    out = run({"method": "gca_ince", "dataset": "cifar10", "data_root": str(tmp_path), "verify_data": False,
               "epochs": 1, "batch_size": 32, "proj_hidden": 32, "proj_dim": 16, "knn_k": 10},
              lambda m, c=None: seen.append(m))
    assert len(seen) == 1 and 0 <= out["test_linear_acc"] <= 1


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_rgb_augmentations_are_seeded_and_in_range(name):
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(0), AUGMENTS[name])
    b = augment(x, torch.Generator().manual_seed(0), AUGMENTS[name])
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (8, 3, 32, 32)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_resnet_cifar_stem_shapes():
    m = build_model("resnet18", 3, proj_hidden=2048, proj_dim=128)
    h, z = m(torch.rand(2, 3, 32, 32))
    assert h.shape == (2, 512) and z.shape == (2, 128)
    assert m.encoder.conv1.kernel_size == (3, 3) and m.encoder.conv1.stride == (1, 1)
    m50 = build_model("resnet50", 3, proj_hidden=64, proj_dim=16, cifar_stem=False)
    assert m50(torch.rand(2, 3, 64, 64))[0].shape == (2, 2048)


def test_digits_read_without_sklearn_equal_sklearns_load_digits():
    from sklearn.datasets import load_digits

    from trainables.data import _digits

    images, target = _digits()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)


def test_cached_split_equals_sklearns_and_a_cache_hit_imports_no_sklearn(tmp_path, monkeypatch):
    import subprocess
    import sys

    from sklearn.model_selection import train_test_split

    from trainables.data import _stratified_split

    monkeypatch.setenv("OTSTUDY_CACHE_DIR", str(tmp_path))
    y = np.repeat(np.arange(5), 20)  # 100 labels, 5 classes
    first = _stratified_split(y, 0.25, 0)  # computed, then cached
    assert len(list(tmp_path.glob("split-*.json"))) == 1
    keep, held = train_test_split(list(range(100)), test_size=25, stratify=y, random_state=0)
    assert first == (sorted(keep), sorted(held))
    assert _stratified_split(y, 0.25, 0) == first  # read back
    assert _stratified_split(y, 0.1, 0) != first and len(list(tmp_path.glob("split-*.json"))) == 2
    code = ("import sys; from trainables.data import load_splits; s = load_splits('digits');"
            "print(len(s.train_x), len(s.val_x), len(s.test_x), 'sklearn' in sys.modules)")
    env = {**__import__("os").environ, "OTSTUDY_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
            for _ in range(2)]
    assert runs[0].stdout.split() == ["1212", "135", "450", "True"]  # first: sklearn makes the split
    assert runs[1].stdout.split() == ["1212", "135", "450", "False"]  # then: the cache, no sklearn import
