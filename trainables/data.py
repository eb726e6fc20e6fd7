"""Datasets as in-memory tensors, and batched per-sample augmentations.

Every dataset is split once, with a fixed split seed independent of the
trial's seed, into ``train`` (pretraining and the probes' training set),
``val`` (carved from train; the only split any selection may look at: the
kNN pruning signal, the linear probe's weight decay) and ``test`` (reported,
never selected on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("digits",)
SPLIT_SEED = 0  # fixed: every trial of every study sees the same split
# size of the pretraining split, for validating batch sizes before a study starts
DATASET_TRAIN_SIZES = {"digits": 1212}


@dataclass
class Splits:
    """Images in [0, 1], shape (N, C, H, W) float32; labels int64 (N,)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    n_classes: int

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


def _stratified_split(y, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = list(range(len(y)))
    keep, held = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    return sorted(keep), sorted(held)


def load_digits_splits(test_fraction: float = 0.25, val_fraction: float = 0.1) -> Splits:
    """scikit-learn's digits: 1,797 real 8x8 grayscale images, 10 classes (ships with sklearn)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0,1]
    y = torch.tensor(d.target, dtype=torch.int64)
    trainval, test = _stratified_split(d.target, test_fraction, SPLIT_SEED)
    tv_y = d.target[trainval]
    tr_local, val_local = _stratified_split(tv_y, val_fraction, SPLIT_SEED)
    train = [trainval[i] for i in tr_local]
    val = [trainval[i] for i in val_local]
    return Splits("digits", x[train], y[train], x[val], y[val], x[test], y[test], 10)


def load_splits(name: str, data_root: Optional[str] = None) -> Splits:
    if name == "digits":
        return load_digits_splits()
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample random augmentation strengths (units in comments)."""

    crop_scale: Tuple[float, float] = (0.5, 1.0)  # area fraction kept by the random resized crop
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    max_rotation_deg: float = 10.0  # uniform in [-r, r]
    hflip_p: float = 0.0  # digits are not mirror-symmetric: off by default
    noise_std: float = 0.05  # additive Gaussian noise, in [0, 1] intensity units
    erase_p: float = 0.25  # probability of erasing one random rectangle
    erase_scale: Tuple[float, float] = (0.05, 0.2)  # erased area fraction


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def augment(x: Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> Tensor:
    """One random view of every image, as batched tensor ops on ``x.device``.

    Random resized crop + rotation + optional flip as one affine warp per
    sample (``affine_grid`` + ``grid_sample``), then Gaussian noise and random
    erasing. All randomness comes from ``gen`` (a generator on ``x.device``),
    so a seeded generator gives the same views.

    Args:
        x: (B, C, H, W) images in [0, 1].
    Returns:
        (B, C, H, W) augmented images.
    """
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
