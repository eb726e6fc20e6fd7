"""Every method's loss: one pure function per method and a registry by name.

Shared notation (see docs/methods.md): a batch of N images seen through two
augmentations; encoder features ``h1, h2`` of shape (N, D_h) and projections
``z1, z2`` of shape (N, D_z). The 2N x 2N contrastive matrices stack the views
as rows ``[view1_0..view1_{N-1}, view2_0..view2_{N-1}]``; the positive of row
i is row ``(i + N) mod 2N``; self-pairs are forbidden (cost +inf, mass
exactly 0).

Every function has the signature ``fn(h1, h2, z1, z2, *, knobs...) ->
LossOutput`` so the trainable can call any method by name; a method ignores
the tensors it does not use.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ot
from .costs import contrastive_cost, feature_cost  # noqa: F401  (re-exported: the losses' cost matrices)
from .catalog import METHOD_INFO, RELAXATIONS, MethodInfo, check_ot_choice, check_rince  # noqa: F401

__all__ = ["LossOutput", "Method", "METHODS", "compute_loss", "nt_xent"]


@dataclass
class LossOutput:
    """A loss value plus float diagnostics (its parts, OT solver state, timings).

    ``reg``: for a method with a weighted regulariser (SinSim's beta * W, IOT-CL's lambda_p * KL), that term as
    a tensor in the graph, so a trial can compare its gradient with the rest of the loss's (None otherwise, and
    at weight 0); ``parts["reg_loss"]`` is its value.
    """

    loss: Tensor
    parts: Dict[str, float] = field(default_factory=dict)
    reg: Optional[Tensor] = None


# --------------------------------------------------------------------------- helpers


def _check_views(x1: Tensor, x2: Tensor, name: str) -> None:
    if x1.dim() != 2 or x2.shape != x1.shape:
        raise ValueError(f"{name}1 and {name}2 must both have shape (N, D); got "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    if x1.shape[0] < 2:
        raise ValueError(f"a contrastive batch needs N >= 2 samples, got N={x1.shape[0]}")


def _positive_index(n: int, device) -> Tensor:
    """pos[i] = (i + N) mod 2N for the stacked 2N rows, shape (2N,)."""
    idx = torch.arange(2 * n, device=device)
    return (idx + n) % (2 * n)


def _positive_pairs(n: int, device) -> Tuple[Tensor, Tensor]:
    """(rows, cols) of the 2N positive pairs of the 2N x 2N contrastive matrix."""
    return torch.arange(2 * n, device=device), _positive_index(n, device)


def _positive_kl(log_pos: Tensor, mass: Tensor) -> Tensor:
    """The generalised KL(T | P) = sum T log(T/P) - sum T + sum P for GCA's target T = 1/(2N) on the 2N positive
    pairs, from what it depends on: log P at the positives (2N,) and the plan's mass. The same value as the
    dense formula over the 2N x 2N matrices, without its ~10 passes over them and their backward (GCA-INCE's
    loss at batch 512: 0.6x the time). It equals the ordinary KL when the plan has mass 1."""
    t = 1.0 / log_pos.shape[0]
    return (t * (math.log(t) - log_pos)).sum() - 1.0 + mass


def _sync_clock(like: Tensor) -> float:
    """perf_counter after the device's queued work on ``like`` is done (CUDA), so a difference times a solve."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


def _timed_solve(**kwargs) -> Tuple[ot.OTResult, float]:
    """Run ot.sinkhorn and return (result, milliseconds)."""
    t0 = _sync_clock(kwargs["cost"])
    res = ot.sinkhorn(**kwargs)
    return res, 1e3 * (_sync_clock(kwargs["cost"]) - t0)


def _ot_parts(res: ot.OTResult, ms: float) -> Dict[str, float]:
    return {"ot_marginal_err": float(res.marginal_error), "ot_iters": float(res.n_iters),
            "ot_time_ms": ms}


# --------------------------------------------------------------------------- SimCLR


def nt_xent(z1: Tensor, z2: Tensor, *, tau: float) -> Tensor:
    r"""NT-Xent (SimCLR, Chen et al. 2020, arXiv 2002.05709).

    :math:`\ell_{i} = -\log \frac{\exp(s_{i,p(i)}/\tau)}{\sum_{k \ne i} \exp(s_{ik}/\tau)}`,
    averaged over the 2N rows, ``s`` the cosine similarity of the stacked views.

    Args:
        z1, z2: (N, D) projections of the two views.
        tau: temperature > 0.
    Returns:
        scalar loss.
    """
    _check_views(z1, z2, "z")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # (2N, D)
    logits = (z @ z.T) / tau  # (2N, 2N)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, -math.inf)  # self-pairs excluded, not down-weighted
    return F.cross_entropy(logits, _positive_index(n, z.device))


def simclr(h1, h2, z1, z2, *, tau: float = 0.5) -> LossOutput:
    """SimCLR: NT-Xent on the projections (arXiv 2002.05709)."""
    loss = nt_xent(z1, z2, tau=tau)
    return LossOutput(loss, {"nt_xent": float(loss.detach())})


# --------------------------------------------------------------------------- SinSim


def sinsim(h1, h2, z1, z2, *, tau: float = 0.5, beta: float = 0.8, eps: float = 0.05,
           sinkhorn_iters: int = 40, ot_cost: str = "cosine", ot_value: str = "entropic",
           ot_grad: str = "unrolled", ot_solver: str = "sinkhorn") -> LossOutput:
    r"""SinSim: NT-Xent(z) + beta * W_eps(h1, h2) (Sepanj & Fieguth, arXiv 2502.10478, Eq. 3-4).

    :math:`L = \mathrm{NTXent}(z_1, z_2; \tau) + \beta\, W`, with C the normalised cost between the two
    views' encoder features h1, h2 (N x N), P the entropic plan between uniform weights after
    ``sinkhorn_iters`` Sinkhorn iterations at ``eps``, and W chosen by ``ot_value``:

    * ``entropic`` (the paper's Eq. 3, the default): the entropic OT objective
      :math:`\mathrm{OT}_\varepsilon = \langle P, C\rangle - \varepsilon H(P)`, H(P) = -sum P (log P - 1);
    * ``cost``: the transport cost :math:`\langle P, C\rangle` alone (a plan's cost, as some OT-regularised
      losses use it);
    * ``divergence``: the debiased Sinkhorn divergence
      :math:`\mathrm{OT}_\varepsilon(h_1,h_2) - (\mathrm{OT}_\varepsilon(h_1,h_1) + \mathrm{OT}_\varepsilon(h_2,h_2))/2`
      (Feydy et al. 2019), the three costs on one common scale.

    ``ot_grad`` only chooses how the gradient of that W is computed: ``unrolled`` differentiates through every
    iteration, ``implicit`` uses the envelope theorem (dOT_eps/dC = P*, one n x n matrix kept for backward);
    at convergence the two agree (tests). ``cost`` has no envelope gradient, so it is unrolled only
    (:func:`check_ot_choice`). ``ot_solver="sns"`` solves each plan to L1 marginal error 1e-6 by
    Sinkhorn-Newton-Sparse instead of ``sinkhorn_iters`` iterations (the converged plan, the reference of an
    ablation over K); its gradient is the envelope one.

    Difference from the public SinSim script: its "Sinkhorn loss" is ``sum(C * exp(-C/eps)) / N`` on a
    squared-Euclidean cost, the Gibbs kernel without the Sinkhorn scaling, so no plan enters its loss; that
    variant is ``sinsim_gibbs_kernel``.

    Args:
        h1, h2: (N, D_h) encoder features.  z1, z2: (N, D_z) projections.
    Returns:
        the loss, its parts (``nt_xent``, ``ot_loss`` = W, ``reg_loss`` = beta W, the solver's diagnostics) and
        ``reg`` = beta W (None at beta = 0).
    """
    _check_views(h1, h2, "h")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if ot_solver == "sns":
        ot_grad = "implicit"  # the envelope gradient is the only one SNS gives
    check_ot_choice(ot_value, ot_grad, ot_solver)
    contrast = nt_xent(z1, z2, tau=tau)
    # beta = 0 is plain SimCLR; the OT value is still measured (without a graph) as a diagnostic.
    ctx = torch.enable_grad() if beta > 0 else torch.no_grad()
    with ctx:
        if ot_value != "divergence":
            cost = feature_cost(h1, h2, ot_cost=ot_cost)  # (N, N)
        else:
            # one batched solve of the three problems, on one common scale
            raw = torch.stack([feature_cost(h1, h2, ot_cost=ot_cost, normalise=False),
                               feature_cost(h1, h1, ot_cost=ot_cost, normalise=False),
                               feature_cost(h2, h2, ot_cost=ot_cost, normalise=False)])  # (3, N, N)
            cost = raw / raw[0].max().clamp_min(1e-12)
        if ot_solver == "sns":  # one (n, n) problem per solve
            solved = []
            for c in (cost if cost.dim() == 3 else cost[None]):
                t0 = _sync_clock(c)
                r = ot.sinkhorn_newton_sparse(c, eps=eps, tol=1e-6, warn=False)
                solved.append((r, 1e3 * (_sync_clock(c) - t0)))
            w = torch.stack([r.objective() for r, _ in solved]).reshape(cost.shape[:-2])
            # as for the batched Sinkhorn solve: the worst error, the most iterations, the total time; and of
            # those iterations, the most that were Newton steps (OTResult.newton)
            ot_parts = {"ot_marginal_err": max(float(r.marginal_error) for r, _ in solved),
                        "ot_iters": float(max(r.n_iters for r, _ in solved)),
                        "ot_newton_steps": float(max(r.newton["newton_steps"] for r, _ in solved)),
                        "ot_time_ms": sum(t for _, t in solved)}
        else:
            res, ms = _timed_solve(cost=cost, eps=eps, n_iters=sinkhorn_iters, ot_grad=ot_grad)
            w = res.transport_cost() if ot_value == "cost" else res.objective()  # () or (3,)
            ot_parts = _ot_parts(res, ms)
        ot_term = w if ot_value != "divergence" else w[0] - 0.5 * (w[1] + w[2])
    reg = beta * ot_term if beta > 0 else None
    loss = contrast + reg if reg is not None else contrast
    parts = {"nt_xent": float(contrast.detach()), "ot_loss": float(ot_term.detach()),
             "reg_loss": beta * float(ot_term.detach())}
    parts.update(ot_parts)
    return LossOutput(loss, parts, reg)


def sinsim_gibbs_kernel(h1, h2, z1, z2, *, tau: float = 0.5, beta: float = 0.8, eps: float = 0.05) -> LossOutput:
    r"""The public SinSim script's "Sinkhorn loss", offered by name for comparison only (not the paper's Eq. 3).

    :math:`L = \mathrm{NTXent} + \beta \frac1N \sum_{ij} \tilde C_{ij} e^{-\tilde C_{ij}/\varepsilon}`,
    :math:`\tilde C = C / \mathrm{sg}(\max C)`, :math:`C_{ij} = \|h_{1i} - h_{2j}\|^2 + 10^{-6}`: the Gibbs
    kernel of a squared-Euclidean cost divided by its maximum, which the script detaches from the graph (sg:
    stop-gradient), summed and divided by the batch size N. No Sinkhorn scaling: no transport plan (nothing
    with marginals 1/N) enters this loss. Use ``sinsim`` for the paper's equation.

    Args:
        h1, h2: (N, D_h) encoder features.  z1, z2: (N, D_z) projections.
    """
    _check_views(h1, h2, "h")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    contrast = nt_xent(z1, z2, tau=tau)
    cost = feature_cost(h1, h2, ot_cost="sqeuclidean", normalise=False) + 1e-6  # (N, N)
    cost = cost / cost.detach().max()
    term = (cost * torch.exp(-cost / eps)).sum() / h1.shape[0]
    reg = beta * term if beta > 0 else None
    return LossOutput(contrast + reg if reg is not None else contrast,
                      {"nt_xent": float(contrast.detach()), "ot_loss": float(term.detach()),
                       "reg_loss": beta * float(term.detach())}, reg)


# --------------------------------------------------------------------------- GCA


def _gca_plan(z1, z2, *, eps, gca_iters, uot_lambda1=None, uot_lambda2=None, cost=None):
    """GCA's plan on the 2N x 2N cost: ``gca_iters`` = T full Sinkhorn iterations (a row then a column update, as
    the GCA paper and its code count them), T = 0.5 the row update alone (InfoNCE's coupling)."""
    cost = contrastive_cost(z1, z2) if cost is None else cost  # (2N, 2N), +inf on the diagonal
    res, ms = _timed_solve(cost=cost, eps=eps, n_projections=_gca_projections(gca_iters),
                           uot_lambda1=uot_lambda1, uot_lambda2=uot_lambda2)
    return res, ms


def _gca_projections(gca_iters: float) -> int:
    """Single (row or column) updates in T = ``gca_iters`` full iterations: 2T, a whole number >= 1."""
    half = 2 * float(gca_iters)
    if not (half >= 1 and half == int(half)):
        raise ValueError(f"gca_iters must be a multiple of 0.5 that is >= 0.5 (full Sinkhorn iterations; 0.5 = "
                         f"the row update alone), got {gca_iters}")
    return int(half)


def gca_ince(h1, h2, z1, z2, *, eps: float = 0.5, gca_iters: float = 5) -> LossOutput:
    r"""GCA-INCE (Chen et al., arXiv 2502.20141): KL(P_tgt | P_theta).

    ``P_theta`` is obtained from the Gibbs kernel ``exp(-C/eps)`` of the 2N x 2N
    cosine cost (self-pairs forbidden) by ``gca_iters`` = T full Sinkhorn iterations,
    each a Bregman projection onto the row marginal then onto the column marginal
    (uniform 1/(2N)), as the GCA paper and its code count them. ``P_tgt`` puts
    1/(2N) on each positive pair. (GCA's domain-aware block target, Sec. 3.4, needs domain labels, which no
    dataset here has.)

    T = 0.5 (the row projection alone) is exactly InfoNCE / NT-Xent with tau = eps;
    larger T tightens the plan towards the balanced OT solution.
    """
    _check_views(z1, z2, "z")
    res, ms = _gca_plan(z1, z2, eps=eps, gca_iters=gca_iters)
    loss = _gca_kl(res, z1.shape[0])
    return LossOutput(loss, {"gca_kl": float(loss.detach()), **_ot_parts(res, ms)})


def _gca_kl(res: ot.OTResult, n: int) -> Tensor:
    """KL(P_tgt | P) of GCA's plan for the target 1/(2N) on the positive pairs."""
    return _positive_kl(res.log_plan_at(*_positive_pairs(n, res.cost.device)), res.plan.sum())


def gca_rince(h1, h2, z1, z2, *, eps: float = 0.5, gca_iters: float = 5, rince_q: float = 0.5,
              rince_lam: float = 0.01) -> LossOutput:
    r"""GCA-RINCE (arXiv 2502.20141): RINCE (Chuang et al., CVPR 2022) on the scores of the GCA plan.

    RINCE scores each pair by the unnormalised ``exp(s/tau)``, s the cosine similarity, and per anchor i
    :math:`\ell_i = -e^{q s_{i+}/\tau}/q + (\lambda (e^{s_{i+}/\tau} + \sum_{j \ne i,+} e^{s_{ij}/\tau}))^q / q`.
    GCA replaces InfoNCE's one row projection by T full Sinkhorn iterations. The plan after them is
    :math:`P = \mathrm{diag}(u) K \mathrm{diag}(v)`, ``K = exp(-C/eps)``, C = 1 - cos; its scores are the plan with
    the row scaling taken out (the GCA authors' ``hs_rince`` divides P by u likewise), in RINCE's units:

    :math:`S_{ij} = e^{1/\varepsilon} K_{ij} v_j = \exp((s_{ij} + g_j)/\varepsilon)`, g = eps log v the column
    potential of the solver (started at g = 0, rows first).

    ``gca_iters`` = 0.5 (the row projection alone) leaves g = 0, so S = exp(s/eps) and the loss is RINCE with
    tau = eps exactly; with more iterations the column scalings reweight every anchor's positive and negatives,
    and both q and lambda act (the row sums of S are not constant). Mean over the 2N anchors; self-pairs have
    S = 0. The terms are formed from logs in float64, so a plan entry that underflows keeps a finite gradient.
    """
    _check_views(z1, z2, "z")
    n = z1.shape[0]
    check_rince(rince_q, rince_lam, eps, n)
    res, ms = _gca_plan(z1, z2, eps=eps, gca_iters=gca_iters)
    rows, pos = _positive_pairs(n, res.cost.device)
    # log S_i+ = (1 + g_+ - C_i+) / eps  (2N,)
    log_pos = ((1.0 + res.g[pos] - res.cost[rows, pos]) / eps).double()
    # log sum_j S_ij = 1/eps + log(P 1)_i - f_i / eps, from the plan's row sums (kept off 0 should a whole row
    # underflow after a column update)
    rows_mass = res.plan.sum(1)
    log_all = (torch.log(rows_mass.clamp_min(torch.finfo(rows_mass.dtype).tiny)) + (1.0 - res.f) / eps).double()
    per_row = (-torch.exp(rince_q * log_pos) + torch.exp(rince_q * (math.log(rince_lam) + log_all))) / rince_q
    loss = per_row.mean().to(z1.dtype)
    return LossOutput(loss, {"rince": float(loss.detach()), **_ot_parts(res, ms)})


def gca_rince_code(h1, h2, z1, z2, *, eps: float = 0.5, gca_iters: float = 10, rince_q: float = 0.98) -> LossOutput:
    r"""The GCA authors' public code's "GCA-RINCE" (nerdslab/gca, ``gca_loss_cifar.py``, class ``gca_rince``),
    offered by name for comparison; it is not RINCE (see ``gca_rince``).

    The code's cost: cosines clamped below at 1e-7, ``C = 1 - cos``, and every self-pair's cost set to the cost
    matrix's maximum (a finite cost: self-pairs keep mass). T = ``gca_iters`` full Sinkhorn iterations (the code
    runs 10), then the cross-entropy of each row of ``log P`` (softmax re-normalising the row) at its positive,
    averaged over the 2N rows, raised to q and divided by q:

    :math:`L = \frac{1}{q}\Big(\frac{1}{2N}\sum_i -\log \frac{P_{i+}}{\sum_j P_{ij}}\Big)^q`.

    The code passes class weights lambda to the cross-entropy but then sets every column that is some row's
    positive, i.e. all of them, back to 1, so its lambda has no effect; this variant has no ``rince_lam``.
    q = 0.98 and eps = 0.5 are its configuration's values.
    """
    _check_views(z1, z2, "z")
    if not 0 < rince_q <= 1:
        raise ValueError(f"rince_q must be in (0, 1], got {rince_q}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # (2N, D)
    cost = 1.0 - (z @ z.T).clamp_min(1e-7)  # (2N, 2N)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    cost = torch.where(eye, cost.max(), cost)  # self-pairs at the largest cost, not forbidden
    res, ms = _gca_plan(z1, z2, eps=eps, gca_iters=gca_iters, cost=cost)
    log_p = res.log_plan()  # (2N, 2N)
    rows, pos = _positive_pairs(n, z.device)
    ce = -(log_p[rows, pos] - torch.logsumexp(log_p, dim=1)).mean()
    loss = ce.pow(rince_q) / rince_q
    return LossOutput(loss, {"rince": float(loss.detach()), **_ot_parts(res, ms)})


def gca_uot(h1, h2, z1, z2, *, eps: float = 0.5, gca_iters: float = 5,
            uot_lambda1: float = 1.0, uot_lambda2: float = 1.0) -> LossOutput:
    r"""GCA-UOT (arXiv 2502.20141): generalised KL(P_tgt | P) with an unbalanced plan.

    P solves :math:`\min_P \langle P,C\rangle - \varepsilon H(P) + \lambda_1 KL(P1|a) + \lambda_2 KL(P^T 1|b)`
    approximately by T = ``gca_iters`` full iterations of unbalanced scaling updates
    (rows first), so its marginals are only softly tied to 1/(2N); the generalised KL
    also penalises the mass the plan gained or lost.

    The GCA authors' public code differs (docs/methods.md): ``r1`` x the cross-entropy of ``log P`` (a KL
    without the mass terms) + ``r2`` x a RINCE-like term, marginal penalties 1e-4, 10 iterations.
    """
    _check_views(z1, z2, "z")
    res, ms = _gca_plan(z1, z2, eps=eps, gca_iters=gca_iters,
                        uot_lambda1=uot_lambda1, uot_lambda2=uot_lambda2)
    loss = _gca_kl(res, z1.shape[0])
    return LossOutput(loss, {"gca_kl": float(loss.detach()), "plan_mass": float(res.plan.sum().detach()),
                             **_ot_parts(res, ms)})


# --------------------------------------------------------------------------- IOT-CL


def iot_cl(h1, h2, z1, z2, *, eps: float = 0.5, relaxation: str = "Ua", sinkhorn_iters: int = 4,
           lambda_p: float = 0.0) -> LossOutput:
    r"""IOT-CL (Shi, Zhang, Zhen, Fan, Yan, ICML 2023, PMLR 202), Eqs. 16-25.

    Inner problem: the coupling of the 2N x 2N cost ``C = 1 - cos`` (Eq. 16,
    +inf on self-pairs) under a constraint set U:

    * ``U1``: :math:`P = \exp(-C/\varepsilon)/\sum_{ts}\exp(-C_{ts}/\varepsilon)` (Eq. 19);
    * ``Ua``: row softmax with rows summing to 1/(2N) (Eq. 12) - SimCLR;
    * ``Uab``: K = ``sinkhorn_iters`` rounds of Eq. 22 (row then column
      normalisation) starting from exp(-C/eps).

    Outer loss: :math:`KL(\tilde P \| P) = -\sum \tilde P \log P - H(\tilde P)`,
    :math:`\tilde P` = 1/(2N) on positive pairs. This is Eq. 23 minus the constant
    log(2N) (it does not change gradients) and makes U(a) equal NT-Xent with
    tau = eps exactly. Uniformity penalty (Eq. 24-25):
    :math:`\lambda_p KL(\bar Q \| P)`, :math:`\bar Q` = P on positives and the
    mean of P over the negative pairs elsewhere (self-pairs excluded). As in
    Eq. 24, Q-bar is a function of the parameters (not detached).
    """
    _check_views(z1, z2, "z")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
    if lambda_p < 0:
        raise ValueError(f"lambda_p must be >= 0, got {lambda_p}")
    n = z1.shape[0]
    cost = contrastive_cost(z1, z2)  # (2N, 2N)
    parts: Dict[str, float] = {}
    if relaxation == "U1":
        log_p = ot.coupling_u1(cost, eps=eps)
    elif relaxation == "Ua":
        log_p = ot.coupling_ua(cost, eps=eps)
    else:
        res, ms = _timed_solve(cost=cost, eps=eps, n_iters=sinkhorn_iters)
        log_p = res.log_plan() if lambda_p > 0 else None  # the 2N x 2N log-plan only for the uniformity term
        parts.update(_ot_parts(res, ms))
    rows, pos = _positive_pairs(n, cost.device)
    # KL(P~ | P) with P~ = 1/(2N) on the 2N positives
    log_pos = log_p[rows, pos] if log_p is not None else res.log_plan_at(rows, pos)
    align = -(log_pos + math.log(2 * n)).mean()
    loss = align
    parts["iot_align"] = float(align.detach())
    if lambda_p > 0:
        neg = torch.isfinite(cost)  # (2N, 2N) allowed pairs
        neg[rows, pos] = False  # negatives only
        p = torch.exp(log_p)
        mean_neg = p[neg].mean()
        # Q-bar equals P on positives, so only negatives contribute to KL(Q-bar | P)
        uni = (mean_neg * (torch.log(mean_neg) - log_p[neg])).sum()
        reg = lambda_p * uni
        loss = loss + reg
        parts["iot_uniform"] = float(uni.detach())
        parts["reg_loss"] = float(reg.detach())
        return LossOutput(loss, parts, reg)
    return LossOutput(loss, parts)


# --------------------------------------------------------------------------- baselines


def vicreg(h1, h2, z1, z2, *, vicreg_inv: float = 25.0, vicreg_var: float = 25.0,
           vicreg_cov: float = 1.0) -> LossOutput:
    r"""VICReg (Bardes et al., arXiv 2105.04906), on the projections (N, D).

    ``inv * MSE(z1, z2) + var * (mean relu(1 - std(z1)) + mean relu(1 - std(z2)))/2
    + cov * (sum offdiag Cov(z1)^2 + sum offdiag Cov(z2)^2) / D``,
    std = sqrt(Var + 1e-4), Cov with 1/(N-1).
    """
    _check_views(z1, z2, "z")
    n, d = z1.shape
    inv = F.mse_loss(z1, z2)
    var = 0.0
    cov = 0.0
    for z in (z1, z2):
        zc = z - z.mean(0)
        std = torch.sqrt(zc.var(0) + 1e-4)
        var = var + F.relu(1.0 - std).mean() / 2
        c = (zc.T @ zc) / (n - 1)  # (D, D)
        off = c - torch.diag(torch.diag(c))
        cov = cov + off.pow(2).sum() / d
    loss = vicreg_inv * inv + vicreg_var * var + vicreg_cov * cov
    return LossOutput(loss, {"vic_inv": float(inv.detach()), "vic_var": float(var.detach()),
                             "vic_cov": float(cov.detach())})


def barlow_twins(h1, h2, z1, z2, *, barlow_lambda: float = 5e-3) -> LossOutput:
    r"""Barlow Twins (Zbontar et al., arXiv 2103.03230).

    ``c = BN(z1)^T BN(z2) / N`` (D x D), BN without affine parameters;
    ``L = sum_i (1 - c_ii)^2 + lambda sum_{i != j} c_ij^2``.
    """
    _check_views(z1, z2, "z")
    n = z1.shape[0]

    def bn(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = bn(z1).T @ bn(z2) / n  # (D, D)
    on = (torch.diagonal(c) - 1.0).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return LossOutput(on + barlow_lambda * off, {"bt_on_diag": float(on.detach()),
                                                 "bt_off_diag": float(off.detach())})


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method(MethodInfo):
    """A method of the catalogue with its loss function."""

    fn: Callable[..., LossOutput] = field(kw_only=True)


_LOSS_FNS = {"simclr": simclr, "sinsim": sinsim, "sinsim_gibbs_kernel": sinsim_gibbs_kernel, "gca_ince": gca_ince,
             "gca_rince": gca_rince, "gca_rince_code": gca_rince_code, "gca_uot": gca_uot, "iot_cl": iot_cl, "vicreg": vicreg,
             "barlow_twins": barlow_twins}
METHODS: Dict[str, Method] = {name: Method(name, info.paper, info.uses_ot, info.note, fn=_LOSS_FNS[name])
                              for name, info in METHOD_INFO.items()}


def method_knobs(method: str, config: Dict[str, object]) -> Dict[str, object]:
    """The method's keyword arguments: its paper defaults overridden by non-None config values."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    m = METHODS[method]
    return {k: (config[k] if config.get(k) is not None else v) for k, v in m.defaults.items()}


def compute_loss(method: str, h1: Tensor, h2: Tensor, z1: Tensor, z2: Tensor,
                 config: Dict[str, object]) -> LossOutput:
    """Dispatch to ``METHODS[method]`` with the knobs taken from a flat config."""
    knobs = method_knobs(method, config)
    return METHODS[method].fn(h1, h2, z1, z2, **knobs)
