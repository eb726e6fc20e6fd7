"""The unrolled gradient of the kernel-domain scalings, with its reverse pass written out."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import backend
from .scaling import _scaling_loop


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
        mode = backend.numpy_mode(kernel, *(g for g in (gu, gv) if g is not None))  # no graph here (once_differentiable)
        if mode == "all":
            # one small CPU problem: the same recursion in numpy, whose per-op cost on short vectors is a fraction
            # of torch's (SinSim's OT term at n = 128-256: backward 0.78-0.84x; at n >= 1024 it measured 1.16x,
            # so larger problems keep torch's elementwise ops with numpy's products below)
            left, right = _unrolled_backward_numpy(kernel, row_in, row_q, col_in, col_q, gu, gv, ctx.n_cols)
            return (left.t() @ right,) + (None,) * 11

        fast = mode == "products"

        def send(acc, mat, vec):  # acc + mat @ vec (acc None: zero)
            if fast:
                return backend.np_mv(mat, vec) if acc is None else acc + backend.np_mv(mat, vec)
            if acc is None:
                return backend.matvec(mat, vec)
            return torch.addmv(acc, mat, vec) if flat else acc + backend.matvec(mat, vec)

        kt = kernel.transpose(-1, -2)
        left, right = [], []  # K's gradient: the sum over updates of left (..., n) x right (..., m)
        with backend.numpy_context(fast):
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

    return torch.from_numpy(np.stack(parts, 0))


def _unrolled_backward_numpy(kernel, row_in, row_q, col_in, col_q, gu, gv, n_cols: int):
    """:meth:`_UnrolledScaling.backward`'s recursion for one (n, m) CPU problem, in numpy: the factors
    (L x n) and (L x m) of K's gradient, left^T right, over the L updates."""

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
