"""The cost matrices the losses transport over: the 2N x 2N contrastive cost of the stacked views (self-pairs
forbidden) and the N x M cost between two feature clouds, normalised by its maximum (SinSim's), with an
autograd function that keeps only the features for backward."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_cost(z1: Tensor, z2: Tensor) -> Tensor:
    """Cosine cost of the stacked views with self-pairs forbidden.

    Args:
        z1, z2: (N, D).
    Returns:
        C of shape (2N, 2N): ``C_ij = 1 - cos(z_i, z_j)``, ``C_ii = +inf``.
    """
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # (2N, D)
    cost = 1.0 - z @ z.T  # (2N, 2N)
    eye = torch.eye(cost.shape[0], dtype=torch.bool, device=cost.device)
    return cost.masked_fill(eye, math.inf)


class _NormalisedCosineCost(torch.autograd.Function):
    """``(1 - cos(x_i, y_j)) / max_ij (1 - cos(x_i, y_j))`` with its exact gradient, keeping only x, y and their
    norms for backward (N x D each) where autograd's ops kept the N x M cost (the division and the maximum need
    it): SinSim's OT term with the implicit gradient kept 2 N x N matrices, now 1 (the solver's plan).

    Backward, with G the gradient of the output and m the maximum (C = 1 - S, S = x_hat y_hat^T):
    dC = G / m at every entry, plus ``-<G, C> / m^2`` shared evenly by the entries equal to the maximum (as
    autograd's ``max`` shares it), where ``<G, C> = sum G - <x_hat, G y_hat>`` comes from the product
    ``G y_hat`` the gradient of x needs anyway; a maximum below 1e-12 is clamped and gets no gradient (as
    ``clamp_min``); x_hat = x / max(|x|, 1e-12) as ``F.normalize``. On CUDA under autocast the cost is built in
    float32 (``custom_fwd``), as the OT solve wants it."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        nx, ny = x.norm(dim=1, keepdim=True).clamp_min(1e-12), y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cost = (x / nx) @ (y / ny).T
        cost.neg_().add_(1.0)  # 1 - S in place: one N x M buffer
        top = cost.max()
        scale = top.clamp_min(1e-12)
        ties = (cost == top).nonzero() if float(top) >= 1e-12 else cost.new_zeros((0, 2), dtype=torch.long)
        cost.div_(scale)
        ctx.save_for_backward(x, y, nx, ny, scale, ties)
        return cost

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, y, nx, ny, scale, ties = ctx.saved_tensors
        xh, yh = x / nx, y / ny
        g_yh = grad @ yh  # (N, D); with dS = -dC, d x_hat = dS y_hat and d y_hat = dS^T x_hat
        gxh = g_yh / -scale
        gyh = (grad.T @ xh) / -scale if ctx.needs_input_grad[1] else None
        if len(ties):  # d/dm of <G, C / m> = -<G, C> / m^2, shared by the maxima (dC there), <G, C> from G y_hat
            share = -(grad.sum() - (xh * g_yh).sum()) / (scale * scale) / len(ties)
            gxh.index_add_(0, ties[:, 0], yh[ties[:, 1]] * -share)
            if gyh is not None:
                gyh.index_add_(0, ties[:, 1], xh[ties[:, 0]] * -share)
        # through x_hat = x / max(|x|, 1e-12): (g - x_hat (x_hat . g)) / |x| where |x| > 1e-12, else g / 1e-12
        gx = (gxh - xh * (xh * gxh).sum(1, keepdim=True) * (nx > 1e-12)) / nx if ctx.needs_input_grad[0] else None
        gy = (gyh - yh * (yh * gyh).sum(1, keepdim=True) * (ny > 1e-12)) / ny if gyh is not None else None
        return gx, gy


def feature_cost(x: Tensor, y: Tensor, *, ot_cost: str = "cosine", normalise: bool = True) -> Tensor:
    """Cost between two feature clouds, shape (N, M).

    ``cosine``: 1 - cos(x_i, y_j) in [0, 2]; ``sqeuclidean``: ||x_i - y_j||^2.
    ``normalise`` divides by the maximum entry so the cost lies in [0, 1]
    whatever the feature scale, which keeps ``eps`` meaningful across encoders
    (SinSim's "cost normalised"). The maximum is part of the function and is
    differentiated (a.e.), so the gradient is the true gradient of the loss.
    The normalised cosine cost is :class:`_NormalisedCosineCost` (the same values
    and gradient, without an N x M matrix kept for backward).
    """
    if ot_cost == "cosine":
        if normalise and torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            return _NormalisedCosineCost.apply(x, y)
        cost = 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T  # (N, M)
    elif ot_cost == "sqeuclidean":
        cost = (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min(0.0)
    else:
        raise ValueError(f"ot_cost must be 'cosine' or 'sqeuclidean', got {ot_cost!r}")
    if normalise:
        cost = cost / cost.max().clamp_min(1e-12)
    return cost
