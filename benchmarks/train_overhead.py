"""Step time of each method vs SimCLR at the same batch size, with the OT share, and the
memory an unrolled vs implicit Sinkhorn gradient keeps for backward.

* small CNN on digits (real images), batch sizes 64..512 (digits has 1,212 training images);
* ResNet-18 (CIFAR stem) on random 32x32 RGB inputs, batch 64 and 256, fewer steps (CPU).
``sinsim+sns`` is SinSim with ``ot_solver: sns`` (each plan solved to marginal error 1e-6 by
Sinkhorn-Newton-Sparse, envelope gradient): what a converged plan costs per step.
Each configuration: a few warm-up steps, then the median of timed steps (forward, loss with its
OT solve, backward, optimiser step), all in this one process.

    .venv/bin/python -m benchmarks.train_overhead [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import ensure_malloc_env, markdown_table, record
from benchmarks.ot_solvers import saved_bytes
from trainables.data import AUGMENTS, augment, load_digits_splits
from trainables.losses import METHODS, compute_loss, feature_cost
from trainables.models import build_model
from trainables.ot import sinkhorn

METHOD_LIST = ["simclr", "sinsim", "sinsim+sns", "gca_ince", "gca_rince", "gca_uot", "iot_cl", "vicreg",
               "barlow_twins"]
VARIANTS = {"sinsim+sns": ("sinsim", {"ot_solver": "sns"})}  # SinSim's plan solved to 1e-6 by SNS


def step_times(method, model, images, batch, steps, warmup, aug):
    """(median step ms, median OT ms, median OT iterations) of ``method`` (or a VARIANTS name)."""
    method, config = VARIANTS.get(method, (method, {}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    times, ot, iters = [], [], []
    for s in range(warmup + steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        views = torch.cat([augment(x, gen, aug), augment(x, gen, aug)])
        t0 = time.perf_counter()
        h, z = model(views)
        h1, h2 = h.chunk(2)
        z1, z2 = z.chunk(2)
        out = compute_loss(method, h1, h2, z1, z2, config)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if s >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
            ot.append(out.parts.get("ot_time_ms", 0.0))
            iters.append(out.parts.get("ot_iters", 0.0))
    return statistics.median(times), statistics.median(ot), statistics.median(iters)


def table(encoder, images, batches, steps, warmup, methods, channels):
    rows = []
    for batch in batches:
        base = None
        for method in methods:
            torch.manual_seed(0)
            model = build_model(encoder, channels, proj_hidden=512 if encoder != "small_cnn" else 256,
                                proj_dim=128 if encoder != "small_cnn" else 64)
            aug = AUGMENTS["digits" if channels == 1 else "simclr"]
            ms, ot, k = step_times(method, model, images, batch, steps, warmup, aug)
            base = ms if method == "simclr" else base
            # the iteration knob, or for SNS the iterations it took to 1e-6 (median over steps)
            iters = f"{k:g} to 1e-6" if method in VARIANTS else METHODS[method].defaults.get("sinkhorn_iters", "")
            rows.append([encoder, batch, method, iters, ms, ot, ot / ms, ms / base])
            print(rows[-1], flush=True)
    return rows


def memory(n, d=512, eps=0.05, iters=40):
    rows = []
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(n, d, generator=g)
    h2 = torch.randn(n, d, generator=g)
    for mode in ("unrolled", "implicit"):
        def build():
            x = h1.clone().requires_grad_(True)
            res = sinkhorn(feature_cost(x, h2), eps=eps, n_iters=iters, grad=mode)
            return res.objective() if mode == "implicit" else res.transport_cost()

        _, mem = saved_bytes(build)
        t0 = time.perf_counter()
        build().backward()
        rows.append([n, mode, mem / 2**20, mem / (n * n * 4), 1e3 * (time.perf_counter() - t0)])
    return rows


def main():
    ensure_malloc_env()
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    digits = load_digits_splits().train_x
    rows = table("small_cnn", digits, [64, 128] if args.quick else [64, 128, 256, 512], 5 if args.quick else 10,
                 2, METHOD_LIST, 1)
    rgb = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    rows += table("resnet18", rgb, [64] if args.quick else [64, 256], 2 if args.quick else 3, 1,
                  ["simclr", "sinsim", "gca_ince"], 3)
    header = ["encoder", "batch", "method", "iters", "step ms", "OT ms", "OT share", "step / SimCLR step"]
    body = markdown_table(header, rows)
    mem = memory(512) + memory(2048)
    body += "\n\n### Sinkhorn gradient memory (SinSim's OT term, d = 512, 40 iterations, float32)\n\n"
    body += markdown_table(["n", "gradient", "kept for backward (MiB)", "x n*n float32", "fwd+bwd ms"], mem)
    record("train_overhead: every method vs SimCLR, per training step", body)


if __name__ == "__main__":
    main()
