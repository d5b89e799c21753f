"""One vocabulary, one CLI: walk the config tree and every entry point's declaration; run each entry
point's --help (anywhere on the line) and bad input, in process and as a real subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from dsl.cli import ALIASES, Renamed, load_job, main, parse
from dsl.config import ConfigError, JobConfig, RunConfig, leaf_keys
from dsl.config.parse import key_info

REPO = Path(__file__).resolve().parents[1]
# every entry point that declares a Job (a new one is picked up here without editing this test)
SCRIPTS = sorted(str(p.relative_to(REPO)) for d in ("jobs", "tune", "dashboards") for p in (REPO / d).glob("*.py")
                 if "\nJOB = Job(" in p.read_text())
JOBS = {s: load_job(s) for s in SCRIPTS}
TREE = leaf_keys(JobConfig())


def test_the_four_entry_points_are_declared():
    assert {"jobs/finetune.py", "jobs/sample.py", "jobs/evaluate.py", "tune/eta_cap_search.py"} <= set(SCRIPTS)


def test_every_key_has_help_and_one_description_in_both_roots():
    for key in TREE:
        assert key_info(JobConfig(), key)["help"], f"{key} has no help text"
    # RunConfig (what checkpoints store) and JobConfig describe their shared keys identically
    for key in leaf_keys(RunConfig()):
        if key in TREE:
            a, b = key_info(RunConfig(), key), key_info(JobConfig(), key)
            assert (a["type"], a["range"], a["help"]) == (b["type"], b["range"], b["help"]), key


def test_one_name_per_concept():
    """The old second names of a concept are gone from the tree; keys that once clashed are distinct."""
    leaves = {k.rsplit(".", 1)[-1] for k in TREE}
    for retired in ("oracle", "mauve_workers", "n_reference", "out_dir", "seeds", "log_to_mlflow",
                    "mlflow_experiment", "toy", "embedded"):
        assert retired not in leaves, retired
    helps = {k: key_info(JobConfig(), k)["help"] for k in TREE}
    assert helps["train.steps"] == "optimizer steps"
    assert "step budget T" in helps["sampling.steps"] and "step budgets T" in helps["search.budgets"]
    assert "checkpoint root" in helps["service.storage"] and "Optuna database" in helps["search.study_db"]
    assert "steps" not in {f.name for f in fields(JobConfig().search)}


def test_aliases_name_one_key_each_and_never_clash_with_an_old_spelling():
    sections = {f.name for f in fields(JobConfig()) if is_dataclass(getattr(JobConfig(), f.name))}
    assert len(set(ALIASES.values())) == len(ALIASES)
    for short, key in ALIASES.items():
        assert key in TREE, (short, key)
        assert short not in TREE and short not in sections, f"alias {short} shadows a key"
        for script, job in JOBS.items():
            assert short not in job.renamed, f"{script}: {short} is both an alias and an old spelling"


@pytest.mark.parametrize("script", SCRIPTS)
def test_declarations_name_real_keys(script):
    job = JOBS[script]
    top = {f.name for f in fields(JobConfig())}
    for entry in (*job.uses, *job.ignores):
        assert entry in top or any(k == entry or k.startswith(entry + ".") for k in TREE), entry
    own = set(job.keys())
    for old, rule in job.renamed.items():
        assert old not in own, f"{script}: old spelling {old} is still a key of the job"
        if rule.key is not None:
            assert rule.key in own, f"{script}: {old} → {rule.key}, which the job does not read"
    for word in job.defaults:
        key = word.split("=", 1)[0]
        assert key in own, f"{script}: default for {key}, which the job does not read"
    parse(job, [])   # the job's own defaults validate


@pytest.mark.parametrize("script", SCRIPTS)
def test_plain_renames_land_in_the_new_key_with_one_warning(script, capsys):
    """Every old spelling: one warning line naming the new key, and the value in the new key."""
    job = JOBS[script]
    for old, rule in job.renamed.items():
        if rule.convert is not None:
            continue
        value = _a_valid_other_value(job, rule.key)
        base = ["checkpoint=oracle:hmm"] if job.reads("checkpoint") else []
        try:
            _, cfg = parse(job, [*base, f"{old}={value}"])
        except ConfigError as exc:   # a value valid alone may break a cross-key check of the job
            pytest.fail(f"{script}: {old}={value}: {exc}")
        got = cfg
        for part in rule.key.split("."):
            got = getattr(got, part)
        assert _word(got) == value, (old, rule.key, got)
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"warning: {old}= is deprecated and will be removed in the next release; use {rule.instead}"]


def _word(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(_word(v) for v in value)
    return str(value)


def _a_valid_other_value(job, key: str) -> str:
    """A value for ``key`` different from the job's default that passes the job's checks."""
    info = key_info(job.default_config(next(iter(job.modes))), key)
    d = info["default"]
    if isinstance(d, bool):
        return _word(not d)
    special = {"eval.workers": "2", "search.asha_reduction": "3", "sampling.num_samples": "40",
               "sampling.length": "16", "search.min_samples": "4", "eval.references": "80",
               "search.t_on_range": "0.4,0.9", "search.t_off_range": "0.01,0.04", "search.alpha_on_range": "0.5,0.9",
               "search.top_p_range": "0.5,0.9", "search.rewrite_target": "0.5,1.5", "search.budgets": "8,16",
               "search.eta_cap_range": "0.01,0.2", "eval.mauve_seeds": "1,2", "eval.snr": "1.0,2.0",
               "sampling.t_off": "0.1", "sampling.t_on": "0.6", "sampling.sde_path": "left-to-right",
               "sampling.rewrite_count": "change", "eval.num_buckets": "7"}
    if key in special:
        return special[key]
    if isinstance(d, float):
        return str(d / 2 if d else 0.5)
    if isinstance(d, int):
        return str(d + 1)
    return "x-value"


# ----------------------------------------------------------------------------------------------
# --help and errors, the same for every entry point


def _help_lines(text: str) -> dict[str, str]:
    """{key: "type ... help"} from a --help text (the default column is left out: it is per job)."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"  (\S+)\s+(.+?)\s+default (.*)$", line)
        if m and m.group(1) in TREE:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            out[m.group(1)] = m.group(2).strip() + " | " + re.sub(r"\s+\(alias: .*\)$", "", nxt)
    return out


def test_help_anywhere_shows_every_key_the_job_reads_and_one_text_per_key(capsys):
    seen: dict[str, str] = {}
    for script, job in JOBS.items():
        mode = list(job.modes)[-1]
        for argv in (["--help"], ["-h", "bogus=1"], [mode, "bogus=1", "--help"], ["preset=embedded", "--help"]):
            assert main(job, argv) == 0, (script, argv)
            text = capsys.readouterr().out
            shown = _help_lines(text)
            assert set(shown) == set(job.keys()), (script, set(job.keys()) ^ set(shown))
            assert "modes" in text and all(m in text for m in job.modes)
        for key, line in shown.items():   # a key reads the same in every job's help
            assert seen.setdefault(key, line) == line, (script, key)
    assert "' | recover" not in text   # no bare empty Literal


def test_help_lists_presets_with_sizes_and_aliases(capsys):
    assert main(JOBS["jobs/finetune.py"], ["preset=owt-small", "--help"]) == 0
    text = capsys.readouterr().out
    assert "owt-small" in text and "embedded" in text and "text8" in text
    assert re.search(r"small\s+hidden=768 blocks=12 heads=12 length=1024", text)
    assert "lr= → train.lr=" in text and "steps= → train.steps=" in text


BAD = {  # a bad key and a bad value for every entry point
    "jobs/finetune.py": (["train.stepz=3"], ["train.lr=-1"]),
    "jobs/sample.py": (["sampling.stepz=3"], ["sampling.top_p=2"]),
    "jobs/evaluate.py": (["eval.bogus=1"], ["eval.workers=-1"]),
    "tune/eta_cap_search.py": (["search.bogus=1"], ["budgets=0"]),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_key_and_bad_value_are_one_line_exit_2_nothing_written(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad_key, bad_value = BAD.get(script, (["no.such.key=1"], ["seed=-1"]))
    for argv in (bad_key, bad_value, ["train.steps=1"] if script != "jobs/finetune.py" else ["sampling.steps=1"]):
        assert main(JOBS[script], [*argv, f"out={tmp_path / 'out'}"]) == 2, (script, argv)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), (script, argv, err)
        assert not any(tmp_path.iterdir()), (script, argv)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_points_as_users_run_them(script, tmp_path):
    """The real command line: --help after other words exits 0; a bad key exits 2 with one error line on
    stderr, no stdout and no file. (A bad value takes the same exit path; its line is checked in process
    by test_bad_key_and_bad_value_are_one_line_exit_2_nothing_written: one interpreter start fewer.)"""
    def run(*argv):
        return subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=180)

    helped = run("preset=embedded", "seed=1", "--help")
    assert helped.returncode == 0 and "keys (type, range" in helped.stdout, helped.stderr[-1000:]
    bad_key = BAD.get(script, (["no.such.key=1"], ["seed=-1"]))[0]
    proc = run(*bad_key)
    assert proc.returncode == 2 and proc.stdout == "", (bad_key, proc.stdout[-500:], proc.stderr[-1000:])
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and bad_key[0].split("=")[0].split(".")[-1] in line
    assert not any(tmp_path.iterdir())


def test_renamed_converters():
    """The old spellings whose value changes form on the way to the new key."""
    search, finetune = JOBS["tune/eta_cap_search.py"], JOBS["jobs/finetune.py"]
    assert isinstance(search.renamed["mauve_seeds"], Renamed)
    assert parse(search, ["mauve_seeds=3"])[1].eval.mauve_seeds == (25, 26, 27)
    assert parse(search, ["tracking_uri=none"])[1].service.mlflow == "off"
    assert parse(search, ["tracking_uri=sqlite:///x.db"])[1].service.tracking_uri == "sqlite:///x.db"
    assert parse(finetune, ["service.log_to_mlflow=true", "model=toy"])[1].service.mlflow == "on"
    with pytest.raises(ConfigError, match="not a count"):
        parse(search, ["mauve_seeds=25,26"])


def test_summary_is_the_last_stdout_line(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(JOBS["jobs/sample.py"], ["checkpoint=oracle:cyclic", "sampling.num_samples=2", "sampling.steps=4",
                                         f"out={out}", "service.mlflow=off"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


def _readme_commands() -> list[list[str]]:
    """Every `python jobs/... | tune/...` command in the READMEs and the scripts' own usage text,
    continuations joined, placeholders (<...>, [...], ...) left out."""
    out = []
    docs = [(REPO / d).read_text() for d in ("README.md", "cluster/README.md")] + [j.doc for j in JOBS.values()]
    for text in docs:
        text = text.replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"python ((?:jobs|tune|dashboards)/\w+\.py)((?: [^#`]*)?)", line)
            if m and not line.lstrip().startswith("|"):
                rest = re.sub(r"\[[^\]]*\]|<[^>]*>", " ", m.group(2)).split(" |")[0]   # placeholders
                words = [w.strip("()") for w in rest.split()]
                words = [w for w in words if re.fullmatch(r"[a-z][\w.]*=\S+|[a-z][\w-]*", w)
                         and "..." not in w and "…" not in w]
                out.append([m.group(1), *words])
    return out


def test_documented_commands_use_the_current_vocabulary(capsys):
    commands = _readme_commands()
    assert len(commands) >= 20
    for script, *argv in commands:
        parse(JOBS[script], argv)
        assert "warning" not in capsys.readouterr().err, (script, argv)
