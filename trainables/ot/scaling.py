"""The scaling iterations of the kernel domains: alternating ``u <- (a / K v)^fi1``, ``v <- (b / K^T u)^fi2``,
rows first, in torch (with absorption into the kernel for the stabilised domain) or, for one small CPU problem,
in numpy."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import backend
from .problem import _kernel_limit


def _fix(fi: float, offset: Tensor, eps: float) -> Optional[Tensor]:
    """Unbalanced: the offset is not neutral under the power fi; this factor restores it (None if balanced)."""
    return torch.exp((fi - 1.0) * offset / eps) if fi != 1.0 else None


def _scaling_loop(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, rebuild=None, until=None,
                  trace: Optional[list] = None):
    """The iterations of :func:`_scale`: (u, v, f0, g0, kernel, err, updates used), or None if the scalings
    stopped being finite. ``trace`` (a list) receives each update's (input scaling x, denominator d = K x or
    K^T x, new scaling)."""
    mode = backend.numpy_mode(kernel, f0, g0, a, b)
    if rebuild is None and mode == "all":
        return _scaling_iterations_numpy(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until,
                                         trace)
    fast = mode == "products"
    with backend.numpy_context(fast):
        return _scaling_iterations(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, rebuild, until,
                                   trace, backend.np_mv if fast else backend.matvec)


def _scaling_iterations_numpy(kernel, f0, g0, a, b, eps, n_half, fi1, fi2, tol, balanced_rows, until, trace):
    """:func:`_scaling_iterations` (kernel domains, no rebuild) for one small CPU problem (:func:`backend.numpy_mode`
    "all"), in numpy: the same updates and stopping rules, at a fraction of torch's per-op cost on short vectors
    (n = 128, to 1e-6: a tie with POT before, whose iterations are numpy's too). ``trace`` receives numpy
    arrays. A mirror of the torch loop rather than one loop over both: sharing it would take four injected
    operations (ones, detach, the L1 error, the log change), and the torch loop also absorbs into the kernel."""

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
                    err = backend.l1_error(u.detach() * kv.detach(), a_)
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
