"""The CPU backend of the solvers: which of numpy (OpenBLAS) and torch runs a solve's matrix-vector products,
measured once per process, BLAS threads and numpy's warnings during a solve, flushing subnormals. Its state (the
measured route, threadpoolctl's controller, whether SNS's Newton phase runs in numpy) lives here only; tests
and benchmarks set it here."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

import numpy as np
import torch
from torch import Tensor


# From this many entries up, the matrix-vector products of a CPU solve go through numpy (OpenBLAS), with BLAS held
# to one thread during the solve, where that is the faster route on this machine (:func:`products_route`). On an
# AMD EPYC torch's (MKL) gemv, itself single-threaded there, was 1.2-1.7x slower than OpenBLAS's on one thread
# (n = 1024 float32: 72 us against 51 us), and whole solves took 0.80-0.93x the time at n = 512-2048 through
# numpy (alternating rounds, ad hoc); with OpenBLAS's two threads 0.52-1.38x (they contend with torch's OpenMP
# threads, which spin after every parallel op). On an Intel Xeon torch's gemv was the faster one (n = 1024
# float32: 42 us against 102 us), and 40-iteration solves took 1.27-1.78x the time through numpy. Below this
# size the round trip through numpy cost 1.05-1.66x (AMD), so only "all" (below) goes to numpy there.
NUMPY_MATVEC_MIN = 1 << 18
PRODUCTS: Optional[str] = None  # products_route's answer, once per process
BLAS = None  # threadpoolctl's controller, made on first use (it scans the loaded libraries once)


def numpy_mode(mat: Tensor, *others: Tensor) -> Optional[str]:
    """How a solve with ``mat`` uses numpy, decided once per solve: ``"all"`` (its iterations or reverse pass in
    numpy altogether: one small problem, below ``NUMPY_MATVEC_MIN`` entries, ``others`` of its dtype),
    ``"products"`` (its matrix-vector products through :func:`np_mv`, from ``NUMPY_MATVEC_MIN`` entries, where
    numpy's are the faster on this machine: :func:`products_route`) or None (torch). Only for one dense CPU
    float32/float64 matrix with no autograd graph to record through it or ``others`` (the tensors the products'
    vectors come from)."""
    if not (mat.dim() == 2 and mat.layout == torch.strided and mat.device.type == "cpu"
            and mat.dtype in (torch.float32, torch.float64)):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (mat, *others)):
        return None
    if mat.numel() >= NUMPY_MATVEC_MIN:
        return "products" if products_route() == "numpy" else None
    return "all" if all(t.dtype == mat.dtype for t in others) else None


def products_route() -> str:
    """``"numpy"`` or ``"torch"``: the faster route for a large CPU solve's matrix-vector products on this
    machine, measured once per process (:func:`measure_products`, ~30 ms) unless ``OTSTUDY_OT_PRODUCTS`` names
    one. The two give the same plans to rounding (summation order), so setting it only matters for bitwise
    repeats of a run, or where the measurement is too close to call on a busy machine."""
    global PRODUCTS
    if PRODUCTS is None:
        choice = os.environ.get("OTSTUDY_OT_PRODUCTS", "").strip().lower()
        if choice not in ("", "numpy", "torch"):
            raise ValueError(f"OTSTUDY_OT_PRODUCTS must be 'numpy' or 'torch' (unset: measured), got {choice!r}")
        PRODUCTS = choice or measure_products()
    return PRODUCTS


def measure_products(n: int = 1024, rounds: int = 9) -> str:
    """Times both routes' products (``P y`` and ``P^T x``, float32 and float64, n x n) in alternating rounds:
    numpy (one BLAS thread, as in a solve) only where its median total is below 0.9x torch's (a margin, so that
    a close call on a noisy machine stays with torch, whose products also serve autograd)."""
    g = torch.Generator().manual_seed(0)
    totals = {"numpy": 0.0, "torch": 0.0}
    with numpy_context(True):
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


def np_mv(mat: Tensor, vec: Tensor) -> Tensor:
    """``mat @ vec`` by numpy, for a matrix in :func:`numpy_mode` "products" (a vector of another dtype: torch)."""
    if vec.dtype != mat.dtype:
        return matvec(mat, vec)
    return torch.from_numpy(mat.detach().numpy() @ vec.detach().numpy())


def numpy_context(on: bool):
    """A context for a solve whose products go through numpy (a no-op unless ``on``): BLAS held to one thread,
    and numpy's floating-point warnings off (torch's products give inf/NaN silently, and the solvers check
    their scalings for them and fall back)."""
    global BLAS
    if not on:
        return contextlib.nullcontext()

    if BLAS is None:
        from threadpoolctl import ThreadpoolController

        BLAS = ThreadpoolController()
    stack = contextlib.ExitStack()
    stack.enter_context(BLAS.limit(limits=1, user_api="blas"))
    stack.enter_context(np.errstate(all="ignore"))
    return stack


@contextlib.contextmanager
def flush_subnormals(on: bool):
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
    if not on or flushing() or not torch.set_flush_denormal(True):  # off, already on, or not x86 with SSE3
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def flushing() -> bool:
    """Whether this thread flushes subnormals already (torch has no getter): 2^-1070 times 1 gives 0 then."""
    return float(torch.tensor([2.0 ** -1070], dtype=torch.float64).mul_(1.0)[0]) == 0.0


def matvec(mat: Tensor, vec: Tensor) -> Tensor:
    """mat @ vec over the last axes, (..., n, m) x (..., m) -> (..., n); ``torch.mv`` for one problem (3-4 us
    less a product than a batched matmul, a tenth of a 40-iteration solve at n = 128)."""
    return torch.mv(mat, vec) if mat.dim() == 2 else (mat @ vec[..., :, None])[..., 0]


def l1_error(x, target) -> float:
    """max over problems of ||x - target||_1 (x, target: (..., n)); ``torch.dist`` for one problem (one op
    where sub, abs, sum and max were four: 3 us an iteration at n = 128). Also for two numpy vectors (SNS's
    Newton phase on a CPU)."""
    if not isinstance(x, Tensor):
        return float(abs(x - target).sum())
    if x.dim() == 1:
        return float(torch.dist(x, target, 1))
    return float(torch.linalg.vector_norm(x - target, 1, -1).max())


NEWTON_NUMPY = True  # on a CPU, SNS's Newton phase in numpy and scipy (tests set False to check torch's path)
