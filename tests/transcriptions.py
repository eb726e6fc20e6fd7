"""Independent reference transcriptions of the losses and statistics under test.

These functions are written from the published sources named in each
docstring, NOT from this project's code, so that the test suite can compare
the project's implementations against them.  They use torch only (plus
scipy.stats for the t distribution in ``paired_t``), favour plain loops and
simple tensor ops over speed, and work in whatever dtype they are given
(float64 recommended).

Nothing in this module imports the project.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide every row by its Euclidean norm, the norm floored at ``eps``.

    This is the definition of ``torch.nn.functional.normalize(x, dim=1)``:
    x_i / max(||x_i||_2, eps).
    """
    norms = torch.sqrt((x * x).sum(dim=1, keepdim=True))
    return x / norms.clamp_min(eps)


# ---------------------------------------------------------------------------
# 1. RINCE (Chuang et al., CVPR 2022)
# ---------------------------------------------------------------------------


def rince(z1: torch.Tensor, z2: torch.Tensor, *, tau: float, q: float, lam: float) -> torch.Tensor:
    """Robust InfoNCE (RINCE) loss, symmetric SimCLR form.

    Source: C.-Y. Chuang, R. D. Hjelm, X. Wang, V. Vineet, N. Joshi,
    A. Torralba, S. Jegelka, Y. Song, "Robust Contrastive Learning against
    Noisy Views", CVPR 2022 (arXiv:2201.04309).  Checked against the authors'
    code, GitHub chingyaoc/RINCE: README.md pseudo code
    ``rince_loss = -pos**q / q + (lam * (pos + neg))**q / q`` and
    ``ImageNet/simclr/simclr_module.py`` (``SimCLR.sym_loss``), where
    pos = exp(s_i+), neg = sum of exp(s_ik) over the negatives (every row but
    the anchor itself and its positive), and the loss is averaged over all 2N
    anchors.

    Formula.  Stack x = [z1; z2] (2N rows).  For anchors i = 0..2N-1:
        s_ik   = cos(x_i, x_k) / tau            (cosines are NOT clamped)
        p(i)   = (i + N) mod 2N                 (the positive of i)
        Neg(i) = {k : k != i, k != p(i)}
        loss_i = -exp(q * s_{i,p(i)}) / q
                 + (lam * (exp(s_{i,p(i)}) + sum_{k in Neg(i)} exp(s_ik)))**q / q
    Returns (1 / 2N) * sum_i loss_i.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError("z1 and z2 must both be (N, D) with the same shape")
    n = z1.shape[0]
    x = torch.cat([z1, z2], dim=0)
    xn = _unit_rows(x)
    two_n = 2 * n
    per_anchor = []
    for i in range(two_n):
        pos_idx = (i + n) % two_n
        s_pos = (xn[i] * xn[pos_idx]).sum() / tau
        neg_sum = torch.zeros((), dtype=x.dtype, device=x.device)
        for k in range(two_n):
            if k == i or k == pos_idx:
                continue
            s_ik = (xn[i] * xn[k]).sum() / tau
            neg_sum = neg_sum + torch.exp(s_ik)
        term_pos = -torch.exp(q * s_pos) / q
        term_all = (lam * (torch.exp(s_pos) + neg_sum)) ** q / q
        per_anchor.append(term_pos + term_all)
    return torch.stack(per_anchor).mean()


# ---------------------------------------------------------------------------
# 2. gca_rince of the public GCA code (nerdslab/gca, gca_loss_cifar.py)
# ---------------------------------------------------------------------------


def gca_rince_public_code(
    z: torch.Tensor, *, epsilon: float, iterations: int, lam: float, q: float
) -> torch.Tensor:
    """Transcription of ``gca_rince.forward`` in nerdslab/gca ``gca_loss_cifar.py``.

    Source: public GitHub repository nerdslab/gca, file gca_loss_cifar.py,
    classes ``base`` (``compute_cost``, ``gibs_kernel``) and ``gca_rince``
    (read at commits 06a86ebe and 81a2137c; the forward computation is the
    same in both -- the later one only comments out an unused ``P_tgt``).
    Note: the public ``gca_rince.__init__`` overwrites ``self.iterations = 10``
    whatever value is passed to the constructor, so the public loss always
    runs 10 iterations; pass ``iterations=10`` to reproduce it exactly.

    Input z: (2N, D), rows 2k and 2k+1 are a positive pair (the code's layout).

    What the forward pass computes (n = 2N):
      1. zh = z / max(||z||, 1e-12) row-wise (F.normalize); compute_cost
         normalises again (a no-op up to rounding, kept for faithfulness).
      2. S = clamp(zh zh^T, min=1e-7)          (cosines clamped from below)
         Cost = 1 - S
         c_max = max over ALL entries of Cost (diagonal included; not detached)
         Cost_ii = c_max, Cost_ij unchanged for i != j
      3. K = exp(-Cost / epsilon)
      4. a = b = ones(n)/n, v = ones(n)/n; repeat `iterations` times:
             u = a / (K v);  v = b / (K^T u)
         P = diag(u) K diag(v)
      5. target t(i) = i + 1 for even i, i - 1 for odd i.
         logits = log P;  ce_i = -log( P_{i,t(i)} / sum_j P_ij )
                                = -(logits_i[t(i)] - logsumexp_j logits_ij)
         weighted mean: L = sum_i w_{t(i)} ce_i / sum_i w_{t(i)}
         (this is F.cross_entropy(..., weight=w) with reduction='mean').
      6. return L**q / q.
    """
    if z.dim() != 2 or z.shape[0] % 2 != 0:
        raise ValueError("z must be (2N, D)")
    n = z.shape[0]
    dtype, device = z.dtype, z.device

    # 1. normalise (forward) and normalise again (compute_cost)
    zh = _unit_rows(z)
    zh = _unit_rows(zh)

    # 2. cost with clamped cosines and diagonal replaced by the cost's maximum
    sim = (zh @ zh.T).clamp(min=1e-7)
    cost = 1.0 - sim
    c_max = cost.max()
    eye = torch.eye(n, dtype=dtype, device=device)
    cost = c_max * eye + (1.0 - eye) * cost

    # 3. Gibbs kernel
    K = torch.exp(-cost / epsilon)

    # 4. Sinkhorn scaling with uniform marginals 1/n, v started at 1/n
    a = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    b = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    v = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    u = a
    for _ in range(iterations):
        u = a / (K @ v)
        v = b / (K.T @ u)
    P = torch.diag(u) @ K @ torch.diag(v)

    # 5. targets: partner within each (2k, 2k+1) pair
    targets = [i + 1 if i % 2 == 0 else i - 1 for i in range(n)]

    # Class weights exactly as the public code builds them: start with every
    # class weighted lam, then set class_weights[targets.unique()] = 1.0.
    # targets is a permutation of 0..n-1, so targets.unique() is EVERY class
    # index, and every weight is overwritten with 1.0.  cross_entropy
    # therefore uses all-ones weights: lam has no effect at all and the loss
    # is the plain (unweighted) mean cross-entropy over the n anchors.
    class_weights = torch.full((n,), float(lam), dtype=dtype, device=device)
    for t in sorted(set(targets)):
        class_weights[t] = 1.0
    assert bool((class_weights == 1.0).all())

    logits = torch.log(P)
    num = torch.zeros((), dtype=dtype, device=device)
    den = torch.zeros((), dtype=dtype, device=device)
    for i in range(n):
        t = targets[i]
        ce_i = -(logits[i, t] - torch.logsumexp(logits[i], dim=0))
        num = num + class_weights[t] * ce_i
        den = den + class_weights[t]
    loss = num / den

    # 6. the "robust" exponent applied to the already-averaged loss
    return loss ** q / q


# ---------------------------------------------------------------------------
# 3. Sinkhorn plans as the GCA code counts iterations
# ---------------------------------------------------------------------------


def gca_sinkhorn_plan_loop(cost: torch.Tensor, *, eps: float, iterations: int) -> torch.Tensor:
    """Entropic OT plan after `iterations` full Sinkhorn iterations (GCA counting).

    Source: Sinkhorn-Knopp scaling as written in nerdslab/gca
    gca_loss_cifar.py (``gca_ince`` / ``gca_rince``): one "iteration" is one
    row update followed by one column update.

    Formula (n x m cost, here square n x n in practice):
        K = exp(-cost / eps)          (cost = +inf gives K = 0 there)
        a = ones(n)/n, b = ones(m)/m, v = ones(m)
        repeat `iterations` times:
            u = a / (K v)
            v = b / (K^T u)
        return diag(u) K diag(v)
    """
    n, m = cost.shape
    dtype, device = cost.dtype, cost.device
    K = torch.exp(-cost / eps)
    a = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    b = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
    v = torch.ones(m, dtype=dtype, device=device)
    u = torch.ones(n, dtype=dtype, device=device)
    for _ in range(iterations):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return torch.diag(u) @ K @ torch.diag(v)


def gca_row_projection_plan(cost: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Single row projection of the Gibbs kernel (the "half step" plan).

    Source: ``hs_ince`` / ``hs_rince`` in nerdslab/gca gca_loss_cifar.py
    (u1 = u / (K @ v) with v = ones, P = diag(u1) K diag(v)), with the
    marginal a = uniform 1/n.

    Formula:
        K = exp(-cost / eps)          (cost = +inf gives K = 0 there)
        a = ones(n)/n
        u = a / (K @ ones(m))
        return diag(u) K              (every row sums to 1/n)
    """
    n, m = cost.shape
    dtype, device = cost.dtype, cost.device
    K = torch.exp(-cost / eps)
    a = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    u = a / (K @ torch.ones(m, dtype=dtype, device=device))
    return torch.diag(u) @ K


# ---------------------------------------------------------------------------
# 4. SinSim script "Sinkhorn loss" term
# ---------------------------------------------------------------------------


def sinsim_script_ot_term(h1: torch.Tensor, h2: torch.Tensor, *, eps: float) -> torch.Tensor:
    """The "Sinkhorn loss" term of the public SinSim script, as the audit described it.

    Source: the audit's description of the public SinSim training script's
    Sinkhorn regulariser (no iterations are run; it is a kernel-weighted cost).

    Formula (h1, h2: (N, D)):
        D_ij = ||h1_i - h2_j||_2            (torch.cdist(h1, h2))
        C_ij = D_ij**2 + 1e-6
        C    = C / stopgrad(max_ij C_ij)    (maximum DETACHED from autograd)
        term = (1/N) * sum_ij C_ij * exp(-C_ij / eps),  N = h1.shape[0]
    Differentiable in h1, h2 except through the detached maximum.

    torch.cdist is used with the exact per-pair mode
    ("donot_use_mm_for_euclid_dist") so that distances are computed as
    sqrt(sum_d (h1_id - h2_jd)^2) rather than via the |a|^2+|b|^2-2ab expansion.
    """
    n = h1.shape[0]
    dist = torch.cdist(h1, h2, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    C = dist ** 2 + 1e-6
    C = C / C.max().detach()
    return (C * torch.exp(-C / eps)).sum() / n


# ---------------------------------------------------------------------------
# 5. paired t statistics and Holm adjustment
# ---------------------------------------------------------------------------


def paired_t(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean, 95% t-interval half-width and two-sided p-value for paired differences.

    Source: the textbook one-sample Student t test on paired differences
    (e.g. any statistics text; scipy.stats.ttest_1samp gives the same p).
    scipy.stats.t is used only for the t distribution's ppf/sf.

    Formula (d_1..d_n, n >= 2, df = n - 1):
        mean = (1/n) sum d_i
        sd   = sqrt( sum (d_i - mean)^2 / (n - 1) )
        se   = sd / sqrt(n)
        half = t.ppf(0.975, df) * se
        T    = mean / se
        p    = 2 * t.sf(|T|, df)
    Degenerate se == 0: p = nan if mean == 0 (0/0, as scipy), else p = 0.0.
    Returns (mean, half, p) as Python floats.
    """
    from scipy.stats import t as student_t

    d = [float(x) for x in diffs]
    n = len(d)
    if n < 2:
        raise ValueError("paired_t needs at least 2 differences")
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    se = math.sqrt(var) / math.sqrt(n)
    df = n - 1
    half = float(student_t.ppf(0.975, df)) * se
    if se == 0.0:
        p = float("nan") if mean == 0.0 else 0.0
    else:
        tstat = mean / se
        p = float(2.0 * student_t.sf(abs(tstat), df))
    return mean, half, p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values.

    Source: S. Holm, "A simple sequentially rejective multiple test
    procedure", Scand. J. Statist. 6 (1979) 65-70; adjusted-p form as in
    Wright, "Adjusted P-values for simultaneous inference", Biometrics 1992.

    Formula: sort p ascending, p_(1) <= ... <= p_(m) (ties kept in input order);
        adj_(i) = min(1, max_{j <= i} (m - j + 1) * p_(j))
    and return the adjusted values in the original input order.
    """
    p = [float(x) for x in pvalues]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])  # stable for ties
    adjusted = [0.0] * m
    running_max = 0.0
    for rank, idx in enumerate(order):  # rank = j - 1
        candidate = (m - rank) * p[idx]
        running_max = max(running_max, candidate)
        adjusted[idx] = min(1.0, running_max)
    return adjusted


# ---------------------------------------------------------------------------
# self-check
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    torch.manual_seed(0)
    dt = torch.float64

    z1 = torch.randn(4, 5, dtype=dt)
    z2 = torch.randn(4, 5, dtype=dt)
    print("rince:", rince(z1, z2, tau=0.5, q=0.5, lam=0.01).item())

    z = torch.randn(8, 5, dtype=dt, requires_grad=True)
    val = gca_rince_public_code(z, epsilon=0.5, iterations=10, lam=0.01, q=0.6)
    val.backward()
    print("gca_rince_public_code:", val.item(), "grad finite:", bool(torch.isfinite(z.grad).all()))

    cost = torch.rand(5, 5, dtype=dt)
    cost.fill_diagonal_(float("inf"))
    P = gca_sinkhorn_plan_loop(cost, eps=0.3, iterations=20)
    print("gca_sinkhorn_plan_loop: row sums", P.sum(1).tolist(), "col sums", P.sum(0).tolist())
    R = gca_row_projection_plan(cost, eps=0.3)
    print("gca_row_projection_plan: row sums", R.sum(1).tolist())

    h1 = torch.randn(6, 3, dtype=dt, requires_grad=True)
    h2 = torch.randn(6, 3, dtype=dt, requires_grad=True)
    term = sinsim_script_ot_term(h1, h2, eps=0.1)
    term.backward()
    print("sinsim_script_ot_term:", term.item(), "grad finite:", bool(torch.isfinite(h1.grad).all()))

    diffs = torch.randn(10, dtype=dt).tolist()
    print("paired_t:", paired_t(diffs))
    print("holm:", holm([0.01, 0.04, 0.03, 0.5]))
