"""The trainable: reports, resume == uninterrupted, frozen probes, data, config errors."""
import io
import math

import pytest
import torch

from trainables import data as D
from trainables.config import TrialConfig
from trainables.models import build_model
from trainables.pretrain_probe import TrialDiverged, run
from trainables.probes import align_uniform, extract_features, knn_accuracy, linear_probe, mlp_probe

EPOCH_KEYS = {"epoch", "train_loss", "epoch_time_s", "step_time_ms", "ot_time_ms", "data_time_ms",
              "images_per_s", "peak_mem_mb", "knn_acc"}
FINAL_KEYS = {"linear_acc", "test_linear_acc", "test_knn_acc", "test_knn5_acc", "align", "uniform", "final"}


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
    ({"method": "sinsim", "ot_solver": "newton"}, "ot_solver='newton': choose sinkhorn .* or sns"),
    ({"method": "sinsim", "ot_solver": "sns", "ot_grad": "unrolled"},
     "ot_grad='unrolled': ot_solver=sns has the implicit \\(envelope\\) gradient only"),
])
def test_config_rejects_bad_values(cfg, match):
    with pytest.raises(ValueError, match=match):
        TrialConfig.from_dict(cfg)


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

    from study.runner import _Reporter

    event = threading.Event()
    reporter = _Reporter(event)
    reporter.poll()  # not stopped: returns
    event.set()  # what Tune's session.finish does on ASHA's stop or before reusing the process
    with pytest.raises(SystemExit):
        reporter.poll()
    reporter.close(check=False)
    assert not reporter._thread.is_alive()
