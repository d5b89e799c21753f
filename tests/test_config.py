"""The config tree: presets, overrides, validation messages, round trips."""

import json

import pytest

from dsl import config as C


def test_defaults_follow_app_c1():
    cfg = C.RunConfig()
    assert (cfg.channel.p_roar, cfg.channel.gamma_max) == (0.1, 50.0)
    assert (cfg.channel.lognormal_mu, cfg.channel.lognormal_sigma) == (1.65, 0.9)
    assert cfg.channel.lognormal_clip is False
    assert cfg.channel.embed_dim == 64
    assert cfg.train.warmup_steps == 0 and cfg.train.precision == "fp32"


def test_preset_then_overrides_in_order():
    cfg = C.load(C.RunConfig, ["train.lr=2e-3", "preset=embedded", "model.dropout=0.05"])
    # the preset is applied first whatever its position, then the overrides
    assert cfg.train.lr == 2e-3
    assert cfg.model.hidden == 64 and cfg.model.length == 64
    assert cfg.model.dropout == 0.05


def test_model_preset_sets_small_shape():
    cfg = C.load(C.RunConfig, ["model=small"])
    assert (cfg.model.hidden, cfg.model.blocks, cfg.model.heads, cfg.model.cond_dim) == (768, 12, 12, 128)


def test_aliases_and_types():
    cfg = C.load(C.RunConfig, ["steps=10", "objective=mdlm", "train.ema=0"],
                 aliases={"steps": "train.steps"})
    assert cfg.train.steps == 10 and isinstance(cfg.train.steps, int)
    assert cfg.objective == "mdlm" and cfg.train.ema == 0.0
    cfg = C.load(C.RunConfig, ["train.steps=1e3", "channel.lognormal_clip=yes"])
    assert cfg.train.steps == 1000 and cfg.channel.lognormal_clip is True


@pytest.mark.parametrize("args, fragment", [
    (["train.lr"], "malformed override 'train.lr'"),
    (["train.lrr=1"], "did you mean train.lr"),
    (["preset=nope"], "unknown preset 'nope'; available: embedded"),
    (["objective=gan"], "objective='gan' is not one of: dsl, mdlm, ar"),
    (["train.ema=1.5"], "train.ema=1.5 is out of range"),
    (["train.steps=abc"], "train.steps='abc' is not a valid int"),
    (["model.heads=5"], "must be divisible by model.heads=5"),
    (["model=huge"], "a section takes a preset name"),
    (["objective=ar"], "objective=ar needs model.arch=ar"),
    (["channel.lognormal_clip=maybe"], "is not a boolean"),
    (["train.lr=nan"], "must be a finite number"),
])
def test_bad_input_is_one_clear_line(args, fragment):
    with pytest.raises(C.ConfigError) as err:
        C.load(C.RunConfig, args)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


def test_sampling_window_validation():
    with pytest.raises(C.ConfigError, match="t_off=0.6 must be < sampling.t_on=0.55"):
        s = C.SamplingConfig()
        C.apply_overrides(s, ["t_off=0.6"])


def test_dict_round_trip_and_strictness():
    cfg = C.load(C.RunConfig, ["preset=embedded", "objective=mdlm"])
    data = json.loads(C.dumps(cfg))
    back = C.from_dict(C.RunConfig, data)
    assert back == cfg
    data["train"]["bogus"] = 1
    with pytest.raises(C.ConfigError, match="unknown config key 'train.bogus'"):
        C.from_dict(C.RunConfig, data)


def test_flatten_is_flat_and_complete():
    flat = C.flatten(C.RunConfig())
    assert flat["train.lr"] == 3e-4 and flat["channel.gamma_max"] == 50.0
    assert all(not isinstance(v, dict) for v in flat.values())


def test_describe_lists_keys():
    text = C.describe(C.RunConfig)
    assert "channel.p_roar" in text and "train.batch_size" in text


def test_presets_are_toml_files_shipped_as_package_data():
    from pathlib import Path

    from dsl.config.presets import tomllib

    root = Path(C.__file__).parent / "presets"
    files = sorted(p.relative_to(root.parent).as_posix() for p in root.rglob("*.toml"))
    assert {f.split("/")[-1][:-5] for f in files if "/run/" in f} == set(C.RUN_PRESETS)
    assert {f.split("/")[-1][:-5] for f in files if "/model/" in f} == set(C.MODEL_PRESETS)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["dsl.config"]
    assert all(any(Path(f).match(g) for g in globs) for f in files)   # every preset file is installed


def test_run_preset_applies_its_model_preset_first():
    assert C.RUN_PRESETS["embedded"][:2] == ["model=tiny-cpu", "model.length=64"]
    cfg = C.load(C.RunConfig, ["preset=text8"])
    assert (cfg.model.hidden, cfg.model.length, cfg.data.tokenizer) == (768, 256, "char")


def test_type_names_show_empty_choices_and_booleans():
    from typing import Literal

    from dsl.config.fields import type_name

    assert type_name(Literal["", "recover"]) == "'' | recover"
    assert type_name(bool) == "true | false"
    assert type_name(tuple[int, ...]) == "int,..."


def test_model_spec_kinds_and_refusals(tmp_path):
    from dsl.errors import UserError
    from dsl.model_spec import INIT_KINDS, OURS, parse_model_spec

    run = tmp_path / "run"
    (run / "step-4").mkdir(parents=True)
    (run / "step-4" / "manifest.json").write_text("{}")
    hf = tmp_path / "hfmodel"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    weights = tmp_path / "mdlm.ckpt"
    weights.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    kinds = {"oracle:hmm": "oracle", str(run): "run", str(run / "step-4"): "checkpoint", "s3://b/r": "uri",
             "hf:kuleshov-group/mdlm-owt": "hf", str(hf): "hf_dir", str(weights): "weights", "scratch": "scratch",
             "none": "none", "gpt2-large": "hub"}
    every = ("none", "scratch", "source", "oracle", *OURS, "hf", "hf_dir", "weights", "hub")
    for text, kind in kinds.items():
        assert parse_model_spec(text, "k", every).kind == kind, text
    assert parse_model_spec(str(run), "init", INIT_KINDS).ours
    with pytest.raises(C.ConfigError, match="checkpoint='oracle:nope': oracles are oracle:hmm, oracle:cyclic, oracle:topics"):
        parse_model_spec("oracle:nope", "checkpoint", ("oracle",))
    with pytest.raises(C.ConfigError, match="init=hf:a/b is hf:<owner>/<name>, which init does not take"):
        parse_model_spec("hf:a/b", "init", ("scratch", *OURS))
    with pytest.raises(UserError, match="checkpoint=/no/such: no such file or directory; accepted: oracle:hmm"):
        parse_model_spec("/no/such", "checkpoint", ("oracle", *OURS))
    with pytest.raises(UserError, match="no such file or directory"):   # looks like a hub id, not accepted
        parse_model_spec("runs/missing", "checkpoint", ("oracle", *OURS))
    with pytest.raises(UserError, match="a directory with no manifest.json"):
        parse_model_spec(str(tmp_path / "empty"), "checkpoint", OURS)
    with pytest.raises(C.ConfigError, match="checkpoint='' : give"):
        parse_model_spec(" ", "checkpoint", OURS)
