"""Probes on frozen features: kNN, linear (logistic regression), alignment/uniformity.

None of these trains the encoder: features are extracted under
``torch.no_grad()`` in eval mode and the probes fit only their own weights.
Selection (the linear probe's weight decay) looks at the validation split;
the test split is only scored.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(encoder: nn.Module, x: Tensor, *, batch_size: int = 512,
                     device: torch.device | str = "cpu") -> Tensor:
    """Encoder features of un-augmented images, (N, D) float32 on the CPU.

    The encoder's train/eval mode is restored afterwards.
    """
    from .data import to_float

    was_training = encoder.training
    encoder.eval()
    out = [encoder(to_float(x[i:i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
    encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(bank: Tensor, bank_y: Tensor, query: Tensor, query_y: Tensor, *, n_classes: int,
                 k: int = 200, temperature: float = 0.1, weighted: bool = True) -> float:
    """kNN classification accuracy with cosine similarity.

    ``weighted``: votes ``exp(sim / temperature)`` (Wu et al. 2018, the usual
    SSL monitor, k=200, T=0.1); otherwise a plain majority vote (k=5 in IOT-CL).

    Args:
        bank: (M, D) training features, bank_y (M,).  query: (Q, D), query_y (Q,).
    """
    k = min(k, len(bank))
    b = F.normalize(bank, dim=1)
    correct = 0
    for i in range(0, len(query), 1024):
        q = F.normalize(query[i:i + 1024], dim=1)
        sim = q @ b.T  # (q, M)
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        labels = bank_y[top_idx]  # (q, k)
        w = torch.exp(top_sim / temperature) if weighted else torch.ones_like(top_sim)
        votes = torch.zeros(len(q), n_classes, dtype=w.dtype).scatter_add_(1, labels, w)  # (q, C)
        correct += int((votes.argmax(1) == query_y[i:i + 1024]).sum())
    return correct / len(query)


def _standardise(train: Tensor, *others: Tensor):
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _fit_logreg(x: Tensor, y: Tensor, n_classes: int, weight_decay: float, max_iter: int) -> nn.Linear:
    torch.manual_seed(0)  # the probe is deterministic whatever the caller's RNG state
    lin = nn.Linear(x.shape[1], n_classes, dtype=x.dtype)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 0.5 * weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def linear_probe(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, test_f: Tensor,
                 test_y: Tensor, *, n_classes: int,
                 weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
                 max_iter: int = 200) -> Dict[str, float]:
    """Multinomial logistic regression on frozen, standardised features (full-batch L-BFGS).

    The weight decay is chosen on the validation split; the chosen model is
    then scored on the test split. Returns ``linear_acc`` (val),
    ``test_linear_acc`` and the chosen ``probe_wd``.
    """
    with torch.enable_grad():
        tr, va, te = [t.double() for t in _standardise(train_f, val_f, test_f)]
        best = None
        for wd in weight_decays:
            lin = _fit_logreg(tr, train_y, n_classes, wd, max_iter)
            with torch.no_grad():
                acc = float((lin(va).argmax(1) == val_y).double().mean())
            if best is None or acc > best[0]:
                best = (acc, wd, lin)
        acc, wd, lin = best
        with torch.no_grad():
            test_acc = float((lin(te).argmax(1) == test_y).double().mean())
    return {"linear_acc": acc, "test_linear_acc": test_acc, "probe_wd": wd}


def mlp_probe(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, test_f: Tensor, test_y: Tensor,
              *, n_classes: int, hidden: int = 512, steps: int = 300, seed: int = 0,
              weight_decays: Sequence[float] = (1e-4, 1e-2)) -> Dict[str, float]:
    """A one-hidden-layer MLP on frozen, standardised features (SinSim's "MLP classifier").

    Full-batch Adam for ``steps`` steps; weight decay chosen on val, test scored once.
    Returns ``mlp_acc`` (val) and ``test_mlp_acc``.
    """
    tr, va, te = _standardise(train_f, val_f, test_f)
    best = None
    with torch.enable_grad():
        for wd in weight_decays:
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(tr.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=wd)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(net(tr), train_y).backward()
                opt.step()
            with torch.no_grad():
                acc = float((net(va).argmax(1) == val_y).float().mean())
            if best is None or acc > best[0]:
                best = (acc, net)
    acc, net = best
    with torch.no_grad():
        test_acc = float((net(te).argmax(1) == test_y).float().mean())
    return {"mlp_acc": acc, "test_mlp_acc": test_acc}


@torch.no_grad()
def align_uniform(f1: Tensor, f2: Tensor, *, t: float = 2.0) -> Dict[str, float]:
    """Alignment and uniformity (Wang & Isola 2020) of L2-normalised embeddings.

    ``align = E ||f(x) - f(x+)||^2`` over positive pairs (rows of f1, f2);
    ``uniform = log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs of f1.
    """
    a, b = F.normalize(f1, dim=1), F.normalize(f2, dim=1)
    align = (a - b).pow(2).sum(1).mean()
    sq = torch.pdist(a).pow(2)
    uniform = torch.log(torch.exp(-t * sq).mean())
    return {"align": float(align), "uniform": float(uniform)}
