"""One trial's configuration: a dataclass built from the flat Tune dict."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, get_type_hints

from .catalog import (AUGMENT_NAMES, BANK_SMALLEST_CLASS, DATASETS, ENCODERS, METHOD_INFO as METHODS, RELAXATIONS,
                      OT_GRADS, OT_VALUES, check_ot_choice, check_rince, default_knn_k)

OPTIMIZERS = ("adam", "sgd", "lars")


@dataclass
class TrialConfig:
    """Flat trial config. Method knobs left at None take the method's paper default."""

    # what to run
    method: str = "simclr"  # a name in trainables.losses.METHODS
    dataset: str = "digits"  # embedded default
    data_root: Optional[str] = None  # where torchvision datasets live
    download: bool = False  # let torchvision fetch a missing dataset (needs internet)
    verify_data: bool = True  # torchvision's MD5 checks; false accepts files by presence and format
    image_size: int = 64  # image_folder only: images are resized to image_size x image_size
    augment: str = "auto"  # auto | digits | simclr | simclr_blur | gca_harsh (trainables.data.AUGMENTS)
    crop_min_scale: Optional[float] = None  # override the set's random-resized-crop area floor
    encoder: str = "small_cnn"
    cifar_stem: bool = True  # ResNet: 3x3 stride-1 first conv, no max-pool (32x32 inputs)
    proj_hidden: int = 256  # projector width D_h -> proj_hidden -> proj_dim
    proj_dim: int = 64
    # optimisation
    epochs: int = 20
    batch_size: int = 256  # images per step (each seen twice: 2N views)
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 1e-6
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 0 (per step)
    seed: int = 0
    checkpoint_every: int = 1  # epochs between checkpoints (and the last epoch); a resume repeats at most this - 1
    device: str = "auto"  # auto | cpu | cuda (the GPU Ray assigned through CUDA_VISIBLE_DEVICES)
    amp: bool = True  # bf16 autocast of the encoder/projector on CUDA; losses and OT stay float32
    compile: bool = False  # torch.compile the model
    # evaluation
    probe_every: int = 1  # epochs between kNN probes (the pruning signal)
    knn_k: Optional[int] = None  # None: catalog.default_knn_k of the bank (20 on digits, 200 on CIFAR-10); never
    # above the bank's smallest class
    knn_t: float = 0.1
    mlp_probe: bool = False  # also fit an MLP probe on the frozen features at the end
    # method knobs (None = method default, see METHODS[...].defaults)
    tau: Optional[float] = None
    beta: Optional[float] = None
    eps: Optional[float] = None
    sinkhorn_iters: Optional[int] = None  # SinSim, IOT-CL U(a,b): full Sinkhorn iterations K
    gca_iters: Optional[float] = None  # GCA: full Sinkhorn iterations T (0.5 = the row update alone, InfoNCE)
    ot_cost: Optional[str] = None
    ot_value: Optional[str] = None
    ot_grad: Optional[str] = None
    ot_solver: Optional[str] = None
    uot_lambda1: Optional[float] = None
    uot_lambda2: Optional[float] = None
    rince_q: Optional[float] = None
    rince_lam: Optional[float] = None
    relaxation: Optional[str] = None
    lambda_p: Optional[float] = None
    vicreg_inv: Optional[float] = None
    vicreg_var: Optional[float] = None
    vicreg_cov: Optional[float] = None
    barlow_lambda: Optional[float] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrialConfig":
        """Build from a flat dict; unknown keys, wrong types and bad values raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        hints = get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            kwargs[k] = _coerce(k, v, hints[k])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def bad(key, why):
            raise ValueError(f"{key}={getattr(self, key)!r}: {why}")

        if self.method not in METHODS:
            bad("method", f"unknown method; choose one of {sorted(METHODS)}")
        if self.dataset not in DATASETS:
            bad("dataset", f"unknown dataset; choose one of {list(DATASETS)}")
        if self.encoder not in ENCODERS:
            bad("encoder", f"choose one of {list(ENCODERS)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"choose one of {list(OPTIMIZERS)}")
        if self.augment != "auto" and self.augment not in AUGMENT_NAMES:
            bad("augment", f"choose auto or one of {sorted(AUGMENT_NAMES)}")
        if self.crop_min_scale is not None and not 0 < self.crop_min_scale <= 1:
            bad("crop_min_scale", "must be in (0, 1]")
        if self.image_size < 8:
            bad("image_size", "must be >= 8")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "choose auto, cpu or cuda")
        for key in ("epochs", "batch_size", "probe_every", "proj_hidden", "proj_dim", "checkpoint_every"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if self.knn_k is not None:
            if self.knn_k < 1:
                bad("knn_k", "must be >= 1")
            smallest = BANK_SMALLEST_CLASS.get(self.dataset)
            if smallest is not None and self.knn_k > smallest:
                bad("knn_k", f"above the smallest class of the {self.dataset} kNN bank ({smallest} images): every "
                             f"query of that class would count other classes' votes; use at most {smallest} "
                             f"(default for {self.dataset}: {default_knn_k(smallest)})")
        if self.batch_size < 2:
            bad("batch_size", "a contrastive batch needs >= 2 images")
        if self.warmup_epochs < 0:
            bad("warmup_epochs", "must be >= 0")
        for key in ("lr", "knn_t"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                bad(key, "must be a finite number > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        for key in ("tau", "eps", "uot_lambda1", "uot_lambda2", "rince_lam"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                bad(key, "must be > 0")
        for key in ("beta", "lambda_p", "vicreg_inv", "vicreg_var", "vicreg_cov", "barlow_lambda"):
            v = getattr(self, key)
            if v is not None and v < 0:
                bad(key, "must be >= 0")
        if self.sinkhorn_iters is not None and self.sinkhorn_iters < 1:
            bad("sinkhorn_iters", "must be >= 1")
        if self.gca_iters is not None and not (self.gca_iters >= 0.5 and (2 * self.gca_iters).is_integer()):
            bad("gca_iters", "must be a multiple of 0.5 that is >= 0.5 (full Sinkhorn iterations; 0.5 = the row "
                             "update alone, InfoNCE)")
        if self.rince_q is not None and not 0 < self.rince_q <= 1:
            bad("rince_q", "must be in (0, 1]")
        if self.relaxation is not None and self.relaxation not in RELAXATIONS:
            bad("relaxation", f"choose one of {list(RELAXATIONS)}")
        if self.ot_cost is not None and self.ot_cost not in ("cosine", "sqeuclidean"):
            bad("ot_cost", "choose cosine or sqeuclidean")
        for key, allowed in (("ot_value", OT_VALUES), ("ot_grad", OT_GRADS), ("ot_solver", ("sinkhorn", "sns"))):
            if getattr(self, key) is not None and getattr(self, key) not in allowed:
                bad(key, f"choose one of {', '.join(allowed)}")
        if self.ot_solver == "sns" and self.ot_grad == "unrolled":
            bad("ot_grad", "ot_solver=sns has the implicit (envelope) gradient only; set ot_grad: implicit or "
                           "leave it out")
        knobs = METHODS[self.method].defaults
        if "ot_value" in knobs:
            solver = self.ot_solver or knobs["ot_solver"]
            grad = self.ot_grad or ("implicit" if solver == "sns" else knobs["ot_grad"])
            try:
                check_ot_choice(self.ot_value or knobs["ot_value"], grad, solver)
            except ValueError as exc:
                raise ValueError(f"{self.method}: {exc}") from None
        if "rince_q" in knobs:
            try:
                check_rince(self.knob("rince_q"), self.knob("rince_lam"), self.knob("eps"))
            except ValueError as exc:
                raise ValueError(f"{self.method}: {exc}") from None

    def knob(self, key: str) -> Any:
        """A knob of the trial's method: the config's value, else the method's default (None if it has none)."""
        value = getattr(self, key)
        return value if value is not None else METHODS[self.method].defaults.get(key)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Accept ints for floats (YAML writes 1 for 1.0) and numpy scalars; reject the rest."""
    base = hint
    optional = False
    if getattr(hint, "__origin__", None) is not None and type(None) in getattr(hint, "__args__", ()):
        optional = True
        base = next(a for a in hint.__args__ if a is not type(None))
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} must not be null")
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalar
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {type(value).__name__} {value!r}")
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is str and isinstance(value, str):
        return value
    raise ValueError(f"{key} must be {base.__name__}, got {type(value).__name__} {value!r}")
