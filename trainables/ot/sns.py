"""Sinkhorn-Newton-Sparse (Tang et al., ICLR 2024): Sinkhorn's warm-up, then Newton steps on the dual with a
sparsified Hessian, for a converged balanced plan."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backend
from .problem import OTResult, SinkhornNotConvergedWarning, _check_eps, _cost_range, _kernel_limit, _marginal, masked_cost
from .sinkhorn import _iterate, _scale, _stabilized_kernel
from .sns_linalg import _KeptEntries, _ScaledPlan, _pcg, _schur_product, _tensor, _xp


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

    Stage 1: Sinkhorn iterations (kernel domain where the kernel's range fits float64, stabilised kernel
    otherwise). Stage 2: Newton steps on the concave dual (Lyapunov) potential
    :math:`L(f,g) = \langle f,a\rangle + \langle g,b\rangle - \varepsilon\sum_{ij} e^{(f_i+g_j-C_{ij})/\varepsilon}`,
    whose negative Hessian is
    :math:`\frac1\varepsilon\begin{pmatrix}\mathrm{diag}(P1) & P\\ P^\top & \mathrm{diag}(P^\top 1)\end{pmatrix}`,
    with the off-diagonal blocks sparsified (the diagonal blocks stay exact, so the matrix stays positive
    semi-definite), the Newton system solved by conjugate gradients and the step chosen by a backtracking
    (Armijo) line search on L. Stops when the L1 marginal error is below ``tol``. All of it in float64; the
    plan is returned in the cost's dtype.

    Where this departs from the paper (docs/methods.md has the measurements behind each):

    * sparsification per row: each row keeps every entry holding at least ``sparsity_tol / m`` of its mass
      (the paper: the largest entries overall at a fixed density), in CSR while the kept entries are at most
      ``dense_above`` of the plan, the exact plan above that;
    * the Newton system through its Schur complement in d_g, by Jacobi-preconditioned CG to a relative
      ``min(cg_tol, sqrt(err))`` (inexact Newton), columns whose Schur diagonal vanishes left out of the
      preconditioner;
    * the line search by one product with the current plan, and the plan kept as diag(u) P0 diag(v)
      (:class:`_ScaledPlan`) so that a step only rescales it;
    * the warm-up: at least ``warmup_iters``, then Sinkhorn goes on while its own rate predicts ``tol`` within
      ``sinkhorn_budget`` more iterations (``sinkhorn_budget=0``: the paper's fixed warm-up), and while its
      error is above ``handover_error`` and its rate predicts reaching that within ``handover_budget`` more;
      ``warm_start_factor`` > 1 starts from ``warm_start_iters`` iterations at ``warm_start_factor * eps``;
    * a Newton direction without ascent is not taken: 1, 2, 4, ... up to 16 Sinkhorn iterations instead.

    Gradients: the potentials are detached (envelope theorem, as ``ot_grad="implicit"`` in :func:`sinkhorn`).

    Args:
        cost: (n, m), +inf (or ``mask=False``) for forbidden pairs.
        eps: entropic regularisation.  tol: target L1 marginal error.  a, b: marginals (default uniform).
        sinkhorn_budget: None: by problem size (:func:`_default_sinkhorn_budget`).
        max_newton: the most Newton steps.  cg_max_iter: the most CG products a step.
    Returns:
        :class:`OTResult`; ``n_iters`` counts Sinkhorn iterations plus Newton steps, and ``newton`` says where
        they and the time went.

    (Over 80 lines for this docstring, the algorithm and its departures; the code is ~60 lines, its stages in
    helpers.)
    """
    _check_arguments(cost, eps, tol, warmup_iters, sparsity_tol, warm_start_factor, warm_start_iters,
                     sinkhorn_budget, handover_budget, handover_error, dense_above, cg_tol, max_newton, cg_max_iter)
    eps = float(eps)
    handover = None if handover_error is None else (float(handover_error), int(handover_budget))
    cost = masked_cost(cost, mask)
    n, m = cost.shape
    budget = _default_sinkhorn_budget(n, m, cost.device.type == "cpu") if sinkhorn_budget is None \
        else int(sinkhorn_budget)
    a = _marginal(a, [], n, cost, "a")
    b = _marginal(b, [], m, cost, "b")
    c = cost.detach().double()
    cpu = c.device.type == "cpu"  # CG in numpy on a float32 copy of a dense plan, whichever route P's products take
    stats = {"newton_steps": 0, "damped_steps": 0, "failed_steps": 0, "cg_products": 0,
             "newton_s": 0.0}  # OTResult.newton (its sinkhorn_iters: the rest of n_iters)
    with torch.no_grad():
        a64, b64 = a.double(), b.double()
        cmin, cmax, forbidden = _cost_range(c)  # (1, 1) each
        domain = _float64_domain(cmin, cmax, eps)
        if warm_start_factor > 1:
            f, g, warm_err, half_steps, p = _warm_start(c, a64, b64, eps, float(warm_start_factor),
                                                        int(warm_start_iters), tol, budget, cmin, cmax, handover)
        else:  # the paper's warm-up at eps (with the budget and handover rules)
            until = _sinkhorn_while_fast(tol, int(warmup_iters), budget, handover=handover)
            longest = int(warmup_iters) + _sinkhorn_phase_cap(budget, handover)
            f, g, warm_err, half_steps, p, domain = _iterate(c, a64, b64, eps, 2 * longest, 1.0, 1.0, tol, domain,
                                                             cmin, True, until=until)
        if p is None:
            p = _stabilized_kernel(c, f, g, eps)
        used = half_steps / 2
        if not warm_err < tol:  # Newton steps follow (a solve that Sinkhorn finished pays for none of their set-up)
            options = _NewtonOptions(int(max_newton), float(sparsity_tol), float(dense_above), float(cg_tol),
                                     int(cg_max_iter))
            # numpy's products on one BLAS thread and subnormals flushed, for the Newton phase only (a solve that
            # stays with Sinkhorn paid ~70 us for entering them, 7% of one at n = 512, eps = 0.05)
            with backend.numpy_context(cpu), backend.flush_subnormals(cpu):
                f, g, p, used = _newton_phase(c, a64, b64, f, g, p, eps, tol, used, stats, options)
        stats["sinkhorn_iters"] = used - stats["newton_steps"]
    return _result(cost, a, b, _tensor(f), _tensor(g), p, eps, tol, used, domain, forbidden, stats, warn)


def _result(cost: Tensor, a: Tensor, b: Tensor, f: Tensor, g: Tensor, p: Tensor, eps: float, tol: float, used: float,
            domain: str, forbidden: bool, stats: dict, warn: bool) -> OTResult:
    """SNS's :class:`OTResult` in the cost's dtype, its plan in the graph where the cost has one (the envelope
    gradient), its marginal error measured on that plan; the non-convergence warning where it is above tol."""
    f, g = f.to(cost.dtype), g.to(cost.dtype)
    if cost.requires_grad and torch.is_grad_enabled():  # the envelope gradient flows through the cost
        plan = torch.exp((f[:, None] + g[None, :] - cost) / eps)
    else:  # p is that plan already (float64)
        plan = p.to(cost.dtype)
    with torch.no_grad():
        # row and column sums as matrix-vector products (sum(0) over a row-major plan is ~3x slower; torch.mv
        # by the transpose rather than a vector-matrix product: 16 + 23 us against 79 us at n = 512)
        err = backend.l1_error(backend.matvec(plan, torch.ones_like(b)), a) \
            + backend.l1_error(backend.matvec(plan.t(), torch.ones_like(a)), b)
    if warn and err > tol:
        warnings.warn(f"sinkhorn_newton_sparse did not converge: marginal error {err:.3e} > tol {tol:.1e} "
                      f"after {used:g} iterations (eps={eps:g})", SinkhornNotConvergedWarning, stacklevel=3)
    return OTResult(plan=plan, f=f, g=g, cost=cost, eps=eps, a=a, b=b, uot_lambda1=None, uot_lambda2=None,
                    marginal_error=err, n_iters=used, domain=domain, ot_grad="implicit", forbidden=forbidden,
                    newton=stats)


def _check_arguments(cost, eps, tol, warmup_iters, sparsity_tol, warm_start_factor, warm_start_iters,
                     sinkhorn_budget, handover_budget, handover_error, dense_above, cg_tol, max_newton,
                     cg_max_iter) -> None:
    """SNS's arguments at the boundary: a ValueError naming the first that is out of range."""
    if not isinstance(cost, Tensor) or cost.dim() != 2:
        raise ValueError("sinkhorn_newton_sparse solves one (n, m) problem; got shape "
                         f"{tuple(getattr(cost, 'shape', ()))}")
    if not cost.is_floating_point():
        raise ValueError(f"cost must be floating point, got dtype {cost.dtype}")
    _check_eps(eps)
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


@dataclass(frozen=True)
class _NewtonOptions:
    max_newton: int
    sparsity_tol: float
    dense_above: float
    cg_tol: float
    cg_max_iter: int


def _newton_phase(c: Tensor, a64: Tensor, b64: Tensor, f, g, p: Tensor, eps: float, tol: float, used: float,
                  stats: dict, opt: _NewtonOptions):
    """Newton steps from the warm-up's potentials and plan until the L1 marginal error is below ``tol`` (or
    ``opt.max_newton`` steps): (f, g, the plan, the iterations used in all). ``stats`` counts the steps, the
    damped and the refused ones, CG's products and the phase's seconds. On a CPU the phase's vectors are numpy
    arrays (zero-copy views; torch's ops on short vectors cost several times numpy's), elsewhere tensors."""
    started = time.perf_counter()
    n, m = c.shape
    on_np = c.device.type == "cpu" and backend.NEWTON_NUMPY
    xp = _xp(on_np)
    mv = backend.np_mv if backend.numpy_mode(c) == "products" else backend.matvec
    a_, b_, f, g = (x.numpy() if on_np else x for x in (a64, b64, f, g))
    ones_n, ones_m = xp.ones_like(a_), xp.ones_like(b_)
    plan_ = _ScaledPlan(p, mv, c.device.type == "cpu", on_np)  # scaled by each step without a pass over it
    dense = False  # the kept share only grows as the plan converges: once dense, stay dense (exact Hessian)
    failures = 0  # consecutive Newton steps without ascent
    r_next = None  # the plan's row sums after a Newton step, when its line search gave them
    for _ in range(opt.max_newton):
        # faster than sum(0) over a row-major P; the rows from the last line search's product where it has them
        r, col = plan_.rows(ones_m) if r_next is None else r_next, plan_.cols(ones_n)
        r_next = None
        err = backend.l1_error(r, a_) + backend.l1_error(col, b_)
        if err < tol:
            break
        grad_f, grad_g = a_ - r, b_ - col  # ascent direction of L
        r_pos = xp.maximum(r, 1e-300) if on_np else r.clamp_min(1e-300)  # (numpy's clip: 10 us)
        d_f, d_g, dense = _newton_direction(plan_, dense, r, col, r_pos, grad_f, grad_g, err, eps, xp, on_np, stats,
                                            opt)
        accepted, step, x, y, p_y = _line_search(plan_, r, col, d_f, d_g, grad_f, grad_g, a_, b_, eps, xp)
        if not accepted:
            # no ascent along Newton's direction (a CG breakdown, or a direction L only falls along, as where a
            # near-permutation plan splits into blocks that exchange mass through ~0 entries): Sinkhorn iterations
            # instead, which always ascend; 1, 2, 4, ... up to 16 after consecutive failures
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
        reach = float(xp.maximum(abs(d_f).max(), abs(d_g).max())) / eps
        if step * reach <= 30.0:  # the new plan is the old one scaled, its rows x * (P y): no product
            plan_.scale(x, y)
            r_next = x * p_y
        else:
            plan_.reset(_stabilized_kernel(c, _tensor(f), _tensor(g), eps))
    if stats["newton_steps"] or stats["failed_steps"]:
        stats["newton_s"] = time.perf_counter() - started
    return f, g, plan_.plan(), used


def _newton_direction(plan_: _ScaledPlan, dense: bool, r, col, r_pos, grad_f, grad_g, err: float, eps: float, xp,
                      on_np: bool, stats: dict, opt: _NewtonOptions):
    """(d_f, d_g, dense): the Newton ascent direction of L with the sparsified (or, once ``dense``, the exact)
    Hessian, through its Schur complement in d_g, by Jacobi-preconditioned CG to ``min(cg_tol, sqrt(err))``."""
    n, m = len(r), len(col)
    if not dense:  # keep the entries holding at least sparsity_tol/m of their row's mass
        p = plan_.plan()
        keep = p >= _tensor((opt.sparsity_tol / m) * r)[:, None]  # torch's comparison (on two threads)
        kept = _KeptEntries(keep.numpy() if on_np else keep, scipy_csr=on_np)
        dense = kept.count > opt.dense_above * n * m
    schur = None  # CG's product, when CG runs in numpy (a CPU)
    if dense:
        prod_rows, prod_cols = plan_.rows, plan_.cols
        schur_diag = plan_.schur_diagonal(col, r_pos)
        schur = plan_.float32_schur(col, r_pos, eps)
    else:
        prod_rows, prod_cols, schur_diag, schur = kept.hessian(p, col, r_pos, eps)
    # a column whose Schur diagonal vanishes (all its kept mass comes from rows that send it all their kept mass:
    # an isolated block of a near-permutation plan) has a zero row and column in the Schur matrix: the Jacobi
    # preconditioner leaves it out (a pseudo-inverse) rather than dividing by ~0, which sent CG's iterates to inf
    inv_diag = xp.where(schur_diag > 1e-12 * col, eps / schur_diag, 0.0)
    rhs, cg_tol_now = grad_g - prod_cols(grad_f / r_pos), min(opt.cg_tol, math.sqrt(err))
    product = schur if schur is not None else _schur_product(col, prod_rows, prod_cols, r_pos, eps)

    def counted(y):
        stats["cg_products"] += 1
        return product(y)

    if schur is not None and not on_np:  # CG in numpy on torch's vectors (a CPU, tests only)
        d_g = torch.from_numpy(_pcg(counted, rhs.numpy(), inv_diag.numpy(), tol=cg_tol_now,
                                    max_iter=opt.cg_max_iter))
    else:
        d_g = _pcg(counted, rhs, inv_diag, tol=cg_tol_now, max_iter=opt.cg_max_iter)
    d_f = (eps * grad_f - prod_rows(d_g)) / r_pos
    # L is invariant along (1, -1): drop that component, which the sparsified Hessian (no longer exactly singular
    # there) can blow up, and which would only push exp(f/eps) out of range
    shift = float(d_f.sum() - d_g.sum()) / (n + m)
    return d_f - shift, d_g + shift, dense


def _line_search(plan_: _ScaledPlan, r, col, d_f, d_g, grad_f, grad_g, a_, b_, eps: float, xp):
    """Backtracking (Armijo) along (d_f, d_g): (accepted, the step, x, y, P y) with x = exp(s d_f / eps) and
    y = exp(s d_g / eps), the new plan's scalings. The gain ``L(f + s d_f, g + s d_g) - L(f, g)`` is
    ``s <d, (a, b)> - eps (x^T P y - 1^T P 1)``: one product with the current plan a trial, through expm1 for
    small steps so that it stays exact near convergence. The halving starts at the first step whose x, y stay
    within float64 (larger ones would give a non-finite gain and be refused)."""
    slope = float(grad_f @ d_f + grad_g @ d_g)
    lin = float(a_ @ d_f + b_ @ d_g)
    total = float(r.sum())
    reach = float(xp.maximum(abs(d_f).max(), abs(d_g).max())) / eps
    rise = float(xp.maximum(d_f.max(), d_g.max())) / eps
    step = 0.0  # no finite ascent direction (a CG breakdown): no line search
    if math.isfinite(rise) and slope > 0:
        step = 1.0 if rise <= _EXP_MAX else 2.0 ** -math.ceil(math.log2(rise / _EXP_MAX))
    while step > 1e-8:
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
            return True, step, x, y, p_y
        step *= 0.5
    return False, step, None, None, None


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
        errs.append(backend.l1_error(backend.matvec(p, torch.ones_like(b)), a))
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
