"""The trainable: pretrain an encoder with one method, probe it with frozen features.

``run(config, report, restore=None)`` is all a runner needs: it calls
``report(metrics, checkpoint)`` once per epoch, with a checkpoint dict (model,
optimiser, scheduler and RNG states) every ``checkpoint_every`` epochs and at
the last one (None otherwise), and continues from ``restore`` (such a dict)
when given. An optional ``poll()`` is called before every training step: a
runner raises from it to end the trial mid-epoch (Tune's stop). It never
imports ray or mlflow, so it runs the same under Ray Tune, pytest, or a plain
loop::

    from trainables.pretrain_probe import run
    run({"method": "sinsim", "epochs": 5}, report=lambda m, ckpt=None: print(m))

Metrics, every epoch: ``epoch``, ``train_loss`` and the loss parts (for a method with a weighted regulariser,
``reg_loss``, its value, e.g. SinSim's beta * W, and ``reg_grad_ratio``, its gradient's norm on the encoder
features over the rest of the loss's, on the epoch's first batch),
``epoch_time_s``, median ``step_time_ms`` / ``ot_time_ms`` / ``data_time_ms``,
``images_per_s``, ``peak_mem_mb``, ``lr``, and ``hardware`` (a string: the GPU's name, or the CPU's model
and torch's threads, what the timings were measured on); ``knn_acc`` (validation split)
every ``probe_every`` epochs and at the last one. The last epoch adds
``linear_acc`` and ``knn5_acc`` (val), ``test_linear_acc``, ``test_knn_acc``, ``test_knn5_acc``, ``knn_k_used``
(the weighted kNN's k: the config's ``knn_k``, else :func:`catalog.default_knn_k` of the bank),
``align``, ``uniform`` and ``final: 1``; its checkpoint also carries
``embeddings`` (frozen test features and labels, at most 2,000) for the
report's embedding picture. Every checkpoint keeps ``metrics`` (its epoch's) and
``recent_metrics`` (the last ``RECENT_EPOCHS`` epochs', oldest first).
"""
from __future__ import annotations

import collections
import contextlib
import resource
import statistics
import time
from typing import Any, Callable, Deque, Dict, List, Optional

import torch

from .catalog import default_knn_k
from .config import TrialConfig
from .data import augment, augment_config, load_splits
from .losses import METHODS
from .models import build_model
from .optim import build_optimizer, lr_lambda
from .probes import align_uniform, extract_features, knn_accuracy, linear_probe, mlp_probe

Report = Callable[..., None]
EMBED_MAX = 2000  # test images whose frozen features are kept for the embedding picture
RECENT_EPOCHS = 16  # epochs whose metrics each checkpoint keeps (``recent_metrics``)


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def recent_metrics(checkpoint: Dict[str, Any]) -> List[Dict[str, float]]:
    """The metrics of a checkpoint's last epochs, oldest first (its own epoch's alone for a checkpoint
    written before ``recent_metrics`` existed)."""
    return list(checkpoint.get("recent_metrics") or ([checkpoint["metrics"]] if checkpoint.get("metrics") else []))


def pick_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible (CUDA_VISIBLE_DEVICES?)")
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
    return torch.device("cpu")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's processor or machine."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# a trial's random streams, each from its own generator seed (stream_seed): drawn from one seed s, seed s's
# augmentations (s + 1) were seed s + 1's initialisation and data order, and the seeds of a study not independent
STREAMS = {"init": 0, "shuffle": 1, "augment": 2, "probe_views": 3, "mlp_probe": 4}


def stream_seed(seed: int, stream: str) -> int:
    """The generator seed of one of a trial's random streams (:data:`STREAMS`): NumPy's SeedSequence of the
    trial's seed, spawned once per stream, so no two (seed, stream) pairs share a generator."""
    import numpy as np

    words = np.random.SeedSequence(seed, spawn_key=(STREAMS[stream],)).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # < 2**63: any torch.Generator takes it


def hardware_name(device: torch.device) -> str:
    """What a trial's timings were measured on: the GPU's name, or the CPU's model and torch's threads. Step
    times and their ratios move with it (an AMD EPYC and an Intel Xeon ranked two BLAS routes the other way
    round), so results carry it and the report takes overhead ratios within one kind of hardware."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, amp: bool) -> Callable[[], Any]:
    """The context the encoder and projector run in: bf16 autocast on CUDA with ``amp``, else none. A CPU trial
    runs in float32 (bf16 on most CPUs is slower than float32); the loss, and every OT solve, always gets float32
    features (``_Trial._step`` casts them). Tests replace this to run the bf16 path on a CPU."""
    if amp and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def run(config: Dict[str, Any], report: Report, restore: Optional[Dict[str, Any]] = None,
        poll: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Pretrain and probe; returns the last epoch's metrics. ``poll`` (if given) runs before every step."""
    trial = _Trial(TrialConfig.from_dict(config))
    start_epoch = 0
    if restore is not None:
        start_epoch = trial.restore(restore)
        if start_epoch >= trial.cfg.epochs and restore.get("metrics"):
            # finished before the runner recorded it (e.g. the driver died): report, do not retrain
            metrics = {**restore["metrics"], "hardware": trial.hardware}
            report(metrics, restore)
            return metrics
    metrics: Dict[str, Any] = {}
    for epoch in range(start_epoch, trial.cfg.epochs):
        metrics = trial.train_epoch(epoch, poll)
        last = epoch + 1 == trial.cfg.epochs
        embeddings = None
        if (epoch + 1) % trial.cfg.probe_every == 0 or last:
            probe_out = _probe(trial.model, trial.data, trial.cfg, trial.device, final=last, aug_cfg=trial.aug_cfg,
                               knn_k=trial.knn_k)
            embeddings = probe_out.pop("_embeddings", None)
            metrics.update(probe_out)
        checkpoint = trial.checkpoint(epoch, metrics, embeddings)
        save = (epoch + 1) % trial.cfg.checkpoint_every == 0 or last
        report(metrics, checkpoint if save else None)
    return metrics


class _Trial:
    """One trial's state: the data, the model and its optimiser and schedule, the generators of the data order
    and the augmentations (seeded by the trial's seed, so a seed fixes the initialisation, the data order and the
    augmentations whatever the method), and the method's loss with its knobs resolved once."""

    def __init__(self, cfg: TrialConfig):
        self.cfg = cfg
        self.device = device = pick_device(cfg.device)
        self.hardware = hardware_name(device)
        self.data = data = load_splits(cfg.dataset, cfg.data_root, download=cfg.download,
                                       verify_data=cfg.verify_data, image_size=cfg.image_size)
        self.knn_k = probe_k(cfg, data)
        pool = data.pretrain_x  # (N, C, H, W): train (+ unlabeled for STL-10), never val or test
        self.n_train = len(pool)
        if cfg.batch_size > self.n_train:
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the {cfg.dataset} training split "
                             f"({self.n_train} images)")
        print(f"[otstudy trial] {cfg.method} on {cfg.dataset} ({self.n_train} images), device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
        torch.manual_seed(stream_seed(cfg.seed, "init"))
        self.model = build_model(cfg.encoder, data.channels, proj_hidden=cfg.proj_hidden, proj_dim=cfg.proj_dim,
                                 cifar_stem=cfg.cifar_stem).to(device)
        self.opt = build_optimizer(cfg.optimizer, self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.autocast = autocast_for(device, cfg.amp)
        self.steps_per_epoch = self.n_train // cfg.batch_size  # drop the last partial batch: 2N is fixed
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.epochs * self.steps_per_epoch, cfg.warmup_epochs * self.steps_per_epoch))
        self.shuffle_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "shuffle"))
        self.aug_gen = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, "augment"))
        self.aug_cfg = augment_config(cfg.augment, cfg.dataset, cfg.crop_min_scale)
        self.train_x = pool.to(device)  # uint8 stays uint8 on the device; views are made float per batch
        self.loss_fn, self.knobs = METHODS[cfg.method].fn, cfg.method_knobs()
        # the metrics of the last epochs, kept in each checkpoint: a runner whose record of them was lost
        # with its driver gets them back from the checkpoint it continues from (see study.export)
        self.recent: Deque[Dict[str, float]] = collections.deque(maxlen=RECENT_EPOCHS)

    def restore(self, ckpt: Dict[str, Any]) -> int:
        """Continue from a checkpoint of :meth:`checkpoint`; returns the epochs it had run."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.shuffle_gen.set_state(ckpt["shuffle_rng"])
        self.aug_gen.set_state(ckpt["aug_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.recent.extend(recent_metrics(ckpt))
        return int(ckpt["epoch"])

    def train_epoch(self, epoch: int, poll: Optional[Callable[[], None]]) -> Dict[str, Any]:
        """One epoch of pretraining; its metrics (the loss and its parts, timings, memory)."""
        cfg, device = self.cfg, self.device
        self.model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(self.n_train, generator=self.shuffle_gen)
        step_ms, data_ms, ot_ms, losses = [], [], [], []
        part_sums: Dict[str, float] = {}
        reg_grad_ratio = None
        for s in range(self.steps_per_epoch):
            if poll is not None:
                poll()
            t0 = time.perf_counter()
            x = self.train_x[perm[s * cfg.batch_size:(s + 1) * cfg.batch_size].to(device)]  # (N, C, H, W)
            views = torch.cat([augment(x, self.aug_gen, self.aug_cfg),
                               augment(x, self.aug_gen, self.aug_cfg)])  # (2N, C, H, W)
            _sync(device)
            t1 = time.perf_counter()
            out, aside, ratio = self._step(views, epoch, s)
            t2 = time.perf_counter()
            reg_grad_ratio = ratio if s == 0 else reg_grad_ratio
            data_ms.append(1e3 * (t1 - t0))
            step_ms.append(1e3 * (t2 - t1 - aside))
            losses.append(float(out.loss.detach()))
            if "ot_time_ms" in out.parts:
                ot_ms.append(out.parts["ot_time_ms"])
            for k, v in out.parts.items():
                if k != "ot_time_ms":
                    part_sums[k] = part_sums.get(k, 0.0) + v
        epoch_time = time.perf_counter() - t_epoch
        return {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            **{k: v / self.steps_per_epoch for k, v in part_sums.items()},
            **({"reg_grad_ratio": reg_grad_ratio} if reg_grad_ratio is not None else {}),
            "epoch_time_s": epoch_time,
            "step_time_ms": statistics.median(step_ms),
            "data_time_ms": statistics.median(data_ms),
            "ot_time_ms": statistics.median(ot_ms) if ot_ms else 0.0,
            "images_per_s": self.steps_per_epoch * cfg.batch_size / epoch_time,
            "peak_mem_mb": _peak_mem_mb(device),
            "lr": self.sched.get_last_lr()[0],
            "on_gpu": 1.0 if device.type == "cuda" else 0.0,
            "hardware": self.hardware,  # a string: not a metric (MLflow gets it as a tag), kept out of checkpoints
        }

    def _step(self, views: torch.Tensor, epoch: int, s: int):
        """One optimiser step on a batch's two views: (the loss's output, the seconds spent measuring the
        regulariser's pull (left out of the step's time), that pull on the epoch's first batch or None)."""
        with self.autocast():
            h, z = self.forward(views)  # (2N, D_h), (2N, D_z)
        h, z = h.float(), z.float()
        h1, h2 = h.chunk(2)
        z1, z2 = z.chunk(2)
        out = self.loss_fn(h1, h2, z1, z2, **self.knobs)
        if not torch.isfinite(out.loss):
            raise TrialDiverged(f"train_loss became {float(out.loss.detach())} at epoch {epoch + 1}, step {s + 1} "
                                f"(method={self.cfg.method}, lr={self.cfg.lr})")
        aside, ratio = 0.0, None
        if s == 0 and "reg_loss" in out.parts:
            t_aside = time.perf_counter()
            ratio = regulariser_grad_ratio(out, h)
            _sync(self.device)
            aside = time.perf_counter() - t_aside
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.sched.step()
        _sync(self.device)
        return out, aside, ratio

    def checkpoint(self, epoch: int, metrics: Dict[str, Any], embeddings) -> Dict[str, Any]:
        """Everything a resume needs to continue as if uninterrupted, and the recent epochs' metrics."""
        ckpt = {
            "epoch": epoch + 1,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "shuffle_rng": self.shuffle_gen.get_state(),
            "aug_rng": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "metrics": {k: float(v) for k, v in metrics.items() if k != "hardware"},
        }
        self.recent.append(ckpt["metrics"])
        ckpt["recent_metrics"] = list(self.recent)
        if embeddings is not None:
            # frozen test features for the report's embedding picture; a runner may store them apart
            ckpt["embeddings"] = embeddings
        return ckpt


def probe_k(cfg: TrialConfig, data) -> int:
    """The kNN probe's k: the config's, or :func:`catalog.default_knn_k` of the bank's smallest class; a k above
    that class's count is refused (the spec refuses it before a study starts where the catalog knows the
    bank; here for any dataset, image folders included)."""
    smallest = int(torch.bincount(data.train_y).min())
    if cfg.knn_k is None:
        return default_knn_k(smallest)
    if cfg.knn_k > smallest:
        raise ValueError(f"knn_k={cfg.knn_k}: above the smallest class of the {cfg.dataset} kNN bank ({smallest} "
                         f"images); use at most {smallest} (default: {default_knn_k(smallest)})")
    return cfg.knn_k


def regulariser_grad_ratio(out, h: torch.Tensor) -> float:
    """How strong a method's regulariser pulls: ``||d reg / d h|| / ||d (loss - reg) / d h||`` on the encoder
    features h (2N, D_h) of one batch, Frobenius norms; 0 where the regulariser's weight is 0. SinSim's beta
    multiplies a cost whose size depends on the encoder (on ReLU features the eps = 0.05 plan was near
    uniform), so beta alone does not say how hard the OT term pulled: this ratio does. The graph is kept for
    the step's own backward."""
    if out.reg is None or not out.reg.requires_grad:
        return 0.0
    g_reg, = torch.autograd.grad(out.reg, h, retain_graph=True)
    g_main, = torch.autograd.grad(out.loss - out.reg, h, retain_graph=True, allow_unused=True)
    main = float(g_main.norm()) if g_main is not None else 0.0
    return float(g_reg.norm()) / main if main > 0 else float("inf")


def _probe(model, data, cfg: TrialConfig, device, *, final: bool, aug_cfg, knn_k: int) -> Dict[str, float]:
    """kNN on the validation split every probe epoch (the pruning signal); the full evaluation at the end:
    the weighted kNN (k = ``knn_k``), a plain 5-NN vote and the linear probe, on validation and test.

    The probes use their own RNG (none of the training generators), so probing
    does not change the training trajectory and a resumed run matches an
    uninterrupted one.
    """
    enc = model.encoder
    train_f = extract_features(enc, data.train_x, device=device)
    val_f = extract_features(enc, data.val_x, device=device)
    out = {"knn_acc": knn_accuracy(train_f, data.train_y, val_f, data.val_y, n_classes=data.n_classes,
                                   k=knn_k, temperature=cfg.knn_t)}
    if not final:
        return out
    test_f = extract_features(enc, data.test_x, device=device)
    out["knn_k_used"] = float(knn_k)
    out["knn5_acc"] = knn_accuracy(train_f, data.train_y, val_f, data.val_y, n_classes=data.n_classes, k=5,
                                   weighted=False)
    out["test_knn_acc"] = knn_accuracy(train_f, data.train_y, test_f, data.test_y, n_classes=data.n_classes,
                                       k=knn_k, temperature=cfg.knn_t)
    out["test_knn5_acc"] = knn_accuracy(train_f, data.train_y, test_f, data.test_y, n_classes=data.n_classes,
                                        k=5, weighted=False)
    out.update(linear_probe(train_f, data.train_y, val_f, data.val_y, test_f, data.test_y,
                            n_classes=data.n_classes))
    if cfg.mlp_probe:
        out.update(mlp_probe(train_f, data.train_y, val_f, data.val_y, test_f, data.test_y,
                             n_classes=data.n_classes, seed=stream_seed(cfg.seed, "mlp_probe")))
    # alignment / uniformity of two fresh augmentations of the validation images
    gen = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, "probe_views"))
    vx = data.val_x.to(device)
    f1 = extract_features(enc, augment(vx, gen, aug_cfg), device=device)
    f2 = extract_features(enc, augment(vx, gen, aug_cfg), device=device)
    out.update(align_uniform(f1, f2))
    out["final"] = 1.0
    n = min(len(test_f), EMBED_MAX)
    out["_embeddings"] = {"features": test_f[:n].clone(), "labels": data.test_y[:n].clone()}
    return out
