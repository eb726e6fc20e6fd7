"""IOT-CL's closed-form couplings: U(1), a global softmax, and U(a), a row softmax."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .problem import _check_eps, masked_cost


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
