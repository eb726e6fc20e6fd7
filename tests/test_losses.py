"""Every loss: references written from the papers, identities between them, gradients."""
import math

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

from trainables import losses as L
from trainables.ot import sinkhorn

import transcriptions as ref


def views(n=8, d=6, dh=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, k, generator=g, dtype=dtype) for k in (dh, dh, d, d)]


def nt_xent_naive(z1, z2, tau):
    """SimCLR's loss, Algorithm 1 of Chen et al. 2020, written as loops."""
    z = torch.cat([z1, z2])
    n2 = z.shape[0]
    n = n2 // 2

    def sim(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.07, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 5, 16])
def test_nt_xent_equals_naive_loop(tau, n):
    _, _, z1, z2 = views(n=n, seed=n)
    assert L.nt_xent(z1, z2, tau=tau).item() == pytest.approx(nt_xent_naive(z1, z2, tau), rel=1e-10)


@pytest.mark.parametrize("n", [2, 4, 32])
def test_collapsed_embeddings_give_log_2n_minus_1(n):
    z = torch.ones(n, 4, dtype=torch.float64)
    assert L.nt_xent(z, z, tau=0.3).item() == pytest.approx(math.log(2 * n - 1), rel=1e-12)


def test_nt_xent_symmetric_in_views():
    _, _, z1, z2 = views()
    assert L.nt_xent(z1, z2, tau=0.3).item() == pytest.approx(L.nt_xent(z2, z1, tau=0.3).item(), rel=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_iot_cl_under_ua_equals_simclr(eps):
    h1, h2, z1, z2 = views(seed=1)
    iot = L.iot_cl(h1, h2, z1, z2, eps=eps, relaxation="Ua").loss
    assert iot.item() == pytest.approx(L.nt_xent(z1, z2, tau=eps).item(), rel=1e-10)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_gca_with_one_row_projection_equals_infonce(eps):
    # gca_iters = 0.5: the row projection alone, half a Sinkhorn iteration
    h1, h2, z1, z2 = views(seed=2)
    gca = L.gca_ince(h1, h2, z1, z2, eps=eps, gca_iters=0.5).loss
    assert gca.item() == pytest.approx(L.nt_xent(z1, z2, tau=eps).item(), rel=1e-10)


@pytest.mark.parametrize("t", [1, 3, 10])
def test_gca_iters_counts_full_sinkhorn_iterations(t):
    # T of the GCA paper and its code: T times a row update then a column update, i.e. K = T iterations of the
    # solver; the old count (single projections) made the default T = 5 two and a half iterations
    _, _, z1, z2 = views(n=6, seed=14)
    cost = L.contrastive_cost(z1, z2)
    plan = L._gca_plan(z1, z2, eps=0.5, gca_iters=t)[0].plan
    assert torch.allclose(plan, ref.gca_sinkhorn_plan_loop(cost, eps=0.5, iterations=t), rtol=1e-12, atol=0)
    assert torch.allclose(plan, sinkhorn(cost, eps=0.5, n_iters=t).plan, rtol=1e-12, atol=0)
    half = L._gca_plan(z1, z2, eps=0.5, gca_iters=0.5)[0].plan
    assert torch.allclose(half, ref.gca_row_projection_plan(cost, eps=0.5), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="gca_iters must be a multiple of 0.5"):
        L.gca_ince(None, None, z1, z2, gca_iters=0.75)


@pytest.mark.parametrize("q, lam", [(0.5, 0.01), (1.0, 0.1), (0.1, 0.025)])
@pytest.mark.parametrize("eps", [0.2, 0.5])
def test_gca_rince_with_one_row_projection_is_rince(q, lam, eps):
    # RINCE (Chuang et al. 2022) on unnormalised exp(cos / tau), transcribed independently (tests/transcriptions.py)
    _, _, z1, z2 = views(n=7, seed=15)
    ours = L.gca_rince(None, None, z1, z2, eps=eps, gca_iters=0.5, rince_q=q, rince_lam=lam).loss
    assert ours.item() == pytest.approx(ref.rince(z1, z2, tau=eps, q=q, lam=lam).item(), rel=1e-10)


def test_gca_rince_q_and_lambda_act_on_the_features():
    # the old form rescaled the plan to row mass 1, so after a row update lambda's term was the constant
    # lambda^q / q: the loss moved by exactly (0.5^q - 0.01^q) / q and the gradient not at all
    _, _, z1, z2 = views(n=8, seed=16)

    def loss_and_grad(**kw):
        z = [t.clone().requires_grad_(True) for t in (z1, z2)]
        loss = L.gca_rince(None, None, *z, **kw).loss
        return loss.item(), torch.cat(torch.autograd.grad(loss, z))

    base, g_base = loss_and_grad()  # the defaults: T = 5, q = 0.5, lambda = 0.01
    for kw in ({"rince_lam": 0.5}, {"rince_q": 0.9}):
        value, grad = loss_and_grad(**kw)
        assert (grad - g_base).norm() > 1e-2 * g_base.norm(), kw
    lam_value, _ = loss_and_grad(rince_lam=0.5)
    assert abs((lam_value - base) - (0.5 ** 0.5 - 0.01 ** 0.5) / 0.5) > 1e-3
    # d loss / d lambda at the defaults, by central differences: mean_i lambda^(q-1) (sum_j S_ij)^q, not 0
    h = 1e-6
    up, _ = loss_and_grad(rince_lam=0.01 + h)
    down, _ = loss_and_grad(rince_lam=0.01 - h)
    assert (up - down) / (2 * h) > 0.1


@pytest.mark.parametrize("iterations, q", [(10, 0.98), (3, 0.5)])
def test_gca_rince_code_is_the_authors_public_code(iterations, q):
    # nerdslab/gca gca_loss_cifar.py class gca_rince, transcribed independently; the code pairs rows 2k, 2k+1
    _, _, z1, z2 = views(n=6, seed=17)
    interleaved = torch.stack([z1, z2], dim=1).reshape(12, -1)  # (2N, D): z1[0], z2[0], z1[1], ...
    want = ref.gca_rince_public_code(interleaved, epsilon=0.5, iterations=iterations, lam=0.01, q=q)
    got = L.gca_rince_code(None, None, z1, z2, eps=0.5, gca_iters=iterations, rince_q=q).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    # its lambda is inert (every class weight ends up 1): not a knob of this variant
    assert "rince_lam" not in L.METHODS["gca_rince_code"].knobs
    assert ref.gca_rince_public_code(interleaved, epsilon=0.5, iterations=iterations, lam=0.5, q=q).item() == \
        pytest.approx(want.item(), rel=1e-12)


def test_sinsim_with_beta_zero_equals_simclr():
    h1, h2, z1, z2 = views(seed=3)
    s = L.sinsim(h1, h2, z1, z2, beta=0.0, tau=0.3).loss
    assert s.item() == L.simclr(h1, h2, z1, z2, tau=0.3).loss.item()


def test_sinsim_ot_term_is_the_sinkhorn_plan_cost_and_matches_pot():
    h1, h2, z1, z2 = views(n=12, seed=4)
    cost = L.feature_cost(h1, h2)
    plan = pot.sinkhorn(np.full(12, 1 / 12), np.full(12, 1 / 12), cost.numpy(), 0.05, numItermax=100000,
                        stopThr=1e-13)
    transport = float((plan * cost.numpy()).sum())
    entropy = float(-(plan * (np.log(plan) - 1)).sum())  # H(P) = -sum P (log P - 1)
    for value, expected in (("cost", transport), ("entropic", transport - 0.05 * entropy)):
        out = L.sinsim(h1, h2, z1, z2, beta=0.8, tau=0.5, eps=0.05, sinkhorn_iters=2000, ot_value=value)
        assert out.parts["ot_loss"] == pytest.approx(expected, rel=1e-6)
        assert out.loss.item() == pytest.approx(L.nt_xent(z1, z2, tau=0.5).item() + 0.8 * expected, rel=1e-6)
        assert out.parts["reg_loss"] == pytest.approx(0.8 * expected, rel=1e-6)
    # the paper's Eq. 3 (the entropic objective) is the default
    assert L.sinsim(h1, h2, z1, z2, sinkhorn_iters=2000).parts["ot_loss"] == pytest.approx(
        transport - 0.05 * entropy, rel=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_sinsim_gibbs_kernel_is_the_public_script(eps):
    # squared-Euclidean cost + 1e-6, divided by its detached maximum, sum C exp(-C/eps) / N (an independent
    # transcription of the script as audited); value and gradient
    h1, h2, z1, z2 = views(n=9, seed=18)
    got_h = [h.clone().requires_grad_(True) for h in (h1, h2)]
    want_h = [h.clone().requires_grad_(True) for h in (h1, h2)]
    out = L.sinsim_gibbs_kernel(got_h[0], got_h[1], z1, z2, beta=0.8, eps=eps)
    want = ref.sinsim_script_ot_term(*want_h, eps=eps)
    assert out.parts["ot_loss"] == pytest.approx(want.item(), rel=1e-10)
    assert out.loss.item() == pytest.approx(L.nt_xent(z1, z2, tau=0.5).item() + 0.8 * want.item(), rel=1e-10)
    for g_got, g_want in zip(torch.autograd.grad(out.loss, got_h), torch.autograd.grad(0.8 * want, want_h)):
        assert torch.allclose(g_got, g_want, rtol=1e-8, atol=1e-12)


def _autograd_normalised_cosine(x, y):
    cost = 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    return cost / cost.max().clamp_min(1e-12)


def test_normalised_cosine_cost_has_autograds_values_and_gradient_without_keeping_the_cost():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    y = torch.randn(7, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(L.feature_cost, (x.clone().requires_grad_(True), y.clone().requires_grad_(True)))
    assert torch.autograd.gradcheck(lambda a: L.feature_cost(a, y), (x.clone().requires_grad_(True),))  # y fixed
    # a tie for the maximum (the most dissimilar row of x repeated: autograd's max shares the gradient evenly)
    # and a zero row (F.normalize divides it by 1e-12), against autograd's own ops
    first = 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    x = torch.cat([x, x[int(first.argmax()) // 7][None]])
    x[2] = 0.0
    weights = torch.randn(10, 7, generator=g, dtype=torch.float64)
    results = []
    for fn in (L.feature_cost, _autograd_normalised_cosine):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        cost = fn(xs, ys)
        (cost * weights).sum().backward()
        results.append((cost.detach(), xs.grad, ys.grad))
    (cost, gx, gy), (cost_ref, gx_ref, gy_ref) = results
    assert int((cost == cost.max()).sum()) == 2
    assert torch.allclose(cost, cost_ref, rtol=1e-14, atol=0)
    assert torch.allclose(gx, gx_ref, rtol=1e-12, atol=1e-12 * float(gx_ref.abs().max()))
    assert torch.allclose(gy, gy_ref, rtol=1e-12, atol=1e-12)
    # what backward keeps: only the features and their norms, no N x M matrix (autograd's ops kept the cost)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    for fn in (L.feature_cost, _autograd_normalised_cosine):
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x.clone().requires_grad_(True), y.clone().requires_grad_(True))
        shapes = sorted(kept.values())
        assert ((10, 7) in shapes) == (fn is _autograd_normalised_cosine), shapes
    # no graph wanted: the plain ops (the same values)
    with torch.no_grad():
        assert torch.allclose(L.feature_cost(x, y), cost_ref, rtol=1e-14, atol=0)


def _kept_bytes(build):
    """The storages autograd keeps for backward while ``build()`` makes its graph, as {pointer: bytes}."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        build()
    return kept


def test_sinsim_implicit_ot_term_keeps_one_n_by_n_matrix_for_backward():
    # the bound (at most 2 n x n): the solver's plan, and nothing n x n for the normalised cost; NT-Xent's
    # 2n x 2n softmax keeps its own matrices (beta = 0 builds only those), the OT term adds exactly one n x n
    n, d = 256, 32
    h1, h2, z1, z2 = [t.requires_grad_(True) for t in views(n=n, d=d, seed=9)]
    n_by_n = h1.element_size() * n * n
    big = [v for v in _kept_bytes(lambda: L.sinsim(h1, h2, z1, z2, beta=0.8, ot_grad="implicit")).values()
           if v >= n_by_n]
    base = [v for v in _kept_bytes(lambda: L.sinsim(h1, h2, z1, z2, beta=0.0)).values() if v >= n_by_n]
    assert sum(big) - sum(base) == n_by_n, (sorted(big), sorted(base))


def test_sinsim_debiased_divergence_is_zero_for_identical_clouds():
    h1, _, z1, z2 = views(seed=5)
    out = L.sinsim(h1, h1.clone(), z1, z2, beta=1.0, ot_value="divergence", sinkhorn_iters=200)
    assert abs(out.parts["ot_loss"]) < 1e-10


def test_sinsim_beta_changes_the_encoder_gradient():
    h1, h2, z1, z2 = [t.requires_grad_(True) for t in views(seed=6)]
    L.sinsim(h1, h2, z1, z2, beta=1.0).loss.backward()
    assert h1.grad is not None and h1.grad.abs().sum() > 0  # OT acts on encoder features h


@pytest.mark.parametrize("ot_value", ["entropic", "divergence"])
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_the_gradient_method_never_changes_the_value_minimised(ot_value, eps):
    # every allowed (ot_value, ot_grad) pair: unrolled and implicit give the same value and the same gradient on
    # the encoder features once Sinkhorn has converged (the envelope theorem: dOT_eps/dC = P*)
    out, grads = {}, {}
    for grad in ("unrolled", "implicit"):
        h1, h2, z1, z2 = [t.requires_grad_(True) for t in views(n=10, seed=19)]
        out[grad] = L.sinsim(h1, h2, z1, z2, beta=1.0, eps=eps, ot_value=ot_value, ot_grad=grad, sinkhorn_iters=3000)
        out[grad].loss.backward()
        grads[grad] = torch.cat([h1.grad, h2.grad])
    assert out["unrolled"].parts["ot_loss"] == pytest.approx(out["implicit"].parts["ot_loss"], rel=1e-8)
    assert torch.allclose(grads["unrolled"], grads["implicit"], rtol=1e-6, atol=1e-9 * float(grads["implicit"].abs().max()))
    # and the value knob does change the gradient: <P*, C>'s differs from OT_eps's
    h1, h2, z1, z2 = [t.requires_grad_(True) for t in views(n=10, seed=19)]
    L.sinsim(h1, h2, z1, z2, beta=1.0, eps=eps, ot_value="cost", sinkhorn_iters=3000).loss.backward()
    cost_grad = torch.cat([h1.grad, h2.grad])
    if ot_value == "entropic":
        assert (cost_grad - grads["implicit"]).norm() > 0.05 * grads["implicit"].norm()


def test_sinsim_refuses_an_implicit_gradient_of_the_transport_cost():
    h1, h2, z1, z2 = views()
    for kw in ({"ot_grad": "implicit"}, {"ot_solver": "sns"}):
        with pytest.raises(ValueError, match=r"ot_value=cost \(<P\*, C>\) has no implicit gradient"):
            L.sinsim(h1, h2, z1, z2, ot_value="cost", **kw)


@pytest.mark.parametrize("ot_value", ["entropic", "divergence"])
def test_sinsim_with_sns_is_the_converged_implicit_objective_and_its_gradient(ot_value):
    # ot_solver="sns": the plan solved to 1e-6 by Sinkhorn-Newton-Sparse, with the envelope gradient; at
    # convergence that is OT_eps and its gradient as Sinkhorn run long with grad="implicit" gives them
    out, grads = {}, {}
    for name, kw in (("sns", {"ot_solver": "sns"}), ("long", {"ot_grad": "implicit", "sinkhorn_iters": 5000})):
        h1, h2, z1, z2 = [t.requires_grad_(True) for t in views(n=12, seed=8)]
        out[name] = L.sinsim(h1, h2, z1, z2, beta=0.8, eps=0.02, ot_value=ot_value, **kw)
        out[name].loss.backward()
        grads[name] = h1.grad
    assert out["sns"].parts["ot_loss"] == pytest.approx(out["long"].parts["ot_loss"], rel=1e-6, abs=1e-9)
    # the same up to SNS's 1e-6 marginal error (the plan is the gradient of OT_eps with respect to the cost)
    assert float((grads["sns"] - grads["long"]).abs().max()) <= 1e-3 * float(grads["long"].abs().max()) > 0
    assert out["sns"].parts["ot_marginal_err"] <= 1e-6
    assert out["sns"].parts["ot_iters"] < out["long"].parts["ot_iters"]
    with pytest.raises(ValueError, match="ot_solver must be 'sinkhorn' or 'sns', got 'newton'"):
        L.sinsim(*views(), ot_solver="newton")


def test_iot_cl_uab_converges_to_both_marginals_and_u1_sums_to_one():
    _, _, z1, z2 = views(n=6, seed=7)
    cost = L.contrastive_cost(z1, z2)
    plan = sinkhorn(cost, eps=0.5, n_iters=500).plan
    assert torch.allclose(plan.sum(1), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(plan.sum(0), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-10)
    from trainables.ot import coupling_u1
    p1 = coupling_u1(cost, eps=0.5).exp()
    assert p1.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(p1.diagonal() == 0)


def test_iot_cl_uab_equals_algorithm_1():
    """Algorithm 1 of Shi et al. (row then column normalisation, K rounds) as written in the paper."""
    _, _, z1, z2 = views(n=5, seed=8)
    eps, k = 0.5, 3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    cost = 1 - z @ z.T
    probs = torch.exp(-cost / eps) * (1 - torch.eye(10, dtype=torch.float64))
    for _ in range(k):
        probs = probs / probs.sum(1, keepdim=True)
        probs = probs / probs.sum(0, keepdim=True)
    pos = torch.cat([torch.diagonal(probs, 5), torch.diagonal(probs, -5)])
    # Algorithm 1 returns -sum log(prob+)/2N on a doubly-stochastic-scaled matrix (each column sums to 1,
    # i.e. 2N times our plan); KL(P~|P) removes that log(2N) offset
    alg1 = -torch.log(pos).sum() / 10
    ours = L.iot_cl(None, None, z1, z2, eps=eps, relaxation="Uab", sinkhorn_iters=k).loss
    assert ours.item() == pytest.approx(alg1.item(), rel=1e-10)


def test_iot_cl_uniformity_penalty_by_hand():
    _, _, z1, z2 = views(n=4, seed=9)
    out = L.iot_cl(None, None, z1, z2, eps=0.5, relaxation="Ua", lambda_p=2.0)
    logp = L.contrastive_cost(z1, z2)
    p = torch.softmax(-logp / 0.5, dim=1) / 8
    neg = ~torch.eye(8, dtype=torch.bool)
    idx = torch.arange(8)
    neg[idx, (idx + 4) % 8] = False
    m = p[neg].mean()
    q = torch.where(neg, m, p)
    q.fill_diagonal_(0)
    allowed = ~torch.eye(8, dtype=torch.bool)
    kl = (q[allowed] * torch.log(q[allowed] / p[allowed])).sum()
    assert out.parts["iot_uniform"] == pytest.approx(kl.item(), rel=1e-10)
    assert out.loss.item() == pytest.approx(out.parts["iot_align"] + 2.0 * kl.item(), rel=1e-10)


def test_gca_uot_tends_to_balanced_gca_for_large_lambdas():
    h1, h2, z1, z2 = views(seed=11)
    bal = L.gca_ince(h1, h2, z1, z2, eps=0.5, gca_iters=100).loss
    uot = L.gca_uot(h1, h2, z1, z2, eps=0.5, gca_iters=100, uot_lambda1=1e6, uot_lambda2=1e6).loss
    assert uot.item() == pytest.approx(bal.item(), rel=1e-4)


def _dense_reference(method, z1, z2, cfg):
    """The 2N x 2N formulas the losses used before they read only the positive pairs: the full log-plan,
    the dense target and generalised KL, RINCE's logsumexp over rows, IOT-CL's gather from the full log-plan."""
    n = z1.shape[0]
    res, _ = L._gca_plan(z1, z2, eps=cfg["eps"], gca_iters=cfg["gca_iters"],
                         uot_lambda1=cfg.get("uot_lambda1"), uot_lambda2=cfg.get("uot_lambda2")) \
        if method != "iot_cl" else (sinkhorn(L.contrastive_cost(z1, z2), eps=cfg["eps"],
                                             n_iters=cfg["sinkhorn_iters"]), None)
    log_p = res.log_plan()
    idx = torch.arange(2 * n)
    pos = (idx + n) % (2 * n)
    if method in ("gca_ince", "gca_uot"):
        # the generalised KL(T | P) = sum T log(T / P) - sum T + sum P, T = 1/(2N) on the positives
        t = torch.zeros_like(res.plan)
        t[idx, pos] = 1.0 / (2 * n)
        on = t > 0
        return (t[on] * (torch.log(t[on]) - log_p[on])).sum() - t.sum() + res.plan.sum()
    if method == "gca_rince":
        log_s = log_p - res.f[:, None] / cfg["eps"] + 1 / cfg["eps"]  # the plan without its row scaling: (1+g-C)/eps
        q, lam = 0.5, 0.01
        return ((-torch.exp(q * log_s[idx, pos]) + torch.exp(q * (math.log(lam) + torch.logsumexp(log_s, 1)))) / q
                ).mean()
    return -(log_p[idx, pos] + math.log(2 * n)).mean()


@pytest.mark.parametrize("method, cfg", [
    ("gca_ince", dict(eps=0.5, gca_iters=2.5)),
    ("gca_ince", dict(eps=0.1, gca_iters=2)),
    ("gca_uot", dict(eps=0.5, gca_iters=2.5, uot_lambda1=1.0, uot_lambda2=0.5)),
    ("gca_rince", dict(eps=0.5, gca_iters=2.5)),
    ("iot_cl", dict(eps=0.5, sinkhorn_iters=4, relaxation="Uab")),
])
def test_losses_reading_only_the_positive_pairs_equal_the_dense_formulas(method, cfg):
    _, _, z1, z2 = views(n=6, seed=21)
    got_z = [z.clone().requires_grad_(True) for z in (z1, z2)]
    want_z = [z.clone().requires_grad_(True) for z in (z1, z2)]
    got = L.compute_loss(method, None, None, *got_z, cfg).loss
    want = _dense_reference(method, *want_z, cfg)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for g_got, g_want in zip(torch.autograd.grad(got, got_z), torch.autograd.grad(want, want_z)):
        assert torch.allclose(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_barlow_twins_and_vicreg_closed_forms():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 8, generator=g, dtype=torch.float64))
    z = (q - q.mean(0)) * 8.0  # centred, mutually orthogonal columns
    bt = L.barlow_twins(None, None, z, z.clone())
    assert bt.parts["bt_on_diag"] < 1e-2  # identical, whitened-ish views: c_ii ~ 1
    vic = L.vicreg(None, None, z, z.clone())
    assert vic.parts["vic_inv"] == 0.0
    collapsed = torch.ones(16, 8, dtype=torch.float64)
    v = L.vicreg(None, None, collapsed, collapsed)
    assert v.parts["vic_var"] == pytest.approx(1.0 - math.sqrt(1e-4), rel=1e-12)  # relu(1 - sqrt(0 + 1e-4))


# sinsim_gibbs_kernel reproduces the public script, whose detached maximum makes its gradient differ from the
# loss's derivative by design; test_sinsim_gibbs_kernel_is_the_public_script compares it with the script's
@pytest.mark.parametrize("name", sorted(set(L.METHODS) - {"sinsim_gibbs_kernel"}))
def test_gradcheck_every_loss_float64(name):
    h1, h2, z1, z2 = [t.requires_grad_(True) for t in views(n=4, d=3, dh=5, seed=12)]
    knobs = {k: v for k, v in (("sinkhorn_iters", 3), ("gca_iters", 1.5)) if k in L.METHODS[name].knobs}

    def f(a, b, c, d):
        return L.compute_loss(name, a, b, c, d, knobs).loss

    assert torch.autograd.gradcheck(f, (h1, h2, z1, z2), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(L.METHODS))
@pytest.mark.parametrize("case", ["collapsed", "orthogonal", "tiny_eps"])
def test_every_loss_finite(name, case):
    n, d = 8, 16
    if case == "collapsed":
        z1 = z2 = torch.ones(n, d)
        h1 = h2 = torch.ones(n, 2 * d)
    elif case == "orthogonal":
        z1 = z2 = torch.eye(d)[:n]
        h1 = h2 = torch.eye(2 * d)[:n]
    else:
        h1, h2, z1, z2 = views(n=n, d=d, dh=2 * d, seed=13, dtype=torch.float32)
    knobs = {"eps": 1e-3} if ("eps" in L.METHODS[name].knobs and case == "tiny_eps") else {}
    tensors = [t.clone().requires_grad_(True) for t in (h1, h2, z1, z2)]
    if name == "gca_rince" and case == "tiny_eps":  # RINCE's unnormalised exp(q cos / eps) would overflow
        with pytest.raises(ValueError, match=r"= 501 > 80: RINCE's \(lambda sum_j exp\(cos_ij / eps\)\)\^q overflows"):
            L.compute_loss(name, *tensors, knobs)
        return
    out = L.compute_loss(name, *tensors, knobs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for t in tensors:
        assert t.grad is None or torch.isfinite(t.grad).all()


def test_unknown_method_and_bad_knobs():
    h1, h2, z1, z2 = views()
    with pytest.raises(ValueError, match="unknown method 'simclr2'"):
        L.compute_loss("simclr2", h1, h2, z1, z2, {})
    with pytest.raises(ValueError, match="relaxation must be one of"):
        L.iot_cl(h1, h2, z1, z2, relaxation="U2")
    with pytest.raises(ValueError, match=r"z1 and z2 must both have shape"):
        L.simclr(h1, h2, z1, z2[:3])
    with pytest.raises(ValueError, match="N >= 2"):
        L.simclr(h1, h2, z1[:1], z2[:1])


def test_gca_rince_is_refused_exactly_where_a_collapsed_batch_would_overflow_float32():
    # every cosine at 1: (lambda sum_j S_ij)^q is the largest term; at the bound it is finite, past it the old
    # check (q / eps alone) let lambda = 100 through to an infinite loss
    from trainables.catalog import RINCE_EXP_LIMIT
    from trainables.config import TrialConfig

    n = 256
    z = torch.ones(n, 16)
    at_bound = 1.0 / (RINCE_EXP_LIMIT - math.log(2 * n))
    loss = L.gca_rince(None, None, z, z.clone(), eps=at_bound * 1.0001, gca_iters=5, rince_q=1.0, rince_lam=1.0).loss
    assert torch.isfinite(loss) and loss.item() > 1e34
    with pytest.raises(ValueError, match=r"= 90.8 > 80"):
        L.gca_rince(None, None, z, z.clone(), eps=0.0125, gca_iters=5, rince_q=1.0, rince_lam=100.0)
    with pytest.raises(ValueError, match=r"gca_rince: rince_q \(1/eps \+ log\(max\(rince_lam, 1\) 2 batch_size\)\) = 90.8"):
        TrialConfig.from_dict({"method": "gca_rince", "eps": 0.0125, "rince_q": 1.0, "rince_lam": 100.0,
                               "batch_size": 256})
    # the authors' form takes logs (log-softmax) and has no lambda: eps = 0.01 is fine there
    TrialConfig.from_dict({"method": "gca_rince_code", "eps": 0.01})
    assert torch.isfinite(L.gca_rince_code(None, None, z, z.clone(), eps=0.01).loss)
