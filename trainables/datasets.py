"""torchvision datasets read from a local ``data_root`` into uint8 tensors.

Nothing is downloaded unless the config says ``download: true``. torchvision
verifies the MD5 checksums of CIFAR, SVHN and STL-10 files; that stays the
default, and ``verify_data: false`` accepts files by presence and format
(the tests write tiny files in the real on-disk formats).

Each loader returns (train_x, train_y, test_x, test_y, extra_x): uint8 images
(N, C, H, W), int64 labels, and for STL-10 the unlabeled split (pretraining
only). ``data.load_splits`` carves the validation split from train.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Tuple

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: the study driver reads SOURCES without it
    from torch import Tensor

# where each dataset lives under data_root, and where to get it
SOURCES = {
    "mnist": ("MNIST/raw", "the MNIST idx files (train-images-idx3-ubyte, ...)",
              "http://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": ("FashionMNIST/raw", "the Fashion-MNIST idx files",
                      "https://github.com/zalandoresearch/fashion-mnist"),
    "cifar10": ("cifar-10-batches-py", "the python version of CIFAR-10 (data_batch_1..5, test_batch, batches.meta)",
                "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": ("cifar-100-python", "the python version of CIFAR-100 (train, test, meta)",
                 "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "svhn": (".", "train_32x32.mat and test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/"),
    "stl10": ("stl10_binary", "the STL-10 binary files (train_X.bin, train_y.bin, test_*, unlabeled_X.bin)",
              "https://cs.stanford.edu/~acoates/stl10/"),
    "image_folder": (".", "train/<class>/*.png|jpg and test/<class>/*.png|jpg", "your own data"),
}
TORCHVISION_DATASETS = tuple(SOURCES)
Loaded = Tuple["Tensor", "Tensor", "Tensor", "Tensor", Optional["Tensor"]]


class DatasetMissing(FileNotFoundError):
    pass


class DatasetUnreadable(ValueError):
    """A dataset's file exists but cannot be read (truncated, corrupt, another format); the message is one line
    naming the file and what is wrong. A retry would fail the same way."""


def _expected_files(name: str, root: Path):
    sub = root / SOURCES[name][0]
    if name in ("mnist", "fashion_mnist"):
        return [sub / f for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    if name == "cifar10":
        return [sub / f"data_batch_{i}" for i in range(1, 6)] + [sub / "test_batch", sub / "batches.meta"]
    if name == "cifar100":
        return [sub / "train", sub / "test", sub / "meta"]
    if name == "svhn":
        return [root / "train_32x32.mat", root / "test_32x32.mat"]
    if name == "stl10":
        return [sub / f for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")]
    return [root / "train", root / "test"]


def check_available(name: str, data_root: Optional[str], download: bool = False) -> None:
    """Raise :class:`DatasetMissing` naming the path and how to get the data; before any training."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}")
    if data_root is None:
        raise DatasetMissing(f"dataset {name} needs data_root: a directory holding {SOURCES[name][1]} "
                             f"(set fixed.data_root in the spec)")
    root = Path(data_root).expanduser()
    if download and name != "image_folder":
        return
    missing = [p for p in _expected_files(name, root) if not p.exists()]
    if missing:
        hint = "" if name == "image_folder" else " or set download: true to let torchvision fetch it (needs internet)"
        raise DatasetMissing(f"dataset {name}: {missing[0]} not found; put {SOURCES[name][1]} under "
                             f"{root / SOURCES[name][0]} (from {SOURCES[name][2]}){hint}")


def _presence_only(cls, files_attr: str = "lists"):
    """A torchvision dataset class whose integrity check is presence, not MD5 (verify_data: false)."""

    class Unverified(cls):
        def _check_integrity(self) -> bool:
            if hasattr(self, "train_list"):  # CIFAR, STL-10
                return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                           for f, _ in self.train_list + self.test_list)
            return os.path.isfile(os.path.join(self.root, self.filename))  # SVHN

        def _load_meta(self) -> None:  # CIFAR: the same file, without the checksum
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Unverified.__name__ = f"Unverified{cls.__name__}"
    return Unverified


def load_torchvision(name: str, data_root: str, *, download: bool = False, verify_data: bool = True,
                     image_size: int = 64) -> Loaded:
    check_available(name, data_root, download)
    root = str(Path(data_root).expanduser())

    def cls(c):
        return c if verify_data else _presence_only(c)

    try:
        return _load(name, root, cls, download, image_size)
    except DatasetMissing:
        raise
    except Exception as exc:
        bad = _unreadable_file(name, Path(root))  # a file there that its reader cannot read: name it, in one line
        if bad is None and isinstance(exc, RuntimeError):  # torchvision: "Dataset not found or corrupted"
            raise DatasetMissing(f"dataset {name} under {Path(root) / SOURCES[name][0]}: {exc} (torchvision checks "
                                 f"MD5 sums; verify_data: false accepts files by presence and format)") from None
        where = bad or Path(root) / SOURCES[name][0]
        raise DatasetUnreadable(f"dataset {name}: {where} cannot be read ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _unreadable_file(name: str, root: Path) -> Optional[Path]:
    """The first of the dataset's files that its format's reader refuses (for the error's line), else None."""
    for path in _expected_files(name, root):
        if not path.is_file():
            continue
        try:
            if name in ("cifar10", "cifar100"):
                with open(path, "rb") as f:
                    pickle.load(f, encoding="latin1")
            elif name in ("mnist", "fashion_mnist"):
                _check_idx(path)
            elif name == "svhn":
                import scipy.io

                scipy.io.loadmat(str(path))
            elif name == "stl10" and path.suffix == ".bin" and "_X" in path.name:
                if path.stat().st_size % (3 * 96 * 96):
                    raise ValueError(f"{path.stat().st_size} bytes is not a whole number of 96x96x3 images")
        except Exception:
            return path
    return None


def _check_idx(path: Path) -> None:
    """An IDX file's header against its size (MNIST's format: magic, dims, then the bytes)."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0:
            raise ValueError("not an IDX file")
        dims = [int.from_bytes(f.read(4), "big") for _ in range(head[3])]
    if path.stat().st_size != 4 + 4 * len(dims) + int(np.prod(dims)):
        raise ValueError("truncated")


def _load(name, root, cls, download, image_size) -> Loaded:
    import torch
    import torchvision.datasets as tvd

    if name in ("mnist", "fashion_mnist"):
        c = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        tr, te = c(root, train=True, download=download), c(root, train=False, download=download)
        return (tr.data.unsqueeze(1), tr.targets.long(), te.data.unsqueeze(1), te.targets.long(), None)
    if name in ("cifar10", "cifar100"):
        c = cls(tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)
        tr, te = c(root, train=True, download=download), c(root, train=False, download=download)
        return (_hwc(tr.data), torch.tensor(tr.targets), _hwc(te.data), torch.tensor(te.targets), None)
    if name == "svhn":
        c = cls(tvd.SVHN)
        tr, te = c(root, split="train", download=download), c(root, split="test", download=download)
        return (torch.from_numpy(tr.data), torch.from_numpy(tr.labels).long(), torch.from_numpy(te.data),
                torch.from_numpy(te.labels).long(), None)
    if name == "stl10":
        c = cls(tvd.STL10)
        tr, te = c(root, split="train", download=download), c(root, split="test", download=download)
        un = c(root, split="unlabeled", download=download)
        return (torch.from_numpy(tr.data), torch.from_numpy(tr.labels).long(), torch.from_numpy(te.data),
                torch.from_numpy(te.labels).long(), torch.from_numpy(un.data))
    if name == "image_folder":
        trx, try_, classes = _image_folder(Path(root) / "train", image_size)
        tex, tey, _ = _image_folder(Path(root) / "test", image_size, classes)
        return trx, try_, tex, tey, None
    raise ValueError(f"unknown dataset {name!r}")


def _hwc(a: np.ndarray) -> Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


def _image_folder(path: Path, size: int, classes=None):
    import torch
    from PIL import Image

    classes = classes or sorted(p.name for p in path.iterdir() if p.is_dir())
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted((path / c).iterdir()) if (path / c).is_dir() else []:
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                continue
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
            xs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))  # (3, size, size)
            ys.append(ci)
    if not xs:
        raise DatasetMissing(f"dataset image_folder: no images under {path}/<class>/")
    return torch.stack(xs), torch.tensor(ys), classes
