"""The entropic OT problem and its result: :class:`OTResult`, the marginal penalties and their conjugates, the
cost's checks (forbidden pairs, range), shared by the solvers of this package."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


class SinkhornNotConvergedWarning(UserWarning):
    """Sinkhorn ended with a marginal error above the requested ``tol``."""


@dataclass
class OTResult:
    """Output of :func:`sinkhorn`.

    Attributes:
        plan: transport plan P, shape (..., n, m); exactly 0 on masked pairs.
        f, g: dual potentials, shapes (..., n) and (..., m).
        cost: the cost the plan was solved for (+inf on masked pairs).
        eps: entropic regularisation used.
        marginal_error: balanced / semi-relaxed with hard rows: L1 distance
            of the plan's hard marginals to ``a`` (and ``b``), max over the
            batch. Otherwise: the last fixed-point residual
            ``max |f_new - f_old| / eps`` of the row potential.
        n_iters: full (row + column) iterations run; projections / 2 when
            the solver was called with ``n_projections``.
        domain: ``"kernel"``, ``"stabilized"``, ``"kernel64"`` or ``"log"`` (the one used).
        ot_grad: ``"unrolled"`` or ``"implicit"``.
        forbidden: whether the cost has forbidden (+inf) pairs; None if not known (then treated as
            possible). Without them the values skip the masking (an isfinite and a where over n x m, 3x the
            product's time: 1.1 of SinSim's 1.2 ms for <P, C> at n = 512).
        newton: Sinkhorn-Newton-Sparse only (else None): where its iterations and time went, a dict of
            ``sinkhorn_iters`` (before Newton, and in place of Newton steps without ascent), ``newton_steps``
            (taken), ``damped_steps`` (of those, with a step length below 1), ``failed_steps`` (directions
            without ascent, not counted in ``n_iters``), ``cg_products`` (CG's Hessian products, all steps),
            ``newton_s`` (seconds from the first Newton step's start to the last one's end, failed ones and
            their Sinkhorn iterations included). ``sinkhorn_iters + newton_steps == n_iters``.
    """

    plan: Tensor
    f: Tensor
    g: Tensor
    cost: Tensor
    eps: float
    a: Tensor
    b: Tensor
    uot_lambda1: Optional[float]
    uot_lambda2: Optional[float]
    marginal_error: float
    n_iters: float
    domain: str
    ot_grad: str
    forbidden: Optional[bool] = None
    newton: Optional[dict] = None

    def log_plan(self) -> Tensor:
        """log P, shape (..., n, m); -inf on masked pairs."""
        return (self.f[..., :, None] + self.g[..., None, :] - self.cost) / self.eps

    def log_plan_at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """log P at the pairs (rows[k], cols[k]) of a single (n, m) problem, shape (len(rows),): the entries a
        loss needs (the positive pairs of a contrastive plan), without the n x m log-plan."""
        return (self.f[rows] + self.g[cols] - self.cost[rows, cols]) / self.eps

    def transport_cost(self) -> Tensor:
        """<P, C> summed over (n, m), shape (...); masked pairs contribute 0."""
        if self.forbidden is False:
            return (self.plan * self.cost).sum((-2, -1))
        finite = torch.isfinite(self.cost)
        return torch.where(finite, self.plan * self.cost, torch.zeros_like(self.plan)).sum((-2, -1))

    def objective(self) -> Tensor:
        """The entropic OT objective OT_eps, shape (...).

        Unrolled: the primal ``<P,C> - eps H(P) + marginal penalties`` at the
        returned plan. Implicit: the dual objective at the (detached)
        converged potentials, whose gradient with respect to C is the plan.
        The two agree at convergence.
        """
        if self.ot_grad == "implicit":
            # the plan is exp((f + g - C)/eps) with f, g detached: reuse it for the mass term, so
            # backward keeps a single n x m matrix
            return _phi(self.f, self.a, self.uot_lambda1) + _phi(self.g, self.b, self.uot_lambda2) \
                - self.eps * self.plan.sum((-2, -1))
        logp = self.log_plan()
        p = self.plan
        if self.forbidden is False:
            ent_term = (p * (logp - 1.0)).sum((-2, -1))
        else:  # P (log P - 1) with 0 log 0 = 0 on masked pairs
            ent_term = torch.where(torch.isfinite(self.cost), p * (logp - 1.0), torch.zeros_like(p)).sum((-2, -1))
        value = self.transport_cost() + self.eps * ent_term
        value = value + _kl_penalty(p.sum(-1), self.a, self.uot_lambda1)
        value = value + _kl_penalty(p.sum(-2), self.b, self.uot_lambda2)
        return value


def masked_cost(cost: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Return ``cost`` with ``+inf`` where ``mask`` is False (forbidden pairs).

    Args:
        cost: (..., n, m).
        mask: bool (..., n, m) or broadcastable, True = allowed; None = keep.
    """
    if mask is None:
        return cost
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    return cost.masked_fill(~mask, math.inf)


def _kl_penalty(x: Tensor, a: Tensor, lam: Optional[float]) -> Tensor:
    """lam * KL(x | a) (generalised KL), 0 when the marginal is a hard constraint."""
    if lam is None or math.isinf(lam):
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    xlogx = torch.where(x > 0, x * torch.log(x / a), torch.zeros_like(x))
    return lam * (xlogx - x + a).sum(-1)


def _phi(f: Tensor, a: Tensor, lam: Optional[float]) -> Tensor:
    """Conjugate of the marginal term: <f, a> (hard) or -lam <a, exp(-f/lam) - 1> (KL)."""
    if lam is None or math.isinf(lam):
        return (f * a).sum(-1)
    return -lam * (a * torch.expm1(-f / lam)).sum(-1)


def _check_lambda(name: str, lam) -> Optional[float]:
    if lam is None:
        return None
    lam = float(lam)
    if not (lam > 0):
        raise ValueError(f"{name} must be > 0 (or inf for a hard marginal), got {lam}")
    return lam


def _fi(lam: Optional[float], eps: float) -> float:
    """Exponent of the unbalanced scaling update: lam / (lam + eps); 1 for a hard marginal."""
    if lam is None or math.isinf(lam):
        return 1.0
    return lam / (lam + eps)


def _kernel_limit(dtype: torch.dtype) -> float:
    # u, v and K's smallest entries scale like exp(+-span); keep them at most
    # 40% of the exponent range so products and sums stay representable.
    return 0.4 * math.log(torch.finfo(dtype).max)


def _cost_range(cost: Tensor):
    """(min C, max C over the allowed entries, whether any pair is forbidden), the two keepdim over the last
    two axes; one-line errors for NaN, -inf, and a row or column with no allowed entry. Two passes over C
    when no pair is forbidden, and one read of two numbers (NaN propagates through amin/amax)."""
    with torch.no_grad():
        cmin = cost.amin((-2, -1), keepdim=True)
        cmax = cost.amax((-2, -1), keepdim=True)
        lo, hi = torch.stack((cmin.amin(), cmax.amax())).tolist()
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("cost contains NaN")
        if lo == -math.inf:
            raise ValueError("cost contains -inf")
        forbidden = hi == math.inf
        if forbidden:
            # a row or column without an allowed entry has +inf as its smallest cost; the largest allowed cost
            # with the forbidden ones turned to -inf (row and column minima and nan_to_num: 0.5 ms at
            # 1024 x 1024 where isfinite, its any() checks and masked_fill took 2.5 ms, half of a GCA solve)
            if bool(torch.isinf(cost.amin(-1)).any()) or bool(torch.isinf(cost.amin(-2)).any()):
                raise ValueError("every row and column of cost needs at least one allowed (finite) entry")
            cmax = cost.nan_to_num(posinf=-math.inf).amax((-2, -1), keepdim=True)
    return cmin.detach(), cmax.detach(), forbidden


def _marginal(w: Optional[Tensor], batch, size: int, like: Tensor, name: str) -> Tensor:
    if w is None:
        return torch.full((*batch, size), 1.0 / size, dtype=like.dtype, device=like.device)
    if w.shape[-1] != size:
        raise ValueError(f"{name} has {w.shape[-1]} entries but cost has {size} along that side")
    if not (w > 0).all():
        raise ValueError(f"{name} must be strictly positive")
    return w.to(dtype=like.dtype, device=like.device).expand(*batch, size)


def _check_eps(eps) -> None:
    if not (float(eps) > 0 and math.isfinite(float(eps))):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
