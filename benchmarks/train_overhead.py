"""Step time of each method vs SimCLR at the same batch size, with the OT share, and the
memory an unrolled vs implicit Sinkhorn gradient keeps for backward.

* small CNN on digits (real images), batch sizes 64..512 (digits has 1,212 training images);
* ResNet-18 (CIFAR stem) on random 32x32 RGB inputs, batch 64 and 256, fewer steps (CPU).
``sinsim+sns`` is SinSim with ``ot_solver: sns`` (each plan solved to marginal error 1e-6 by
Sinkhorn-Newton-Sparse, envelope gradient): what a converged plan costs per step.
Per batch size every method has its own model; after warm-up steps the methods' steps are timed in
interleaved rounds (one step of each per round, the order rotating), all in this one process, and each
method's step is reported as the median over rounds and as its ratio to SimCLR's step of the same round
(median, and range over rounds). Timing each method's steps in a block of its own let a drifting machine
into the ratios (ResNet-18 at batch 64: 1.36x for a 2 ms OT term in a 3.8 s step).
"OT ms (solve)" is the forward solve alone; "loss ms" is the loss's forward and backward down to the
features, so "loss beyond SimCLR's" is what the method's loss (its OT term with the backward through its
iterations, and its other parts) adds to a step.

    .venv/bin/python -m benchmarks.train_overhead [--quick]
    .venv/bin/python -m benchmarks.train_overhead --part resnet [--rounds 21]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import ensure_malloc_env, markdown_table, record
from benchmarks.ot_solvers import paired_times, saved_bytes
from trainables.data import AUGMENTS, augment, load_digits_splits
from trainables.losses import METHODS, compute_loss, feature_cost
from trainables.models import build_model
from trainables.ot import sinkhorn

METHOD_LIST = ["simclr", "sinsim", "sinsim+sns", "gca_ince", "gca_rince", "gca_uot", "iot_cl", "vicreg",
               "barlow_twins"]
VARIANTS = {"sinsim+sns": ("sinsim", {"ot_solver": "sns"})}  # SinSim's plan solved to 1e-6 by SNS


class Stepper:
    """One model, optimiser and batch stream training with ``method`` (or a VARIANTS name), a step at a time."""

    def __init__(self, method, encoder, channels, images, batch):
        self.method, self.config = VARIANTS.get(method, (method, {}))
        torch.manual_seed(0)  # every method starts from the same weights and sees the same batches
        self.model = build_model(encoder, channels, proj_hidden=512 if encoder != "small_cnn" else 256,
                                 proj_dim=128 if encoder != "small_cnn" else 64)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.gen = torch.Generator().manual_seed(0)
        self.aug = AUGMENTS["digits" if channels == 1 else "simclr"]
        self.images, self.batch = images, batch

    def step(self):
        """(step ms, loss ms, OT ms, OT iterations) of one training step: forward, loss with its OT solve,
        backward, optimiser step (the batch and its augmentations are drawn before the clock starts). The loss
        ms is the loss's own forward and backward, down to the features (the backward is cut at the features
        and continued into the encoder from their gradients: the same gradient)."""
        x = self.images[torch.randint(0, len(self.images), (self.batch,), generator=self.gen)]
        views = torch.cat([augment(x, self.gen, self.aug), augment(x, self.gen, self.aug)])
        t0 = time.perf_counter()
        h, z = self.model(views)
        hd, zd = h.detach().requires_grad_(True), z.detach().requires_grad_(True)
        t1 = time.perf_counter()
        h1, h2 = hd.chunk(2)
        z1, z2 = zd.chunk(2)
        out = compute_loss(self.method, h1, h2, z1, z2, self.config)
        out.loss.backward()
        loss_ms = 1e3 * (time.perf_counter() - t1)
        self.opt.zero_grad()
        used = [(t, d.grad) for t, d in ((h, hd), (z, zd)) if d.grad is not None]
        torch.autograd.backward([t for t, _ in used], [g for _, g in used])
        self.opt.step()
        return (1e3 * (time.perf_counter() - t0), loss_ms, out.parts.get("ot_time_ms", 0.0),
                out.parts.get("ot_iters", 0.0))


def table(encoder, images, batches, rounds, warmup, methods, channels):
    """Per batch size, the methods' steps interleaved: each round runs one step of every method (the order
    rotating from round to round), so a machine that speeds up or slows down during the run moves every
    method alike; the ratio to SimCLR is taken within each round (paired) and its median reported."""
    rows = []
    for batch in batches:
        steppers = {m: Stepper(m, encoder, channels, images, batch) for m in methods}
        for _ in range(warmup):
            for s in steppers.values():
                s.step()
        times = {m: [] for m in methods}
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                times[m].append(steppers[m].step())
        base = [t[0] for t in times["simclr"]]
        base_loss = statistics.median(t[1] for t in times["simclr"])
        for m in methods:
            ms, loss_ms, ot, k = (statistics.median(col) for col in zip(*times[m]))
            ratios = [t[0] / b for t, b in zip(times[m], base)]
            # the iteration knob, or for SNS the iterations it took to 1e-6 (median over steps)
            knobs = METHODS[VARIANTS[m][0] if m in VARIANTS else m].defaults
            iters = f"{k:g} to 1e-6" if m in VARIANTS else knobs.get("sinkhorn_iters", knobs.get("gca_iters", ""))
            rows.append([encoder, batch, m, iters, ms, ot, ot / ms, loss_ms, (loss_ms - base_loss) / ms,
                         statistics.median(ratios), f"{min(ratios):.3g}-{max(ratios):.3g}"])
            print(rows[-1], flush=True)
        del steppers
    return rows


def memory(n, d=512, eps=0.05, iters=40):
    rows = []
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(n, d, generator=g)
    h2 = torch.randn(n, d, generator=g)
    for mode in ("unrolled", "implicit"):
        def build():
            x = h1.clone().requires_grad_(True)
            res = sinkhorn(feature_cost(x, h2), eps=eps, n_iters=iters, ot_grad=mode)
            return res.objective() if mode == "implicit" else res.transport_cost()

        _, mem = saved_bytes(build)
        t0 = time.perf_counter()
        build().backward()
        rows.append([n, mode, mem / 2**20, mem / (n * n * 4), 1e3 * (time.perf_counter() - t0)])
    return rows


def cost_backward(pairs: int = 15, d: int = 512, eps: float = 0.05, iters: int = 40):
    """SinSim's normalised cosine cost (``feature_cost``, one autograd function) against the same cost written
    with autograd's ops, alone and with SinSim's implicit OT term after it, forward and backward, in alternating
    pairs (ratios within a pair, medians), with what each keeps for backward."""
    import torch.nn.functional as F

    def autograd_ops(x, y):
        cost = 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
        return cost / cost.max().clamp_min(1e-12)

    rows = []
    for n in (256, 512, 1024, 2048):
        g = torch.Generator().manual_seed(0)
        h1, h2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        for term in (False, True):
            def build(fn):
                x, y = h1.clone().requires_grad_(True), h2.clone().requires_grad_(True)
                cost = fn(x, y)
                return sinkhorn(cost, eps=eps, n_iters=iters, ot_grad="implicit").objective() if term else cost.sum()

            kept = {name: saved_bytes(lambda: build(fn))[1] / (n * n * 4)
                    for name, fn in (("this", feature_cost), ("ops", autograd_ops))}
            _, times = paired_times({"this": lambda: build(feature_cost).backward(),
                                     "ops": lambda: build(autograd_ops).backward()}, pairs, slow_s=float("inf"))
            ratio = statistics.median(t / o for t, o in zip(times["this"], times["ops"]))
            rows.append([n, "cost + SinSim's implicit OT term" if term else "cost",
                         1e3 * statistics.median(times["ops"]), 1e3 * statistics.median(times["this"]), ratio,
                         kept["ops"], kept["this"]])
            print(rows[-1], flush=True)
    return markdown_table(["n", "what", "autograd's ops ms", "feature_cost ms", "time, feature_cost / ops",
                           "kept (x n*n float32), ops", "kept, feature_cost"], rows)


def resnet_goal(rounds: int):
    """Only the goal's case, ResNet-18 at batch 256 (SimCLR, SinSim, GCA-INCE), in ``rounds`` interleaved
    rounds: its steps vary ~15% from round to round on a shared VM, so 7 rounds leave the median ratio a few
    percent off; more rounds narrow it."""
    rgb = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = table("resnet18", rgb, [256], rounds, 1, ["simclr", "sinsim", "gca_ince"], 3)
    header = ["encoder", "batch", "method", "iters", "step ms", "OT ms (solve)", "OT share", "loss ms (fwd+bwd)",
              "loss beyond SimCLR's, share of step", "step / SimCLR step", "range over rounds"]
    record(f"train_overhead --part resnet --rounds {rounds}: ResNet-18 at batch 256, the goal's case",
           f"{rounds} interleaved rounds (one step of each method per round, the order rotating; ratios within a "
           "round, their median and range).\n\n" + markdown_table(header, rows))


def main():
    ensure_malloc_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_overhead")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes and rounds")
    p.add_argument("--part", choices=("all", "resnet"), default="all",
                   help="resnet: only ResNet-18 at batch 256 (the goal's case), in --rounds rounds")
    p.add_argument("--rounds", type=int, default=21, help="rounds for --part resnet (default 21)")
    args = p.parse_args()
    if args.rounds < 3:
        p.error(f"--rounds must be at least 3, got {args.rounds}")
    if args.part == "resnet":
        return resnet_goal(args.rounds)
    digits = load_digits_splits().train_x
    rows = table("small_cnn", digits, [64, 128] if args.quick else [64, 128, 256, 512], 5 if args.quick else 11,
                 2, METHOD_LIST, 1)
    rgb = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    rows += table("resnet18", rgb, [64] if args.quick else [64, 256], 3 if args.quick else 7, 1,
                  ["simclr", "sinsim", "gca_ince"], 3)
    header = ["encoder", "batch", "method", "iters", "step ms", "OT ms (solve)", "OT share", "loss ms (fwd+bwd)",
              "loss beyond SimCLR's, share of step", "step / SimCLR step", "range over rounds"]
    body = markdown_table(header, rows)
    mem = memory(512) + memory(2048)
    body += "\n\n### Sinkhorn gradient memory (SinSim's OT term, d = 512, 40 iterations, float32)\n\n"
    body += markdown_table(["n", "gradient", "kept for backward (MiB)", "x n*n float32", "fwd+bwd ms"], mem)
    body += ("\n\n### SinSim's max-normalised cosine cost: one autograd function vs autograd's ops (d = 512, "
             "float32, forward + backward, 15 alternating pairs; the implicit OT term at eps 0.05, 40 iterations)\n\n")
    body += cost_backward()
    record("train_overhead: every method vs SimCLR, per training step", body)


if __name__ == "__main__":
    main()
