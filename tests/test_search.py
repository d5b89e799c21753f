"""Unit tests of the η_cap(T) search that need no Ray cluster: config checks, the searcher's handling of
ASHA-stopped trials, study resume bookkeeping, resources, best-trial choice, the fitted rule, the plot.
The end-to-end searches on a real local Ray cluster are in tests/test_search_integration.py."""

from __future__ import annotations

import json
import math

import pytest

from dsl.cli import load_job, parse
from dsl.config import ConfigError
from dsl.errors import UserError
from dsl.service import search as S
from dsl.service.search_config import search_space, trial_resources
from dsl.service.search_optuna import StudySearcher
from dsl.service.search_results import (
    band_distance,
    best_per_steps,
    eta_cap_artifacts,
    fit_rule,
    penalised_score,
    plot_mauve_vs_rewrites,
)
from dsl.service.search_study import open_storage, prepare_study, storage_url, study_records, tpe_seed
from dsl.service.search_trial import rungs_for

JOB = load_job("tune/eta_cap_search.py")


def load(args: list[str]):
    return parse(JOB, args)[1]

# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the key, before anything starts


@pytest.mark.parametrize("arg, needle", [
    ("search.eta_cap_range=0.5,0.1", "search.eta_cap_range=0.5,0.1: empty or inverted range"),
    ("search.eta_cap_range=0.1,0.1", "search.eta_cap_range=0.1,0.1: empty or inverted range"),
    ("search.eta_cap_range=", "search.eta_cap_range=''"),
    ("search.eta_cap_range=0,0.1", "search.eta_cap_range=0,0.1: both ends must lie in (0, inf]"),
    ("search.eta_cap_range=0.1", "expected a range lo,hi"),
    ("search.t_on_range=0.9,0.2", "search.t_on_range=0.9,0.2: empty or inverted range"),
    ("search.top_p_range=0.5,1.5", "search.top_p_range=0.5,1.5: both ends must lie in (0, 1]"),
    ("budgets=0,16", "search.budgets=0,16: every T must be in [1,"),
    ("budgets=-4", "every T must be"),
    ("budgets=", "search.budgets= is empty"),
    ("budgets=16,16", "repeats a budget"),
    ("search.rewrite_target=2,1", "search.rewrite_target=2,1: need 0 <= lo <= hi"),
    ("search.rewrite_target=1", "expected two numbers lo,hi"),
    ("study=", "search.study= is empty"),
    ("search.min_samples=64", "search.min_samples=64 > sampling.num_samples=32"),
    ("etacap=0.1,0.2", "unknown config key 'etacap'"),
    ("sampling.steps=8", "sampling.steps is not read by tune/eta_cap_search.py"),
    ("eval.workers=0", "eval.workers=0"),
])
def test_bad_config_is_one_line_naming_the_key(arg, needle):
    with pytest.raises(ConfigError) as err:
        load([arg])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_t_window_ranges_must_not_overlap():
    with pytest.raises(ConfigError, match="search.t_off_range=0.1,0.6 overlaps search.t_on_range=0.5,0.9"):
        load(["search.t_on_range=0.5,0.9", "search.t_off_range=0.1,0.6"])
    with pytest.raises(ConfigError, match="sampling.t_off=0.05 overlaps search.t_on_range=0.01,0.9"):
        load(["search.t_on_range=0.01,0.9"])   # against the fixed t_off
    with pytest.raises(ConfigError, match="search.t_off_range=0.1,0.6 overlaps sampling.t_on=0.55"):
        load(["search.t_off_range=0.1,0.6"])
    with pytest.raises(ConfigError, match="the search always samples with remdm-loop"):
        load(["sampling.sampler=mdlm"])


def test_defaults_and_overrides_parse():
    cfg = load(["budgets=128,256,512,1024", "search.eta_cap_range=1e-4,0.05", "search.rewrite_target=0.5,1.5",
                "sampling.top_p=0.8", "search.t_on_range=0.4,0.7"])
    assert cfg.search.budgets == (128, 256, 512, 1024)
    assert cfg.search.eta_cap_range == (1e-4, 0.05) and cfg.search.rewrite_target == (0.5, 1.5)
    assert cfg.sampling.top_p == 0.8
    space = search_space(cfg)
    assert set(space) == {"eta_cap", "t_on"}
    assert space["eta_cap"].log and (space["eta_cap"].low, space["eta_cap"].high) == (1e-4, 0.05)
    assert not space["t_on"].log


def test_entry_point_prints_error_line_and_exits_2(capsys):
    from dsl.cli import main

    assert main(JOB, ["search.rewrite_target=3,1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: search.rewrite_target=3,1: need 0 <= lo <= hi (e.g. 1,2)"]


def test_storage_that_cannot_be_opened_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        open_storage("postgresql://postgres:secret@127.0.0.1:1/nowhere")
    msg = str(err.value)
    assert msg.startswith("search.study_db=postgresql://***@127.0.0.1:1/nowhere cannot be opened")
    assert "secret" not in msg and "\n" not in msg
    with pytest.raises(UserError, match="search.study_db=nonsense://x cannot be opened"):
        open_storage("nonsense://x")


def test_storage_url_defaults_to_sqlite_in_out_dir(tmp_path):
    cfg = load([f"out={tmp_path}"])
    assert storage_url(cfg) == f"sqlite:///{tmp_path.resolve() / 'study.db'}"
    assert storage_url(load(["search.study_db=none"])) is None


# ----------------------------------------------------------------------------------------------
# Study bookkeeping: resume, stale trials, ASHA-stopped trials


def test_prepare_study_fails_trials_left_running_and_counts_finished(tmp_path):
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    name = "s:T=16"
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    dist = {"eta_cap": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}
    for value in (0.3, 0.5):
        t = study.ask(dist)
        study.tell(t, value)
    t = study.ask(dist)
    study.tell(t, state=TrialState.PRUNED)
    study.ask(dist)                       # a trial a killed driver left RUNNING
    done, stored = prepare_study(storage, name)
    assert (done, stored) == (3, 4)
    states = [t.state for t in optuna.load_study(storage=storage, study_name=name).trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert optuna.load_study(storage=storage, study_name=name).trials[3].user_attrs["interrupted"] is True


def _searcher(storage, name, records, full=8):
    return StudySearcher({"eta_cap": __import__("optuna").distributions.FloatDistribution(1e-3, 1.0, log=True)},
                            storage, name, sampler_seed=1, startup=2, full_samples=full, steps=16,
                            on_record=records.append)


def test_asha_stopped_trial_is_pruned_with_its_fidelity_and_full_one_complete(tmp_path):
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    name = "s:T=16"
    prepare_study(storage, name)
    records: list = []
    searcher = _searcher(storage, name, records)
    low = {"score": 0.2, "mauve": 0.2, "mean_rewrites": 1.5, "samples": 4, "training_iteration": 1}
    full = {"score": 0.7, "mauve": 0.7, "mean_rewrites": 1.2, "samples": 8, "training_iteration": 2,
            "diag_remask_rate": 0.1, "not_recorded": 5}
    p0 = searcher.suggest("a")
    p1 = searcher.suggest("b")
    assert set(p0) == {"eta_cap"} and p0 != p1
    searcher.on_trial_result("a", low)
    searcher.on_trial_complete("a", low)            # ASHA stopped it after the first rung
    searcher.on_trial_result("b", dict(full, samples=4, training_iteration=1))
    searcher.on_trial_result("b", full)
    searcher.on_trial_complete("b", full)
    trials = optuna.load_study(storage=storage, study_name=name).trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[0].user_attrs["full_fidelity"] is False and trials[0].user_attrs["samples"] == 4
    assert trials[0].intermediate_values == {1: 0.2}   # Optuna keeps the last intermediate as its value
    assert trials[1].value == 0.7 and trials[1].user_attrs["full_fidelity"] is True
    assert trials[1].user_attrs["diag_remask_rate"] == 0.1 and "not_recorded" not in trials[1].user_attrs
    assert [r["state"] for r in records] == ["PRUNED", "COMPLETE"]
    assert records[0]["eta_cap"] == p0["eta_cap"] and records[1]["number"] == 1
    rows = study_records(storage, name, 16)
    assert [r["number"] for r in rows] == [0, 1] and rows[0]["full_fidelity"] is False


def test_resumed_searcher_continues_numbers_without_replaying_params(tmp_path):
    import optuna

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    name = "s:T=16"
    first: list = []
    prepare_study(storage, name)
    s1 = _searcher(storage, name, first)
    params_before = [s1.suggest(str(i))["eta_cap"] for i in range(2)]
    for i in range(2):
        s1.on_trial_complete(str(i), {"score": 0.1 * i, "mauve": 0.1, "mean_rewrites": 1.0, "samples": 8})
    # a fresh driver: same sampler seed would replay params; the driver derives it from the study size
    done, stored = prepare_study(storage, name)
    s2 = StudySearcher({"eta_cap": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}, storage,
                          name, sampler_seed=tpe_seed(0, 16, stored), startup=2,
                          full_samples=8, steps=16, on_record=first.append)
    replay = _searcher(storage, "other", [])
    assert replay.suggest("x")["eta_cap"] == params_before[0]      # the trap: same seed, same start
    new = s2.suggest("c")["eta_cap"]
    assert new not in params_before
    assert [t.number for t in optuna.load_study(storage=storage, study_name=name).trials] == [0, 1, 2]
    assert done == 2


# ----------------------------------------------------------------------------------------------
# Resources: no deadlock on 2 CPUs


def test_trial_resources_from_cluster():
    cfg = load([])
    assert trial_resources({"CPU": 2.0}, 1.0, cfg) == ({"cpu": 1.0}, 1)
    assert trial_resources({"CPU": 8.0}, 2.0, cfg) == ({"cpu": 1.0}, 6)
    # fewer free CPUs than trial_cpus: a trial takes what is left instead of waiting forever
    assert trial_resources({"CPU": 2.0}, 1.5, cfg) == ({"cpu": 0.5}, 1)
    assert trial_resources({"CPU": 4.0, "GPU": 2.0}, 1.0, cfg) == ({"cpu": 1.0, "gpu": 1}, 2)
    capped = load(["search.max_concurrent=2"])
    assert trial_resources({"CPU": 16.0}, 1.0, capped)[1] == 2
    with pytest.raises(UserError, match="no CPU is left for trials"):
        trial_resources({"CPU": 2.0}, 2.0, cfg)


def test_rungs_are_asha_milestones():
    assert rungs_for(32, 8, 2) == (8, 16, 32)
    assert rungs_for(30, 8, 2) == (8, 16, 30)
    assert rungs_for(32, 32, 2) == (32,)
    assert rungs_for(100, 10, 3) == (10, 30, 90, 100)


# ----------------------------------------------------------------------------------------------
# Choosing, fitting, writing


def test_band_distance_and_penalty():
    assert band_distance(1.5, (1, 2)) == 0.0
    assert band_distance(0.25, (1, 2)) == 0.75
    assert band_distance(3.0, (1, 2)) == 1.0
    assert penalised_score(0.9, 3.0, (1, 2), 1.0) == pytest.approx(-0.1)
    # penalty 1: one rewrite outside the band loses to any in-band MAUVE
    assert penalised_score(1.0, 3.0, (1, 2), 1.0) <= penalised_score(0.0, 1.5, (1, 2), 1.0)


def _rec(number, steps, eta, mauve, rewrites, full=True):
    return {"number": number, "steps": steps, "eta_cap": eta, "mauve": mauve, "mean_rewrites": rewrites,
            "full_fidelity": full}


def test_best_per_steps_trusts_only_full_fidelity_and_the_band():
    records = [
        _rec(0, 16, 0.01, 0.95, 0.5),            # best MAUVE but below the band
        _rec(1, 16, 0.05, 0.80, 1.2),
        _rec(2, 16, 0.07, 0.85, 1.8),            # chosen
        _rec(3, 16, 0.06, 0.99, 1.5, full=False),  # stopped early: not trusted
        _rec(4, 32, 0.02, 0.60, 0.2),
        _rec(5, 32, 0.03, 0.70, 0.4),            # nothing in band: closest to it
    ]
    chosen = best_per_steps(records, (1, 2))
    assert chosen[16]["number"] == 2 and chosen[16]["in_band"] is True
    assert chosen[32]["number"] == 5 and chosen[32]["in_band"] is False


def test_best_per_steps_breaks_ties_by_trial_number():
    records = [_rec(3, 16, 0.02, 0.8, 1.5), _rec(1, 16, 0.04, 0.8, 1.5)]
    assert best_per_steps(records, (1, 2))[16]["number"] == 1


def test_fit_rule_recovers_an_exact_line_in_log_t():
    a, b = 0.05, -0.006
    table = {t: a + b * math.log(t) for t in (128, 256, 512, 1024)}
    rule = fit_rule(table)
    assert rule["form"] == "linear_log_t"
    assert rule["a"] == pytest.approx(a, abs=1e-12) and rule["b"] == pytest.approx(b, abs=1e-12)
    assert rule["r2"] == pytest.approx(1.0)
    # the paper's Sec 6.1 table is not a line in log T: R² < 1, slope negative
    paper = fit_rule({128: 0.010, 256: 0.008, 512: 0.007, 1024: 0.002})
    assert paper["b"] < 0 and 0.5 < paper["r2"] < 1.0
    assert fit_rule({128: 0.01}) == {"form": "linear_log_t", "a": 0.01, "b": 0.0, "r2": 1.0, "points": 1}


def test_artifacts_load_with_the_samplers_loader(tmp_path):
    from dsl.atomic import write_json_atomic
    from dsl.sampling.schedules import load_eta_cap

    chosen = {16: _rec(2, 16, 0.07, 0.85, 1.8), 32: _rec(5, 32, 0.03, 0.70, 1.4)}
    table_doc, rule_doc, fit = eta_cap_artifacts(chosen, 32)
    assert table_doc == {"table": {"16": 0.07, "32": 0.03}, "length": 32}
    assert rule_doc["length"] == 32 and rule_doc["budgets"] == [16, 32]
    write_json_atomic(tmp_path / "t.json", table_doc)
    write_json_atomic(tmp_path / "r.json", rule_doc)
    table = load_eta_cap(str(tmp_path / "t.json"))
    rule = load_eta_cap(str(tmp_path / "r.json"))
    assert table(16) == 0.07 and table(32) == 0.03
    assert rule(16) == pytest.approx(0.07) and rule(32) == pytest.approx(0.03)
    assert fit == {"r2": pytest.approx(1.0), "points": 2}
    assert json.loads((tmp_path / "t.json").read_text()) == table_doc
    assert not (tmp_path / "t.json.tmp").exists()


def test_plot_is_a_png(tmp_path):
    records = [_rec(0, 16, 0.01, 0.5, 0.5), _rec(1, 16, 0.05, 0.8, 1.4), _rec(2, 16, 0.2, 0.6, 2.5, False),
               _rec(3, 32, 0.02, 0.7, 1.1)]
    chosen = best_per_steps(records, (1, 2))
    path = plot_mauve_vs_rewrites(records, chosen, (1, 2), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Preflight: a bad checkpoint, reference or storage fails before Ray or any trial starts


@pytest.mark.parametrize("args, needle", [
    (["checkpoint=/nonexistent/ckpt"], "checkpoint=/nonexistent/ckpt"),
    (["checkpoint=oracle:nope"], "checkpoint='oracle:nope'"),
    (["reference=/nonexistent/refs.txt"], "eval.reference='/nonexistent/refs.txt' is not a file"),
    (["search.study_db=postgresql://postgres@127.0.0.1:1/x"],
     "search.study_db=postgresql://***@127.0.0.1:1/x cannot be opened (OperationalError"),
])
def test_bad_input_fails_before_any_trial(tmp_path, monkeypatch, args, needle):
    import ray

    cfg = load(["sampling.length=16", "sampling.num_samples=8", "search.min_samples=8", "eval.references=8",
                f"out={tmp_path / 'out'}", "service.mlflow=off", *args])
    with pytest.raises((UserError, ConfigError)) as err:
        S.run_search(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "out" / "eta_cap_table.json").exists()


def test_reference_file_is_read_as_evaluation_reads_it_and_too_few_texts_rejected(tmp_path):
    from dsl.eval.mauve import ReferenceSet

    cfg = load(["sampling.length=16", "sampling.num_samples=4", "search.min_samples=4", "eval.references=4",
                f"reference={tmp_path / 'refs.jsonl'}"])
    (tmp_path / "refs.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n'
                                         '{"text": "four"}\n{"text": " "}\n{"text": "five"}\n')
    from dsl.sampling import load_denoiser

    den = load_denoiser("oracle:hmm", cfg.sampling, length=16)
    texts = S._load_reference_texts(cfg, den)
    # the seeded draw evaluation makes (eval.reference_seed), of the non-empty texts
    assert texts == ReferenceSet.from_spec(str(tmp_path / "refs.jsonl"), 4, cfg.eval.reference_seed).texts
    assert len(texts) == 4 and set(texts) <= {"one", "two", "three", "four", "five"}
    (tmp_path / "refs.jsonl").write_text('{"text": "only"}\n{"text": "two"}\n')
    with pytest.raises(UserError, match="has 2 texts, fewer than the 4 needed"):
        S._load_reference_texts(cfg, den)
    src = load(["sampling.length=16", "sampling.num_samples=4", "search.min_samples=4", "eval.references=6"])
    texts = S._load_reference_texts(src, den)
    assert len(texts) == 6 and texts == S._load_reference_texts(src, den)   # seeded, reproducible


def test_references_fewer_than_samples_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.references=16 < sampling.num_samples=32"):
        load(["eval.references=16"])


@pytest.mark.parametrize("old, value, new, read", [
    ("steps", "8,16", "search.budgets=", lambda c: c.search.budgets == (8, 16)),
    ("storage", "none", "search.study_db=", lambda c: c.search.study_db == "none"),
    ("out_dir", "o", "out=", lambda c: c.out == "o"),
    ("eta", "0.01,0.2", "search.eta_cap_range=", lambda c: c.search.eta_cap_range == (0.01, 0.2)),
    ("samples", "16", "sampling.num_samples=", lambda c: c.sampling.num_samples == 16),
    ("length", "12", "sampling.length=", lambda c: c.sampling.length == 12),
    ("mauve_workers", "2", "eval.workers=", lambda c: c.eval.workers == 2),
    ("mauve_seeds", "2", "eval.mauve_seeds=25,26,... (the seeds, not their count)",
     lambda c: c.eval.mauve_seeds == (25, 26)),
    ("judge", "", "eval.judge= ('' is now source)", lambda c: c.eval.judge == "source"),
    ("tracking_uri", "none", "service.tracking_uri= (none is now service.mlflow=off)",
     lambda c: c.service.mlflow == "off"),
    ("mlflow_experiment", "x", "experiment=", lambda c: c.experiment == "x"),
])
def test_old_spellings_land_in_the_new_key_with_one_warning(capsys, old, value, new, read):
    assert read(load([f"{old}={value}"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {old}= is deprecated and will be removed in the next release; use {new}"]
