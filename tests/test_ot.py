"""trainables.ot against POT, the marginals, masking, stability and gradients."""
import math
import time
import warnings

import numpy as np
import ot as pot
import pytest
import torch

from trainables.ot import (SinkhornNotConvergedWarning, coupling_u1, coupling_ua, sinkhorn,
                            sinkhorn_newton_sparse)


def random_cost(n, m, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randn(m, 5, generator=g, dtype=dtype) + 0.3
    c = torch.cdist(x, y) ** 2
    return c / c.max()


def two_d_clouds(n, seed):
    """The sns benchmark's problem: squared distances (/ max) between n Gaussian points in 2-D and n shifted by 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) + 1.0
    c = torch.cdist(x, y) ** 2
    return c / c.max()


def rel_err(p, q):
    return float(np.abs(p - q).max() / np.abs(q).max())


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.5])
@pytest.mark.parametrize("n,m", [(8, 8), (33, 20), (64, 64)])
@pytest.mark.parametrize("domain", ["kernel", "stabilized", "log"])
def test_balanced_plan_equals_pot(eps, n, m, domain):
    cost = random_cost(n, m, seed=n + m)
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    ref = pot.sinkhorn(a, b, cost.numpy(), eps, numItermax=200000, stopThr=1e-13)
    res = sinkhorn(cost, eps=eps, n_iters=200000, tol=1e-13, domain=domain, warn=False)
    assert res.domain == domain
    assert rel_err(res.plan.numpy(), ref) < 1e-5


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.5])
@pytest.mark.parametrize("lams", [(1.0, 0.5), (0.1, 10.0), (math.inf, 0.5)])
@pytest.mark.parametrize("domain", ["kernel", "stabilized", "log"])
def test_unbalanced_plan_equals_pot(eps, lams, domain):
    cost = random_cost(30, 25, seed=3) + 2.0  # a cost offset matters for UOT: exercises the shift fix
    a, b = np.full(30, 1 / 30), np.full(25, 1 / 25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that reg_type='entropy' ignores its c argument
        ref = pot.unbalanced.sinkhorn_unbalanced(a, b, cost.numpy(), eps, lams, reg_type="entropy",
                                                 numItermax=200000, stopThr=1e-14)
    res = sinkhorn(cost, eps=eps, n_iters=200000, tol=1e-13, domain=domain, uot_lambda1=lams[0],
                   uot_lambda2=lams[1], warn=False)
    assert rel_err(res.plan.numpy(), ref) < 1e-5


def test_custom_marginals_are_met():
    cost = random_cost(20, 30, seed=1)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    res = sinkhorn(cost, eps=0.05, n_iters=5000, a=a, b=b, tol=1e-12)
    assert torch.allclose(res.plan.sum(1), a, atol=1e-10)
    assert torch.allclose(res.plan.sum(0), b, atol=1e-10)
    assert res.marginal_error < 1e-12


def test_batched_problems_equal_separate_solves():
    costs = torch.stack([random_cost(12, 12, seed=s) for s in range(3)])  # (3, 12, 12)
    batched = sinkhorn(costs, eps=0.1, n_iters=50)
    for i in range(3):
        single = sinkhorn(costs[i], eps=0.1, n_iters=50)
        assert torch.allclose(batched.plan[i], single.plan, atol=1e-12)


def test_batched_stabilized_problems_equal_separate_solves():
    # float32 at eps = 0.01: the stabilised domain, whose absorptions are decided over the whole batch
    costs = torch.stack([random_cost(16, 16, seed=s, dtype=torch.float32) * (1 + s) for s in range(3)])
    batched = sinkhorn(costs, eps=0.01, n_iters=60)
    assert batched.domain == "stabilized"
    for i in range(3):
        single = sinkhorn(costs[i], eps=0.01, n_iters=60)
        assert torch.allclose(batched.plan[i], single.plan, rtol=1e-4, atol=1e-7)


def test_masked_pairs_get_exactly_zero_mass():
    n = 10
    cost = random_cost(n, n, seed=2)
    mask = ~torch.eye(n, dtype=torch.bool)
    for domain in ("kernel", "stabilized", "log"):
        res = sinkhorn(cost, eps=0.05, n_iters=500, mask=mask, domain=domain)
        assert torch.all(res.plan.diagonal() == 0.0)
        assert torch.allclose(res.plan.sum(1), torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-8)
    inf_cost = cost.masked_fill(~mask, math.inf)
    res = sinkhorn(inf_cost, eps=0.05, n_iters=500)
    assert torch.all(res.plan.diagonal() == 0.0)
    assert torch.isfinite(res.transport_cost())


def test_masked_plan_equals_pot_with_forbidden_entries():
    # POT has no mask; a zero kernel entry is the same thing: compare on the kernel domain
    n = 12
    cost = random_cost(n, n, seed=5)
    mask = ~torch.eye(n, dtype=torch.bool)
    res = sinkhorn(cost, eps=0.1, n_iters=100000, mask=mask, tol=1e-13, warn=False)
    k = np.exp(-cost.numpy() / 0.1) * mask.numpy()
    u, v = np.ones(n), np.ones(n)
    for _ in range(100000):
        u = (1 / n) / (k @ v)
        v = (1 / n) / (k.T @ u)
    ref = u[:, None] * k * v[None, :]
    assert rel_err(res.plan.numpy(), ref) < 1e-6


@pytest.mark.parametrize("eps", [1e-3, 1e-2])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_stable_for_small_eps_and_large_costs(eps, scale):
    cost = (random_cost(64, 64, seed=7, dtype=torch.float32) * scale).requires_grad_(True)
    res = sinkhorn(cost, eps=eps, n_iters=50)
    assert res.domain in ("log", "kernel64")  # float32 exp(-C/eps) underflows, and an unrolled gradient: never
    # the float32 kernel, nor the stabilised one (see test_unrolled_gradient_never_uses_the_stabilized_kernel)
    assert torch.isfinite(res.plan).all()
    value = res.transport_cost()
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(cost.grad).all()


def test_auto_picks_kernel_when_safe():
    res = sinkhorn(random_cost(16, 16, seed=0, dtype=torch.float32), eps=0.5, n_iters=10)
    assert res.domain == "kernel"


@pytest.mark.parametrize("lams", [(None, None), (1.0, 2.0)])
def test_implicit_gradient_matches_unrolled_at_convergence(lams):
    cost = random_cost(15, 15, seed=9)
    grads = {}
    for mode in ("unrolled", "implicit"):
        c = cost.clone().requires_grad_(True)
        res = sinkhorn(c, eps=0.1, n_iters=3000, tol=1e-13, ot_grad=mode, uot_lambda1=lams[0],
                       uot_lambda2=lams[1], warn=False)
        res.objective().backward()
        grads[mode] = c.grad
    # envelope theorem: d OT_eps / dC = P*
    assert torch.allclose(grads["implicit"], grads["unrolled"], rtol=1e-6, atol=1e-9)
    plan = sinkhorn(cost, eps=0.1, n_iters=3000, tol=1e-13, uot_lambda1=lams[0], uot_lambda2=lams[1],
                    warn=False).plan
    assert torch.allclose(grads["implicit"], plan, rtol=1e-6, atol=1e-10)


def test_implicit_keeps_no_graph_through_iterations():
    c = random_cost(20, 20, seed=4).requires_grad_(True)
    res = sinkhorn(c, eps=0.1, n_iters=100, ot_grad="implicit")
    assert not res.f.requires_grad and not res.g.requires_grad
    assert res.plan.requires_grad  # one exp((f + g - C)/eps) carries the gradient


def test_gradcheck_unrolled_float64():
    c = random_cost(5, 4, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, eps=0.2, n_iters=10).transport_cost(), (c,))
    assert torch.autograd.gradcheck(
        lambda x: sinkhorn(x, eps=0.2, n_iters=10, uot_lambda1=1.0, uot_lambda2=0.5).objective(), (c,))


def _recorded_unrolled(cost, eps, n_half, a, b, lam1=None, lam2=None):
    """The kernel-domain updates recorded op by op by autograd (what sinkhorn's unrolled gradient was before
    its reverse pass was written out): the plan after ``n_half`` updates, rows first."""
    fi1 = 1.0 if lam1 is None else lam1 / (lam1 + eps)
    fi2 = 1.0 if lam2 is None else lam2 / (lam2 + eps)
    k = torch.exp(-cost / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for step in range(n_half):
        if step % 2 == 0:
            u = (a / (k @ v[..., :, None])[..., 0]) ** fi1
        else:
            v = (b / (k.transpose(-1, -2) @ u[..., :, None])[..., 0]) ** fi2
    return u[..., :, None] * k * v[..., None, :]


@pytest.mark.parametrize("shape, lams, steps", [
    ((7, 5), (None, None), dict(n_iters=10)),
    ((3, 6, 4), (None, None), dict(n_iters=6)),  # a batch of problems
    ((6, 6), (1.0, 0.5), dict(n_iters=8)),  # unbalanced (GCA-UOT)
    ((6, 5), (None, 2.0), dict(n_iters=5)),
    ((5, 5), (None, None), dict(n_projections=1)),  # rows only: U(a)
    ((5, 7), (None, None), dict(n_projections=5)),  # ends on a row update
    ((8, 8), (None, None), dict(n_iters=1000, tol=1e-5)),  # stopped early by tol
])
def test_unrolled_gradient_equals_autograd_recorded_op_by_op(shape, lams, steps):
    # the written-out reverse pass of the unrolled updates against autograd's own, for <P, C>, OT_eps (which
    # also goes through the potentials f = eps log u, g = eps log v) and random weights on the plan
    g = torch.Generator().manual_seed(11)
    cost = torch.rand(*shape, generator=g, dtype=torch.float64)
    a = torch.rand(*shape[:-1], generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(*shape[:-2], shape[-1], generator=g, dtype=torch.float64) + 0.5
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    weights = torch.randn(*shape, generator=g, dtype=torch.float64)
    c = cost.clone().requires_grad_(True)
    res = sinkhorn(c, eps=0.1, a=a, b=b, uot_lambda1=lams[0], uot_lambda2=lams[1], warn=False, **steps)
    if "tol" in steps:
        assert res.n_iters < steps["n_iters"]
    ref_c = cost.clone().requires_grad_(True)
    ref = _recorded_unrolled(ref_c, 0.1, steps.get("n_projections") or int(round(2 * res.n_iters)), a, b, *lams)
    assert torch.allclose(res.plan, ref, rtol=1e-12, atol=1e-15)
    nodes, seen = [res.plan.grad_fn], set()
    while nodes:  # the written-out reverse pass is the one in the graph
        node = nodes.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes += [nxt for nxt, _ in node.next_functions]
    assert "_UnrolledScalingBackward" in {type(node).__name__ for node in seen}

    def kl(x, w, lam):
        return 0.0 if lam is None else lam * (x * torch.log(x / w) - x + w).sum()

    # <P, C>, <P, W> and OT_eps (whose entropy term also goes through the potentials f = eps log u, g = eps log v)
    for got_value, want_value in [
        (res.transport_cost().sum(), (ref * ref_c).sum()),
        ((res.plan * weights).sum(), (ref * weights).sum()),
        (res.objective().sum(), (ref * ref_c).sum() + 0.1 * (ref * (ref.log() - 1.0)).sum()
         + kl(ref.sum(-1), a, lams[0]) + kl(ref.sum(-2), b, lams[1])),
    ]:
        assert torch.allclose(got_value, want_value, rtol=1e-12)
        got = torch.autograd.grad(got_value, c, retain_graph=True)[0]
        want = torch.autograd.grad(want_value, ref_c, retain_graph=True)[0]
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-13)


def test_log_plan_at_pairs_equals_the_full_log_plan_there():
    cost = random_cost(7, 5, seed=12)
    res = sinkhorn(cost, eps=0.1, n_iters=6, uot_lambda1=1.0)
    rows, cols = torch.tensor([0, 3, 6, 2]), torch.tensor([4, 0, 1, 1])
    assert torch.allclose(res.log_plan_at(rows, cols), res.log_plan()[rows, cols], rtol=1e-14, atol=0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ot_grad", ["unrolled", "implicit"])
def test_values_without_forbidden_pairs_skip_the_masking_and_agree_with_it(masked, ot_grad):
    import dataclasses

    cost = random_cost(9, 7, seed=13)
    if masked:
        cost[2, 3] = cost[5, 0] = math.inf
    c = cost.clone().requires_grad_(True)
    res = sinkhorn(c, eps=0.1, n_iters=20, ot_grad=ot_grad, uot_lambda1=None if masked else 2.0)
    assert res.forbidden is masked
    unknown = dataclasses.replace(res, forbidden=None)  # the masked formulas
    for value in ("transport_cost", "objective"):
        got, want = getattr(res, value)(), getattr(unknown, value)()
        assert torch.isfinite(got) and torch.allclose(got, want, rtol=1e-13)
        g_got = torch.autograd.grad(got, c, retain_graph=True)[0]
        g_want = torch.autograd.grad(want, c, retain_graph=True)[0]
        assert torch.allclose(g_got, g_want, rtol=1e-12, atol=1e-15, equal_nan=True)  # NaN: d/dC at C = inf


def test_tol_stops_early_and_warns_when_not_reached():
    cost = random_cost(30, 30, seed=3)
    res = sinkhorn(cost, eps=0.5, n_iters=1000, tol=1e-6)
    assert res.n_iters < 1000 and res.marginal_error < 1e-6
    with pytest.warns(SinkhornNotConvergedWarning, match="marginal error"):
        sinkhorn(cost, eps=0.01, n_iters=2, tol=1e-9)


def test_projections_count_rows_first():
    cost = random_cost(10, 10, seed=8)
    one = sinkhorn(cost, eps=0.1, n_projections=1)
    assert torch.allclose(one.plan.sum(1), torch.full((10,), 0.1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(one.plan, coupling_ua(cost, eps=0.1).exp(), atol=1e-12)
    four = sinkhorn(cost, eps=0.1, n_projections=4)
    two = sinkhorn(cost, eps=0.1, n_iters=2)
    assert torch.allclose(four.plan, two.plan)


def test_closed_form_couplings():
    cost = random_cost(7, 9, seed=6)
    p1 = coupling_u1(cost, eps=0.2).exp()
    assert torch.isclose(p1.sum(), torch.tensor(1.0, dtype=torch.float64))
    ref = torch.softmax((-cost / 0.2).flatten(), 0).view(7, 9)
    assert torch.allclose(p1, ref)
    pa = coupling_ua(cost, eps=0.2).exp()
    assert torch.allclose(pa.sum(1), torch.full((7,), 1 / 7, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 0.0, "n_iters": 5}, "eps must be"),
    ({"eps": -1.0, "n_iters": 5}, "eps must be"),
    ({"eps": 0.1}, "exactly one of n_iters"),
    ({"eps": 0.1, "n_iters": 5, "n_projections": 3}, "exactly one of n_iters"),
    ({"eps": 0.1, "n_iters": 0}, "n_iters must be"),
    ({"eps": 0.1, "n_iters": 5, "uot_lambda1": -1.0}, "uot_lambda1 must be > 0"),
    ({"eps": 0.1, "n_iters": 5, "domain": "fast"}, "domain must be"),
    ({"eps": 0.1, "n_iters": 5, "ot_grad": "magic"}, "ot_grad must be"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(random_cost(4, 4, seed=0), **kwargs)


@pytest.mark.parametrize("where, value, match", [
    ((0, 1, slice(None)), math.inf, "at least one allowed"),  # a row of the first problem
    ((1, slice(None), 2), math.inf, "at least one allowed"),  # a column of the second
    ((1, 0, 0), math.nan, "cost contains NaN"),
    ((0, 2, 1), -math.inf, "cost contains -inf"),
])
def test_a_cost_without_a_solution_is_a_one_line_error(where, value, match):
    cost = torch.stack([random_cost(3, 4, seed=0), random_cost(3, 4, seed=1)])
    cost[0, 0, 0] = math.inf  # a forbidden pair alone is fine
    assert torch.isfinite(sinkhorn(cost, eps=0.1, n_iters=3).plan).all()
    cost[where] = value
    with pytest.raises(ValueError, match=match):
        sinkhorn(cost, eps=0.1, n_iters=3)


@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_sns_plan_equals_pot(eps):
    cost = random_cost(64, 64, seed=11)
    a = np.full(64, 1 / 64)
    ref = pot.sinkhorn(a, a, cost.numpy(), eps, numItermax=500000, stopThr=1e-12)
    res = sinkhorn_newton_sparse(cost, eps=eps, tol=1e-10)
    assert res.marginal_error < 1e-10
    assert rel_err(res.plan.numpy(), ref) < 1e-5


def test_sns_rectangular_weighted_plan_equals_pot_and_its_gradient_is_the_plan():
    # n != m and non-uniform marginals exercise the Schur-complement solve (d_f eliminated), with the exact
    # Hessian (dense: at this size the kept entries exceed dense_above) and with the sparsified one (CSR)
    g = torch.Generator().manual_seed(7)
    cost = random_cost(48, 80, seed=7)
    a = torch.rand(48, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(80, generator=g, dtype=torch.float64) + 0.2
    a, b = a / a.sum(), b / b.sum()
    ref = pot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), 0.005, method="sinkhorn_log", numItermax=500000,
                       stopThr=1e-12)
    c = cost.clone().requires_grad_(True)
    res = sinkhorn_newton_sparse(c, eps=0.005, a=a, b=b, tol=1e-10)
    assert res.marginal_error < 1e-10
    assert rel_err(res.plan.detach().numpy(), ref) < 1e-5
    res.objective().backward()  # envelope theorem: d OT_eps / dC = P*
    assert torch.allclose(c.grad, res.plan.detach(), atol=1e-12)
    sparse = sinkhorn_newton_sparse(cost, eps=0.005, a=a, b=b, tol=1e-10, dense_above=1.0)
    assert sparse.marginal_error < 1e-10 and sparse.n_iters < 40
    assert rel_err(sparse.plan.numpy(), ref) < 1e-5


def test_sns_needs_ten_times_fewer_iterations_at_small_eps():
    cost = random_cost(64, 64, seed=11)
    # the paper's handover (Newton as soon as Sinkhorn slows; the default hands over later, for time)
    sns = sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-6, handover_error=None)
    plain = sinkhorn(cost, eps=0.003, n_iters=200000, tol=1e-6, warn=False)
    assert sns.marginal_error < 1e-6 and plain.marginal_error < 1e-6
    assert sns.n_iters * 10 <= plain.n_iters  # the SNS paper's claim (Sinkhorn warm-up + Newton steps)
    assert torch.allclose(sns.plan, plain.plan, atol=1e-6)


def test_sns_needs_ten_times_fewer_iterations_on_2d_clouds_where_newton_is_damped_for_many_steps():
    # 2-D Gaussian clouds (the sns benchmark's problem, n = 256): far from the solution the plan nearly splits
    # into blocks and the line search cuts Newton's steps; every step still counts one iteration (an earlier
    # version ran Sinkhorn iterations after each cut step: 42 here, against 281 for Sinkhorn)
    cost = two_d_clouds(256, seed=3)
    sns = sinkhorn_newton_sparse(cost, eps=0.002, tol=1e-6, handover_error=None)  # the paper's handover
    plain = sinkhorn(cost, eps=0.002, n_iters=20000, tol=1e-6)
    assert sns.marginal_error < 1e-6 and plain.marginal_error < 1e-6
    assert sns.n_iters * 10 <= plain.n_iters
    assert torch.allclose(sns.plan, plain.plan, atol=1e-6)


def test_sns_warm_start_at_a_larger_eps_takes_fewer_iterations_on_2d_clouds():
    # the benchmark's clouds (n = 512, eps = 0.005): Sinkhorn needs ~109 iterations; from 3 iterations at
    # 4 eps, Newton reaches 1e-6 in 10 in all (13 from the warm-up at eps), the same plan
    cost = two_d_clouds(512, seed=0)
    plain = sinkhorn(cost, eps=0.005, n_iters=20000, tol=1e-6)
    at_eps = sinkhorn_newton_sparse(cost, eps=0.005, tol=1e-6)
    warm = sinkhorn_newton_sparse(cost, eps=0.005, tol=1e-6, warm_start_factor=4)
    assert warm.marginal_error < 1e-6 and at_eps.marginal_error < 1e-6
    assert warm.n_iters < at_eps.n_iters and 10 * warm.n_iters <= plain.n_iters
    assert float((warm.plan - plain.plan).abs().sum()) < 1e-5


def test_sns_falls_back_to_sinkhorn_iterations_when_a_newton_step_gives_no_ascent(monkeypatch):
    # every CG solve broken (a NaN direction): each Newton attempt is replaced by a Sinkhorn iteration, so
    # SNS becomes Sinkhorn: the same iterations to the same tolerance, the same plan, no warning
    from trainables.ot import sns as ot_sns
    monkeypatch.setattr(ot_sns, "_pcg", lambda matvec, b, d, **kw: b * float("nan"))  # a tensor or an array
    cost = random_cost(32, 32, seed=2)
    plain = sinkhorn(cost, eps=0.05, n_iters=1000, tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sinkhorn_newton_sparse(cost, eps=0.05, tol=1e-9, sinkhorn_budget=0)
    assert res.n_iters == plain.n_iters and res.marginal_error < 1e-9
    assert torch.allclose(res.plan, plain.plan, atol=1e-12, rtol=0)
    # every iteration is Sinkhorn's; the refused directions are counted apart (1, 2, 4, 8, 16, 16, ...)
    assert res.newton["sinkhorn_iters"] == res.n_iters and res.newton["newton_steps"] == 0
    assert res.newton["failed_steps"] >= 2 and res.newton["newton_s"] > 0


def test_sns_reports_where_its_iterations_and_time_went(monkeypatch):
    # OTResult.newton: the Sinkhorn iterations before Newton plus the Newton steps make n_iters; CG's products
    # are counted (checked against the products _pcg is handed); the Newton phase's time is part of the solve's
    from trainables.ot import sns as ot_sns

    calls = []
    pcg = ot_sns._pcg

    def counting_pcg(matvec, *args, **kwargs):
        def product(y):
            calls.append(1)
            return matvec(y)
        return pcg(product, *args, **kwargs)

    monkeypatch.setattr(ot_sns, "_pcg", counting_pcg)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, x + 1.0 + 0.3 * torch.randn(200, 2, generator=g, dtype=torch.float64)) ** 2
    cost = cost / cost.max()
    t0 = time.perf_counter()
    res = sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-8, sinkhorn_budget=0)  # the paper's fixed warm-up
    wall = time.perf_counter() - t0
    stats = res.newton
    assert res.marginal_error < 1e-8 and stats["sinkhorn_iters"] == 5 and stats["failed_steps"] == 0
    assert stats["sinkhorn_iters"] + stats["newton_steps"] == res.n_iters and stats["newton_steps"] >= 3
    assert 0 <= stats["damped_steps"] < stats["newton_steps"]  # the last steps are full Newton steps
    assert stats["cg_products"] == len(calls) and stats["cg_products"] >= stats["newton_steps"]
    assert 0 < stats["newton_s"] < wall
    # the default hands over later: more Sinkhorn iterations, fewer Newton steps, the same accounting
    later = sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-8)
    assert later.newton["sinkhorn_iters"] > 5 and later.newton["newton_steps"] < stats["newton_steps"]
    assert later.newton["sinkhorn_iters"] + later.newton["newton_steps"] == later.n_iters
    # Sinkhorn alone within tol in the warm-up: no Newton phase; plain Sinkhorn reports none
    easy = sinkhorn_newton_sparse(cost, eps=0.5, tol=1e-8)
    assert easy.newton["newton_steps"] == 0 and easy.newton["newton_s"] == 0.0
    assert easy.newton["sinkhorn_iters"] == easy.n_iters
    assert sinkhorn(cost, eps=0.5, n_iters=50).newton is None


def test_sns_scaled_plan_products_schur_diagonal_and_float32_schur_match_the_explicit_plan():
    # SNS keeps its dense plan as diag(u) P0 diag(v) between Newton steps: every quantity read through it
    # must be the one of the explicit plan, before and after P0 absorbs the scalings past exp(30)
    from trainables.ot.backend import matvec as _matvec
    from trainables.ot.sns_linalg import _ScaledPlan

    g = torch.Generator().manual_seed(5)
    p0 = torch.rand(50, 40, generator=g, dtype=torch.float64) / 2000
    x = torch.exp(2 * torch.randn(50, generator=g, dtype=torch.float64))
    y = torch.exp(2 * torch.randn(40, generator=g, dtype=torch.float64))
    wn, wm = torch.rand(50, generator=g, dtype=torch.float64), torch.rand(40, generator=g, dtype=torch.float64)
    plan = _ScaledPlan(p0.clone(), _matvec, cpu=True)
    expected = p0.clone()
    for big in (1.0, 1e14):  # the second scaling leaves exp(+-30): P0 absorbs it
        plan.scale(x * big, y)
        expected = x[:, None] * big * expected * y[None, :]
        assert (plan.u is None) == (big > 1)
        r, col = expected.sum(1), expected.sum(0)
        assert torch.allclose(plan.rows(wm), expected @ wm, rtol=1e-12, atol=0)
        assert torch.allclose(plan.cols(wn), expected.t() @ wn, rtol=1e-12, atol=0)
        assert torch.allclose(plan.schur_diagonal(col, r), col - (expected ** 2 / r[:, None]).sum(0), rtol=1e-10)
        schur = plan.float32_schur(col, r, 0.05)
        want = (col * wm - expected.t() @ ((expected @ wm) / r)) / 0.05
        got = torch.from_numpy(schur(wm.numpy()))
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5  # float32 products, float64 vectors
    assert torch.allclose(plan.plan(), expected, rtol=1e-12, atol=0) and plan.u is None
    # an entry past float32's range: CG keeps float64 products
    huge = _ScaledPlan(p0 * 1e36, _matvec, cpu=True)
    assert huge.float32_schur(col, r, 0.05) is None
    # a plan whose entries span 1e-3 to 1e-42 (small eps): the float32 copy holds no subnormal entry (those and
    # the entries below 1e-20 are 0), and the Schur product stays the explicit plan's to float32's precision
    tiny = torch.exp(-96.0 * torch.rand(50, 40, generator=g, dtype=torch.float64)) / 1000
    plan = _ScaledPlan(tiny.clone(), _matvec, cpu=True)
    r, col = tiny.sum(1), tiny.sum(0)
    schur = plan.float32_schur(col, r, 0.01)
    low = plan._low
    assert float(((tiny < 1e-38) & (tiny > 1e-45)).double().mean()) > 0.05  # subnormal in a plain float32 copy
    assert not bool(((low != 0) & (low.abs() < 1.18e-38)).any()) and bool((low[tiny < 1e-20] == 0).all())
    want = (col * wm - tiny.t() @ ((tiny @ wm) / r)) / 0.01
    got = torch.from_numpy(schur(wm.numpy()))
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_sns_with_float32_cg_products_matches_float64_cg(monkeypatch):
    # CG's products by a float32 copy of the plan (CPU) give the plan and the iterations of float64 products
    from trainables.ot import sns_linalg as ot_sns_linalg

    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, x + 1.0 + 0.3 * torch.randn(200, 2, generator=g, dtype=torch.float64)) ** 2
    cost = cost / cost.max()
    # Newton from the paper's early handover: most of the iterations are Newton steps, whose CG is compared
    fast = sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-8, handover_error=None)
    monkeypatch.setattr(ot_sns_linalg._ScaledPlan, "float32_schur", lambda self, col, r, eps: None)
    exact = sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-8, handover_error=None)
    assert fast.marginal_error < 1e-8 and exact.marginal_error < 1e-8
    assert abs(fast.n_iters - exact.n_iters) <= 1 and fast.n_iters < 40
    assert torch.allclose(fast.plan, exact.plan, rtol=0, atol=1e-9)


def test_sns_flushes_subnormals_while_it_solves_and_restores_the_threads_setting(monkeypatch):
    # at eps = 0.003 the plan's entries fall far below float32's normal range (its CG products use a float32
    # copy): SNS solves with subnormals flushed to zero (x86 FTZ/DAZ), which gives the plan and the iterations
    # of a solve without, and leaves the thread's setting as it found it, off or on
    import contextlib

    from trainables.ot import backend as ot_backend, sns as ot_sns

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals (torch.set_flush_denormal)")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, x + 1.0 + 0.3 * torch.randn(200, 2, generator=g, dtype=torch.float64)) ** 2
    cost = cost / cost.max()
    seen = []
    pcg = ot_sns._pcg

    def recording_pcg(*args, **kwargs):
        seen.append(ot_backend.flushing())
        return pcg(*args, **kwargs)

    monkeypatch.setattr(ot_sns, "_pcg", recording_pcg)
    assert not ot_backend.flushing()
    flushed = sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-8)
    assert seen and all(seen) and not ot_backend.flushing()
    seen.clear()
    monkeypatch.setattr(ot_backend, "flush_subnormals", lambda on: contextlib.nullcontext())
    kept = sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-8)
    assert seen and not any(seen)
    assert float((kept.plan < 1e-38).double().mean()) > 0.02  # ~1,700 entries below float32's normal range
    assert flushed.n_iters == kept.n_iters and flushed.marginal_error < 1e-8
    assert torch.allclose(flushed.plan, kept.plan, rtol=0, atol=1e-12)
    monkeypatch.undo()
    torch.set_flush_denormal(True)
    try:
        sinkhorn_newton_sparse(cost, eps=0.003, tol=1e-8)
        assert ot_backend.flushing()  # a thread that flushed before still does
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("seed,eps", [(0, 0.002), (1, 0.001)])
def test_sns_converges_on_near_permutation_plans_where_sinkhorn_crawls(seed, eps):
    # cosine costs between points and noisy copies of them: at eps <= 0.002 the plan nearly splits into
    # blocks that exchange mass through ~0 entries. Sinkhorn is still 1e-4 off after 5000 iterations;
    # the previous SNS took an unaccepted line-search step anyway (plans of mass up to 1e164) or stopped
    # on a NaN direction (a Jacobi preconditioner dividing by a vanishing Schur diagonal) after 5 iterations
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(128, 32, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 0.3 * torch.randn(128, 32, generator=g, dtype=torch.float64), dim=1)
    cost = 1 - x @ y.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornNotConvergedWarning)
        plain = sinkhorn(cost, eps=eps, n_iters=5000, tol=1e-6)
    assert plain.marginal_error > 1e-5  # crawling
    res = sinkhorn_newton_sparse(cost, eps=eps, tol=1e-6)
    assert res.marginal_error <= 1e-6 and torch.isfinite(res.plan).all() and 10 * res.n_iters < 5000
    assert float((res.plan - plain.plan).abs().sum()) < 2e-3  # the same optimum, nearer to it


def test_sns_sparsified_hessian_in_scipy_gives_the_steps_of_torchs_csr(monkeypatch):
    # a near-permutation plan keeps ~1-2 entries a row: SNS's Newton steps run on the sparsified Hessian,
    # on a CPU as scipy CSR matrices with CG and the step's vectors in numpy; torch's CSR tensors and vectors
    # (the path on a GPU) give the same steps and plan
    from trainables.ot import backend as ot_backend, sns_linalg as ot_sns_linalg

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(128, 32, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 0.3 * torch.randn(128, 32, generator=g, dtype=torch.float64), dim=1)
    cost = 1 - x @ y.T
    paths = []
    hessian = ot_sns_linalg._KeptEntries.hessian

    def spy(self, *args):
        paths.append((self.scipy_csr, self.count))
        return hessian(self, *args)

    monkeypatch.setattr(ot_sns_linalg._KeptEntries, "hessian", spy)
    scipy_res = sinkhorn_newton_sparse(cost, eps=0.002, tol=1e-8, handover_error=None)
    scipy_paths, paths[:] = list(paths), []
    monkeypatch.setattr(ot_backend, "NEWTON_NUMPY", False)
    torch_res = sinkhorn_newton_sparse(cost, eps=0.002, tol=1e-8, handover_error=None)
    assert len(scipy_paths) >= 5 and all(on and count < 0.05 * 128 * 128 for on, count in scipy_paths)
    assert [count for _, count in paths] == [count for _, count in scipy_paths] and not any(on for on, _ in paths)
    assert scipy_res.marginal_error < 1e-8 and torch_res.marginal_error < 1e-8
    assert scipy_res.newton["newton_steps"] == torch_res.newton["newton_steps"]
    # ~1,500 CG products in all: sums in another order move a few of them
    products = scipy_res.newton["cg_products"], torch_res.newton["cg_products"]
    assert abs(products[0] - products[1]) <= 0.02 * products[1]
    assert torch.allclose(scipy_res.plan, torch_res.plan, rtol=0, atol=1e-10)


def test_sns_newton_phase_in_numpy_takes_the_steps_of_torchs_on_a_dense_plan(monkeypatch):
    # 2-D clouds at eps 0.005 give a diffuse plan: the exact (dense) Hessian, CG by its float32 copy. On a CPU
    # the step's vectors are numpy arrays and the next rows come from the line search's product; torch's
    # vectors (the path on a GPU, forced here) take the same steps to the same plan
    from trainables.ot import backend as ot_backend, sns_linalg as ot_sns_linalg

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(160, 2, generator=g, dtype=torch.float64), torch.randn(160, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, y + 1.0) ** 2
    cost = cost / cost.max()
    dense = []
    kept = ot_sns_linalg._KeptEntries.__init__

    def spy(self, keep, scipy_csr):
        kept(self, keep, scipy_csr)
        dense.append((scipy_csr, self.count > 0.05 * 160 * 160))

    monkeypatch.setattr(ot_sns_linalg._KeptEntries, "__init__", spy)
    np_res = sinkhorn_newton_sparse(cost, eps=0.005, tol=1e-9, sinkhorn_budget=0)
    monkeypatch.setattr(ot_backend, "NEWTON_NUMPY", False)
    torch_res = sinkhorn_newton_sparse(cost, eps=0.005, tol=1e-9, sinkhorn_budget=0)
    assert dense == [(True, True), (False, True)]  # dense from the first step, each path once
    assert np_res.marginal_error < 1e-9 and torch_res.marginal_error < 1e-9
    assert np_res.newton["newton_steps"] == torch_res.newton["newton_steps"] >= 4
    assert np_res.newton["damped_steps"] == torch_res.newton["damped_steps"]
    assert abs(np_res.newton["cg_products"] - torch_res.newton["cg_products"]) <= 1
    # the same iterates: the last step's error (~2e-11) agrees to 1% (a preconditioner 0.3 col off in one path
    # took the same steps and products but ended at 4.7e-12)
    assert abs(np_res.marginal_error - torch_res.marginal_error) <= 0.01 * torch_res.marginal_error
    assert torch.allclose(np_res.plan, torch_res.plan, rtol=0, atol=1e-12)
    assert torch.allclose(np_res.f, torch_res.f, rtol=0, atol=1e-9)


def test_sns_stays_with_sinkhorn_while_its_rate_predicts_convergence_within_the_budget():
    # eps = 0.05: Sinkhorn's error falls by a steady factor per iteration and reaches 1e-10 in ~21 iterations,
    # fewer than the cost of a few Newton steps: SNS is then exactly Sinkhorn (same iterations, same plan)
    cost = random_cost(64, 64, seed=11)
    plain = sinkhorn(cost, eps=0.05, n_iters=1000, tol=1e-10)
    sns = sinkhorn_newton_sparse(cost, eps=0.05, tol=1e-10)
    assert sns.n_iters == plain.n_iters < 40
    assert torch.allclose(sns.plan, plain.plan, atol=1e-12, rtol=0)
    # a warm start (3 iterations at 4 eps) predicts Sinkhorn's ~21 iterations and stays with it: at most the 3
    # warm-start iterations more (no Newton step, whose count would be far smaller), the same plan
    warm = sinkhorn_newton_sparse(cost, eps=0.05, tol=1e-10, warm_start_factor=4)
    assert plain.n_iters < warm.n_iters <= plain.n_iters + 3 and warm.marginal_error < 1e-10
    assert rel_err(warm.plan.numpy(), plain.plan.numpy()) < 1e-6
    # with no budget: the paper's fixed warm-up, then Newton steps (fewer iterations, the same plan)
    paper = sinkhorn_newton_sparse(cost, eps=0.05, tol=1e-10, sinkhorn_budget=0)
    assert paper.n_iters < plain.n_iters and paper.marginal_error < 1e-10
    assert rel_err(paper.plan.numpy(), plain.plan.numpy()) < 1e-6
    with pytest.raises(ValueError, match="sinkhorn_budget must be an integer >= 0, got -1"):
        sinkhorn_newton_sparse(cost, eps=0.05, sinkhorn_budget=-1)
    with pytest.raises(ValueError, match="handover_budget must be an integer >= 0, got None"):
        sinkhorn_newton_sparse(cost, eps=0.05, handover_budget=None)  # only sinkhorn_budget has a None default
    with pytest.raises(ValueError, match="warm_start_factor must be a number >= 1, got 0.5"):
        sinkhorn_newton_sparse(cost, eps=0.05, warm_start_factor=0.5)
    with pytest.raises(ValueError, match="warm_start_iters must be an integer >= 2, got 1"):
        sinkhorn_newton_sparse(cost, eps=0.05, warm_start_iters=1)


def test_sns_default_budget_falls_with_the_problem_size_and_sends_large_problems_to_newton_sooner():
    from trainables.ot.sns import _default_sinkhorn_budget

    assert [_default_sinkhorn_budget(n, n, True) for n in (64, 512, 768, 1024, 2048, 8192)] == [60, 60, 40, 30, 30, 30]
    assert _default_sinkhorn_budget(512, 2048, True) == 30 and _default_sinkhorn_budget(4096, 4096, False) == 60

    def clouds(n):  # 2-D Gaussian clouds, squared distance / max (benchmarks.sns): Sinkhorn needs ~41-54 at 0.01
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 2, generator=g, dtype=torch.float64)
        c = torch.cdist(x, torch.randn(n, 2, generator=g, dtype=torch.float64) + 1.0) ** 2
        return c / c.max()

    # n = 1024: Sinkhorn's ~36 iterations after the warm-up exceed the budget of 30, so Newton takes over (fewer
    # iterations, the same plan as Sinkhorn's); with the old budget of 60 SNS stayed with Sinkhorn
    cost = clouds(1024)
    plain = sinkhorn(cost, eps=0.01, n_iters=1000, tol=1e-8)
    sns = sinkhorn_newton_sparse(cost, eps=0.01, tol=1e-8)
    assert sns.newton["newton_steps"] > 0 and sns.n_iters < plain.n_iters / 2 and sns.marginal_error < 1e-8
    assert rel_err(sns.plan.numpy(), plain.plan.numpy()) < 1e-5
    assert sinkhorn_newton_sparse(cost, eps=0.01, tol=1e-8, sinkhorn_budget=60).newton["newton_steps"] == 0
    # n = 512 keeps 60: there a Newton step costs more than the Sinkhorn iterations it saves
    assert sinkhorn_newton_sparse(clouds(512), eps=0.01, tol=1e-6).newton["newton_steps"] == 0


def test_sns_hands_over_to_newton_once_sinkhorn_has_brought_the_error_down_to_handover_error():
    # the rule, read with the error after every Sinkhorn iteration (True: hand over to Newton), on errors 0.9 r^k
    from trainables.ot.sns import _sinkhorn_while_fast

    def handover_at(rate, **kw):
        stop = _sinkhorn_while_fast(1e-6, 5, 60, **kw)
        for k in range(2000):
            if stop(0.9 * rate ** k):
                return k
        return None

    # rate 0.88 (2-D clouds, n = 512, eps = 0.005): 1e-6 is ~85 iterations away at 0.05, more than the budget of 60:
    # Sinkhorn runs until the error is at most 0.05 (k = 23), the paper's handover right after the warm-up (the
    # 5th error read, k = 4, is the one after the 5th iteration)
    assert 0.9 * 0.88 ** 22 > 0.05 >= 0.9 * 0.88 ** 23
    assert handover_at(0.88, handover=(0.05, 160)) == 23
    assert handover_at(0.88) == 4
    # rate 0.975 (eps = 0.001): 0.05 is 114 iterations away, within 160: Sinkhorn goes on to it; with a reach of
    # 100 it hands over at once; rate 0.999 (0.05 is ~2,900 away): at once too
    assert handover_at(0.975, handover=(0.05, 160)) == 115
    assert handover_at(0.975, handover=(0.05, 100)) == 4
    assert handover_at(0.999, handover=(0.05, 160)) == 4
    # rate 0.6: 1e-6 within the budget from the start: Sinkhorn to the end, whatever the handover
    assert handover_at(0.6, handover=(0.05, 160)) is None
    # budget 0 is the paper's fixed warm-up: the handover rule does not extend it
    assert _sinkhorn_while_fast(1e-6, 5, 0, handover=(0.05, 160))(0.9) is False
    stop = _sinkhorn_while_fast(1e-6, 1, 0, handover=(0.05, 160))
    assert stop(0.9) is True
    cost = random_cost(8, 8, seed=1)
    with pytest.raises(ValueError, match="handover_error must be None or a number > 0, got -0.1"):
        sinkhorn_newton_sparse(cost, eps=0.05, handover_error=-0.1)
    with pytest.raises(ValueError, match="handover_budget must be an integer >= 0, got 1.5"):
        sinkhorn_newton_sparse(cost, eps=0.05, handover_budget=1.5)


def test_sns_default_handover_reaches_the_same_plan_with_more_sinkhorn_and_fewer_newton_steps(monkeypatch):
    # 2-D clouds (n = 256, eps = 0.005): the default runs Sinkhorn until its error is at most 0.05, then Newton;
    # the paper's handover starts Newton after the 5 warm-up iterations. The same plan to the tolerance
    from trainables.ot import sns as ot_sns

    rule, seen = ot_sns._sinkhorn_while_fast, []

    def spy(*args, **kw):
        stop = rule(*args, **kw)
        seen.clear()

        def recorded(err):
            seen.append(err)
            return stop(err)
        return recorded

    monkeypatch.setattr(ot_sns, "_sinkhorn_while_fast", spy)
    cost = two_d_clouds(256, seed=3)
    default = sinkhorn_newton_sparse(cost, eps=0.005, tol=1e-8)
    handed_at = list(seen)
    paper = sinkhorn_newton_sparse(cost, eps=0.005, tol=1e-8, handover_error=None)
    plain = sinkhorn(cost, eps=0.005, n_iters=20000, tol=1e-8)
    assert default.marginal_error < 1e-8 and paper.marginal_error < 1e-8
    # the rule stopped Sinkhorn at the first error at most 0.05 (the last one it read; it reads one after each
    # iteration, so the paper's handover read 5)
    assert handed_at[-1] <= 0.05 < min(handed_at[:-1]) and len(handed_at) > 6 and len(seen) == 5
    sinkhorn_its = len(handed_at)
    assert default.n_iters - sinkhorn_its < paper.n_iters - 5  # fewer Newton steps
    assert paper.n_iters < default.n_iters < plain.n_iters
    assert float((default.plan - plain.plan).abs().sum()) < 1e-6
    assert float((paper.plan - plain.plan).abs().sum()) < 1e-6


def test_sns_respects_masks_and_rejects_unbalanced():
    cost = random_cost(12, 12, seed=1)
    mask = ~torch.eye(12, dtype=torch.bool)
    res = sinkhorn_newton_sparse(cost, eps=0.05, mask=mask, tol=1e-9)
    assert torch.all(res.plan.diagonal() == 0) and res.marginal_error < 1e-9
    with pytest.raises(TypeError, match="uot_lambda1"):  # the balanced problem only: no marginal penalties
        sinkhorn_newton_sparse(cost, eps=0.05, uot_lambda1=1.0)


def test_sns_converges_on_a_near_permutation_plan_at_eps_1e_3():
    # 2-D clouds at eps = 1e-3 (cost / eps up to 1e3: stabilised kernel); Sinkhorn stalls near 5e-8 after
    # 100,000 iterations; SNS (warm-up, then Newton steps) needs < 100
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(96, 2, generator=g, dtype=torch.float64), torch.randn(96, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, y) ** 2
    cost = cost / cost.max()
    res = sinkhorn_newton_sparse(cost, eps=1e-3, tol=1e-8)
    assert res.domain == "stabilized" and res.marginal_error < 1e-8 and res.n_iters < 100
    a = np.full(96, 1 / 96)
    with warnings.catch_warnings():  # POT stops at its iteration cap with marginal error ~5e-8
        warnings.simplefilter("ignore")
        ref = pot.sinkhorn(a, a, cost.numpy(), 1e-3, method="sinkhorn_stabilized", numItermax=100000,
                           stopThr=1e-10)
    assert rel_err(res.plan.numpy(), ref) < 1e-5


def test_sns_float32_cost_gives_a_float32_plan_solved_in_float64():
    cost = random_cost(40, 50, seed=3, dtype=torch.float32)
    res = sinkhorn_newton_sparse(cost, eps=0.01, tol=1e-6)
    assert res.plan.dtype == torch.float32 and res.f.dtype == torch.float32
    assert (res.plan.sum(1) - 1 / 40).abs().sum() < 1e-5
    with pytest.raises(ValueError, match="warmup_iters"):
        sinkhorn_newton_sparse(cost, eps=0.01, warmup_iters=0)
    for bad, message in ((dict(dense_above=1.5), r"dense_above must be in \[0, 1\].*got 1.5"),
                         (dict(cg_tol=0.0), r"cg_tol must be in \(0, 1\), got 0.0"),
                         (dict(max_newton=2.5), "max_newton must be an integer >= 1, got 2.5"),
                         (dict(cg_max_iter=0), "cg_max_iter must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            sinkhorn_newton_sparse(cost, eps=0.01, **bad)


def test_stabilized_float32_matches_pot_iterate_for_iterate_where_the_kernel_underflows():
    # eps = 0.01 on a cosine cost: exp(-C/eps) reaches exp(-200), below float32's range
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(200, 32, generator=g), torch.randn(200, 32, generator=g)
    cost = 1 - torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
    res = sinkhorn(cost, eps=0.01, n_iters=40)
    assert res.domain == "stabilized" and res.plan.dtype == torch.float32
    # reference: 40 float64 kernel iterations, rows first (POT's loop updates columns first, so its plan
    # after a fixed count differs; at convergence they agree, see test_balanced_plan_equals_pot)
    k = np.exp(-cost.double().numpy() / 0.01)
    u, v = np.ones(200), np.ones(200)
    for _ in range(40):
        u = (1 / 200) / (k @ v)
        v = (1 / 200) / (k.T @ u)
    ref = u[:, None] * k * v[None, :]
    assert rel_err(res.plan.double().numpy(), ref) < 1e-4


def test_stabilized_absorptions_keep_plan_and_gradient(monkeypatch):
    from trainables.ot import scaling as ot_scaling

    monkeypatch.setattr(ot_scaling, "_kernel_limit", lambda dtype: 1.0)  # absorb whenever u, v leave exp(+-0.5)
    cost = random_cost(6, 7, seed=2)
    ref = sinkhorn(cost, eps=0.02, n_iters=60, domain="log")
    res = sinkhorn(cost, eps=0.02, n_iters=60, domain="stabilized")
    assert res.domain == "stabilized"
    assert torch.allclose(res.plan, ref.plan, rtol=1e-9, atol=1e-12)
    for lams in ((None, None), (0.5, 2.0)):
        def value(c):
            return sinkhorn(c, eps=0.02, n_iters=15, domain="stabilized", uot_lambda1=lams[0],
                            uot_lambda2=lams[1]).transport_cost()

        assert torch.autograd.gradcheck(value, (cost.clone().requires_grad_(True),))


def test_stabilized_falls_back_to_log_when_a_whole_column_underflows():
    cost = random_cost(8, 8, seed=3, dtype=torch.float32)
    cost[:, 5] = 50.0  # exp(-(50 - min_j C_ij)/0.01) is 0 in every row: column 5 of the kernel vanishes
    res = sinkhorn(cost, eps=0.01, n_iters=50)
    assert res.domain == "log"
    assert torch.equal(res.plan, sinkhorn(cost, eps=0.01, n_iters=50, domain="log").plan)
    assert torch.isfinite(res.plan).all() and abs(float(res.plan[:, 5].sum()) - 1 / 8) < 1e-4


def test_unrolled_gradient_never_uses_the_stabilized_kernel():
    # SinSim's case that gave non-finite gradients through float32 stabilised scalings (n = 1024, eps = 1e-3)
    # (forced to domain="stabilized", this exact case gives a non-finite gradient of x); the float64 kernel
    # shifted by each row's smallest cost holds here, where the globally shifted one underflowed (the log
    # domain was used: 30x the time)
    from trainables.losses import feature_cost

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 32, generator=g).requires_grad_(True), torch.randn(1024, 32, generator=g)
    cost = feature_cost(x, y, ot_cost="cosine")
    res = sinkhorn(cost, eps=1e-3, n_iters=40)
    res.transport_cost().backward()
    assert res.domain == "kernel64" and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert sinkhorn(cost, eps=1e-3, n_iters=40).domain == "stabilized"
    assert sinkhorn(cost, eps=1e-3, n_iters=40, ot_grad="implicit").domain == "stabilized"


@pytest.mark.parametrize("lams", [(None, None), (0.5, 2.0)])
def test_row_shifted_float64_kernel_equals_the_log_domain_where_the_global_kernel_underflows(lams):
    from trainables.losses import feature_cost

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 16, generator=g, dtype=torch.float64), torch.randn(96, 16, generator=g,
                                                                               dtype=torch.float64)
    results = {}
    for domain in ("auto", "log"):
        xr = x.clone().requires_grad_(True)
        cost = feature_cost(xr, y, ot_cost="cosine")
        res = sinkhorn(cost, eps=1e-3, n_iters=30, domain=domain, uot_lambda1=lams[0], uot_lambda2=lams[1])
        (res.objective() + res.transport_cost()).backward()
        results[domain] = res, xr.grad
    (auto, grad_auto), (log, grad_log) = results["auto"], results["log"]
    cmin, cmax = float(auto.cost.detach().min()), float(auto.cost.detach().max())
    assert (cmax - cmin) / 1e-3 > 745  # exp(-(C - min C)/eps) underflows float64 (below its subnormals)
    assert auto.domain == "kernel64"
    assert torch.allclose(auto.plan, log.plan, rtol=1e-9, atol=1e-200)  # entries the kernel lets underflow
    assert torch.allclose(grad_auto, grad_log, rtol=1e-7, atol=1e-12)


def test_row_shifted_kernel_falls_back_to_log_when_its_scalings_leave_float64():
    cost = random_cost(8, 8, seed=3).requires_grad_(True)
    with torch.no_grad():
        cost[:, 5] += 2.0  # column 5 is at least 2 above every row's smallest cost: exp(-2/1e-3) = 0
    res = sinkhorn(cost, eps=1e-3, n_iters=50)
    assert res.domain == "log"
    assert torch.equal(res.plan, sinkhorn(cost, eps=1e-3, n_iters=50, domain="log").plan)
    res.transport_cost().backward()
    assert torch.isfinite(cost.grad).all() and abs(float(res.plan[:, 5].sum().detach()) - 1 / 8) < 1e-4


def test_gradient_through_the_marginals_passes_gradcheck():
    # a differentiable marginal with a constant cost: the plan is built out of place (scaling the kernel in
    # place, as when nothing needs a gradient, broke this backward with an in-place modification error)
    cost = random_cost(6, 5, seed=3)
    g = torch.Generator().manual_seed(3)
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w_: sinkhorn(cost, eps=0.1, n_iters=10, a=w_ / w_.sum(), warn=False).transport_cost(), (w,))


def test_products_route_is_measured_once_per_process_or_named_by_the_environment(monkeypatch):
    # large CPU solves take their products through numpy only where numpy's are faster on this machine
    from trainables.ot import backend as ot_backend

    big = torch.zeros(1024, 1024, dtype=torch.float64)  # >= 2^18 entries
    measured = []
    monkeypatch.setattr(ot_backend, "measure_products", lambda: measured.append(1) or "numpy")
    for env, route, mode in (("torch", "torch", None), (" NumPy ", "numpy", "products"), (None, "numpy", "products")):
        monkeypatch.setattr(ot_backend, "PRODUCTS", None)
        if env is None:
            monkeypatch.delenv("OTSTUDY_OT_PRODUCTS", raising=False)
        else:
            monkeypatch.setenv("OTSTUDY_OT_PRODUCTS", env)
        assert ot_backend.products_route() == route and ot_backend.numpy_mode(big) == mode
        assert ot_backend.numpy_mode(big[:256, :256]) == "all"  # small problems: numpy either way
    ot_backend.products_route()
    assert measured == [1]  # measured once, when no route was named
    monkeypatch.setattr(ot_backend, "PRODUCTS", None)
    monkeypatch.setenv("OTSTUDY_OT_PRODUCTS", "blas")
    with pytest.raises(ValueError, match="OTSTUDY_OT_PRODUCTS must be 'numpy' or 'torch' .* got 'blas'"):
        ot_backend.numpy_mode(big)
    monkeypatch.undo()
    assert ot_backend.measure_products(n=128, rounds=3) in ("numpy", "torch")


def test_products_through_numpy_give_the_same_plans_gradients_and_leave_blas_threads_alone(monkeypatch):
    # large CPU solves take their matrix-vector products through numpy with BLAS on one thread (torch's
    # elementwise ops), small ones run their iterations and reverse pass in numpy altogether; force the first
    # route on small problems (threshold 0) and compare it with the second (threshold 2^60), value and gradient
    from trainables.ot import backend as ot_backend
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    cost = random_cost(40, 30, seed=5)
    g = torch.Generator().manual_seed(5)
    a = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    a = a / a.sum()

    def solve_all():
        c = cost.clone().requires_grad_(True)
        aa = a.clone().requires_grad_(True)  # a graph through the marginal: torch's products there
        unrolled = sinkhorn(c, eps=0.05, n_iters=30, warn=False)
        implicit = sinkhorn(c, eps=0.05, n_iters=300, tol=1e-9, ot_grad="implicit", warn=False)
        marginal = sinkhorn(cost, eps=0.05, n_iters=30, a=aa, warn=False)
        stabilized = sinkhorn(cost, eps=2e-3, n_iters=50, warn=False)
        values = [unrolled.transport_cost(), implicit.transport_cost(), marginal.transport_cost()]
        grads = torch.autograd.grad(values[0] + values[1], c) + torch.autograd.grad(values[2], aa)
        sns = [sinkhorn_newton_sparse(cost, eps=0.005, tol=1e-10, dense_above=d) for d in (0.05, 1.0)]
        return [unrolled.plan, implicit.plan, marginal.plan, stabilized.plan, *grads, *(s.plan for s in sns)]

    before = blas_threads()
    monkeypatch.setattr(ot_backend, "NUMPY_MATVEC_MIN", 1 << 60)
    with_torch = solve_all()
    calls, during = [], []

    def counted(m, v, f=ot_backend.np_mv):
        if not calls:
            during.extend(blas_threads())
        calls.append(1)
        return f(m, v)

    monkeypatch.setattr(ot_backend, "NUMPY_MATVEC_MIN", 0)
    monkeypatch.setattr(ot_backend, "PRODUCTS", "numpy")  # as measured on a machine where numpy's are faster
    monkeypatch.setattr(ot_backend, "np_mv", counted)
    with_numpy = solve_all()
    assert len(calls) > 100  # the route was taken
    assert during and set(during) == {1}  # BLAS held to one thread during a solve
    assert blas_threads() == before  # and as it was afterwards
    ref = pot.sinkhorn(np.full(40, 1 / 40), np.full(30, 1 / 30), cost.numpy(), 0.05, numItermax=300, stopThr=1e-13)
    assert rel_err(with_numpy[1].detach().numpy(), ref) < 1e-6
    for got, want in zip(with_numpy, with_torch):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-14)
