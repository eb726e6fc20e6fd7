"""What otstudy can run, as plain data: methods with their knobs and paper defaults, datasets, encoders.

No torch here: the study driver (spec validation, the search space, Ray Tune's driver) reads this
catalogue without importing torch, which only the trial processes need (it cost the CLI 1.3-2.8 s per
command). ``trainables.losses.METHODS`` pairs each entry with its loss function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .datasets import TORCHVISION_DATASETS

DATASETS = ("digits",) + TORCHVISION_DATASETS
# images available for pretraining (train minus val, plus STL-10's unlabeled split),
# for validating batch sizes before a study starts
DATASET_TRAIN_SIZES = {"digits": 1212, "mnist": 54000, "fashion_mnist": 54000, "cifar10": 45000,
                       "cifar100": 45000, "svhn": 65931, "stl10": 104500}
# the fewest images any class has in the kNN probe's bank (the train split after validation is carved off,
# stratified; for STL-10 the labelled train split): digits from its fixed split (tests/test_trainable.py
# checks it), the torchvision sets from their published class counts less a stratified 10% (the lower
# bound of the split's rounding). image_folder is counted when a trial loads it.
BANK_SMALLEST_CLASS = {"digits": 118, "mnist": 4878, "fashion_mnist": 5400, "cifar10": 4500, "cifar100": 450,
                       "svhn": 4193, "stl10": 450}
KNN_K_LITERATURE = 200  # Wu et al. 2018's weighted kNN monitor, the SSL literature's k on CIFAR-sized banks
KNN_K_SMALL = 20  # the literature's other common k, for banks whose classes are too small for 200
ENCODERS = ("small_cnn", "resnet18", "resnet50")
RELAXATIONS = ("U1", "Ua", "Uab")  # IOT-CL's constraint sets
AUGMENT_NAMES = ("digits", "simclr", "simclr_blur", "gca_harsh")  # the keys of trainables.data.AUGMENTS


def default_knn_k(smallest_class: int) -> int:
    """The kNN probe's k for a bank whose smallest class has ``smallest_class`` images: 200 (the literature's)
    where every class has at least 2 x 200 images, else 20 where every class has at least 2 x 20, else half
    the smallest class. A k above a class's count puts other classes' images among the neighbours of every
    query of that class, whatever the features: on digits (118-123 images per class) k = 200 took at least 77
    of every 200 votes from other classes, and what the probe measured was mostly that."""
    for k in (KNN_K_LITERATURE, KNN_K_SMALL):
        if smallest_class >= 2 * k:
            return k
    return max(1, smallest_class // 2)


OT_VALUES = ("entropic", "cost", "divergence")  # SinSim's OT term: which function of the plan is minimised
OT_GRADS = ("unrolled", "implicit")


def check_ot_choice(ot_value: str, ot_grad: str, ot_solver: str) -> None:
    """SinSim's OT knobs at the boundary. ``ot_value`` chooses the function minimised; ``ot_grad`` and
    ``ot_solver`` only how it is computed, so a pair that would change the function is refused: the implicit
    (envelope) gradient, the only one SNS gives, is P*, the gradient of OT_eps, not of <P*, C>."""
    if ot_value not in OT_VALUES:
        raise ValueError(f"ot_value must be one of {', '.join(OT_VALUES)}, got {ot_value!r}")
    if ot_grad not in OT_GRADS:
        raise ValueError(f"ot_grad must be 'unrolled' or 'implicit', got {ot_grad!r}")
    if ot_solver not in ("sinkhorn", "sns"):
        raise ValueError(f"ot_solver must be 'sinkhorn' or 'sns', got {ot_solver!r}")
    if ot_value == "cost" and (ot_grad == "implicit" or ot_solver == "sns"):
        raise ValueError("ot_value=cost (<P*, C>) has no implicit gradient: the envelope gradient P* (ot_grad: "
                         "implicit, and ot_solver: sns) is the gradient of OT_eps, a different function; use "
                         "ot_grad: unrolled, or ot_value: entropic")


RINCE_EXP_LIMIT = 80.0  # exp(80) ~ 5.5e34: RINCE's exp(q s / eps) terms stay inside float32 (max ~ e^88.7)


def check_rince(rince_q: float, rince_lam: Optional[float], eps: float) -> None:
    """RINCE's knobs at the boundary: q in (0, 1], lambda > 0, and q / eps small enough for exp(q cos / eps)."""
    if not 0 < rince_q <= 1:
        raise ValueError(f"rince_q must be in (0, 1], got {rince_q}")
    if rince_lam is not None and not rince_lam > 0:
        raise ValueError(f"rince_lam must be > 0, got {rince_lam}")
    if rince_q / eps > RINCE_EXP_LIMIT:
        raise ValueError(f"rince_q / eps = {rince_q / eps:.3g} > {RINCE_EXP_LIMIT:g}: RINCE scores exp(q cos / eps) "
                         f"unnormalised, which overflows float32 there; raise eps or lower rince_q")


@dataclass(frozen=True)
class MethodInfo:
    """A method's name, the config keys it reads with its paper defaults, its source, whether it solves OT, and
    where its form differs from a public implementation (``note``, shown in reports; docs/methods.md has all)."""

    name: str
    defaults: Dict[str, object]
    paper: str
    uses_ot: bool
    note: str = ""

    @property
    def knobs(self) -> Tuple[str, ...]:
        return tuple(self.defaults)


METHOD_INFO: Dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("simclr", {"tau": 0.5}, "arXiv 2002.05709", False),
        MethodInfo("sinsim", {"tau": 0.5, "beta": 0.8, "eps": 0.05, "sinkhorn_iters": 40, "ot_cost": "cosine",
                              "ot_value": "entropic", "ot_grad": "unrolled", "ot_solver": "sinkhorn"},
                   "arXiv 2502.10478", True,
                   "W = the entropic objective OT_eps of Eq. 3 (ot_value) of the Sinkhorn plan between the views' "
                   "encoder features; the public script uses the Gibbs kernel without any plan "
                   "(sinsim_gibbs_kernel)"),
        MethodInfo("sinsim_gibbs_kernel", {"tau": 0.5, "beta": 0.8, "eps": 0.05},
                   "the public SinSim script (not the paper)", False,
                   "sum C exp(-C/eps) / N on a squared-Euclidean cost over its detached maximum: no transport plan"),
        MethodInfo("gca_ince", {"eps": 0.5, "gca_iters": 5}, "arXiv 2502.20141", True,
                   "T = gca_iters full Sinkhorn iterations (the authors' code: 10); self-pairs forbidden (+inf "
                   "cost), where the code gives them the largest finite cost"),
        MethodInfo("gca_rince", {"eps": 0.5, "gca_iters": 5, "rince_q": 0.5, "rince_lam": 0.01},
                   "arXiv 2502.20141; RINCE: Chuang et al., CVPR 2022", True,
                   "RINCE on the plan's unnormalised scores (the plan without its row scaling); T = 0.5 is RINCE "
                   "itself. The authors' code instead raises a cross-entropy to q (gca_rince_code)"),
        MethodInfo("gca_rince_code", {"eps": 0.5, "gca_iters": 10, "rince_q": 0.98},
                   "the GCA authors' public code (not the paper)", True,
                   "(cross-entropy of log P)^q / q after 10 Sinkhorn iterations, self-pairs at the largest cost; "
                   "its lambda has no effect (every class weight is reset to 1), so it has none here"),
        MethodInfo("gca_uot", {"eps": 0.5, "gca_iters": 5, "uot_lambda1": 1.0, "uot_lambda2": 1.0},
                   "arXiv 2502.20141", True,
                   "the paper's generalised KL(P_tgt | P) with its mass terms, lambda1 = lambda2 = 1; the authors' "
                   "code minimises r1 x a cross-entropy of log P (no mass terms) + r2 x a RINCE-like term, with "
                   "marginal penalties 1e-4 and 10 iterations"),
        MethodInfo("iot_cl", {"eps": 0.5, "relaxation": "Ua", "sinkhorn_iters": 4, "lambda_p": 0.0},
                   "ICML 2023 (Shi et al.)", True,
                   "KL(P~ | P) = Eq. 23 minus the constant log 2N, so U(a) equals SimCLR at tau = eps exactly"),
        MethodInfo("vicreg", {"vicreg_inv": 25.0, "vicreg_var": 25.0, "vicreg_cov": 1.0}, "arXiv 2105.04906",
                   False),
        MethodInfo("barlow_twins", {"barlow_lambda": 5e-3}, "arXiv 2103.03230", False),
    ]
}
