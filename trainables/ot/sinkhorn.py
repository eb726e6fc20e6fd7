"""Sinkhorn's algorithm: balanced, unbalanced (KL) and semi-relaxed entropic OT, in the kernel, stabilised,
float64-kernel or log domain, with unrolled or implicit gradients."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import backend
from .problem import (OTResult, SinkhornNotConvergedWarning, _check_lambda, _cost_range, _fi, _kernel_limit,
                      _marginal, masked_cost)
from .scaling import _scaling_loop
from .unrolled import _UnrolledScaling


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
    ot_grad: str = "unrolled",
    warn: bool = True,
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
        ot_grad: ``"unrolled"`` | ``"implicit"`` (see module docstring).
        warn: emit the non-convergence warning when ``tol`` is not reached.

    Returns:
        :class:`OTResult` with the plan, potentials and diagnostics.

    (Over 80 lines for this docstring, which states every argument; the code is ~55 lines, its checks and
    steps in helpers.)
    """
    eps = float(eps)
    n_half = _updates(cost, eps, n_iters, n_projections, tol, domain, ot_grad)
    lam1 = _check_lambda("uot_lambda1", uot_lambda1)
    lam2 = _check_lambda("uot_lambda2", uot_lambda2)

    cost = masked_cost(cost, mask)
    *batch, n, m = cost.shape
    a = _marginal(a, batch, n, cost, "a")
    b = _marginal(b, batch, m, cost, "b")
    cmin, cmax, forbidden = _cost_range(cost)
    fi1, fi2 = _fi(lam1, eps), _fi(lam2, eps)
    if domain == "auto":
        domain = _auto_domain(cost, cmin, cmax, eps, fi1, ot_grad)

    balanced_rows = fi1 == 1.0
    if ot_grad == "implicit":
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
        err = _hard_marginal_error(plan, a, b, columns=fi2 == 1.0)
    if tol is not None and warn and err > tol:
        warnings.warn(
            f"sinkhorn did not converge: marginal error {err:.3e} > tol {tol:.1e} after "
            f"{used / 2:g} iterations (eps={eps:g}, {domain} domain)",
            SinkhornNotConvergedWarning,
            stacklevel=2,
        )
    return OTResult(plan=plan, f=f, g=g, cost=cost, eps=eps, a=a, b=b, uot_lambda1=lam1,
                    uot_lambda2=lam2, marginal_error=err, n_iters=used / 2, domain=domain,
                    ot_grad=ot_grad, forbidden=forbidden)


def _updates(cost, eps: float, n_iters, n_projections, tol, domain: str, ot_grad: str) -> int:
    """The arguments of :func:`sinkhorn` at the boundary (a ValueError naming the first out of range), and the
    number of single (row or column) updates they ask for."""
    if not isinstance(cost, Tensor) or cost.dim() < 2:
        raise ValueError("cost must be a tensor of shape (..., n, m)")
    if not cost.is_floating_point():
        raise ValueError(f"cost must be floating point, got dtype {cost.dtype}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if (n_iters is None) == (n_projections is None):
        raise ValueError("give exactly one of n_iters (full iterations) or n_projections")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if domain not in ("auto", "kernel", "kernel64", "stabilized", "log"):
        raise ValueError(f"domain must be 'auto', 'kernel', 'kernel64', 'stabilized' or 'log', got {domain!r}")
    if ot_grad not in ("unrolled", "implicit"):
        raise ValueError(f"ot_grad must be 'unrolled' or 'implicit', got {ot_grad!r}")
    if n_iters is not None:
        if int(n_iters) != n_iters or n_iters < 1:
            raise ValueError(f"n_iters must be an integer >= 1, got {n_iters}")
        return 2 * int(n_iters)
    if int(n_projections) != n_projections or n_projections < 1:
        raise ValueError(f"n_projections must be an integer >= 1, got {n_projections}")
    return int(n_projections)


def _auto_domain(cost: Tensor, cmin: Tensor, cmax: Tensor, eps: float, fi1: float, ot_grad: str) -> str:
    """The domain ``"auto"`` picks: the kernel while its range fits the dtype, else the stabilised kernel, or under
    an unrolled gradient (and for half precision) float64 products on the row-shifted kernel."""
    need = float(((cmax - cmin) / eps).max())
    if fi1 != 1.0:  # the unbalanced row update's offset
        need = max(need, float(((1.0 - fi1) * cmin.abs() / eps).max()))
    unrolled = ot_grad == "unrolled" and cost.requires_grad and torch.is_grad_enabled()
    if need <= _kernel_limit(cost.dtype):
        return "kernel"
    if cost.dtype in (torch.float32, torch.float64) and not unrolled:
        # the kernel exp(-C/eps) would under/overflow: absorb the potentials into it instead, which keeps
        # matrix-vector updates in the cost's dtype (2-3x faster than float64 products, and 5-10x faster than
        # log-sum-exp updates, on this CPU; benchmarks/ot_solvers.py). Not under an unrolled gradient: the backward
        # of u = a / (K v) divides by (K v)^2, which underflows for the tiny column sums a stabilised kernel can
        # have before its first absorption (non-finite gradients measured at eps = 1e-3, n = 1024 in float32)
        return "stabilized"
    # float64 products on the kernel shifted by each row's smallest cost (their backward has float64's range);
    # the log domain only if even they leave it (checked as they run)
    return "kernel64"


def _hard_marginal_error(plan: Tensor, a: Tensor, b: Tensor, *, columns: bool) -> float:
    """L1 distance of the plan's row sums (and column sums, with ``columns``) to a (and b), max over the batch;
    the sums as matrix-vector products (sum(-2) over a row-major plan is ~3x slower)."""
    with torch.no_grad():
        rows = backend.matvec(plan, torch.ones_like(b))
        cols = backend.matvec(plan.transpose(-1, -2), torch.ones_like(a)) if columns else None
        if plan.dim() == 2:
            return backend.l1_error(rows, a) + (backend.l1_error(cols, b) if cols is not None else 0.0)
        err_t = torch.linalg.vector_norm(rows - a, 1, -1)
        if cols is not None:
            err_t = err_t + torch.linalg.vector_norm(cols - b, 1, -1)
        return float(err_t.max())


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


