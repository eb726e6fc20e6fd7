"""Entropic optimal-transport solvers, as pure functions.

Conventions (one spelling everywhere in otstudy):

* ``cost`` C has shape ``(..., n, m)``; leading dimensions are a batch of
  independent problems.
* ``eps`` is the entropic regularisation (the papers' epsilon / lambda).
* The plan is written through dual potentials ``f`` (..., n) and ``g`` (..., m)::

      P_ij = exp((f_i + g_j - C_ij) / eps)

  which is also POT's ``diag(u) K diag(v)`` with ``u = exp(f/eps)``,
  ``v = exp(g/eps)``, ``K = exp(-C/eps)``.
* Entropy is ``H(P) = -sum_ij P_ij (log P_ij - 1)``; the solved problem is

      min_P  <P, C> - eps H(P) + lambda1 KL(P 1 | a) + lambda2 KL(P^T 1 | b)

  with ``KL(x|a) = sum x log(x/a) - x + a``.  Both lambdas ``None`` gives the
  balanced problem (hard marginals), ``inf`` on one side gives the
  semi-relaxed problem, finite values the unbalanced one (GCA-UOT).
* Forbidden pairs (the self-pairs of the 2N x 2N contrastive matrix) get
  ``+inf`` cost or ``mask=False``: their mass is exactly zero, never a large
  finite number.

Numerical domains, chosen per call (``domain="auto"``):

* ``kernel``: matrix-vector products with ``K = exp(-(C - min C)/eps)``; the
  fast path (POT's ``ot.sinkhorn``), safe while the kernel's dynamic range
  ``(max C - min C)/eps`` stays well inside the float exponent range.
* ``stabilized``: when it does not (eps = 0.01 on a cosine cost already
  underflows float32's kernel), the same products on the kernel with the
  potentials absorbed, ``exp((f0_i + g0_j - C_ij)/eps)``, starting from
  ``f0_i = min_j C_ij`` (every row keeps an entry of 1); the scalings are
  absorbed again only when they drift far from 1 (Schmitzer 2019), so most
  updates stay products in the cost's dtype. Not under an unrolled gradient
  (see ``sinkhorn``'s ``domain``).
* ``log``: log-sum-exp updates of f and g; the fallback when even the
  stabilised kernel loses a whole row or column (costs spanning ~1e5 eps),
  and available on request.

Gradients: ``grad="unrolled"`` differentiates through every iteration (the
papers' choice; in the kernel domains by a reverse pass written out in
:class:`_UnrolledScaling`, in the log domain by autograd, which keeps an n x m
matrix per iteration there); ``grad="implicit"`` runs the iterations without
autograd and differentiates the entropic OT objective with the converged
potentials held fixed (envelope theorem: d OT_eps / dC = P*), which keeps one
n x m matrix for backward and needs no reverse pass through the iterations.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "OTResult",
    "SinkhornNotConvergedWarning",
    "sinkhorn",
    "coupling_u1",
    "coupling_ua",
    "masked_cost",
    "sinkhorn_newton_sparse",
]


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
        grad: ``"unrolled"`` or ``"implicit"``.
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
    grad: str
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
        if self.grad == "implicit":
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


def sinkhorn(
    cost: Tensor,
    *,
    eps: float,
    n_iters: Optional[int] = None,
    n_projections: Optional[int] = None,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    tol: Optional[float] = None,
    uot_lambda1: Optional[float] = None,
    uot_lambda2: Optional[float] = None,
    mask: Optional[Tensor] = None,
    domain: str = "auto",
    grad: str = "unrolled",
    warn: bool = True,
    method: str = "sinkhorn",
) -> OTResult:
    r"""Entropic OT by Sinkhorn scaling (Cuturi 2013; Chizat et al. 2018 for UOT).

    Solves :math:`\min_P \langle P, C\rangle - \varepsilon H(P)
    + \lambda_1 KL(P\mathbf 1|a) + \lambda_2 KL(P^\top\mathbf 1|b)` by
    alternating scaling of rows (f) and columns (g), starting from g = 0.
    For the balanced problem each update is the KL (Bregman) projection onto
    one marginal constraint; for the unbalanced one the update is raised to
    ``lambda/(lambda + eps)``.

    Args:
        cost: C, shape (..., n, m). ``+inf`` marks forbidden pairs.
        eps: entropic regularisation, > 0.
        n_iters: maximum number of full iterations (row update + column update).
        n_projections: alternative to ``n_iters``: the number of single
            projections, rows first (1 = rows only, the U(a) / InfoNCE coupling;
            2K = K full iterations). Exactly one of the two must be given.
        a: row marginal (..., n), positive; default uniform 1/n.
        b: column marginal (..., m), positive; default uniform 1/m.
        tol: stop early once the marginal error is below ``tol``; warn
            (:class:`SinkhornNotConvergedWarning`) if it ends above it.
        uot_lambda1, uot_lambda2: KL penalties of the row / column marginals;
            None = hard constraint, ``inf`` = hard (semi-relaxed when only one is).
        mask: bool (..., n, m), False = forbidden pair (same as +inf cost).
        domain: ``"auto"`` | ``"kernel"`` | ``"stabilized"`` (kernel updates with the potentials
            absorbed into the kernel, for a cost whose kernel would underflow; falls back to ``"log"``
            if a whole row or column of it underflows) | ``"kernel64"`` (kernel updates in float64 on
            the kernel shifted by each row's smallest cost; falls back to ``"log"`` if its scalings
            leave float64's range) | ``"log"``. ``"auto"`` picks ``"kernel"`` when safe, else
            ``"stabilized"``; under an unrolled gradient (and for half precision) ``"kernel64"``.
        grad: ``"unrolled"`` | ``"implicit"`` (see module docstring).
        warn: emit the non-convergence warning when ``tol`` is not reached.
        method: ``"sinkhorn"`` or ``"sns"`` (:func:`sinkhorn_newton_sparse`: balanced,
            one problem, ``n_iters`` caps the Newton steps, ``tol`` defaults to 1e-6).

    Returns:
        :class:`OTResult` with the plan, potentials and diagnostics.
    """
    if method == "sns":
        if uot_lambda1 is not None or uot_lambda2 is not None:
            raise ValueError("method='sns' solves the balanced problem only (no uot_lambda1/uot_lambda2)")
        return sinkhorn_newton_sparse(cost, eps=eps, tol=tol or 1e-6, a=a, b=b, mask=mask,
                                      max_newton=n_iters or 100, warn=warn)
    if method != "sinkhorn":
        raise ValueError(f"method must be 'sinkhorn' or 'sns', got {method!r}")
    if not isinstance(cost, Tensor) or cost.dim() < 2:
        raise ValueError("cost must be a tensor of shape (..., n, m)")
    if not cost.is_floating_point():
        raise ValueError(f"cost must be floating point, got dtype {cost.dtype}")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if (n_iters is None) == (n_projections is None):
        raise ValueError("give exactly one of n_iters (full iterations) or n_projections")
    if n_iters is not None:
        if int(n_iters) != n_iters or n_iters < 1:
            raise ValueError(f"n_iters must be an integer >= 1, got {n_iters}")
        n_half = 2 * int(n_iters)
    else:
        if int(n_projections) != n_projections or n_projections < 1:
            raise ValueError(f"n_projections must be an integer >= 1, got {n_projections}")
        n_half = int(n_projections)
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if domain not in ("auto", "kernel", "kernel64", "stabilized", "log"):
        raise ValueError(f"domain must be 'auto', 'kernel', 'kernel64', 'stabilized' or 'log', got {domain!r}")
    if grad not in ("unrolled", "implicit"):
        raise ValueError(f"grad must be 'unrolled' or 'implicit', got {grad!r}")
    lam1 = _check_lambda("uot_lambda1", uot_lambda1)
    lam2 = _check_lambda("uot_lambda2", uot_lambda2)

    cost = masked_cost(cost, mask)
    *batch, n, m = cost.shape
    a = _marginal(a, batch, n, cost, "a")
    b = _marginal(b, batch, m, cost, "b")
    cmin, cmax, forbidden = _cost_range(cost)
    fi1, fi2 = _fi(lam1, eps), _fi(lam2, eps)
    if domain == "auto":
        need = float(((cmax - cmin) / eps).max())
        if fi1 != 1.0:  # the unbalanced row update's offset
            need = max(need, float(((1.0 - fi1) * cmin.abs() / eps).max()))
        unrolled = grad == "unrolled" and cost.requires_grad and torch.is_grad_enabled()
        if need <= _kernel_limit(cost.dtype):
            domain = "kernel"
        elif cost.dtype in (torch.float32, torch.float64) and not unrolled:
            # the kernel exp(-C/eps) would under/overflow: absorb the potentials into it instead, which
            # keeps matrix-vector updates in the cost's dtype (2-3x faster than float64 products, and
            # 5-10x faster than log-sum-exp updates, on this CPU; benchmarks/ot_solvers.py). Not under an
            # unrolled gradient: the backward of u = a / (K v) divides by (K v)^2, which underflows for the
            # tiny column sums a stabilised kernel can have before its first absorption (non-finite
            # gradients measured at eps = 1e-3, n = 1024 in float32)
            domain = "stabilized"
        else:
            # float64 products on the kernel shifted by each row's smallest cost (their backward has
            # float64's range); the log domain only if even they leave it (checked as they run)
            domain = "kernel64"

    balanced_rows = fi1 == 1.0
    if grad == "implicit":
        with torch.no_grad():
            f, g, err, used, _, domain = _iterate(cost.detach(), a, b, eps, n_half, fi1, fi2, tol, domain,
                                          cmin, balanced_rows)
        f, g = f.detach(), g.detach()
        plan = None
    else:
        f, g, err, used, plan, domain = _iterate(cost, a, b, eps, n_half, fi1, fi2, tol, domain, cmin,
                                         balanced_rows)
    if plan is None:
        plan = torch.exp((f[..., :, None] + g[..., None, :] - cost) / eps)  # (..., n, m), 0 where C=+inf
    if balanced_rows:
        with torch.no_grad():
            # row and column sums as matrix-vector products (sum(-2) over a row-major plan is ~3x slower)
            rows = _matvec(plan, torch.ones_like(b))
            cols = _matvec(plan.transpose(-1, -2), torch.ones_like(a)) if fi2 == 1.0 else None
            if plan.dim() == 2:
                err = _l1_error(rows, a) + (_l1_error(cols, b) if cols is not None else 0.0)
            else:
                err_t = torch.linalg.vector_norm(rows - a, 1, -1)
                if cols is not None:
                    err_t = err_t + torch.linalg.vector_norm(cols - b, 1, -1)
                err = float(err_t.max())
    if tol is not None and warn and err > tol:
        warnings.warn(
            f"sinkhorn did not converge: marginal error {err:.3e} > tol {tol:.1e} after "
            f"{used / 2:g} iterations (eps={eps:g}, {domain} domain)",
            SinkhornNotConvergedWarning,
            stacklevel=2,
        )
    return OTResult(plan=plan, f=f, g=g, cost=cost, eps=eps, a=a, b=b, uot_lambda1=lam1,
                    uot_lambda2=lam2, marginal_error=err, n_iters=used / 2, domain=domain,
                    grad=grad, forbidden=forbidden)


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


def _iterate(cost, a, b, eps, n_half, fi1, fi2, tol, domain, cmin, balanced_rows, until=None):
    """Run ``n_half`` alternating updates (rows first). Returns f, g, error, updates used, plan (or None),
    and the domain that was used. ``until(err)``, if given, is called with the L1 marginal error before
    every row update (balanced rows with a ``tol`` only) and stops the iterations when it returns True."""
    out = None
    if domain == "stabilized":
        # None where a whole row or column of the stabilised kernel underflowed: no kernel at all then
        out = _iterate_stabilized(cost, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until)
    elif domain == "kernel64":
        # each row shifted by its own smallest cost: every row keeps an entry of 1, and every entry is at
        # least the globally shifted kernel's, so this holds where exp(-(C - min C)/eps) would underflow
        # (SinSim at eps = 2e-3, n = 1024: the log domain took 22-29x the time and kept 84 n x n for backward)
        c64 = cost.double()
        out = _iterate_kernel(c64, a.double(), b.double(), eps, n_half, fi1, fi2, tol,
                              c64.detach().amin(-1, keepdim=True), balanced_rows, until)
        if out is not None and bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(out[1]).all()):
            f, g, err, used, plan = out
            out = f.to(cost.dtype), g.to(cost.dtype), err, used, plan.to(cost.dtype)
        else:
            out = None
    elif domain == "kernel":
        # None where the unrolled scalings left the float range (see _UnrolledScaling)
        out = _iterate_kernel(cost, a, b, eps, n_half, fi1, fi2, tol, cmin, balanced_rows, until)
    if out is not None:
        return (*out, domain)
    return (*_iterate_log(cost, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until), None, "log")


def _iterate_log(cost, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until=None):
    log_a, log_b = torch.log(a), torch.log(b)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    err = math.inf
    used = 0
    neg_c = -cost / eps  # (..., n, m)
    for k in range(n_half):
        if k % 2 == 0:
            # row update; the log-row-sums of the current plan are free here
            lse = torch.logsumexp(neg_c + g[..., None, :] / eps, dim=-1)  # (..., n)
            if tol is not None and k > 0:
                with torch.no_grad():
                    if balanced_rows:
                        err = float((torch.exp(f / eps + lse) - a).abs().sum(-1).max())
                    if err < tol or (until is not None and balanced_rows and until(err)):
                        break
            f_new = fi1 * (eps * log_a - eps * lse)
            if not balanced_rows:
                with torch.no_grad():
                    err = float(((f_new - f).abs() / eps).max())
            f = f_new
        else:
            lse = torch.logsumexp(neg_c + f[..., :, None] / eps, dim=-2)  # (..., m)
            g = fi2 * (eps * log_b - eps * lse)
        used = k + 1
        if tol is not None and not balanced_rows and k % 2 == 0 and k > 0 and err < tol:
            break
    return f, g, err, used


def _iterate_kernel(cost, a, b, eps, n_half, fi1, fi2, tol, cmin, balanced_rows, until=None):
    # K = exp(-(C - cmin)/eps) has max entry 1; f = eps log u + cmin, g = eps log v. cmin (detached) is the
    # smallest cost (..., 1, 1) or each row's (..., n, 1): the plan and the potentials do not depend on it.
    # None if the unrolled scalings left the float range.
    if cost.requires_grad and torch.is_grad_enabled():
        kernel = torch.exp((cost - cmin) * (-1.0 / eps))  # (..., n, m), 0 on masked pairs
    else:  # one n x m buffer instead of three temporaries
        kernel = torch.sub(cost, cmin).mul_(-1.0 / eps).exp_()
    return _scale(kernel, cmin[..., 0], torch.zeros_like(b), a, b, eps, n_half, fi1, fi2, tol, balanced_rows,
                  until=until)


def _stabilized_kernel(cost, f0, g0, eps):
    """exp((f0_i + g0_j - C_ij)/eps): the kernel with the potentials absorbed."""
    if cost.requires_grad and torch.is_grad_enabled():
        return torch.exp((f0[..., :, None] + g0[..., None, :] - cost) / eps)
    return torch.add(f0[..., :, None], g0[..., None, :]).sub_(cost).mul_(1.0 / eps).exp_()


def _iterate_stabilized(cost, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until=None):
    """Kernel updates on a kernel with the potentials absorbed (Schmitzer 2019; POT's sinkhorn_stabilized).

    The kernel starts shifted by each row's smallest cost, ``K~ = exp((f0 + g0 - C)/eps)`` with
    ``f0_i = min_j C_ij``, ``g0 = 0``: every row's largest entry is exactly 1 even when ``exp(-C/eps)``
    underflows (the shift is a c-transform, the log-domain row update's eps -> 0 limit); the scalings
    u, v are absorbed into f0, g0 (rebuilding K~) whenever they leave ``exp(+-tau)``. Between absorptions an update is a
    matrix-vector product in the cost's own dtype. Returns None if a row or column of K~ underflowed
    entirely (the caller then uses the log domain).
    """
    # f0 = each row's smallest cost: every row of K~ then has a largest entry of exactly 1, one exp pass
    f0 = cost.amin(-1)  # (..., n); finite: every row has an allowed entry
    g0 = torch.zeros_like(b)
    kernel = _stabilized_kernel(cost, f0, g0, eps)
    return _scale(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows,
                  rebuild=lambda f_, g_: _stabilized_kernel(cost, f_, g_, eps), until=until)


def _scale(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, rebuild=None, until=None):
    """Alternating scaling of ``kernel`` = exp((f0 + g0 - C)/eps), rows first; the potentials are
    f = f0 + eps log u, g = g0 + eps log v. With ``rebuild``, u and v are absorbed into f0, g0 (and the
    kernel rebuilt) whenever they leave exp(+-tau); None if they stopped being finite. Under an unrolled
    gradient without ``rebuild`` the scalings come from :class:`_UnrolledScaling`, whose reverse pass is
    written out rather than recorded op by op."""
    # a graph through the kernel or through the marginals (the plan is then built out of place: scaling the
    # kernel in place broke a gradient to the marginals, whose products had kept it for backward)
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (kernel, f0, g0, a, b))
    if graph and rebuild is None and kernel.requires_grad and not any(t.requires_grad for t in (f0, g0, a, b)):
        info: dict = {}
        u, v = _UnrolledScaling.apply(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, info)
        if not info["finite"]:
            return None
        err, used = info["err"], info["used"]
    else:
        out = _scaling_loop(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, rebuild, until)
        if out is None:
            return None
        u, v, f0, g0, kernel, err, used = out
    f = eps * torch.log(u) + f0
    g = eps * torch.log(v) + g0
    if graph:
        plan = u[..., :, None] * kernel * v[..., None, :]  # = exp((f + g - C)/eps), two products
    else:  # the kernel is this call's own buffer: scale it in place (two fresh n x m buffers cost more)
        plan = kernel.mul_(u[..., :, None]).mul_(v[..., None, :])
    return f, g, err, used, plan


# From this many entries up, the matrix-vector products of a CPU solve go through numpy (OpenBLAS), with BLAS held
# to one thread during the solve, where that is the faster route on this machine (:func:`_products_route`). On an
# AMD EPYC torch's (MKL) gemv, itself single-threaded there, was 1.2-1.7x slower than OpenBLAS's on one thread
# (n = 1024 float32: 72 us against 51 us), and whole solves took 0.80-0.93x the time at n = 512-2048 through
# numpy (alternating rounds, ad hoc); with OpenBLAS's two threads 0.52-1.38x (they contend with torch's OpenMP
# threads, which spin after every parallel op). On an Intel Xeon torch's gemv was the faster one (n = 1024
# float32: 42 us against 102 us), and 40-iteration solves took 1.27-1.78x the time through numpy. Below this
# size the round trip through numpy cost 1.05-1.66x (AMD), so only "all" (below) goes to numpy there.
_NUMPY_MATVEC_MIN = 1 << 18
_PRODUCTS: Optional[str] = None  # _products_route's answer, once per process
_BLAS = None  # threadpoolctl's controller, made on first use (it scans the loaded libraries once)


def _numpy_mode(mat: Tensor, *others: Tensor) -> Optional[str]:
    """How a solve with ``mat`` uses numpy, decided once per solve: ``"all"`` (its iterations or reverse pass in
    numpy altogether: one small problem, below ``_NUMPY_MATVEC_MIN`` entries, ``others`` of its dtype),
    ``"products"`` (its matrix-vector products through :func:`_np_mv`, from ``_NUMPY_MATVEC_MIN`` entries, where
    numpy's are the faster on this machine: :func:`_products_route`) or None (torch). Only for one dense CPU
    float32/float64 matrix with no autograd graph to record through it or ``others`` (the tensors the products'
    vectors come from)."""
    if not (mat.dim() == 2 and mat.layout == torch.strided and mat.device.type == "cpu"
            and mat.dtype in (torch.float32, torch.float64)):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (mat, *others)):
        return None
    if mat.numel() >= _NUMPY_MATVEC_MIN:
        return "products" if _products_route() == "numpy" else None
    return "all" if all(t.dtype == mat.dtype for t in others) else None


def _products_route() -> str:
    """``"numpy"`` or ``"torch"``: the faster route for a large CPU solve's matrix-vector products on this
    machine, measured once per process (:func:`_measure_products`, ~30 ms) unless ``OTSTUDY_OT_PRODUCTS`` names
    one. The two give the same plans to rounding (summation order), so setting it only matters for bitwise
    repeats of a run, or where the measurement is too close to call on a busy machine."""
    global _PRODUCTS
    if _PRODUCTS is None:
        choice = os.environ.get("OTSTUDY_OT_PRODUCTS", "").strip().lower()
        if choice not in ("", "numpy", "torch"):
            raise ValueError(f"OTSTUDY_OT_PRODUCTS must be 'numpy' or 'torch' (unset: measured), got {choice!r}")
        _PRODUCTS = choice or _measure_products()
    return _PRODUCTS


def _measure_products(n: int = 1024, rounds: int = 9) -> str:
    """Times both routes' products (``P y`` and ``P^T x``, float32 and float64, n x n) in alternating rounds:
    numpy (one BLAS thread, as in a solve) only where its median total is below 0.9x torch's (a margin, so that
    a close call on a noisy machine stays with torch, whose products also serve autograd)."""
    g = torch.Generator().manual_seed(0)
    totals = {"numpy": 0.0, "torch": 0.0}
    with _numpy_context(True):
        for dtype in (torch.float32, torch.float64):
            mat, vec = torch.rand(n, n, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype)
            m_np, v_np = mat.numpy(), vec.numpy()
            routes = {"numpy": lambda: (m_np @ v_np, m_np.T @ v_np),
                      "torch": lambda: (torch.mv(mat, vec), torch.mv(mat.t(), vec))}
            times: dict = {name: [] for name in routes}
            for k in range(rounds + 1):  # the first round warms both up
                for name in (("numpy", "torch") if k % 2 == 0 else ("torch", "numpy")):
                    start = time.perf_counter()
                    routes[name]()
                    if k:
                        times[name].append(time.perf_counter() - start)
            for name in totals:
                totals[name] += sorted(times[name])[rounds // 2]
    return "numpy" if totals["numpy"] < 0.9 * totals["torch"] else "torch"


def _np_mv(mat: Tensor, vec: Tensor) -> Tensor:
    """``mat @ vec`` by numpy, for a matrix in :func:`_numpy_mode` "products" (a vector of another dtype: torch)."""
    if vec.dtype != mat.dtype:
        return _matvec(mat, vec)
    return torch.from_numpy(mat.detach().numpy() @ vec.detach().numpy())


def _numpy_context(on: bool):
    """A context for a solve whose products go through numpy (a no-op unless ``on``): BLAS held to one thread,
    and numpy's floating-point warnings off (torch's products give inf/NaN silently, and the solvers check
    their scalings for them and fall back)."""
    global _BLAS
    if not on:
        return contextlib.nullcontext()
    import numpy as np

    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    stack = contextlib.ExitStack()
    stack.enter_context(_BLAS.limit(limits=1, user_api="blas"))
    stack.enter_context(np.errstate(all="ignore"))
    return stack


@contextlib.contextmanager
def _flush_subnormals(on: bool):
    """While a CPU solve runs (a no-op unless ``on``): subnormal floats flushed to zero on this thread (x86's
    FTZ/DAZ, by ``torch.set_flush_denormal``; elsewhere nothing changes), then the thread's setting restored.
    For SNS's dense plan, whose entries fall far below float32's and float64's normal ranges at small eps: on
    an Intel Xeon every product with a subnormal operand takes a microcode assist, and SNS's CG products by
    the float32 copy of the plan ran 14x slower (clouds n = 1024, eps 0.001: 250 products 1.07 s against
    0.075 s; whole SNS solves 1.6-8x), where an AMD EPYC (an earlier session's machine) took the same time.
    An entry below 1e-38 (float32) or 2e-308 (float64) holds a negligible share of its row's mass, so the
    plans and iterations do not change. Sinkhorn's own domains keep the kernel within the normal range, and
    its solves took the same time either way (medians of 5 pairs 0.92-1.12x over 42 problems, no trend; ad hoc),
    so it is left alone there. Only this thread's setting changes: torch's other intra-op threads keep theirs."""
    if not on or _flushing() or not torch.set_flush_denormal(True):  # off, already on, or not x86 with SSE3
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _flushing() -> bool:
    """Whether this thread flushes subnormals already (torch has no getter): 2^-1070 times 1 gives 0 then."""
    return float(torch.tensor([2.0 ** -1070], dtype=torch.float64).mul_(1.0)[0]) == 0.0


def _matvec(mat: Tensor, vec: Tensor) -> Tensor:
    """mat @ vec over the last axes, (..., n, m) x (..., m) -> (..., n); ``torch.mv`` for one problem (3-4 us
    less a product than a batched matmul, a tenth of a 40-iteration solve at n = 128)."""
    return torch.mv(mat, vec) if mat.dim() == 2 else (mat @ vec[..., :, None])[..., 0]


def _l1_error(x, target) -> float:
    """max over problems of ||x - target||_1 (x, target: (..., n)); ``torch.dist`` for one problem (one op
    where sub, abs, sum and max were four: 3 us an iteration at n = 128). Also for two numpy vectors (SNS's
    Newton phase on a CPU)."""
    if not isinstance(x, Tensor):
        return float(abs(x - target).sum())
    if x.dim() == 1:
        return float(torch.dist(x, target, 1))
    return float(torch.linalg.vector_norm(x - target, 1, -1).max())


def _fix(fi: float, offset: Tensor, eps: float) -> Optional[Tensor]:
    """Unbalanced: the offset is not neutral under the power fi; this factor restores it (None if balanced)."""
    return torch.exp((fi - 1.0) * offset / eps) if fi != 1.0 else None


def _scaling_loop(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, rebuild=None, until=None,
                  trace: Optional[list] = None):
    """The iterations of :func:`_scale`: (u, v, f0, g0, kernel, err, updates used), or None if the scalings
    stopped being finite. ``trace`` (a list) receives each update's (input scaling x, denominator d = K x or
    K^T x, new scaling)."""
    mode = _numpy_mode(kernel, f0, g0, a, b)
    if rebuild is None and mode == "all":
        return _scaling_iterations_numpy(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until,
                                         trace)
    fast = mode == "products"
    with _numpy_context(fast):
        return _scaling_iterations(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, rebuild, until,
                                   trace, _np_mv if fast else _matvec)


def _scaling_iterations_numpy(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until, trace):
    """:func:`_scaling_iterations` (kernel domains, no rebuild) for one small CPU problem (:func:`_numpy_mode`
    "all"), in numpy: the same updates and stopping rules, at a fraction of torch's per-op cost on short vectors
    (n = 128, to 1e-6: a tie with POT before, whose iterations are numpy's too). ``trace`` receives numpy
    arrays. A mirror of the torch loop rather than one loop over both: sharing it would take four injected
    operations (ones, detach, the L1 error, the log change), and the torch loop also absorbs into the kernel."""
    import numpy as np

    k_np = kernel.detach().numpy()
    k_t = k_np.T
    a_np, b_np = a.detach().numpy(), b.detach().numpy()
    row_fix, col_fix = _fix(fi1, f0.detach(), eps), _fix(fi2, g0.detach(), eps)
    row_fix = None if row_fix is None else row_fix.numpy()
    col_fix = None if col_fix is None else col_fix.numpy()
    u, v = np.ones_like(a_np), np.ones_like(b_np)
    err = math.inf
    used = 0
    with np.errstate(all="ignore"):  # inf/NaN as torch would give them, silently (the callers check)
        for k in range(n_half):
            if k % 2 == 0:
                kv = k_np @ v
                if tol is not None and k > 0:
                    if balanced_rows:
                        err = float(np.abs(u * kv - a_np).sum())
                    if err < tol or (until is not None and balanced_rows and until(err)):
                        break
                u_new = a_np / kv if row_fix is None else (a_np / kv) ** fi1 * row_fix
                if not balanced_rows:
                    err = float(np.abs(np.log(u_new / u)).max())
                if trace is not None:
                    trace.append((v, kv, u_new))
                u = u_new
            else:
                ktu = k_t @ u
                v = b_np / ktu if col_fix is None else (b_np / ktu) ** fi2 * col_fix
                if trace is not None:
                    trace.append((u, ktu, v))
            used = k + 1
            if tol is not None and not balanced_rows and k % 2 == 0 and k > 0 and err < tol:
                break
    return torch.from_numpy(u), torch.from_numpy(v), f0, g0, kernel, err, used


def _scaling_iterations(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, rebuild, until, trace, mv):
    u = torch.ones_like(a)
    v = torch.ones_like(b)
    row_fix, col_fix = _fix(fi1, f0, eps), _fix(fi2, g0, eps)
    tau = 0.5 * _kernel_limit(kernel.dtype)
    err = math.inf
    used = 0
    kernel_t = kernel.transpose(-1, -2)
    a_ = a.detach()
    for k in range(n_half):
        if k % 2 == 0:
            kv = mv(kernel, v)  # (..., n) = K v
            # the errors read detached tensors (no graph): a no_grad block per iteration cost more than its
            # products at n = 128
            if tol is not None and k > 0:
                if balanced_rows:
                    err = _l1_error(u.detach() * kv.detach(), a_)
                if err < tol or (until is not None and balanced_rows and until(err)):
                    break
            u_new = a / kv if row_fix is None else (a / kv) ** fi1 * row_fix
            if not balanced_rows:
                err = float((torch.log(u_new.detach() / u.detach())).abs().max())
            if trace is not None:
                trace.append((v, kv, u_new))
            u = u_new
        else:
            ktu = mv(kernel_t, u)  # (..., m) = K^T u
            v = b / ktu if col_fix is None else (b / ktu) ** fi2 * col_fix
            if trace is not None:
                trace.append((u, ktu, v))
        used = k + 1
        if tol is not None and not balanced_rows and k % 2 == 0 and k > 0 and err < tol:
            break
        # after each of the first 4 full iterations (where the scalings move most), then every 8th and the last
        if rebuild is not None and k % 2 == 1 and (k < 8 or k % 16 == 15 or k + 1 >= n_half):
            with torch.no_grad():
                both = torch.cat((u.detach().flatten(), v.detach().flatten()))
                reach = float(torch.maximum(both.amax(), both.amin().reciprocal()))
            if not math.isfinite(reach) or reach <= 0:
                return None
            if reach > math.exp(tau) and k + 1 < n_half:
                f0, g0 = f0 + eps * torch.log(u), g0 + eps * torch.log(v)
                kernel = rebuild(f0, g0)
                kernel_t = kernel.transpose(-1, -2)
                u, v = torch.ones_like(a), torch.ones_like(b)
                row_fix, col_fix = _fix(fi1, f0, eps), _fix(fi2, g0, eps)
    return u, v, f0, g0, kernel, err, used


class _UnrolledScaling(torch.autograd.Function):
    """The scalings (u, v) after the unrolled updates ``u <- (a / K v)^fi1 row_fix``,
    ``v <- (b / K^T u)^fi2 col_fix``, differentiable in K, with the reverse pass written out.

    Recorded op by op, autograd's backward added an n x m outer product into K's gradient for every
    update (80 passes over an n x m matrix for 40 iterations) and paid its per-op overhead on each
    (SinSim's loss at batch 128: 7.3 ms forward and backward against 0.9 ms for NT-Xent alone, with 1.7
    ms in the forward solve). Here backward runs the recursion in reverse: an update
    ``y = (c / d)^fi fix`` with ``d = K x`` (or ``K^T x``) sends ``gd = -fi gy y / d`` on to x as
    ``K^T gd`` (or ``K gd``), and the outer products of gd and x are summed by one matrix product at the
    end, ``(n x L) @ (L x m)`` for L updates. Kept for backward: K (which autograd kept too) and two
    vectors per update (the scaling it read and -fi y / d). The same derivative as autograd's
    (tests/test_ot.py compares them), about half the time for forward and backward (BENCHMARKS.md,
    ``benchmarks.ot_solvers --part backward``).
    """

    @staticmethod
    def forward(ctx, kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, info):
        trace: list = []
        u, v, _, _, _, info["err"], info["used"] = _scaling_loop(kernel, f0, g0, a, b, eps, n_half, fi1, fi2,
                                                                 tol, balanced_rows, trace=trace)
        saved = []
        for side, fi in ((trace[0::2], fi1), (trace[1::2], fi2)):  # updates alternate, rows first
            if side:
                x_in, den, out = (_stack(part) for part in zip(*side))
                saved += [x_in, (-fi) * out / den]  # d y / d (K x) = -fi y / d, every update at once
        # the factors y / d = c / d^2: finite scalings whose squares leave the float range (tiny column sums
        # of a kernel near underflow) would give inf gradients; the caller then falls back
        info["finite"] = all(bool(torch.isfinite(q).all()) for q in saved[1::2])
        ctx.save_for_backward(kernel, *saved)
        ctx.n_cols = len(trace) // 2
        return u, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gu, gv):
        kernel, *saved = ctx.saved_tensors
        row_in, row_q = saved[:2]  # (rows, ..., m) the v each update read, (rows, ..., n) d u / d (K v)
        col_in, col_q = saved[2:] if ctx.n_cols else (None, None)
        flat = kernel.dim() == 2
        mode = _numpy_mode(kernel, *(g for g in (gu, gv) if g is not None))  # no graph here (once_differentiable)
        if mode == "all":
            # one small CPU problem: the same recursion in numpy, whose per-op cost on short vectors is a fraction
            # of torch's (SinSim's OT term at n = 128-256: backward 0.78-0.84x; at n >= 1024 it measured 1.16x,
            # so larger problems keep torch's elementwise ops with numpy's products below)
            left, right = _unrolled_backward_numpy(kernel, row_in, row_q, col_in, col_q, gu, gv, ctx.n_cols)
            return (left.t() @ right,) + (None,) * 11

        fast = mode == "products"

        def send(acc, mat, vec):  # acc + mat @ vec (acc None: zero)
            if fast:
                return _np_mv(mat, vec) if acc is None else acc + _np_mv(mat, vec)
            if acc is None:
                return _matvec(mat, vec)
            return torch.addmv(acc, mat, vec) if flat else acc + _matvec(mat, vec)

        kt = kernel.transpose(-1, -2)
        left, right = [], []  # K's gradient: the sum over updates of left (..., n) x right (..., m)
        with _numpy_context(fast):
            for k in reversed(range(len(row_q) + ctx.n_cols)):
                i = k // 2
                if k % 2:  # v = (b / K^T u)^fi2 col_fix: the gradient goes on to u; v's previous value starts at 0
                    gd = gv * col_q[i] if gv is not None else torch.zeros_like(col_q[i])
                    gu, gv = send(gu, kernel, gd), None
                    left.append(col_in[i])
                    right.append(gd)
                else:  # u = (a / K v)^fi1 row_fix: the gradient goes on to v
                    gd = gu * row_q[i] if gu is not None else torch.zeros_like(row_q[i])
                    gv, gu = send(gv, kt, gd), None
                    left.append(gd)
                    right.append(row_in[i])
        grad_kernel = torch.stack(left, -1) @ torch.stack(right, -2)  # (..., n, L) @ (..., L, m)
        return (grad_kernel,) + (None,) * 11


def _stack(parts) -> Tensor:
    """torch.stack(parts, 0), for tensors or for numpy arrays (the small-problem iterations' trace)."""
    if isinstance(parts[0], Tensor):
        return torch.stack(parts, 0)
    import numpy as np

    return torch.from_numpy(np.stack(parts, 0))


def _unrolled_backward_numpy(kernel, row_in, row_q, col_in, col_q, gu, gv, n_cols: int):
    """:meth:`_UnrolledScaling.backward`'s recursion for one (n, m) CPU problem, in numpy: the factors
    (L x n) and (L x m) of K's gradient, left^T right, over the L updates."""
    import numpy as np

    k_np = kernel.detach().numpy()
    rin, rq = row_in.numpy(), row_q.numpy()
    cin, cq = (col_in.numpy(), col_q.numpy()) if n_cols else (None, None)
    gu = None if gu is None else gu.detach().numpy()
    gv = None if gv is None else gv.detach().numpy()
    n, m = k_np.shape
    steps = len(rq) + n_cols
    left = np.empty((steps, n), dtype=k_np.dtype)
    right = np.empty((steps, m), dtype=k_np.dtype)
    with np.errstate(all="ignore"):  # inf/NaN as torch would give them, silently
        for row, k in enumerate(reversed(range(steps))):
            i = k // 2
            if k % 2:  # v = (b / K^T u)^fi2 col_fix: the gradient goes on to u; v's previous value starts at 0
                gd = gv * cq[i] if gv is not None else np.zeros(m, dtype=k_np.dtype)
                sent = k_np @ gd
                gu, gv = (sent if gu is None else gu + sent), None
                left[row], right[row] = cin[i], gd
            else:  # u = (a / K v)^fi1 row_fix: the gradient goes on to v
                gd = gu * rq[i] if gu is not None else np.zeros(n, dtype=k_np.dtype)
                sent = k_np.T @ gd
                gv, gu = (sent if gv is None else gv + sent), None
                left[row], right[row] = gd, rin[i]
    return torch.from_numpy(left), torch.from_numpy(right)


def coupling_u1(cost: Tensor, *, eps: float, mask: Optional[Tensor] = None) -> Tensor:
    r"""IOT-CL coupling under U(1) (Shi et al. 2023, Eq. 19): a global softmax.

    :math:`P_{ij} = \exp(-C_{ij}/\varepsilon) / \sum_{t,s} \exp(-C_{ts}/\varepsilon)`;
    the plan sums to 1 over all (n, m) entries.

    Args:
        cost: (..., n, m); +inf (or ``mask=False``) gives exactly zero mass.
    Returns:
        log P, shape (..., n, m) (take ``.exp()`` for the plan).
    """
    _check_eps(eps)
    cost = masked_cost(cost, mask)
    logits = -cost / eps  # (..., n, m)
    flat = logits.flatten(-2)  # (..., n*m)
    return (flat - torch.logsumexp(flat, dim=-1, keepdim=True)).view_as(logits)


def coupling_ua(cost: Tensor, *, eps: float, a: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
    r"""IOT-CL coupling under U(a) (Shi et al. 2023, Eq. 12): a row softmax.

    :math:`P_{ij} = a_i \exp(-C_{ij}/\varepsilon) / \sum_k \exp(-C_{ik}/\varepsilon)`,
    ``a`` uniform 1/n by default; rows sum to ``a``.

    Returns:
        log P, shape (..., n, m).
    """
    _check_eps(eps)
    cost = masked_cost(cost, mask)
    n = cost.shape[-2]
    logits = -cost / eps
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # (..., n, m) row-normalised
    log_a = torch.log(a)[..., :, None] if a is not None else -math.log(n)
    return logp + log_a


def _check_eps(eps) -> None:
    if not (float(eps) > 0 and math.isfinite(float(eps))):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")


# --------------------------------------------------------------------------- Sinkhorn-Newton-Sparse


_EXP_MAX = math.log(torch.finfo(torch.float64).max)  # exp overflows float64 beyond this (709.78)


def sinkhorn_newton_sparse(
    cost: Tensor,
    *,
    eps: float,
    tol: float = 1e-6,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    warmup_iters: int = 5,
    sinkhorn_budget: Optional[int] = None,
    handover_error: Optional[float] = 0.05,
    handover_budget: int = 160,
    warm_start_factor: float = 1.0,
    warm_start_iters: int = 3,
    max_newton: int = 100,
    sparsity_tol: float = 1e-3,
    dense_above: float = 0.05,
    cg_tol: float = 1e-2,
    cg_max_iter: int = 300,
    warn: bool = True,
) -> OTResult:
    r"""Balanced entropic OT by Sinkhorn-Newton-Sparse (Tang et al., ICLR 2024).

    Stage 1: ``warmup_iters`` Sinkhorn iterations (kernel domain where the
    kernel's range fits float64, stabilised kernel otherwise). Stage 2: Newton steps
    on the concave dual (Lyapunov) potential
    :math:`L(f,g) = \langle f,a\rangle + \langle g,b\rangle - \varepsilon\sum_{ij} e^{(f_i+g_j-C_{ij})/\varepsilon}`,
    whose negative Hessian is
    :math:`\frac1\varepsilon\begin{pmatrix}\mathrm{diag}(P1) & P\\ P^\top & \mathrm{diag}(P^\top 1)\end{pmatrix}`.
    The off-diagonal blocks are sparsified (the diagonal blocks stay exact, so
    the sparsified matrix stays diagonally dominant, hence positive
    semi-definite), the Newton system is solved by conjugate gradients, and the
    step is chosen by a backtracking (Armijo) line search on L. Stops when the
    L1 marginal error is below ``tol``. All of it runs in float64; the plan is
    returned in the cost's dtype.

    Where this differs from the paper, and why (measured in ``benchmarks/sns.py``):

    * Sparsification: the paper keeps the largest entries of P overall at a
      target density (about 2/n per row). Here each row keeps every entry of at
      least ``sparsity_tol / m`` of the row's mass, so a row loses at most
      ``sparsity_tol`` of its mass whatever the plan looks like: a
      near-permutation plan keeps ~1-2 entries per row, a diffuse one (moderate
      eps) keeps what it needs. A fixed per-row budget truncated diffuse plans
      and made Newton converge only linearly (20 steps at eps = 0.01 on digits,
      against 3-4 now). The kept entries are stored in CSR form while they are
      at most ``dense_above`` (5%) of the matrix; above that the exact plan is
      used, and stays in use. On CPU, building the CSR pair costs ~50 dense
      matrix-vector products (n = 1024: 12 ms against 0.23 ms a product), more
      than the ~10 CG products of a step save; above 5% the dense path was
      faster (2-D clouds n = 512, eps = 1e-3: 103 ms -> 37 ms with 15%).
      On a CPU the CSR pair is scipy's and CG runs in numpy (:class:`_KeptEntries`):
      near-permutation plans, which stay sparse, took 0.72-0.84x the time of
      torch's CSR tensors (``benchmarks.sns --against 9265d81``, the same iterations),
      then 0.91-0.94x that with the transpose as a CSC view (``--against c593453``).
      On a CPU the whole Newton phase's vectors (potentials, marginals, directions, the line search) are
      numpy arrays too, zero-copy views, the n x m products still by torch (``_NEWTON_NUMPY``): torch's
      ops on n = 512 vectors cost ~1-10 us each against numpy's 0.4-2.5 us, which at ~60 such ops a step
      made them a fifth of it. And a step's line search gives the next step's row sums for free
      (``x * (P y)``, P y being its product). Together 0.84-0.97x the time of every Newton solve of
      ``benchmarks.sns`` (``--against 66b540d``, Intel Xeon: the same iterations and errors).
    * The Newton system is solved through its Schur complement
      :math:`(\mathrm{diag}(P^\top 1) - P_s^\top \mathrm{diag}(1/P1) P_s)\,d_g = \ldots`
      (d_f eliminated), by conjugate gradients preconditioned with that matrix's
      diagonal: for this 2-cyclic system CG on the reduced system needs about
      half the products of CG on the full one (15-80 -> 7-40 measured), each
      product still one P_s and one P_s^T product. The paper runs plain CG on
      the full system (~230 products per step measured).
    * The CG tolerance is loose (``cg_tol`` = 1e-2, inexact Newton): a tighter
      solve only cost products (1e-4 cost 1.7x the products for the same number
      of steps). Near the solution it tightens to the square root of the L1
      marginal error (the forcing term min(cg_tol, sqrt(err)): inexact Newton
      of order 1.5, where a fixed 1e-2 made the last steps linear, each cutting
      the error ~50x): one step fewer on 5 of the 16 problems of
      ``benchmarks.sns`` (none more) for 1% more CG products. min(cg_tol, err)
      (quadratic) saved 9 steps but cost 29% more products.
    * Dense path (this implementation's, not the paper's): between Newton steps the plan is kept as
      ``diag(u) P0 diag(v)`` (:class:`_ScaledPlan`): a step only multiplies u and v, and P0 absorbs them
      when they leave exp(+-30); P0 * P0 (for the Schur diagonal) and, on a CPU, a float32 copy of P0 are
      made per P0, not per step. CG's products (on a CPU) go through that float32 copy, with float64
      vectors: CG solves to a relative 1e-2-1e-3, float32 products are exact to ~1e-7 and cost 0.3-0.5x
      float64's; the residuals, the right-hand side, the line search and the plan stay float64. The same
      iterations on every problem of ``benchmarks.sns``; 0.63-0.92x the time on clouds and digits at
      eps <= 0.005 (``benchmarks.sns --against b4a8644``, AMD EPYC). The solve flushes subnormals to zero
      (:func:`_flush_subnormals`): on an Intel Xeon the products by the copy's subnormal entries made SNS
      1.6-8x slower at eps <= 0.005. With the copy's entries below 1e-20 set to 0, the products run on torch's
      threads (:meth:`_ScaledPlan.float32_schur`): 0.70-0.99x the time again, the same iterations.
    * The line search evaluates L along the step with one product by the current
      plan (``L(f + s d_f, g + s d_g) - L(f, g)`` needs only ``x^T P y`` with
      ``x = exp(s d_f / eps)``, ``y = exp(s d_g / eps)``, written with ``expm1``
      so the gain is exact near convergence), not one n x m exponential per trial;
      the new plan is the old one scaled by x and y (two passes, not an exp pass).
      The halving starts at the first step whose x, y stay within float64
      (larger ones are refused anyway), and the dense path's P * P lives in
      one buffer: 10-20% off every Newton solve in ``benchmarks.sns --against``.
    * Warm-up is at least ``warmup_iters`` = 5 iterations, then Sinkhorn goes on
      while the error's rate over its last 3 iterations predicts reaching ``tol``
      within ``sinkhorn_budget`` more iterations (the cost of ~4-5 Newton steps:
      by default 60 up to n = 512 and down to 30 from n = 1024 on a CPU, see
      :func:`_default_sinkhorn_budget`; the rate is re-read every iteration,
      so an error that falls fast at first and slowly later, as on digits, still gets Newton). The paper
      always runs a fixed warm-up and then Newton; where Sinkhorn needs only
      ~10-100 iterations (moderate eps) that made SNS 1.5-2x slower than Sinkhorn
      alone, and now it costs what Sinkhorn does. ``sinkhorn_budget=0`` is the
      paper's algorithm (with the solves above).
    * Handover (this implementation's, for time rather than iterations): Sinkhorn
      also goes on while its error is above ``handover_error`` = 0.05 and its rate
      predicts reaching that within ``handover_budget`` = 160 more iterations.
      From a plan 0.5-0.9 off its marginals Newton spends 4-12 damped steps before
      it converges fast (2-D clouds, n = 512, eps = 0.005: from 5 iterations, 8
      steps; from 0.05, 3), each step costing 12-20 Sinkhorn iterations (CG's
      products, n = 512-1024, CPU), while Sinkhorn's first iterations cut the
      error cheaply. On the 16 problems of ``benchmarks.sns`` (Intel Xeon,
      alternating pairs, ad hoc) this took 0.28-0.84x the time of the paper's
      early handover on 10, 0.95-1.03x on the other 6, but 2-5x the iterations
      on 2-D clouds (n = 512, eps = 0.005: 27 against 13; Sinkhorn needs 109).
      ``handover_error=None`` hands over as before (as soon as Sinkhorn's rate
      predicts more than ``sinkhorn_budget``): the fewest iterations.
      ``benchmarks.sns --part handover`` times None, 0.02, 0.05 and 0.1 against
      each other (Xeon: 0.02 and 0.1 each 1.07-1.08x the default's time in
      geometric mean, up to 1.41x and 1.6x; None up to 3.6x). The budget
      was 80 before the handover rule; 60 now sends clouds n = 1024 at eps 0.005
      to Newton once the error is below 0.05 (21 iterations in 0.69x the time of
      Sinkhorn's 83), while 40 sent n = 512 at eps 0.01 to Newton at 1.35x
      Sinkhorn's time.
    * ``warm_start_factor`` > 1 (not the default) starts instead from ``warm_start_iters`` = 3 Sinkhorn
      iterations at ``warm_start_factor * eps``; their last rate predicts Sinkhorn's iterations at eps
      (about ``warm_start_factor`` times as many), and Newton starts at once where that exceeds
      ``sinkhorn_budget`` (see :func:`_warm_start`). With 4: fewer iterations on 15 of the 16 problems of
      ``benchmarks.sns --part warm-start`` (2-D clouds n = 512, eps = 0.005: 10 against 13, Sinkhorn 109;
      near-permutation cosine at 0.001: 69 against 84), but not less time (0.64-1.45x in alternating pairs:
      on digits the start trades cheap Sinkhorn iterations for Newton steps), so the default stays at eps.
    * Every step after the warm-up is a Newton step, damped or not, as in the
      paper (unless Newton's direction gives no ascent: see the last point).
      An earlier version ran, after each damped step, as many Sinkhorn
      iterations as the step took CG products (about its cost). On 2-D clouds
      at eps 0.005-0.001 that counted 19-89 iterations where Newton alone needs
      13-24 (Sinkhorn: 109-1969). This version, with the line search above,
      takes 0.60-1.33x its time (``python -m benchmarks.sns --against 8527e76``):
      less at n = 512, eps = 1e-3 and on digits at 2e-3, more at n = 1024,
      eps = 1e-3 and on digits at 1e-3, where a damped Newton step costs more
      than the Sinkhorn iterations it replaced; against Sinkhorn alone SNS
      stays faster from eps = 2e-3 down (BENCHMARKS.md). Tried and not kept:
      Levenberg-Marquardt damping of the Hessian's diagonal (no fewer steps on
      these problems) and CG tolerances loosened far from the solution
      (Eisenstat-Walker: half the CG products, but more steps on digits; the
      time moved by -25% to +25%).

    * A Newton direction along which L does not ascend (the line search finds no step down to 1e-8, the
      slope is not positive, or the direction is not finite) is not taken: Sinkhorn iterations are run
      instead (1, 2, 4, ... up to 16 after consecutive failures, each counted), and Newton is tried again.
      This happens on near-permutation plans (cosine costs between points and noisy copies of them at
      eps <= 0.002), which split into blocks that exchange mass through ~0 entries: the previous version
      took the last refused step anyway (plans of mass up to 1e164) or, where a column's Schur diagonal
      vanished, divided by it in the Jacobi preconditioner and stopped on a NaN direction after the
      warm-up. Such columns are now left out of the preconditioner (a pseudo-inverse), and SNS reaches
      1e-6 there in 31-250 iterations where Sinkhorn is still 1e-4 off after 5000.

    Gradients: the potentials are detached (envelope theorem, as
    ``grad="implicit"`` in :func:`sinkhorn`).

    Args:
        cost: (n, m), +inf (or ``mask=False``) for forbidden pairs.
        eps: entropic regularisation.  tol: target L1 marginal error.
        warmup_iters: Sinkhorn iterations always run first.  sinkhorn_budget: Sinkhorn goes on after
            them while its rate predicts ``tol`` within this many more iterations (0: the paper's fixed
            warm-up, whatever the handover; None: by problem size, :func:`_default_sinkhorn_budget`).
            handover_error, handover_budget: and while its error is above
            ``handover_error`` and its rate predicts reaching it within ``handover_budget`` more iterations
            (the defaults, for time; ``handover_error=None``: Newton as soon as the budget rule says so, for
            the fewest iterations).  warm_start_factor, warm_start_iters: above 1, the start is ``warm_start_iters``
            Sinkhorn iterations at ``warm_start_factor * eps`` instead (``warmup_iters`` then unused).
    Returns:
        :class:`OTResult`; ``n_iters`` counts Sinkhorn iterations plus Newton steps.
    """
    if not isinstance(cost, Tensor) or cost.dim() != 2:
        raise ValueError("sinkhorn_newton_sparse solves one (n, m) problem; got shape "
                         f"{tuple(getattr(cost, 'shape', ()))}")
    if not cost.is_floating_point():
        raise ValueError(f"cost must be floating point, got dtype {cost.dtype}")
    _check_eps(eps)
    eps = float(eps)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if int(warmup_iters) != warmup_iters or warmup_iters < 1:
        raise ValueError(f"warmup_iters must be an integer >= 1, got {warmup_iters}")
    if not 0 < sparsity_tol < 1:
        raise ValueError(f"sparsity_tol must be in (0, 1), got {sparsity_tol}")
    if not (math.isfinite(warm_start_factor) and warm_start_factor >= 1):
        raise ValueError(f"warm_start_factor must be a number >= 1, got {warm_start_factor}")
    if int(warm_start_iters) != warm_start_iters or warm_start_iters < 2:
        raise ValueError(f"warm_start_iters must be an integer >= 2, got {warm_start_iters}")
    for name, value in (("sinkhorn_budget", sinkhorn_budget), ("handover_budget", handover_budget)):
        if value is None and name == "sinkhorn_budget":  # by problem size
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value}")
    if handover_error is not None and not (isinstance(handover_error, (int, float)) and 0 < handover_error < math.inf):
        raise ValueError(f"handover_error must be None or a number > 0, got {handover_error!r}")
    if not 0 <= dense_above <= 1:
        raise ValueError(f"dense_above must be in [0, 1] (a share of the plan's entries), got {dense_above}")
    if not 0 < cg_tol < 1:
        raise ValueError(f"cg_tol must be in (0, 1), got {cg_tol}")
    for name, value in (("max_newton", max_newton), ("cg_max_iter", cg_max_iter)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    handover = None if handover_error is None else (float(handover_error), int(handover_budget))
    cost = masked_cost(cost, mask)
    n, m = cost.shape
    sinkhorn_budget = (_default_sinkhorn_budget(n, m, cost.device.type == "cpu") if sinkhorn_budget is None
                       else int(sinkhorn_budget))
    a = _marginal(a, [], n, cost, "a")
    b = _marginal(b, [], m, cost, "b")
    c = cost.detach().double()
    numpy_mode = _numpy_mode(c)
    fast = numpy_mode == "products"  # the dense products through numpy
    cpu = c.device.type == "cpu"  # CG in numpy on a float32 copy of a dense plan, whichever route P's products take
    with torch.no_grad(), contextlib.ExitStack() as newton_context:
        mv = _np_mv if fast else _matvec
        a64, b64 = a.double(), b.double()
        cmin, cmax, forbidden = _cost_range(c)  # (1, 1) each
        domain = _float64_domain(cmin, cmax, eps)
        if warm_start_factor > 1:
            f, g, warm_err, half_steps, p = _warm_start(c, a64, b64, eps, float(warm_start_factor),
                                                        int(warm_start_iters), tol, sinkhorn_budget, cmin, cmax,
                                                        handover)
        else:  # the paper's warm-up at eps (with the budget and handover rules below)
            until = _sinkhorn_while_fast(tol, int(warmup_iters), sinkhorn_budget, handover=handover)
            longest = int(warmup_iters) + _sinkhorn_phase_cap(sinkhorn_budget, handover)
            f, g, warm_err, half_steps, p, domain = _iterate(c, a64, b64, eps, 2 * longest, 1.0, 1.0, tol, domain,
                                                             cmin, True, until=until)
        if p is None:
            p = _stabilized_kernel(c, f, g, eps)
        # Newton steps follow: numpy's products on one BLAS thread, subnormals flushed (entered only then: a solve
        # that stays with Sinkhorn paid ~70 us for them, 7% of one at n = 512, eps = 0.05)
        # Sinkhorn reached tol in the warm-up (its rows within tol, its columns exact): no Newton step, nor its
        # set-up (~40 us, 4% of a solve at n = 512, eps = 0.05)
        newton = not warm_err < tol
        used = half_steps / 2
        stats = {"newton_steps": 0, "damped_steps": 0, "failed_steps": 0, "cg_products": 0,
                 "newton_s": 0.0}  # OTResult.newton (its sinkhorn_iters: the rest of n_iters)
        started = time.perf_counter()
        if newton:
            newton_context.enter_context(_numpy_context(cpu))
            newton_context.enter_context(_flush_subnormals(cpu))
            dense = False
            # the Newton phase's vectors: numpy arrays on a CPU (views, no copies), torch tensors elsewhere
            on_np = cpu and _NEWTON_NUMPY
            xp = _xp(on_np)
            a_, b_, f, g = (x.numpy() if on_np else x for x in (a64, b64, f, g))
            ones_n, ones_m = xp.ones_like(a_), xp.ones_like(b_)
            plan_ = _ScaledPlan(p, mv, cpu, on_np)  # the plan, scaled by each Newton step without a pass over it
            failures = 0  # consecutive Newton steps without ascent
            r_next = None  # the plan's row sums after a Newton step, when its line search gave them
        for _ in range(max_newton if newton else 0):
            # faster than sum(0) over a row-major P; the rows from the last line search's product where it has them
            r, col = plan_.rows(ones_m) if r_next is None else r_next, plan_.cols(ones_n)
            r_next = None
            err = _l1_error(r, a_) + _l1_error(col, b_)
            if err < tol:
                break
            grad_f, grad_g = a_ - r, b_ - col  # ascent direction of L
            r_pos = xp.maximum(r, 1e-300) if on_np else r.clamp_min(1e-300)  # (numpy's clip: 10 us)
            if not dense:  # keep the entries holding at least sparsity_tol/m of their row's mass
                p = plan_.plan()
                keep = p >= _tensor((sparsity_tol / m) * r)[:, None]  # torch's comparison (on two threads)
                kept = _KeptEntries(keep.numpy() if on_np else keep, scipy_csr=on_np)
                # the kept share only grows as the plan converges: once dense, stay dense (exact Hessian)
                dense = kept.count > dense_above * n * m
            schur = None  # CG's product, when CG runs in numpy (a CPU)
            if dense:
                prod_rows, prod_cols = plan_.rows, plan_.cols
                schur_diag = plan_.schur_diagonal(col, r_pos)
                schur = plan_.float32_schur(col, r_pos, eps)
            else:
                prod_rows, prod_cols, schur_diag, schur = kept.hessian(p, col, r_pos, eps)
                del kept

            # M d = grad (Newton ascent step for the concave L) via its Schur complement in d_g, inexact,
            # Jacobi preconditioned; then d_f from the first block row
            # a column whose Schur diagonal vanishes (all its kept mass comes from rows that send it all
            # their kept mass: an isolated block of a near-permutation plan) has a zero row and column in
            # the Schur matrix: the Jacobi preconditioner leaves it out (a pseudo-inverse) rather than
            # dividing by ~0, which sent CG's iterates to inf and the direction to NaN
            inv_diag = xp.where(schur_diag > 1e-12 * col, eps / schur_diag, 0.0)
            rhs, cg_tol_now = grad_g - prod_cols(grad_f / r_pos), min(cg_tol, math.sqrt(err))
            product = schur if schur is not None else _schur_product(col, prod_rows, prod_cols, r_pos, eps)

            def counted(y):
                stats["cg_products"] += 1
                return product(y)

            if schur is not None and not on_np:  # CG in numpy on torch's vectors (a CPU, tests only)
                d_g = torch.from_numpy(_pcg(counted, rhs.numpy(), inv_diag.numpy(), tol=cg_tol_now,
                                            max_iter=cg_max_iter))
            else:
                d_g = _pcg(counted, rhs, inv_diag, tol=cg_tol_now, max_iter=cg_max_iter)
            d_f = (eps * grad_f - prod_rows(d_g)) / r_pos
            # L is invariant along (1, -1): drop that component, which the sparsified Hessian (no longer
            # exactly singular there) can blow up, and which would only push exp(f/eps) out of range
            shift = float(d_f.sum() - d_g.sum()) / (n + m)
            d_f, d_g = d_f - shift, d_g + shift
            slope = float(grad_f @ d_f + grad_g @ d_g)
            lin = float(a_ @ d_f + b_ @ d_g)
            total = float(r.sum())
            reach = float(xp.maximum(abs(d_f).max(), abs(d_g).max())) / eps
            # a trial step that sends any exp(s d / eps) past float64's range gives a non-finite gain and is
            # refused: start the halving at the first step that does not (the same step is accepted, without
            # the ~20 refused trials a direction reaching 1e9 eps took)
            rise = float(xp.maximum(d_f.max(), d_g.max())) / eps
            accepted, step = False, 0.0  # no finite ascent direction (a CG breakdown): no line search
            if math.isfinite(rise) and slope > 0:
                step = 1.0 if rise <= _EXP_MAX else 2.0 ** -math.ceil(math.log2(rise / _EXP_MAX))
            while step > 1e-8:
                # L(f + s d_f, g + s d_g) - L(f, g) = s <d, (a, b)> - eps (x^T P y - 1^T P 1),
                # x = exp(s d_f / eps), y = exp(s d_g / eps); for small steps through expm1 (x = 1 + ex),
                # which keeps the gain exact near convergence
                if step * reach <= 1.0:
                    ex, ey = xp.expm1(step * d_f / eps), xp.expm1(step * d_g / eps)
                    p_ey = plan_.rows(ey)
                    extra = float(ex @ r + ey @ col + ex @ p_ey)
                    x, y, p_y = ex + 1.0, ey + 1.0, r + p_ey
                else:
                    x, y = xp.exp(step * d_f / eps), xp.exp(step * d_g / eps)
                    p_y = plan_.rows(y)
                    extra = float(x @ p_y) - total
                gain = step * lin - eps * extra
                if math.isfinite(gain) and gain >= 1e-4 * step * slope:
                    accepted = True
                    break
                step *= 0.5
            if not accepted:
                # no ascent along Newton's direction (a CG breakdown, or a direction L only falls along, as
                # where a near-permutation plan splits into blocks that exchange mass through ~0 entries):
                # Sinkhorn iterations instead, which always ascend; 1, 2, 4, ... up to 16 after consecutive
                # failures (a failed attempt costs up to cg_max_iter CG products and a line search)
                failures += 1
                stats["failed_steps"] += 1
                out = _scale(plan_.plan(), _tensor(f), _tensor(g), a64, b64, eps, 2 * min(2 ** (failures - 1), 16),
                             1.0, 1.0, tol, True, rebuild=lambda f_, g_: _stabilized_kernel(c, f_, g_, eps))
                if out is None:  # the scalings left float64: keep the plan reached so far
                    break
                f, g, _, half_steps, p = out
                f, g = (f.numpy(), g.numpy()) if on_np else (f, g)
                plan_.reset(p)
                used += half_steps / 2
                continue
            failures = 0
            used += 1
            stats["newton_steps"] += 1
            stats["damped_steps"] += step < 1.0
            f, g = f + step * d_f, g + step * d_g
            if step * reach <= 30.0:  # the new plan is the old one scaled, its rows x * (P y): no product
                plan_.scale(x, y)
                r_next = x * p_y
            else:
                plan_.reset(_stabilized_kernel(c, _tensor(f), _tensor(g), eps))
        if stats["newton_steps"] or stats["failed_steps"]:
            stats["newton_s"] = time.perf_counter() - started
        stats["sinkhorn_iters"] = used - stats["newton_steps"]
        if newton:
            p = plan_.plan()
    f, g = _tensor(f).to(cost.dtype), _tensor(g).to(cost.dtype)
    if cost.requires_grad and torch.is_grad_enabled():  # the envelope gradient flows through the cost
        plan = torch.exp((f[:, None] + g[None, :] - cost) / eps)
    else:  # p is that plan already (float64)
        plan = p.to(cost.dtype)
    with torch.no_grad():
        # row and column sums as matrix-vector products (sum(0) over a row-major plan is ~3x slower; torch.mv
        # by the transpose rather than a vector-matrix product: 16 + 23 us against 79 us at n = 512)
        err = _l1_error(_matvec(plan, torch.ones_like(b)), a) + _l1_error(_matvec(plan.t(), torch.ones_like(a)), b)
    if warn and err > tol:
        warnings.warn(f"sinkhorn_newton_sparse did not converge: marginal error {err:.3e} > tol {tol:.1e} "
                      f"after {used:g} iterations (eps={eps:g})", SinkhornNotConvergedWarning, stacklevel=2)
    return OTResult(plan=plan, f=f, g=g, cost=cost, eps=eps, a=a, b=b, uot_lambda1=None, uot_lambda2=None,
                    marginal_error=err, n_iters=used, domain=domain, grad="implicit", forbidden=forbidden,
                    newton=stats)


class _ScaledPlan:
    """SNS's plan as ``diag(u) P0 diag(v)``: a Newton step scales the plan by exp(s d_f / eps) and
    exp(s d_g / eps), which here only multiplies u and v; the products take the scalings on their vectors
    (``P y = u * (P0 (v * y))``). P0 absorbs them (two passes) only when they leave exp(+-30), when the plan
    itself is wanted, or when a new P0 replaces it. Per P0, not per step, are also made P0 * P0 (for the
    Schur complement's diagonal) and, on a CPU, P0's float32 copy for CG's products (one buffer each).
    Scaling P in place took two passes a step, and P * P and the copy one each: at n = 1024 these were a
    third of a solve's time (cProfile, clouds at eps 0.002).
    """

    LIMIT = math.exp(30.0)

    def __init__(self, p: Tensor, mv, cpu: bool, on_np: bool = False):
        """``mv``: P's product by a torch vector; ``on_np``: the vectors in and out are numpy arrays (the
        products still by ``mv``, through zero-copy views)."""
        self.cpu, self.torch_mv = cpu, mv
        self.mv = (lambda mat, vec: mv(mat, torch.from_numpy(vec)).numpy()) if on_np else mv
        self._square = self._low = None  # buffers
        self._version = 0  # bumped whenever P0 changes
        self.reset(p)

    def reset(self, p: Tensor) -> None:
        self.p, self.u, self.v = p, None, None  # None: ones
        self._square_of = self._low_of = None  # the version of P0 each buffer holds
        self._version += 1

    def plan(self) -> Tensor:
        if self.u is not None:
            self.p.mul_(_tensor(self.u)[:, None]).mul_(_tensor(self.v)[None, :])
            self.u = self.v = None
            self._version += 1
        return self.p

    def scale(self, x, y) -> None:
        self.u = x if self.u is None else self.u * x
        self.v = y if self.v is None else self.v * y
        ends = [float(t.max()) for t in (self.u, self.v)]
        ends += [1.0 / low if low > 0 else math.inf for low in (float(t.min()) for t in (self.u, self.v))]
        if not all(end <= self.LIMIT for end in ends):  # (a NaN too)
            self.plan()

    def rows(self, y):  # P y
        if self.u is None:
            return self.mv(self.p, y)
        return self.u * self.mv(self.p, self.v * y)

    def cols(self, x):  # P^T x
        if self.u is None:
            return self.mv(self.p.t(), x)
        return self.v * self.mv(self.p.t(), self.u * x)

    def schur_diagonal(self, col, r):
        """diag(col) - diag(P^T diag(1/r) P) = col - v^2 (P0 * P0)^T (u^2 / r), in float64."""
        if self._square_of != self._version:
            self._square = torch.mul(self.p, self.p, out=self._square)
            self._square_of = self._version
        if self.u is None:
            return col - self.mv(self._square.t(), 1.0 / r)
        return col - self.v * self.v * self.mv(self._square.t(), self.u * self.u / r)

    def float32_schur(self, col, r, eps: float):
        """The Schur product ``y -> (diag(col) - P^T diag(1/r) P) y / eps`` for CG on a CPU: float64 numpy
        vectors, the two products by P0's float32 copy (CG solves to a relative 1e-2-1e-3, float32 is exact to
        1e-7; the products cost a half to a quarter of float64's), or None (not a CPU, or an entry of P0 or of
        u^2 / r past float32's range; an entry is at most its row's sum). The copy's entries below
        ``_F32_FLOOR`` (1e-20) are 0. Only CG's Hessian is the copy's (the gradient, the line search and the
        plan stay float64), and such an entry holds no share of its row's mass that float32 could carry.
        Then no operand of the products, and no product but by a vector entry below 1e-18, is subnormal, and
        the products run on torch's threads: a subnormal operand or result takes a microcode assist on an
        Intel Xeon unless the thread flushes them, and only this thread does (:func:`_flush_subnormals`;
        torch's other intra-op thread keeps its setting). Measured there (n = 1024, a clouds plan at
        eps 0.001, 28% of its float32 entries subnormal, 55% below 1e-20): a pair of products 283 us by
        numpy's one flushed thread, 1,830 us by torch's two threads, 127 us by torch's two threads on the
        floored copy (equal at n = 512, 2.1x faster at 2048). ``benchmarks.sns --against 9f328ca``: the
        same iterations and errors on all 16 problems, 0.70-0.83x the time on digits, 0.87-0.95x on clouds
        at n = 1024, 0.94-0.99x at n = 512. A floor of 1e-30 left products by vector entries below 1e-8
        subnormal: 1.1-1.16x slower at n = 512, eps <= 0.002. Before, numpy's one thread (flushed) was the
        faster route on this copy (torch's took 1.9-3.7x the time, 1.2-1.9x with entries below 1e-38
        zeroed). Normalising P0's rows first (to keep them normal) cost 1.04-1.18x the solve time (AMD)."""
        import numpy as np

        if not self.cpu:
            return None
        if self._low_of != self._version:
            row_sums = self.torch_mv(self.p, torch.ones(self.p.shape[1], dtype=self.p.dtype))
            if not float(row_sums.max()) < 1e30:
                return None
            self._low = self._low.copy_(self.p) if self._low is not None else self.p.to(torch.float32)
            torch.threshold_(self._low, _F32_FLOOR, 0.0)  # no subnormal operand, nor (but for |y| < 1e-18) result
            self._low_of = self._version
        p32, col_ = self._low, _array(col)
        v = _array(self.v) if self.v is not None else None
        w = _array((self.u * self.u / r) if self.u is not None else 1.0 / r).astype(np.float32)
        if not np.isfinite(w).all():  # a row of ~0 mass (1/r past float32's range): float64 products
            return None
        w_ = torch.from_numpy(w)

        def schur(y):
            yy = torch.from_numpy((v * y if v is not None else y).astype(np.float32))
            back = torch.mv(p32.t(), torch.mv(p32, yy).mul_(w_)).numpy().astype(np.float64)
            return (col_ * y - (v * back if v is not None else back)) / eps

        return schur


def _float64_domain(cmin: Tensor, cmax: Tensor, eps: float) -> str:
    """SNS's Sinkhorn domain (float64): the kernel while its range fits, else the stabilised kernel."""
    return "kernel" if float((cmax - cmin) / eps) <= _kernel_limit(torch.float64) else "stabilized"


def _warm_start(c: Tensor, a: Tensor, b: Tensor, eps: float, factor: float, iters: int, tol: float, budget: int,
                cmin: Tensor, cmax: Tensor, handover=None):
    """SNS's start: ``iters`` Sinkhorn iterations at ``factor * eps``, whose potentials are a smoother, better
    centred start for Newton at eps than Sinkhorn's own first iterations at eps (which leave the columns exact
    and the rows far off). Sinkhorn's iterations to ``tol`` grow about like 1/eps, so the rate of the last of
    those iterations predicts Sinkhorn's at eps: ``factor`` times the iterations that rate needs to ``tol``. Where that
    is at most ``budget``, Sinkhorn goes on at eps (with :func:`_sinkhorn_while_fast`, which still hands over to
    Newton if the rate slows, as on near-permutation plans); otherwise Newton starts at once.
    Returns f, g, the L1 error reached (inf when Newton starts at once), the half-updates used and the plan at
    eps (or None)."""
    warm_eps = eps * factor
    domain = _float64_domain(cmin, cmax, warm_eps)
    errs: List[float] = []  # after each iteration but the last (read before each row update)

    def record(err: float) -> bool:  # never stops the iterations
        errs.append(err)
        return False

    f, g, _, half_steps, p, domain = _iterate(c, a, b, warm_eps, 2 * iters, 1.0, 1.0, 0.0, domain, cmin, True,
                                              until=record)
    if p is not None and domain in ("kernel", "stabilized"):  # the plan at warm_eps: its rows' error, one product
        errs.append(_l1_error(_matvec(p, torch.ones_like(b)), a))
    rate = errs[-1] / errs[-2] if len(errs) > 1 and errs[-2] > 0 else 1.0  # the last one: the error can fall
    # fast at first and slowly later (digits)
    if 0.0 < rate < 1.0:
        predicted = factor * max(math.log(errs[-1] / tol), 0.0) / -math.log(rate)
    else:
        predicted = 0.0 if rate == 0.0 else math.inf
    p = _stabilized_kernel(c, f, g, eps)
    if predicted > budget:
        return f, g, math.inf, half_steps, p
    out = _scale(p, f, g, a, b, eps, 2 * _sinkhorn_phase_cap(budget, handover), 1.0, 1.0, tol, True,
                 rebuild=lambda f_, g_: _stabilized_kernel(c, f_, g_, eps),
                 until=_sinkhorn_while_fast(tol, 1, budget, handover=handover))
    if out is None:  # the scalings left float64: Newton from the warm start (p untouched: _scale only scales
        return f, g, math.inf, half_steps, p  # the kernel in place once it has succeeded)
    f, g, err, more, p = out
    return f, g, err, half_steps + more, p


def _default_sinkhorn_budget(n: int, m: int, cpu: bool) -> int:
    """SNS's default ``sinkhorn_budget``: the Sinkhorn iterations that cost what ~4-5 Newton steps do.

    On a CPU a Newton step costs about as many Sinkhorn iterations as 6,000 / n (11-15 at n = 512, 6-7 at
    n = 1024, ``benchmarks.sns --part steps``): its fixed work (~60 small vector ops, the sparsification,
    CG's set-up) weighs less beside the n x m products as n grows. So the budget is 60 up to
    sqrt(n m) = 512 and 60 * 512 / sqrt(n m) above, but not below 30: at n = 2048, eps = 0.02 (Sinkhorn's
    21 iterations) a budget of 15 sent SNS to Newton at 0.76x Sinkhorn's time (its plan is dense there and
    its steps cost more). Measured (Intel Xeon, 2-D clouds, alternating runs, ad hoc): at n = 1024-2048,
    eps = 0.01, 30 takes 12-13 iterations in 1.10-1.20x less time than Sinkhorn's 41-42, where 60 stayed
    with Sinkhorn (0.97-1.05x); at eps 0.007 1.30x against 0.99x; the same iterations and time (within
    noise) at eps 0.015-0.05, at n = 768 (40) and on digits (n = 784: 39). Elsewhere (a GPU, where
    Newton's many small ops cost launches and Sinkhorn's products little) 60, as before.
    """
    if not cpu:
        return 60
    return max(30, min(60, round(60 * 512 / math.sqrt(n * m))))


def _sinkhorn_phase_cap(budget: int, handover: Optional[Tuple[float, int]]) -> int:
    """The most Sinkhorn iterations, beyond the warm-up, that :func:`_sinkhorn_while_fast` is let run before
    Newton: the handover's reach plus four budgets (the rate can keep predicting ``tol`` within the budget)."""
    return (handover[1] if handover else 0) + 4 * budget


def _sinkhorn_while_fast(tol: float, warmup: int, budget: int, window: int = 3,
                         handover: Optional[Tuple[float, int]] = None):
    """A stopping rule for Sinkhorn before Newton: False (go on) during the first ``warmup`` iterations, while
    the error's rate over the last ``window`` iterations predicts reaching ``tol`` within ``budget`` more
    iterations, and (``handover = (error, reach)``) while the error is above ``error`` and the rate predicts
    reaching it within ``reach`` more; True (stop: hand over to Newton) otherwise, or once the error stops
    falling. ``budget = 0`` stops right after the warm-up (the paper's fixed warm-up), whatever ``handover``."""
    errs: List[float] = []

    def stop(err: float) -> bool:
        errs.append(err)
        if len(errs) < warmup:
            return False
        if budget == 0:
            return True
        if len(errs) <= window:
            return False
        rate = (err / errs[-1 - window]) ** (1.0 / window) if errs[-1 - window] > 0 else 0.0
        if not rate < 1.0:
            return True
        if rate == 0.0:
            return False
        if handover is not None and err > handover[0] and math.log(err / handover[0]) / -math.log(rate) <= handover[1]:
            return False  # Sinkhorn brings the error down to where Newton converges in a few steps
        return math.log(err / tol) / -math.log(rate) > budget

    return stop


_F32_FLOOR = 1e-20  # SNS's float32 copy of its plan: entries below this are 0 (see _ScaledPlan.float32_schur)
_NEWTON_NUMPY = True  # on a CPU, SNS's Newton phase in numpy and scipy (tests set False to check torch's path)


def _xp(on_np: bool):
    """The array module of SNS's Newton phase: numpy (on a CPU) or torch; the names it uses (ones_like, where,
    maximum of two arrays, exp, expm1) mean the same in both."""
    if on_np:
        import numpy

        return numpy
    return torch


def _tensor(x) -> Tensor:
    """A torch tensor from a numpy array (a zero-copy view) or a tensor."""
    return x if isinstance(x, Tensor) else torch.from_numpy(x)


def _array(x):
    """A numpy array from a CPU tensor (a zero-copy view) or an array."""
    return x.numpy() if isinstance(x, Tensor) else x


class _KeptEntries:
    """The entries of SNS's plan kept in the sparsified Hessian (``keep``, a boolean n x m mask) and the
    Newton system built from them. On a CPU (``scipy_csr``) P_s is a scipy CSR matrix, P_s^T its CSC view
    (no conversion), the Schur diagonal one ``bincount``, and CG runs in numpy. Near-permutation cosine plan,
    n = 512, 1,360 kept entries: a Schur product (two sparse products and the vector ops) 8.5 us against 19 us
    with torch's CSR tensors, the pair and the diagonal 49 us to build against 195 us (torch's transpose needs
    an argsort; scipy's ``tocsr`` and ``multiply`` had taken 105 us). Elsewhere (a GPU) torch's CSR tensors."""

    def __init__(self, keep, scipy_csr: bool):
        self.keep, self.scipy_csr = keep, scipy_csr  # scipy_csr: keep, and the vectors, are numpy's
        if scipy_csr:  # the count alone decides dense or sparse: the indices only when sparse (a dense plan's
            import numpy as np  # ~1e5 indices took ~200 us to list at n = 512)

            self.count = int(np.count_nonzero(keep))
        else:
            self.rows_nnz = keep.sum(1, dtype=torch.int64)
            self.count = int(self.rows_nnz.sum())

    def hessian(self, p: Tensor, col, r, eps: float):
        """(P_s y, P_s^T x, the Schur complement's diagonal col - P_s^T∘P_s^T (1/r), and the Schur product
        y -> (col y - P_s^T (P_s y / r)) / eps in numpy or None) for the kept entries of ``p``; col, r and
        the vectors numpy arrays with ``scipy_csr``, torch tensors otherwise."""
        if not self.scipy_csr:
            off, off_t = _csr_pair(p, self.keep, self.rows_nnz)
            sq_t = _csr(off_t.crow_indices(), off_t.col_indices(), off_t.values() ** 2, off_t.shape)
            return off.__matmul__, off_t.__matmul__, col - sq_t @ (1.0 / r), None
        import numpy as np
        import scipy.sparse

        n, m = p.shape
        flat = np.flatnonzero(self.keep)  # row-major order
        indptr = np.searchsorted(flat, np.arange(n + 1, dtype=np.int64) * m)  # row starts
        values, cols = p.numpy().ravel()[flat], flat % m
        off = scipy.sparse.csr_matrix((values, cols, indptr), shape=(n, m), copy=False)
        rows_mv, cols_mv = off.__matmul__, off.T.__matmul__  # off.T: CSC, no conversion, products as CSR's
        schur_diag = col - np.bincount(cols, weights=values * values / r[flat // m], minlength=m)
        return rows_mv, cols_mv, schur_diag, _schur_product(col, rows_mv, cols_mv, r, eps)


def _schur_product(col, rows, cols, r, eps: float):
    """``y -> (diag(col) - P^T diag(1/r) P) y / eps`` from ``rows(y) = P y`` and ``cols(x) = P^T x``: SNS's
    Newton system with d_f eliminated, for torch tensors or numpy arrays alike (the dense CPU path's float32
    version is :meth:`_ScaledPlan.float32_schur`)."""
    return lambda y: (col * y - cols(rows(y) / r)) / eps


def _csr_pair(p: Tensor, keep: Tensor, rows_nnz: Tensor):
    """The kept entries of ``p`` as CSR matrices of P_s and P_s^T (torch's CSC products are ~40x slower
    than CSR ones on CPU, and ``to_sparse_csr`` of a transposed view is slow, so both are built here)."""
    n, m = p.shape
    row, col = keep.nonzero().unbind(1)  # row-major order
    vals = p[row, col]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=p.device)
    torch.cumsum(rows_nnz, 0, out=crow[1:])
    order = torch.argsort(col * n + row)  # column-major order = row-major order of the transpose
    crow_t = torch.zeros(m + 1, dtype=torch.int64, device=p.device)
    torch.cumsum(torch.bincount(col, minlength=m), 0, out=crow_t[1:])
    return _csr(crow, col, vals, (n, m)), _csr(crow_t, row[order], vals[order], (m, n))


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def _pcg(matvec, b, inv_d, *, tol: float, max_iter: int):
    """Conjugate gradients for the PSD system ``matvec(x) = b`` from x = 0, preconditioned by the diagonal
    matrix whose inverse is ``inv_d`` (zeros leave those coordinates out); stops when the preconditioned
    residual norm fell by ``tol``. For torch tensors or numpy arrays alike."""
    torch_ = isinstance(b, Tensor)
    x = b * 0.0
    r = b * 1.0
    z = r * inv_d
    p = z
    rz = float(r @ z)
    stop = tol * tol * max(rz, 1e-300)
    for _ in range(max_iter):
        if rz <= stop:
            break
        q = matvec(p)
        denom = float(p @ q)
        if denom <= 0:
            break
        alpha = rz / denom
        if torch_:  # fused, without a temporary (CSR solves on near-permutation plans run thousands of these)
            x.add_(p, alpha=alpha)
            r.sub_(q, alpha=alpha)
        else:
            x += alpha * p
            r -= alpha * q
        z = r * inv_d
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x
