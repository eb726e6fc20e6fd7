"""SNS's linear algebra: the plan kept as diag(u) P0 diag(v), the sparsified Hessian's kept entries, the Schur
complement's products, and conjugate gradients."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor



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
        Intel Xeon unless the thread flushes them, and only this thread does (:func:`backend.flush_subnormals`;
        torch's other intra-op thread keeps its setting). Measured there (n = 1024, a clouds plan at
        eps 0.001, 28% of its float32 entries subnormal, 55% below 1e-20): a pair of products 283 us by
        numpy's one flushed thread, 1,830 us by torch's two threads, 127 us by torch's two threads on the
        floored copy (equal at n = 512, 2.1x faster at 2048). ``benchmarks.sns --against 9f328ca``: the
        same iterations and errors on all 16 problems, 0.70-0.83x the time on digits, 0.87-0.95x on clouds
        at n = 1024, 0.94-0.99x at n = 512. A floor of 1e-30 left products by vector entries below 1e-8
        subnormal: 1.1-1.16x slower at n = 512, eps <= 0.002. Before, numpy's one thread (flushed) was the
        faster route on this copy (torch's took 1.9-3.7x the time, 1.2-1.9x with entries below 1e-38
        zeroed). Normalising P0's rows first (to keep them normal) cost 1.04-1.18x the solve time (AMD)."""

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


_F32_FLOOR = 1e-20  # SNS's float32 copy of its plan: entries below this are 0 (see _ScaledPlan.float32_schur)


def _xp(on_np: bool):
    """The array module of SNS's Newton phase: numpy (on a CPU) or torch; the names it uses (ones_like, where,
    maximum of two arrays, exp, expm1) mean the same in both."""
    return np if on_np else torch


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

            # ~1e5 indices took ~200 us to list at n = 512)

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
        import scipy.sparse  # 0.2 s to import; only a CPU solve with a sparse Hessian needs it

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
