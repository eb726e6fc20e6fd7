"""Paired verdicts: the statistics against independent transcriptions, and their error rates by simulation."""
import numpy as np
import pandas as pd
import pytest

from analysis.stats import ALPHA, detectable_difference, holm, paired_t, paired_verdicts
from analysis.tables import verdict_table

import transcriptions as ref


def test_paired_t_and_holm_equal_their_textbook_forms():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        d = rng.normal(0.01, 0.02, n)
        mean, lo, hi, p, m = paired_t(d)
        want_mean, want_half, want_p = ref.paired_t(d)
        assert m == n and mean == pytest.approx(want_mean, rel=1e-12)
        assert (lo, hi) == pytest.approx((want_mean - want_half, want_mean + want_half), rel=1e-10)
        assert p == pytest.approx(want_p, rel=1e-10)
    p = rng.uniform(0, 0.1, 7)
    assert holm(p) == pytest.approx(ref.holm(p), rel=1e-12)
    assert np.isnan(holm([0.01, np.nan])[1]) and holm([0.01, np.nan])[0] == pytest.approx(0.01)


def test_the_detectable_difference_has_the_stated_power():
    # the power of the paired t-test at that difference, by simulation: 80% (4,000 draws: +- 2 points at 3 SE)
    rng = np.random.default_rng(1)
    n, sd, alpha = 5, 0.03, ALPHA / 4
    delta = detectable_difference(sd, n, alpha)
    hits = sum(paired_t(rng.normal(delta, sd, n))[3] < alpha for _ in range(4000))
    assert abs(hits / 4000 - 0.80) < 0.02
    assert detectable_difference(2 * sd, n, alpha) == pytest.approx(2 * delta, rel=1e-8)  # scales with the spread


def simulated_study(rng, effects, *, seeds=5, sd_seed=0.02, sd_noise=0.01):
    """A study of configurations ``cfg0..`` (true differences ``effects``) and a baseline, each run once per
    seed; a seed moves every configuration alike (its initialisation, data order and augmentations), the rest
    is noise."""
    rows = []
    seed_effect = rng.normal(0, sd_seed, seeds)
    for s in range(seeds):
        rows.append({"method": "simclr", "beta": 0.0, "seed": s, "acc": 0.9 + seed_effect[s] + rng.normal(0, sd_noise)})
        for c, eff in enumerate(effects):
            rows.append({"method": "sinsim", "beta": 0.2 * (c + 1), "seed": s,
                         "acc": 0.9 + eff + seed_effect[s] + rng.normal(0, sd_noise)})
    return pd.DataFrame(rows)


def verdicts(df):
    return paired_verdicts(df, ["method", "beta"], "acc", df["method"] == "simclr")


def test_with_no_true_effect_a_verdict_is_wrong_in_at_most_5_percent_of_studies():
    # Holm's family-wise error: any "better" or "worse" among 4 configurations in <= 5% of 400 studies, plus
    # 3 standard errors of the simulation (sqrt(0.05 * 0.95 / 400) = 1.1 points)
    rng = np.random.default_rng(2)
    wrong = sum((verdicts(simulated_study(rng, [0, 0, 0, 0]))["verdict"] != "no detectable difference").any()
                for _ in range(400))
    assert wrong / 400 <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)


def test_a_true_effect_of_the_stated_detectable_size_is_found_in_80_percent_of_studies():
    # the design: 4 configurations against one baseline, 5 seeds; one configuration differs by the smallest
    # difference the report states for this design (its paired spread is sd_noise * sqrt 2)
    sd_d, n, m = 0.01 * np.sqrt(2), 5, 4
    delta = detectable_difference(sd_d, n, ALPHA / m)
    rng = np.random.default_rng(3)
    better = worse = wrong_nulls = 0
    stated = []
    for _ in range(400):
        v = verdicts(simulated_study(rng, [delta, 0, 0, 0]))
        first = v.iloc[0]
        better += first["verdict"] == "better"
        worse += first["verdict"] == "worse"
        wrong_nulls += (v["verdict"].iloc[1:] != "no detectable difference").any()
        stated.append(first["mde"])
    assert abs(better / 400 - 0.80) <= 0.07
    assert worse == 0
    # the three configurations without an effect are still wrongly called in at most the family-wise 5%
    assert wrong_nulls / 400 <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    # what each report states is that design's value from the observed spread: on average near the true one
    assert np.median(stated) == pytest.approx(delta, rel=0.25)


def test_verdicts_pair_by_seed_at_the_same_shared_knobs():
    # SimCLR at batch 64 and 256; SinSim's trials pair with SimCLR's at their own batch size and seed
    rows = []
    for bs, shift in ((64, 0.0), (256, 0.1)):
        for s in range(3):
            rows.append({"method": "simclr", "batch_size": bs, "seed": s, "acc": 0.5 + shift + 0.01 * s})
            rows.append({"method": "sinsim", "batch_size": bs, "seed": s, "acc": 0.52 + shift + 0.01 * s + 0.001 * s})
    df = pd.DataFrame(rows)
    v = paired_verdicts(df, ["method", "batch_size"], "acc", df["method"] == "simclr", ["batch_size"])
    assert v["pairs"].tolist() == [3, 3]
    assert v["diff"].tolist() == pytest.approx([0.021, 0.021])
    assert v["verdict"].tolist() == ["better", "better"]


def _study(rows):
    df = pd.DataFrame(rows)
    df["status"] = df.get("status", "completed")
    return df


def test_a_baseline_swept_in_a_knob_is_met_at_its_value_not_averaged_over_it():
    # SimCLR and SinSim both read tau; tau moves accuracy by 20 points, SinSim equals SimCLR at each tau
    rng = np.random.default_rng(3)
    rows = [{"method": m, "tau": tau, "seed": s, "test_knn_acc": 0.6 + (tau == 0.5) * 0.2 + 0.01 * s
             + (m == "sinsim") * rng.uniform(-5e-4, 5e-4)}
            for m in ("simclr", "sinsim") for tau in (0.1, 0.5) for s in range(4)]
    df = _study(rows)
    v = verdict_table(df, ["method", "tau"], ["method", "tau"])
    assert v["test_knn_acc_verdict"].tolist() == ["no detectable difference"] * 2  # averaged: better / worse
    assert v["test_knn_acc_pairs"].tolist() == [4, 4]
    with pytest.raises(ValueError, match="the baseline varies in tau at one seed"):
        paired_verdicts(df, ["method", "tau"], "test_knn_acc", df["method"] == "simclr")


def test_each_method_meets_its_own_baseline_and_an_unset_knob_is_the_methods_default():
    # no SimCLR: SinSim at beta 0 and IOT-CL under U(a) with lambda_p unset (its default, 0) are the baselines
    rows = []
    for s in range(4):
        rows += [{"method": "sinsim", "beta": 0.0, "seed": s, "test_knn_acc": 0.70 + 0.01 * s},
                 {"method": "sinsim", "beta": 0.8, "seed": s, "test_knn_acc": 0.70 + 0.01 * s + 0.001 * (s % 2)},
                 {"method": "iot_cl", "relaxation": "Ua", "seed": s, "test_knn_acc": 0.90 + 0.01 * s},
                 {"method": "iot_cl", "relaxation": "Uab", "seed": s, "test_knn_acc": 0.92 + 0.01 * s
                  + 0.001 * (s % 2)}]
    df = _study(rows)
    cols = ["method", "beta", "relaxation"]
    v = verdict_table(df, cols, cols).set_index("method")
    assert v.loc["iot_cl", "test_knn_acc_diff"] == pytest.approx(2.05)  # paired with IOT-CL, not SinSim
    assert v.loc["sinsim", "test_knn_acc_diff"] == pytest.approx(0.05)
    assert v.loc["iot_cl", "test_knn_acc_verdict"] == "better"


def test_a_configuration_with_a_seed_that_did_not_complete_gets_no_verdict():
    # ASHA stopped seed 3 of beta 0.4: its 3 completed seeds are a selection, so no verdict and no Holm test
    rows = [{"method": "sinsim", "beta": b, "seed": s, "test_knn_acc": 0.7 + 0.01 * s - (0.03 + 0.002 * (s % 2)) * (b > 0),
             "status": "pruned" if (b == 0.4 and s == 3) else "completed"}
            for b in (0.0, 0.4, 0.8) for s in range(4)]
    trials = _study(rows)
    v = verdict_table(trials[trials["status"] == "completed"], ["method", "beta"], ["beta"], trials=trials)
    v = v.set_index("beta")
    assert v.loc[0.4, "test_knn_acc_verdict"] == "withheld: 1 of 4 seeds did not complete (pruned 1)"
    assert v.loc[0.8, "test_knn_acc_verdict"] == "worse"
    assert v.loc[0.8, "test_knn_acc_p_holm"] == v.loc[0.8, "test_knn_acc_p"]  # a family of one


def test_equal_differences_and_a_probe_with_fewer_seeds_are_said_so():
    rows = [{"method": m, "seed": s, "test_knn_acc": 0.7 + 0.01 * s + (m == "vicreg") * 0.02,
             "test_linear_acc": (0.8 + 0.01 * s) if s == 0 else np.nan}
            for m in ("simclr", "vicreg") for s in range(4)]
    v = verdict_table(_study(rows), ["method"], ["method"])
    assert v["test_knn_acc_verdict"].tolist() == ["no spread in the differences"]  # was "better" at p = 0
    assert v["test_knn_acc_pairs"].tolist() == [4] and v["test_linear_acc_pairs"].tolist() == [1]
    assert v["test_linear_acc_verdict"].tolist() == ["too few pairs"]
    assert np.isnan(paired_t([0.02, 0.02, 0.02])[3])
