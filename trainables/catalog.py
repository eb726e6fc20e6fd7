"""What otstudy can run, as plain data: methods with their knobs and paper defaults, datasets, encoders.

No torch here: the study driver (spec validation, the search space, Ray Tune's driver) reads this
catalogue without importing torch, which only the trial processes need (it cost the CLI 1.3-2.8 s per
command). ``trainables.losses.METHODS`` pairs each entry with its loss function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from .datasets import TORCHVISION_DATASETS

DATASETS = ("digits",) + TORCHVISION_DATASETS
# images available for pretraining (train minus val, plus STL-10's unlabeled split),
# for validating batch sizes before a study starts
DATASET_TRAIN_SIZES = {"digits": 1212, "mnist": 54000, "fashion_mnist": 54000, "cifar10": 45000,
                       "cifar100": 45000, "svhn": 65931, "stl10": 104500}
ENCODERS = ("small_cnn", "resnet18", "resnet50")
RELAXATIONS = ("U1", "Ua", "Uab")  # IOT-CL's constraint sets
AUGMENT_NAMES = ("digits", "simclr", "simclr_blur", "gca_harsh")  # the keys of trainables.data.AUGMENTS


@dataclass(frozen=True)
class MethodInfo:
    """A method's name, the config keys it reads with its paper defaults, its source, whether it solves OT."""

    name: str
    defaults: Dict[str, object]
    paper: str
    uses_ot: bool

    @property
    def knobs(self) -> Tuple[str, ...]:
        return tuple(self.defaults)


METHOD_INFO: Dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("simclr", {"tau": 0.5}, "arXiv 2002.05709", False),
        MethodInfo("sinsim", {"tau": 0.5, "beta": 0.8, "eps": 0.05, "sinkhorn_iters": 40, "ot_cost": "cosine",
                              "ot_value": "cost", "ot_grad": "unrolled", "ot_solver": "sinkhorn"},
                   "arXiv 2502.10478", True),
        MethodInfo("sinsim_gibbs_kernel", {"tau": 0.5, "beta": 0.8, "eps": 0.05, "ot_cost": "cosine"},
                   "public SinSim script (not the paper)", False),
        MethodInfo("gca_ince", {"eps": 0.5, "sinkhorn_iters": 5}, "arXiv 2502.20141", True),
        MethodInfo("gca_rince", {"eps": 0.5, "sinkhorn_iters": 5, "rince_q": 0.5, "rince_lam": 0.01},
                   "arXiv 2502.20141", True),
        MethodInfo("gca_uot", {"eps": 0.5, "sinkhorn_iters": 5, "uot_lambda1": 1.0, "uot_lambda2": 1.0},
                   "arXiv 2502.20141", True),
        MethodInfo("iot_cl", {"eps": 0.5, "relaxation": "Ua", "sinkhorn_iters": 4, "lambda_p": 0.0},
                   "ICML 2023 (Shi et al.)", True),
        MethodInfo("vicreg", {"vicreg_inv": 25.0, "vicreg_var": 25.0, "vicreg_cov": 1.0}, "arXiv 2105.04906",
                   False),
        MethodInfo("barlow_twins", {"barlow_lambda": 5e-3}, "arXiv 2103.03230", False),
    ]
}
