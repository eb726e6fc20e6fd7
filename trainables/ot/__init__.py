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

Gradients: ``ot_grad="unrolled"`` differentiates through every iteration (the
papers' choice; in the kernel domains by a reverse pass written out in
:class:`_UnrolledScaling`, in the log domain by autograd, which keeps an n x m
matrix per iteration there); ``ot_grad="implicit"`` runs the iterations without
autograd and differentiates the entropic OT objective with the converged
potentials held fixed (envelope theorem: d OT_eps / dC = P*), which keeps one
n x m matrix for backward and needs no reverse pass through the iterations.
"""
from __future__ import annotations

from .couplings import coupling_u1, coupling_ua
from .problem import OTResult, SinkhornNotConvergedWarning, masked_cost
from .sinkhorn import sinkhorn
from .sns import sinkhorn_newton_sparse

__all__ = [
    "OTResult",
    "SinkhornNotConvergedWarning",
    "sinkhorn",
    "coupling_u1",
    "coupling_ua",
    "masked_cost",
    "sinkhorn_newton_sparse",
]
