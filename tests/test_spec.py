"""Spec validation and CLI input errors: one line per problem, exit 2, nothing created."""
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import record

from search_spaces.presets import PRESETS, get_preset
from search_spaces.spaces import DefineByRun
from study.cli import main
from study.spec import SpecError, load_spec_file, parse_spec
from trainables.config import TrialConfig

GOOD = {
    "name": "t",
    "method": "sinsim",
    "dataset": "digits",
    "fixed": {"epochs": 2, "batch_size": 64, "eps": 0.05, "sinkhorn_iters": 40},
    "search": {"beta": {"grid": [0.0, 0.4, 0.8, 1.2]}},
    "sampler": "grid",
    "seeds": [0, 1, 2],
    "metric": "knn_acc",
    "mode": "max",
    "resources": {"cpu": 1, "gpu": 0.5},
    "max_concurrent": 2,
}


def with_(**changes):
    d = copy.deepcopy(GOOD)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def test_good_spec_counts_trials():
    spec = parse_spec(GOOD)
    assert spec.n_configs() == 4 and spec.n_trials() == 12
    assert spec.resources == {"cpu": 1, "gpu": 0.5}


def test_a_grid_runs_every_configuration_with_its_seeds_side_by_side():
    # Tune's own order for several grid_search keys (alphabetical, first fastest) ran "seed" slowest: a
    # configuration's seeds far apart, and 2 concurrent trials of unequal cost side by side
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.experiment import Experiment

    from study.records import flat_config
    from study.runner import _search

    spec = parse_spec(with_(method=["sinsim", "gca_ince"], seeds=[3, 4],
                            search={"eps": {"grid": [0.05, 0.1]}, "beta": {"choices": [0.0, 0.8]}}))
    space, alg, _ = _search(spec)
    assert alg is None
    gen = BasicVariantGenerator()
    gen.add_configurations([Experiment("g", lambda config: None, config=space)])
    configs = []
    while (trial := gen.next_trial()) is not None:
        configs.append(flat_config(trial.config))
    order = [(c["method"], c["eps"], c.get("beta"), c["seed"]) for c in configs]
    # GCA reads eps, not beta (a SinSim knob): its configurations are the eps values alone
    assert order == [(m, e, b, s) for m in ("sinsim", "gca_ince") for e in (0.05, 0.1)
                     for b in ((0.0, 0.8) if m == "sinsim" else (None,)) for s in (3, 4)]
    assert len(order) == spec.n_trials() == 12
    assert all(c["epochs"] == 2 and c["dataset"] == "digits" and "__case__" not in c for c in configs)

    # cases (which may set the method) sit between the knobs and the seeds and override both
    spec = parse_spec(with_(seeds=[0, 1], search={"beta": {"grid": [0.0, 0.8]}, "cases": [
        {"method": "simclr"}, {"method": "sinsim", "eps": 0.1}]}))
    gen = BasicVariantGenerator()
    gen.add_configurations([Experiment("g", lambda config: None, config=_search(spec)[0])])
    configs = []
    while (trial := gen.next_trial()) is not None:
        configs.append(flat_config(trial.config))
    # SimCLR reads no beta: it runs once (at the first beta's place), SinSim at each beta
    assert [(c.get("beta"), c["method"], c["eps"], c["seed"]) for c in configs] == [
        (b, m, e, s) for b, m, e in ((None, "simclr", 0.05), (0.0, "sinsim", 0.1), (0.8, "sinsim", 0.1))
        for s in (0, 1)]
    assert len(configs) == spec.n_trials()


def test_a_grid_leaves_a_knob_out_of_the_methods_that_do_not_read_it():
    # SinSim x GCA-UOT over beta x lambda1 ran 16 trials: SinSim once per lambda1 (which it does not read),
    # GCA-UOT once per beta; the same trial twice, with the same seed and the same result
    from search_spaces.grid import points

    spec = parse_spec(with_(method=["sinsim", "gca_uot"], seeds=[0, 1],
                            search={"beta": {"grid": [0.4, 0.8]}, "uot_lambda1": {"grid": [0.1, 1.0]}}))
    assert spec.grid_configs() == [{"method": "sinsim", "beta": 0.4}, {"method": "sinsim", "beta": 0.8},
                                   {"method": "gca_uot", "uot_lambda1": 0.1}, {"method": "gca_uot", "uot_lambda1": 1.0}]
    assert spec.n_configs() == 4 and spec.n_trials() == 8 and len(points(spec.grid_configs(), spec.seeds)) == 8
    assert points(spec.grid_configs(), spec.seeds)[:2] == [{"method": "sinsim", "beta": 0.4, "seed": 0},
                                     {"method": "sinsim", "beta": 0.4, "seed": 1}]
    # a knob every method reads stays crossed with each; one method alone keeps its whole grid
    spec = parse_spec(with_(method=["simclr", "sinsim"], search={"batch_size": {"grid": [64, 128]},
                                                                 "beta": {"grid": [0.0, 0.8]}}))
    assert [(c["method"], c["batch_size"], c.get("beta")) for c in spec.grid_configs()] == [
        ("simclr", 64, None), ("simclr", 128, None), ("sinsim", 64, 0.0), ("sinsim", 64, 0.8),
        ("sinsim", 128, 0.0), ("sinsim", 128, 0.8)]
    assert parse_spec(with_(search={"beta": {"grid": [0.0, 0.8]}, "eps": {"grid": [0.05, 0.1]}})).n_configs() == 4


def test_exponent_floats_read_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML's safe_load) reads 3e-4 as the string '3e-4': "lr must be float, got str"
    f = tmp_path / "s.yaml"
    f.write_text("name: e\nmethod: simclr\nfixed: {lr: 3e-4, epochs: 2}\nsearch: {weight_decay: {grid: [1e-6, 1E-4]}}\n")
    spec = load_spec_file(f)
    assert spec.fixed["lr"] == 3e-4 and spec.search["weight_decay"] == {"grid": [1e-6, 1e-4]}


def test_issue_example_spec_parses():
    raw = yaml.safe_load("""
name: sinsim-beta-cifar10
method: sinsim
dataset: digits
fixed: {epochs: 500, batch_size: 512, eps: 0.05, sinkhorn_iters: 40}
search:
  beta: {grid: [0.0, 0.4, 0.8, 1.2]}
  eps: {low: 0.01, high: 1.0, log: true}
sampler: tpe
num_samples: 16
seeds: [0, 1, 2]
scheduler: {type: asha, grace_period: 10}
metric: knn_acc
mode: max
resources: {cpu: 4, gpu: 0.5}
max_concurrent: 8
""")
    spec = parse_spec(raw)
    assert spec.n_trials() == 48 and spec.scheduler["type"] == "asha"


BAD = [
    (with_(method="simclr2"), "method: unknown method 'simclr2'"),
    (with_(method=None), "method: required"),
    (with_(dataset="imagenet"), "dataset: unknown dataset 'imagenet'"),
    (with_(fixed={"eps": -0.05}), "fixed: eps=-0.05: must be > 0"),
    (with_(search={"eps": {"grid": [0.05, -1.0]}}), "search.eps.grid[1]: eps=-1.0: must be > 0"),
    (with_(fixed={"uot_lambda1": 1.0}), "fixed.uot_lambda1: only used by gca_uot; this study runs sinsim"),
    (with_(search={"lambda_p": {"grid": [0.1]}}), "search.lambda_p: only used by iot_cl"),
    (with_(fixed={"batch_size": 4096}), "batch_size: 4096 is larger than the digits training split (1212 images)"),
    (with_(sampler="bayes"), "sampler: 'bayes' is not a sampler (allowed: grid, random, tpe)"),
    (with_(search={"eps": {"low": 0.01, "high": 1.0}}), "search.eps: a range needs sampler random or tpe"),
    (with_(search={"eps": {"low": 0.0, "high": 1.0, "log": True}}, sampler="tpe"), "search.eps: a log range needs low > 0"),
    (with_(search={"eps": {"low": 1.0, "high": 0.1}}, sampler="tpe"), "search.eps: low and high must be numbers with low < high"),
    (with_(seeds="zero"), "seeds: must be a non-empty list of integers"),
    (with_(seeds=[0, 0]), "seeds: contains duplicates"),
    (with_(seeds=[0, -1]), "seeds: each must be in [0, 2147483648) (got [0, -1])"),
    (with_(num_samples=3), "num_samples: the grid runs each configuration once per seed; repeat it with more seeds"),
    (with_(metric="accuracy"), "metric: 'accuracy' is not reported by the trainable"),
    (with_(mode="maximize"), "mode: must be 'max' or 'min'"),
    (with_(resources={"cpu": 0, "gpu": 1}), "resources.cpu: must be a number > 0"),
    (with_(resources={"cpu": 1, "tpu": 1}), "resources.tpu: unknown resource"),
    (with_(scheduler={"type": "hyperband"}), "scheduler.type: 'hyperband' is not a scheduler"),
    (with_(scheduler={"type": "asha", "grace_period": 0}), "scheduler.grace_period: must be an integer >= 1"),
    (with_(scheduler={"type": "asha"}, metric="test_linear_acc"), "metric: ASHA prunes on a per-epoch metric"),
    (with_(storage="ftp://host/studies"), "storage: unsupported URI scheme 'ftp'"),
    (with_(storage="s3:///studies"), "storage: 's3:///studies' names no bucket"),
    (with_(mlflow_uri="mlruns"), "mlflow_uri: 'mlruns' is not a tracking URI"),
    (with_(optuna_storage="sqlite:///o.db"), "optuna_storage: a grid study has no Optuna study"),
    (with_(sampler="tpe", num_samples=2, search={"beta": {"low": 0.0, "high": 1.0}}, optuna_storage="o.db"),
     "optuna_storage: o.db is not a database URL (allowed: sqlite://, postgresql://, mysql://)"),
    (with_(fixed={"epochs": "ten"}), "fixed: epochs must be int"),
    (with_(fixed={"seed": 1}), "fixed.seed: use the top-level 'seeds' list"),
    (with_(fixed={"learning_rate": 0.1}), "fixed.learning_rate: unknown config key"),
    (with_(name="my study!"), "name: must be a non-empty string"),
    (with_(max_concurrent=0), "max_concurrent: must be an integer >= 1"),
    (with_(colour="blue"), "colour: unknown field"),
    (with_(search={"beta": [0.1, 0.2]}), "search.beta: must be {grid: [...]}"),
    (with_(method="gca_ince", fixed={"sinkhorn_iters": 5}),
     "fixed.sinkhorn_iters: GCA counts its iterations in gca_iters, full Sinkhorn iterations as the paper does"),
    (with_(method="sinsim", fixed={"ot_value": "cost", "ot_grad": "implicit"}),
     "fixed: sinsim: ot_value=cost (<P*, C>) has no implicit gradient"),
    (with_(fixed={"knn_k": 200}), "fixed: knn_k=200: above the smallest class of the digits kNN bank (118 images)"),
]


@pytest.mark.parametrize("raw,expected", BAD, ids=[e[:40] for _, e in BAD])
def test_bad_spec_names_the_problem(raw, expected):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert any(line.startswith(expected) for line in info.value.problems), info.value.problems
    assert all("\n" not in line for line in info.value.problems)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as info:
        parse_spec(with_(method="x", mode="up", sampler="y"))
    assert len(info.value.problems) >= 3


@pytest.mark.parametrize("raw,expected", BAD[:12], ids=[e[:40] for _, e in BAD[:12]])
def test_cli_exits_2_and_creates_nothing(tmp_path, capsys, raw, expected):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "studies"
    code = main(["run", str(spec_file), "--storage", str(storage)])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert not storage.exists()


@pytest.mark.parametrize("raw,expected", BAD[-3:], ids=["renamed-gca-iters", "cost-implicit", "knn-k"])
def test_knobs_that_would_not_mean_what_they_say_exit_2(tmp_path, capsys, raw, expected):
    # a renamed key, an (ot_value, ot_grad) pair whose gradient is another function's, a kNN k above the bank's
    # smallest class: one line naming the problem, exit 2, nothing created
    test_cli_exits_2_and_creates_nothing(tmp_path, capsys, raw, expected)


@pytest.mark.parametrize("content,expected", [
    ("name: [unclosed\n", "malformed YAML at line"),
    ("- just\n- a list\n", "a spec must be a YAML mapping"),
    ("name: x\nmethod: !!python/object/apply:os.system ['echo pwned']\n", "malformed YAML"),
])
def test_malformed_yaml_and_code_in_yaml(tmp_path, content, expected):
    f = tmp_path / "s.yaml"
    f.write_text(content)
    with pytest.raises(SpecError) as info:
        load_spec_file(f)
    assert expected in info.value.problems[0]


@pytest.mark.parametrize("argv,expected", [
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "/no/such/spec.yaml"], "no such spec file"),
    (["run"], "give a spec file or --preset NAME"),
    (["resume", "/tmp"], "is not an otstudy study directory"),
    (["resume", "/no/such/dir"], "no such study directory"),
    (["report", "/tmp"], "is not an otstudy study directory"),
    (["status", "/no/such/dir"], "no such study directory"),
    (["run", "--preset", "sinsim_beta", "--storage", "ftp://h/x"], "--storage ftp://h/x: unsupported URI scheme"),
    # nothing listens on port 9: the store cannot be reached
    (["status", "s3://nob/studies/a?endpoint_override=127.0.0.1:9&scheme=http"],
     "storage s3://nob/studies/a: cannot be read"),
])
def test_cli_argument_errors(capsys, argv, expected):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_report_of_an_empty_study(tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "spec.yaml").write_text(yaml.safe_dump(GOOD))
    assert main(["report", str(d)]) == 2
    assert "has no results.parquet" in capsys.readouterr().err


def test_existing_study_is_not_overwritten(tmp_path, capsys):
    d = tmp_path / "sinsim_beta"
    d.mkdir()
    (d / "keep.txt").write_text("finished work")
    assert main(["run", "--preset", "sinsim_beta", "--storage", str(tmp_path)]) == 2
    assert "already exists; resume it" in capsys.readouterr().err
    assert (d / "keep.txt").read_text() == "finished work"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_spec(name):
    spec = parse_spec(get_preset(name))
    assert spec.n_trials() >= 1
    smoke = spec.smoke()
    assert smoke.n_trials() <= spec.n_trials() and smoke.fixed["epochs"] <= 3


def test_presets_command_lists_each(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_a_grid_study_can_span_datasets_and_a_preset_can_run_on_mnist5k(capsys):
    spec = parse_spec(with_(dataset=["digits", "mnist5k"], seeds=[0]))
    assert spec.datasets == ["digits", "mnist5k"] and spec.n_trials() == 8
    assert [c["dataset"] for c in spec.grid_configs()] == ["digits"] * 4 + ["mnist5k"] * 4
    assert parse_spec(spec.to_dict()).datasets == spec.datasets  # spec.yaml round trip
    for raw, line in [(with_(dataset=["digits", "mnist5k"], sampler="tpe", search={"beta": {"low": 0, "high": 1}}),
                       "dataset: a list of datasets needs the grid sampler"),
                      (with_(dataset=["digits", "nope"]), "dataset: unknown dataset 'nope'"),
                      (with_(dataset=["digits", "digits"]), "dataset: contains duplicates"),
                      (with_(dataset=["digits", "mnist5k"], fixed={"knn_k": 200}),
                       "fixed: knn_k=200: above the smallest class of the digits kNN bank")]:
        with pytest.raises(SpecError) as info:
            parse_spec(raw)
        assert any(p.startswith(line) for p in info.value.problems), info.value.problems
        assert len(info.value.problems) == len(set(info.value.problems))  # said once, not once per dataset
    # every preset on mnist5k, or on both, by --dataset (a study of its own name)
    for name in PRESETS:
        assert main(["run", "--preset", name, "--dataset", "mnist5k", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sinsim_beta-mnist5k" in out
    assert main(["run", "--preset", "sinsim_beta", "--dataset", "digits,mnist5k", "--dry-run"]) == 0
    assert "40 trials would run" in capsys.readouterr().out
    assert main(["run", "--preset", "sinsim_beta", "--dataset", "imagenet", "--dry-run"]) == 2


def test_knobs_command_lists_the_table(capsys):
    from trainables.catalog import KNOBS

    assert main(["knobs"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in "\n" + out for name in KNOBS)
    assert main(["knobs", "gca_rince"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[::2]] == ["eps", "gca_iters", "rince_q", "rince_lam"]
    assert "float >= 0.5, in steps of 0.5" in lines[2] and "gca_rince: 5" in lines[2]
    assert main(["knobs", "simclr2"]) == 2


def test_a_trial_label_names_a_sampled_value_to_4_significant_digits():
    # a random or TPE study's lines (and MLflow run names) read 'beta=0.5903948646972071 eps=0.07821210768011508'
    from study.tracking import trial_label

    spec = {"method": ["sinsim", "iot_cl"], "search": {"beta": {}, "eps": {}, "lambda_p": {}}}
    cfg = {"method": "sinsim", "beta": 0.5903948646972071, "eps": 0.07821210768011508, "seed": 0}
    assert trial_label(cfg, spec) == "method=sinsim beta=0.5904 eps=0.07821 seed=0"
    # a grid's values as written in the spec
    assert trial_label({"beta": 0.0, "eps": 1e-3, "seed": 1}, {"method": "sinsim", "search": {"beta": {}, "eps": {}}}) \
        == "beta=0.0 eps=0.001 seed=1"
    assert trial_label({"relaxation": "Uab", "sinkhorn_iters": 4, "seed": 2},
                       {"method": "iot_cl", "search": {"cases": [{"relaxation": "Uab", "sinkhorn_iters": 4}]}}) \
        == "relaxation=Uab sinkhorn_iters=4 seed=2"


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `otstudy presets | head -1`: the output is flushed after head has gone; it printed BrokenPipeError's
    # traceback (from the interpreter's last flush), now the command ends as one stopped by SIGPIPE
    import subprocess

    from helpers import OTSTUDY

    proc = subprocess.Popen([OTSTUDY, "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command (which needs ~0.3 s to start) writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def sampled_params(space, n):
    """The params of ``n`` trials a seeded random sampler draws from a define-by-run space."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        drawn.append(dict(trial.params))
        study.tell(trial, 0.0)
    return drawn


def test_define_by_run_space_is_conditional():
    space = DefineByRun({"uot_lambda1": {"low": 0.1, "high": 10.0, "log": True},
                         "lambda_p": {"grid": [0.0, 1.0]}, "eps": {"low": 0.01, "high": 1.0}},
                        ["gca_uot", "iot_cl"])
    drawn = sampled_params(space, 20)
    for params in drawn:
        if params["method"] == "gca_uot":
            assert "uot_lambda1" in params and "lambda_p" not in params
        else:
            assert "lambda_p" in params and "uot_lambda1" not in params
        assert "eps" in params
    assert {p["method"] for p in drawn} == {"gca_uot", "iot_cl"}


def test_a_knob_that_another_setting_makes_inert_is_neither_crossed_nor_sampled():
    # IOT-CL's U(1) and U(a) plans are closed forms: 3 iteration counts there were 3 names for one trial
    spec = parse_spec(with_(method="iot_cl", search={"relaxation": {"grid": ["U1", "Ua", "Uab"]},
                                                     "sinkhorn_iters": {"grid": [1, 4, 10]}}))
    assert spec.grid_configs() == [{"relaxation": "U1"}, {"relaxation": "Ua"},
                                   *({"relaxation": "Uab", "sinkhorn_iters": k} for k in (1, 4, 10))]
    # SinSim with SNS (fixed) runs to its tolerance: its iteration count is no configuration
    spec = parse_spec(with_(method="sinsim", fixed={"ot_solver": "sns"}, search={"beta": {"grid": [0.4, 0.8]},
                                                                               "sinkhorn_iters": {"grid": [10, 40]}}))
    assert spec.grid_configs() == [{"beta": 0.4}, {"beta": 0.8}]
    drawn = sampled_params(DefineByRun({"sinkhorn_iters": {"low": 1, "high": 20}, "relaxation": {"choices":
                                        ["U1", "Ua", "Uab"]}}, ["iot_cl"]), 30)
    assert all(("sinkhorn_iters" in p) == (p["relaxation"] == "Uab") for p in drawn)
    assert {p["relaxation"] for p in drawn} == {"U1", "Ua", "Uab"}
    # and a config reports the gradient SNS takes, not Sinkhorn's default
    assert TrialConfig.from_dict({"method": "sinsim", "ot_solver": "sns"}).method_knobs()["ot_grad"] == "implicit"


def test_a_range_over_gca_iters_samples_half_iterations_a_config_accepts():
    values = {p["gca_iters"] for p in sampled_params(DefineByRun({"gca_iters": {"low": 0.5, "high": 6}}, ["gca_ince"]),
                                                     30)}
    for v in values:
        TrialConfig.from_dict({"method": "gca_ince", "gca_iters": v})
    assert all(0.5 <= v <= 6 and (2 * v).is_integer() for v in values) and any(not v.is_integer() for v in values)


def test_missing_data_root_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as info:
        parse_spec(with_(dataset="cifar10", fixed={"data_root": str(tmp_path / "nowhere")}))
    assert any(ln.startswith("fixed.data_root: dataset cifar10:") and "nowhere" in ln for ln in info.value.problems)
    with pytest.raises(SpecError, match="needs data_root"):
        parse_spec(with_(dataset="mnist", fixed={"epochs": 1}))


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("docs/specs/*.yaml")))
def test_documented_cluster_specs_are_valid_but_for_the_data(path):
    """docs/reproduce.md's specs stay in sync with the spec schema; only /data is missing here."""
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    assert all(ln.startswith("fixed.data_root:") for ln in info.value.problems), info.value.problems


def test_check_resources_fails_on_a_local_cluster_and_warns_on_a_joined_one(monkeypatch, capsys):
    import ray

    from study.session import ResourceError, check_resources

    two_nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
                 {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]  # a dead node holds nothing
    monkeypatch.setattr(ray, "nodes", lambda: two_nodes)
    spec = parse_spec(with_(resources={"cpu": 2, "gpu": 0.5}))
    check_resources(spec, joined=False)  # the second node holds it
    spec = parse_spec(with_(resources={"cpu": 3}))  # 4 CPUs in all, but no node has 3
    with pytest.raises(ResourceError) as info:
        check_resources(spec, joined=False)
    assert str(info.value) == ("resources: each trial asks for 3 CPU(s), but this machine's Ray has 2 CPU(s) "
                               "and 1 GPU(s); lower resources in the spec, or run on a cluster that has them "
                               "(--address)")
    check_resources(spec, joined=True)  # a cluster may be adding nodes: the trials wait, with one line
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[otstudy] warning: resources: each trial asks for 3 CPU(s), "
                                               "but the largest node of the cluster has 2 CPU(s) and 1 GPU(s)")


def test_a_study_asking_for_a_gpu_on_a_machine_without_one_fails_at_once(tmp_path):
    # Tune would keep the trials pending for ever (its only word: "no trial started" every 60 s)
    from helpers import OTSTUDY, spec_file

    from study.runner import write_study_files

    spec, _ = spec_file(tmp_path, "gpu", resources={"cpu": 1, "gpu": 1})
    storage = tmp_path / "studies"
    proc = subprocess.run([OTSTUDY, "run", str(spec), "--storage", str(storage)], capture_output=True, text=True,
                          timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("otstudy: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert re.fullmatch(r"otstudy: error: resources: each trial asks for 1 CPU\(s\) and 1 GPU\(s\), but this "
                        r"machine's Ray has \d+ CPU\(s\) and 0 GPU\(s\); lower resources in the spec, or run on a "
                        r"cluster that has them \(--address\)", errors[0]), errors[0]
    assert not (storage / "gpu").exists()  # nothing ran, nothing is left
    # a study made elsewhere (the spec a GPU cluster ran) is refused too, and left as it was
    study = tmp_path / "elsewhere" / "gpu"
    write_study_files(load_spec_file(spec), study, smoke=False)
    before = {p.name: p.read_bytes() for p in study.iterdir()}
    proc = subprocess.run([OTSTUDY, "resume", str(study)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "1 GPU(s), but this machine's Ray has" in proc.stderr
    assert proc.stderr.rstrip().endswith("; the study is unchanged")
    assert {p.name: p.read_bytes() for p in study.iterdir()} == before
    # the logical GPUs a local Ray may declare (docs/platform.md) must be a count: one line, nothing left
    import os

    proc = subprocess.run([OTSTUDY, "run", str(spec), "--storage", str(storage)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OTSTUDY_RAY_NUM_GPUS": "half"})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("otstudy: error:")]
    assert proc.returncode == 2 and errors == ["otstudy: error: OTSTUDY_RAY_NUM_GPUS='half': expected a whole "
                                               "number of GPUs for the local Ray to declare"], proc.stderr[-2000:]
    assert not (storage / "gpu").exists()


def test_bad_input_cases_are_counted():
    n_spec, n_cli = len(BAD) + 3 + 2, 9 + 2 + 3  # BAD + malformed YAML + data root; CLI arguments + empty/existing
    # study + resources no node has (run, resume) + a GPU count that is not one
    assert n_spec + n_cli >= 20
    record("bad input", "test_spec.py (test_bad_spec_names_the_problem, test_cli_exits_2_and_creates_nothing, "
           "test_cli_argument_errors, ...)",
           f"{n_spec} malformed specs and {n_cli} bad CLI calls: each a one-line error naming the field or "
           f"argument, exit 2, no study directory created")


def test_the_study_driver_never_imports_torch():
    # only trial processes need torch; the CLI, spec validation and the Tune driver read trainables.catalog
    code = ("import sys; import study.cli, study.runner, study.spec, study.export, search_spaces.spaces; "
            "from study.spec import parse_spec; from search_spaces.presets import get_preset; "
            "parse_spec(get_preset('sinsim_beta')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_catalogue_matches_what_the_trials_run():
    from trainables.catalog import AUGMENT_NAMES, METHOD_INFO
    from trainables.data import AUGMENTS
    from trainables.losses import METHODS

    assert AUGMENT_NAMES == tuple(AUGMENTS)
    assert {n: m.defaults for n, m in METHODS.items()} == {n: m.defaults for n, m in METHOD_INFO.items()}


def test_quick_exit_keeps_the_output_and_the_exit_code():
    # what `otstudy` does after a study: print, stop Ray if running, then exit without the interpreter's teardown
    code = "import ray, study.cli as c; print('results written'); c._quick_exit(3)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "results written\n"


def test_each_trial_line_is_printed_as_it_comes_not_folded_by_ray():
    # Ray folds lines that differ only in numbers, from different workers, into a "[repeated 2x across
    # cluster]" line printed seconds later; the CLI exempts the trials' own lines (and only those)
    code = """
import json, study.cli
from ray._private import ray_constants
from ray._private.ray_logging import LogDeduplicator
d = LogDeduplicator(5, ray_constants.RAY_DEDUP_LOGS_ALLOW_REGEX, None, _timesource=lambda: 0)
def lines(pid, text):
    return [ln for b in d.deduplicate({"ip": "x", "pid": pid, "lines": [text]}) for ln in b["lines"]]
trial = "[otstudy trial] sinsim on digits (1212 images), device cpu"
other = "some library warning 1"
print(json.dumps([lines(1, trial), lines(2, trial), lines(1, other), lines(2, other.replace("1", "2"))]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trial_1, trial_2, other_1, other_2 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(trial_1) == 1 and len(trial_2) == 1  # both workers' trial lines, at once
    assert len(other_1) == 1 and other_2 == []  # Ray's folding still applies to everything else


def test_the_heartbeat_tells_the_time_left_at_the_pace_of_the_epochs_so_far(capsys):
    # 6 trials of 10 epochs (2 not yet proposed): the pace is measured from the first result this driver sees,
    # so epochs run before it (a resumed study's) do not count as fast ones; a pruned trial plans no more
    from types import SimpleNamespace as T

    from study.tracking import Progress

    spec = {"fixed": {"epochs": 10}, "scheduler": {}, "search": {"beta": {"grid": [0.0, 0.8]}}, "method": "sinsim"}
    trials = [T(status="RUNNING", config={"beta": 0.0, "seed": s}, last_result={"epoch": 1}) for s in (0, 1)]
    trials += [T(status="PENDING", config={"beta": 0.8, "seed": s}, last_result={}) for s in (0, 1)]
    progress = Progress(6, "knn_acc", "max", spec, every_s=0.0)
    assert progress.time_left(trials, now=100.0) is None  # the pace starts here: 2 epochs done
    assert progress.time_left(trials, now=130.0) is None  # no epoch since: no pace yet
    trials[0].last_result, trials[1].last_result = {"epoch": 4}, {"epoch": 4}  # 6 epochs in 60 s
    assert progress.time_left(trials, now=160.0) == "~9 min left"  # (60 - 8) epochs at 0.1 a second: 520 s
    # the current trial's epoch is the result's (Tune updates its last result after the callbacks)
    assert progress.time_left(trials, now=160.0, current=trials[0], result={"epoch": 10}) == "~4 min left"  # 230 s
    trials[1].status = "TERMINATED"  # stopped at epoch 4 (pruned): its 6 other epochs are no longer planned
    assert progress.time_left(trials, now=160.0) == "~8 min left"  # 46 epochs: 460 s
    trials[0].last_result = {"epoch": 10}
    trials[0].status = "TERMINATED"
    assert progress.time_left(trials, now=220.0) == "~7 min left"  # 12 epochs in 120 s; 40 left: 400 s
    # with ASHA an upper bound; seconds and hours
    asha = Progress(6, "knn_acc", "max", dict(spec, scheduler={"type": "asha"}), every_s=0.0)
    asha.time_left(trials, now=0.0)
    trials[2].last_result = {"epoch": 1}
    assert asha.time_left(trials, now=2.0) == "at most ~78 s left"  # 39 epochs at 0.5 a second
    assert asha.time_left(trials, now=400.0) == "at most ~4.3 h left"  # 39 epochs at 1 in 400 s
    # the epochs searched, not fixed: the trials not yet proposed plan the proposed ones' mean
    searched = Progress(3, "knn_acc", "max", dict(spec, fixed={}), every_s=0.0)
    few = [T(status="RUNNING", config={"epochs": 4, "seed": 0}, last_result={"epoch": 0}),
           T(status="RUNNING", config={"epochs": 8, "seed": 1}, last_result={"epoch": 0})]
    searched.time_left(few, now=0.0)
    few[0].last_result = {"epoch": 2}
    assert searched.time_left(few, now=10.0) == "~80 s left"  # (4 + 8 + 6 - 2) epochs at 0.2 a second
    # the heartbeat line carries it, from its second result on
    beat = Progress(6, "knn_acc", "max", spec, every_s=0.0)
    beat.on_trial_result(0, few, few[1], {"epoch": 1})
    time.sleep(0.01)
    beat.on_trial_result(1, few, few[1], {"epoch": 2})
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.endswith("best knn_acc so far -") and re.search(r"so far -, ~\d+ (s|min) left$", second)


def test_status_tells_the_training_time_left_from_the_epoch_times_so_far():
    # a running trial's remaining epochs at its own median epoch time, a pending one's and an unproposed one's at
    # the study's; finished trials need nothing; wall time at max_concurrent trials at a time
    import pandas as pd

    from study.cli import training_left

    res = pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "status": ["completed", "running", "pending", "pruned"],
                        "n_epochs": [10, 4, float("nan"), 2], "epochs": [10, 10, 10, 10]})
    hist = pd.DataFrame({"trial_id": ["a"] * 10 + ["b"] * 4 + ["d"] * 2,
                         "epoch_time_s": [2.0] * 10 + [3.0] * 4 + [2.0] * 2})
    spec = {"fixed": {"epochs": 10}, "max_concurrent": 2}
    # b: 6 x 3 s; c: 10 x 2 s (the study's median); 1 unproposed: 10 x 2 s
    assert training_left(res, hist, spec, expected=5) == (58.0, 29.0)
    assert training_left(res, hist, dict(spec, max_concurrent=1), expected=4) == (38.0, 38.0)
    done = res.assign(status=["completed", "completed", "completed", "pruned"])
    assert training_left(done, hist, spec, expected=4) is None  # nothing left
    assert training_left(res, hist.iloc[:0], spec, expected=5) is None  # no epoch time yet
    # epochs searched (not fixed): the unproposed trial plans the proposed ones' mean
    searched = res.assign(epochs=[10, 10, 10, 6])
    assert training_left(searched, hist, {"fixed": {}, "max_concurrent": 2}, expected=5) == (56.0, 28.0)


def test_a_knob_added_to_the_table_is_validated_everywhere_without_other_edits(monkeypatch):
    # one entry in trainables.catalog.KNOBS: a float in (0, 1] that only SimCLR reads, default 0.5
    from trainables import catalog

    monkeypatch.setitem(catalog.KNOBS, "temp_knob", catalog.Knob(
        "temp_knob", float, "a knob for this test", methods={"simclr": 0.5}, low=0, low_open=True, high=1))
    # TrialConfig: type, range, the method's default and its resolved keyword arguments
    cfg = TrialConfig.from_dict({"method": "simclr", "temp_knob": 1})
    assert cfg.temp_knob == 1.0 and cfg.method_knobs() == {"tau": 0.5, "temp_knob": 1.0}
    assert TrialConfig.from_dict({"method": "simclr"}).knob("temp_knob") == 0.5
    with pytest.raises(ValueError, match=r"temp_knob=2.0: must be in \(0, 1\]"):
        TrialConfig.from_dict({"method": "simclr", "temp_knob": 2.0})
    # a spec: the range, and who reads it
    with pytest.raises(SpecError) as info:
        parse_spec(with_(method="simclr", fixed={"temp_knob": 2.0}, search={"tau": {"grid": [0.5]}}))
    assert info.value.problems == ["fixed: temp_knob=2.0: must be in (0, 1]"]
    with pytest.raises(SpecError) as info:
        parse_spec(with_(search={"temp_knob": {"grid": [0.1]}}))  # GOOD runs SinSim
    assert info.value.problems == ["search.temp_knob: only used by simclr; this study runs sinsim"]
    spec = parse_spec(with_(method=["simclr", "sinsim"], search={"temp_knob": {"grid": [0.1, 0.2]}}))
    assert [c for c in spec.grid_configs() if c["method"] == "sinsim"] == [{"method": "sinsim"}]
    # the conditional space: suggested in SimCLR's trials only
    drawn = sampled_params(DefineByRun({"temp_knob": {"low": 0.1, "high": 0.9}}, ["simclr", "sinsim"]), 12)
    assert all(("temp_knob" in p) == (p["method"] == "simclr") for p in drawn)
    assert {p["method"] for p in drawn} == {"simclr", "sinsim"}
