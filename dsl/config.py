"""Typed configuration: dataclass sections, named presets, ``key=value`` overrides, validation.

Every command line in the project is ``python <entry point> [preset=NAME] key=value ...``.
Keys are dotted paths into the tree (``train.lr=1e-4``); a job may also declare short aliases
(``steps=256`` for ``sampling.steps``). Values are parsed from the field's annotation, checked
against the field's ``choices``/range metadata, and then the section's ``validate()`` hook runs.
Every problem is reported as one :class:`ConfigError` line naming the key and what is accepted.

The science sections (model, channel, data, train, sampling) live here so that a checkpoint's
resolved config is one self-describing tree; service-only settings live beside their adapters.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A bad key or value; the message is one line that says what would be accepted."""


# ----------------------------------------------------------------------------------------------
# Field helpers: metadata that the parser enforces.


def choice(default: Any, help: str = "") -> Any:
    """A field whose allowed values are its ``Literal[...]`` annotation."""
    return field(default=default, metadata={"help": help})


def num(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
        hi_open: bool = False, help: str = "") -> Any:
    """A numeric field constrained to [lo, hi] (open ends with ``lo_open``/``hi_open``)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open,
                                            "hi_open": hi_open, "help": help})


def text(default: str = "", help: str = "") -> Any:
    return field(default=default, metadata={"help": help})


def section(cls: type) -> Any:
    return field(default_factory=cls)


# ----------------------------------------------------------------------------------------------
# Sections of the science tree.


@dataclass
class ModelConfig:
    """Backbone shape. ``vocab_size`` counts the mask id (MDLM's V=50258 for GPT-2)."""

    arch: Literal["dit", "ar"] = choice("dit", "dit: time-invariant DiT (Sec 4.3); ar: causal LM")
    hidden: int = num(768, 1, help="hidden width d_model")
    blocks: int = num(12, 1, help="transformer blocks")
    heads: int = num(12, 1, help="attention heads; hidden must be divisible by heads")
    cond_dim: int = num(128, 1, help="adaLN conditioning width (MDLM: 128)")
    mlp_ratio: int = num(4, 1, help="MLP width multiple")
    dropout: float = num(0.1, 0.0, 1.0, hi_open=True, help="residual dropout (MDLM: 0.1)")
    length: int = num(1024, 1, help="maximum sequence length L (tokens)")
    vocab_size: int = num(0, 0, help="V including the mask id; 0 = take it from the tokenizer")
    mask_id: int = num(-1, -1, help="mask token id; -1 = vocab_size - 1 (MDLM convention)")
    znorm_input: bool = field(default=False, metadata={
        "help": "Alg 1 line 18 reading: also feed log(1+||z_i||) to the backbone through a "
                "zero-initialised per-token projection (off = Sec 4.3: Convert(z) alone)"})

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"model.hidden={self.hidden} must be divisible by model.heads={self.heads}")
        if (self.hidden // self.heads) % 2:
            raise ConfigError("model.hidden/model.heads must be even (rotary embedding pairs)")


@dataclass
class ChannelConfig:
    """Spherical-embedding channel and the mixed SNR sampler (Sec 3, 4.1, Alg 1, App C.1)."""

    embed_dim: int = num(64, 2, help="d of the unit-norm token embeddings (App C.1: 64)")
    p_roar: float = num(0.1, 0.0, 1.0, help="P(position is a ROAR endpoint) = 1/k (eq. 17: 0.1)")
    roar: Literal["smoothed", "atomic"] = choice(
        "smoothed", "smoothed: U(0,γ_min) or U(cγ_max,γ_max) (Sec 4.1); atomic: {0, γ_max} (Sec 7.5)")
    gamma_min: float = num(1e-3, 0.0, lo_open=True,
                           help="low ROAR endpoint range U(0,γ_min); the paper gives no value, we "
                                "take Table 4's snr_min=1e-3")
    gamma_max: float = num(50.0, 0.0, lo_open=True, help="clean endpoint γ_max (App C.1: 50)")
    c: float = num(0.8, 0.0, 1.0, help="high ROAR range U(cγ_max, γ_max); unspecified in the paper, 0.8")
    lognormal_mu: float = num(1.65, help="μ of log γ on the continuous branch (eq. 18)")
    lognormal_sigma: float = num(0.9, 0.0, lo_open=True, help="σ of log γ (eq. 18)")
    lognormal_clip: bool = field(default=False, metadata={
        "help": "clip the lognormal branch to [γ_min, γ_max] (App C.1: off)"})
    beta_init: float = num(1.0, 0.0, lo_open=True, help="converter temperature β at init (learnable)")
    mask_bias: float = num(-1.0, help="converter bias of the mask row at init; -1 = ln|V| + 2")


@dataclass
class MDLMLossConfig:
    """MDLM SUBS continuous-time loss with the log-linear schedule (reference §2)."""

    eps: float = num(1e-3, 0.0, 1.0, lo_open=True, hi_open=True, help="log-linear ε")
    sampling_eps: float = num(1e-3, 0.0, 1.0, hi_open=True, help="t ~ U[sampling_eps, 1)")
    stratified: bool = field(default=True, metadata={"help": "stratified t over the batch (MDLM 'antithetic')"})


@dataclass
class DataConfig:
    """Where sequences come from and how they are tokenised and wrapped (reference §5)."""

    source: str = text("hmm", "hmm | cyclic | a local file/folder (.txt/.jsonl/.parquet) | "
                              "hf:<dataset>[:<config>] (openwebtext, text8, wikitext-103, lm1b)")
    tokenizer: str = text("auto", "auto | char | gpt2 | bpe | a tokenizer directory; auto = the "
                                  "source's own for synthetic sources, gpt2 if available else bpe")
    wrap: bool = field(default=True, metadata={"help": "MDLM wrapping: join docs with EOS, BOS..EOS blocks"})
    valid_fraction: float = num(0.01, 0.0, 1.0, lo_open=True, hi_open=True,
                                help="documents held out for validation (deterministic by index)")
    streaming: bool = field(default=False, metadata={"help": "stream the corpus (larger than memory)"})
    text_field: str = text("text", "jsonl/parquet/HF column holding the text")
    bpe_vocab: int = num(4096, 259, help="vocabulary of a byte-level BPE trained on the corpus")
    cache_dir: str = text("", "where tokenised corpora and trained tokenizers are cached ('' = none)")
    length: int = num(0, 0, help="sequence length L of the data; 0 = model.length (must be <= model.length)")
    txt_split: Literal["auto", "eot", "paragraph", "line", "file"] = choice(
        "auto", "documents of a .txt: auto = <|endoftext|> separators if present, else blank lines")
    shuffle_window: int = num(4096, 0, help="training blocks are shuffled within windows of this many "
                                            "(same order streamed or loaded); 0 = corpus order")
    hmm_states: int = num(24, 2, help="hidden states of the synthetic HMM language")
    hmm_words: int = num(120, 4, help="word vocabulary of the synthetic HMM language")
    hmm_seed: int = num(0, 0, help="seed that fixes the HMM's parameters (not its samples)")
    cyclic_k: int = num(7, 2, help="K of the cyclic toy (App B)")


@dataclass
class TrainConfig:
    """Optimisation. ``batch_size`` is the global batch in sequences, whatever the worker count."""

    steps: int = num(1000, 1, help="optimizer steps")
    batch_size: int = num(32, 1, help="global batch (sequences per optimizer step)")
    micro_batch_size: int = num(0, 0, help="sequences per forward per worker; 0 = batch/workers")
    lr: float = num(3e-4, 0.0, lo_open=True, help="peak learning rate (MDLM: 3e-4)")
    beta1: float = num(0.9, 0.0, 1.0, hi_open=True)
    beta2: float = num(0.999, 0.0, 1.0, hi_open=True)
    adam_eps: float = num(1e-8, 0.0, lo_open=True)
    weight_decay: float = num(0.0, 0.0)
    warmup_steps: int = num(0, 0, help="linear warm-up steps (App C.1 fine-tuning: 0)")
    lr_schedule: Literal["constant", "cosine", "linear"] = choice("constant")
    min_lr_ratio: float = num(0.1, 0.0, 1.0, help="final lr / peak for cosine and linear decay")
    grad_clip: float = num(1.0, 0.0, help="global grad-norm clip; 0 = off")
    ema: float = num(0.9999, 0.0, 1.0, hi_open=True, help="EMA decay (MDLM: 0.9999); 0 = off")
    precision: Literal["fp32", "bf16"] = choice("fp32", "bf16 = autocast; App C.1 uses fp32")
    eval_every: int = num(200, 0, help="validate every N steps; 0 = only at the end")
    eval_batches: int = num(4, 1, help="validation batches per evaluation")
    ckpt_every: int = num(200, 0, help="checkpoint every N steps; 0 = only at the end")
    keep_last: int = num(2, 1, help="checkpoints kept besides the best by validation NLL")
    log_every: int = num(10, 1)


@dataclass
class SamplingConfig:
    """Masked and continuous samplers (Sec 5-6, App C.2; reference §3)."""

    sampler: Literal["mdlm", "remdm-cap", "remdm-rescale", "remdm-conf", "remdm-loop",
                     "forward-backward", "remdm-official", "dsl-budget", "sde"] = choice(
        "dsl-budget", "remdm-official: cap for T<L, loop for T>=L; dsl-budget: loop with η_cap(T)")
    steps: int = num(128, 1, help="step budget T")
    top_p: float = num(0.9, 0.0, 1.0, lo_open=True, help="nucleus mass (official rule)")
    eta: float = num(0.02, 0.0, help="remasking η (cap/rescale/loop)")
    t_on: float = num(0.55, 0.0, 1.0, help="loop window start (eq. 22)")
    t_off: float = num(0.05, 0.0, 1.0, help="loop window end (eq. 22)")
    alpha_on: float = num(0.9, 0.0, 1.0, lo_open=True, hi_open=True, help="α held in the loop (eq. 22)")
    eta_cap_table: str = text("", "η_cap(T) table or fitted rule (JSON file/URI); '' = Sec 6.1 values")
    eps: float = num(1e-5, 0.0, 1.0, lo_open=True, hi_open=True, help="final time of the grid")
    noise_removal: bool = field(default=True, metadata={"help": "final greedy pass (+1 NFE)"})
    cache: bool = field(default=True, metadata={"help": "reuse p(x0) when the draft did not change"})
    gamma_vis: float = num(50.0, 0.0, lo_open=True, help="SNR of visible tokens for a DSL denoiser")
    sde_path: Literal["linear", "left-to-right", "random-order"] = choice("linear")
    sde_gamma_end: float = num(50.0, 0.0, lo_open=True, help="SNR at which the SDE stops")
    batch_size: int = num(16, 1)
    seed: int = num(0, 0)
    rewrite_count: Literal["remask", "change"] = choice(
        "remask", "R_i reading (eq. 25): remask = times token i is masked and resampled (Sec 5.2; "
                  "reproduces Table 5), change = every change of x_i incl. reveals, mask as a symbol")
    diag_top_p: float = num(0.9, 0.0, 1.0, lo_open=True, hi_open=True,
                            help="p of the nucleus-size diagnostic k_t (Sec 7.4, Table 6: 0.9)")

    def validate(self) -> None:
        if self.t_off >= self.t_on:
            raise ConfigError(f"sampling.t_off={self.t_off} must be < sampling.t_on={self.t_on}")


@dataclass
class RunConfig:
    """A training run: what every checkpoint stores as its resolved config."""

    name: str = text("", "stable run name ('' = derived); re-using it resumes the run")
    seed: int = num(0, 0)
    objective: Literal["dsl", "mdlm", "ar"] = choice("dsl")
    init: str = text("scratch", "scratch | <checkpoint dir> | s3://... | hf:kuleshov-group/mdlm-owt | "
                                "<Lightning .ckpt>")
    out_dir: str = text("runs", "local root for checkpoints when no storage URI is given")
    model: ModelConfig = section(ModelConfig)
    channel: ChannelConfig = section(ChannelConfig)
    mdlm: MDLMLossConfig = section(MDLMLossConfig)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)

    def validate(self) -> None:
        if self.objective == "ar" and self.model.arch != "ar":
            raise ConfigError("objective=ar needs model.arch=ar (objective dsl/mdlm need model.arch=dit)")
        if self.objective != "ar" and self.model.arch != "dit":
            raise ConfigError(f"objective={self.objective} needs model.arch=dit")


# ----------------------------------------------------------------------------------------------
# Presets: named override lists applied on top of the defaults, before the command line.

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU sizes for tests and the embedded default
    "toy": dict(hidden=32, blocks=2, heads=2, cond_dim=32, dropout=0.0, length=64),
    "tiny-cpu": dict(hidden=64, blocks=2, heads=4, cond_dim=64, dropout=0.0, length=128),
    # MDLM's own sizes (reference §1.1)
    "tiny": dict(hidden=512, blocks=8, heads=8, cond_dim=128, dropout=0.1, length=1024),
    "small": dict(hidden=768, blocks=12, heads=12, cond_dim=128, dropout=0.1, length=1024),
    "medium": dict(hidden=1024, blocks=24, heads=16, cond_dim=128, dropout=0.1, length=1024),
}

RUN_PRESETS: dict[str, list[str]] = {
    # offline, CPU, a few minutes: synthetic HMM language, tiny DiT
    "embedded": ["model=tiny-cpu", "model.length=64", "data.source=hmm", "train.steps=300",
                 "train.batch_size=32", "train.lr=1e-3", "train.eval_every=100",
                 "train.ckpt_every=100", "train.ema=0.99"],
    # the paper's OWT fine-tune (App C.1): MDLM small, GPT-2 BPE, L=1024, no warm-up, fp32
    "owt-small": ["model=small", "data.source=hf:openwebtext", "data.tokenizer=gpt2",
                  "init=hf:kuleshov-group/mdlm-owt", "train.steps=100000", "train.batch_size=512",
                  "train.lr=3e-4", "train.warmup_steps=0", "train.precision=fp32",
                  "train.eval_every=10000", "train.ckpt_every=5000"],
    # text8 likelihood protocol (App C.3): character level, L=256, 12 layers
    "text8": ["model=small", "model.length=256", "data.source=hf:text8", "data.tokenizer=char",
              "train.steps=500000", "train.batch_size=512"],
}


# ----------------------------------------------------------------------------------------------
# Parsing.


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    if typing.get_origin(tp) is Literal:
        name = " | ".join(str(a) for a in typing.get_args(tp))
    elif typing.get_origin(tp) is tuple:
        name = f"comma-separated {typing.get_args(tp)[0].__name__}s"
    else:
        name = getattr(tp, "__name__", str(tp))
    return name + (" | none" if optional else "")


def parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse ``raw`` as the annotated type ``tp`` or raise one ConfigError line."""
    tp, optional = _strip_optional(tp)
    if optional and raw.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if origin is Literal:
            allowed = typing.get_args(tp)
            for a in allowed:
                if str(a) == raw:
                    return a
            raise ConfigError(f"{key}={raw!r} is not one of: {', '.join(map(str, allowed))}")
        if origin is tuple:
            inner = typing.get_args(tp)[0]
            parts = [p for p in raw.split(",") if p.strip()]
            return tuple(parse_value(key, p.strip(), inner) for p in parts)
        if tp is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}={raw!r} is not a boolean (true/false)")
        if tp is int:
            val = float(raw) if ("e" in raw.lower() and "." not in raw) else None
            if val is not None and val.is_integer():
                return int(val)
            return int(raw)
        if tp is float:
            val = float(raw)
            if not math.isfinite(val):
                raise ConfigError(f"{key}={raw!r} must be a finite number")
            return val
        if tp is str:
            return raw
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}={raw!r} is not a valid {_type_name(tp)}")


def _check_range(key: str, value: Any, meta: dict) -> None:
    if value is None or isinstance(value, (bool, str, tuple)):
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    lo_open, hi_open = meta.get("lo_open", False), meta.get("hi_open", False)
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{key}={value} is out of range: expected a value in {left}{lo_s}, {hi_s}{right}")


def _all_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cfg):
        val = getattr(cfg, f.name)
        if is_dataclass(val):
            out.append(prefix + f.name)
            out.extend(_all_keys(val, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def _resolve(cfg: Any, key: str) -> tuple[Any, dataclasses.Field]:
    """Return (the dataclass that owns ``key``'s last part, that field)."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        fmap = {f.name: f for f in fields(node)}
        if part not in fmap:
            raise KeyError(key)
        if i == len(parts) - 1:
            return node, fmap[part]
        node = getattr(node, part)
        if not is_dataclass(node):
            raise KeyError(key)
    raise KeyError(key)


def _unknown_key(cfg: Any, key: str, aliases: dict[str, str]) -> ConfigError:
    known = _all_keys(cfg) + list(aliases)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known top-level keys: " \
        f"{', '.join(sorted({k.split('.')[0] for k in known}))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def set_key(cfg: Any, key: str, raw: str, aliases: dict[str, str] | None = None) -> None:
    """Set one dotted key from its string form, in place, with full validation of that field."""
    aliases = aliases or {}
    key = aliases.get(key, key)
    try:
        owner, f = _resolve(cfg, key)
    except KeyError:
        raise _unknown_key(cfg, key, aliases) from None
    current = getattr(owner, f.name)
    if is_dataclass(current):
        presets = MODEL_PRESETS if isinstance(current, ModelConfig) else {}
        if raw in presets:
            for k, v in presets[raw].items():
                setattr(current, k, v)
            return
        allowed = ", ".join(presets) if presets else "no presets"
        raise ConfigError(f"{key}={raw!r}: a section takes a preset name ({allowed}) or use {key}.<field>=...")
    hints = typing.get_type_hints(type(owner))
    value = parse_value(key, raw, hints[f.name])
    _check_range(key, value, f.metadata)
    setattr(owner, f.name, value)


def validate(cfg: Any, prefix: str = "") -> None:
    """Run range checks on every field and each section's ``validate()`` hook."""
    for f in fields(cfg):
        val = getattr(cfg, f.name)
        if is_dataclass(val):
            validate(val, prefix + f.name + ".")
        else:
            _check_range(prefix + f.name, val, f.metadata)
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook()


def split_override(arg: str) -> tuple[str, str]:
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"malformed override {arg!r}: expected key=value (e.g. train.lr=1e-4)")
    key, raw = arg.split("=", 1)
    return key.strip(), raw.strip()


def apply_overrides(cfg: Any, args: list[str], aliases: dict[str, str] | None = None,
                    presets: dict[str, list[str]] | None = None) -> Any:
    """Apply ``preset=NAME`` (first) and then ``key=value`` overrides in order; validate."""
    presets = RUN_PRESETS if presets is None else presets
    pairs = [split_override(a) for a in args]
    for key, raw in pairs:
        if key == "preset":
            if raw not in presets:
                raise ConfigError(f"unknown preset {raw!r}; available: {', '.join(sorted(presets)) or 'none'}")
            for k, v in (split_override(p) for p in presets[raw]):
                set_key(cfg, k, v, aliases)
    for key, raw in pairs:
        if key != "preset":
            set_key(cfg, key, raw, aliases)
    validate(cfg)
    return cfg


def load(cls: type, args: list[str], aliases: dict[str, str] | None = None,
         presets: dict[str, list[str]] | None = None, defaults: list[str] | None = None) -> Any:
    """Build ``cls()``, apply ``defaults`` (a job's own starting overrides), then ``args``."""
    cfg = cls()
    if defaults:
        for key, raw in (split_override(a) for a in defaults):
            set_key(cfg, key, raw, aliases)
    return apply_overrides(cfg, args, aliases, presets)


# ----------------------------------------------------------------------------------------------
# Serialisation.


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Strictly rebuild ``cls`` from ``to_dict`` output; unknown keys are an error."""
    cfg = cls()
    _fill(cfg, data, "", where)
    validate(cfg)
    return cfg


def _fill(node: Any, data: dict[str, Any], prefix: str, where: str) -> None:
    fmap = {f.name: f for f in fields(node)}
    hints = typing.get_type_hints(type(node))
    for k, v in data.items():
        if k not in fmap:
            raise ConfigError(f"{where}: unknown config key {prefix + k!r}")
        cur = getattr(node, k)
        if is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {prefix + k} must be a mapping")
            _fill(cur, v, prefix + k + ".", where)
            continue
        tp, _ = _strip_optional(hints[k])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        setattr(node, k, v)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 3e-4, ...}``: the form MLflow params and tables want."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def describe(cls: type) -> str:
    """Human-readable list of keys, types and help (``--help`` of every entry point)."""
    lines = []

    def walk(node: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in fields(node):
            val = getattr(node, f.name)
            if is_dataclass(val):
                walk(val, prefix + f.name + ".")
                continue
            help_ = f.metadata.get("help", "")
            lines.append(f"  {prefix + f.name:<28} {_type_name(hints[f.name]):<22} "
                         f"default {val!r}{'  ' + help_ if help_ else ''}")

    walk(cls(), "")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Evaluation job (jobs/evaluate.py; issue 4).


@dataclass
class EvalConfig:
    """MAUVE / GenPPL / sentence entropy of a sample file; calibration (Fig 4); likelihood (Table 3)."""

    samples: str = text("", "samples: JSON lines with 'text' (+ 'ids') as jobs/sample.py writes, or .txt")
    reference: str = text("", "reference texts: a .jsonl/.txt file or hf:<dataset>[:<config>]")
    reference_split: str = text("validation", "split of an hf: reference (MDLM's OWT valid: train[-100000:])")
    text_field: str = text("text", "JSON field / dataset column holding the text")
    n_reference: int = num(0, 0, help="references drawn without replacement; 0 = as many as samples")
    reference_seed: int = num(1, 0, help="seed of the reference draw (MDLM/ReMDM loader seed: 1)")
    words_per_reference: int = num(0, 0, help="cut the reference corpus into chunks of N words; 0 = as stored")
    featurizer: str = text("minilm", "minilm (offline) | gpt2-large (the paper's) | <local HF model dir>")
    max_length: int = num(0, 0, help="featurizer max tokens; 0 = its default (minilm 128, gpt2-large 1024)")
    featurize_batch: int = num(32, 1, help="texts per featurizer forward")
    seeds: tuple[int, ...] = field(default=(25, 26, 27), metadata={
        "help": "k-means seeds MAUVE is averaged over (mauve-text's default seed is 25)"})
    num_buckets: str = text("auto", "k-means buckets K: auto = n/10 (K=500 for 5k samples) or an integer")
    match_length: bool = field(default=True, metadata={
        "help": "cut samples and references to one token budget (recorded as length_budget)"})
    length_budget: int = num(0, 0, help="token budget when matching lengths; 0 = the shorter set's longest text")
    cache: str = text("runs/feature-cache", "reference-feature cache: local dir or s3://...; '' = off")
    workers: int = num(0, 0, help="0 = featurize in this process; N = a MauvePool of N Ray actors")
    gpus_per_worker: float = num(0.0, 0.0, help="GPUs per MAUVE actor")
    ray_address: str = text("", "Ray cluster address for workers > 0; '' = a private local Ray on 127.0.0.1")
    device: str = text("cpu", "torch device of in-process featurizer / oracle")
    oracle: str = text("none", "GenPPL oracle: none | gpt2-large | <local HF causal LM dir> | "
                               "<AR checkpoint dir or s3:// URI> | oracle:hmm | oracle:cyclic (exact)")
    oracle_max_length: int = num(1024, 1, help="re-tokenisation max length of an HF oracle (ReMDM: 1024)")
    genppl_batch: int = num(8, 1, help="samples per oracle forward")
    checkpoint: str = text("", "calibration/likelihood: checkpoint dir(s)/URI(s), comma-separated; "
                                "label=uri names a curve (e.g. atomic=runs/a,smoothed=runs/b)")
    snr: tuple[float, ...] = field(default=(1.0, 5.0, 10.0, 20.0, 50.0, 70.0, 80.0, 90.0, 95.0, 100.0),
                                   metadata={"help": "calibration SNR grid (Fig 4a: the near-clean end 70..100)"})
    calibration_bins: int = num(15, 2, help="equal-width confidence bins of the token ECE (paper: unstated)")
    reliability_snr: float = num(100.0, 0.0, lo_open=True, help="SNR of the reliability diagram (Fig 4b: 100)")
    batches: int = num(4, 1, help="held-out batches for calibration / likelihood")
    batch_size: int = num(8, 1, help="held-out sequences per batch")
    n_mc: int = num(32, 2, help="likelihood: Monte Carlo draws of the path integral per sequence")
    chunk: int = num(256, 1, help="likelihood: characters per text8-style chunk (App C.3: 256)")
    heldout: str = text("", "likelihood: held-out text file ('' = the run's own validation split)")
    t_end: float = num(0.0, 0.0, help="likelihood: 0 = eq. 3 (integral to ∞); t* > 0 = eq. 10/4, integral to "
                                      "t* + the model's factorised -log p(x | z_t*) (an upper bound)")
    out: str = text("", "directory for plots and JSON results ('' = print only; calibration: '.')")
    seed: int = num(0, 0, help="seed of the corruption noise / Monte Carlo draws")
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars on long work"})
    data: DataConfig = section(DataConfig)


__all__ = [
    "ConfigError", "ModelConfig", "ChannelConfig", "MDLMLossConfig", "DataConfig", "TrainConfig",
    "SamplingConfig", "RunConfig", "MODEL_PRESETS", "RUN_PRESETS", "apply_overrides", "load",
    "set_key", "validate", "to_dict", "from_dict", "flatten", "dumps", "describe", "parse_value",
    "split_override", "Optional",
]
