"""The one config tree every entry point parses: its sections and its root, :class:`JobConfig`.

Each key has one meaning in every job that reads it: ``train.steps`` is always optimizer steps,
``sampling.steps`` always the sampler's step budget T, ``search.budgets`` the search's list of T,
``service.storage`` the checkpoint root and ``search.study_db`` the Optuna database. A job reads a
subset of the tree (``dsl.cli.Job.uses``); its ``--help`` lists exactly that subset.

:class:`RunConfig` is the science part of a training run, the self-describing config a checkpoint
stores; it keeps its own type so old checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dsl.config.fields import ConfigError, choice, flag, num, section, text, values

# The largest step budget T a sampler or a search accepts.
MAX_BUDGET = 1 << 20
# Sampling's final time: MDLM and ReMDM stop at 1e-5; past a few percent of the path a noticeable share
# of positions is still masked when the grid ends and the final pass fills them greedily.
MAX_SAMPLING_EPS = 0.05
# SNRs of the samplers: far above every trained γ_max (Sec 4.1, App C.1: 50), where the softmax of the
# exact posterior is already one-hot in float64.
MAX_SNR = 1.0e4

# ----------------------------------------------------------------------------------------------
# Science sections (a checkpoint stores model, channel, mdlm, data, train).


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
    znorm_input: bool = flag(False, "Alg 1 line 18 reading: also feed log(1+||z_i||) to the backbone through a "
                                    "zero-initialised per-token projection (off = Sec 4.3: Convert(z) alone)")

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
    lognormal_clip: bool = flag(False, "clip the lognormal branch to [γ_min, γ_max] (App C.1: off)")
    beta_init: float = num(1.0, 0.0, lo_open=True, help="converter temperature β at init (learnable)")
    mask_bias: float = num(-1.0, help="converter bias of the mask row at init; -1 = ln|V| + 2")


@dataclass
class MDLMLossConfig:
    """MDLM SUBS continuous-time loss with the log-linear schedule (MDLM, Sahoo et al. 2024, eq. 10)."""

    eps: float = num(1e-3, 0.0, 1.0, lo_open=True, hi_open=True, help="log-linear ε")
    sampling_eps: float = num(1e-3, 0.0, 1.0, hi_open=True, help="t ~ U[sampling_eps, 1)")
    stratified: bool = flag(True, "stratified t over the batch (MDLM 'antithetic')")


@dataclass
class DataConfig:
    """Where sequences come from and how they are tokenised and wrapped (MDLM's data pipeline)."""

    source: str = text("hmm", "hmm | cyclic | topics | a local file/folder (.txt/.jsonl/.parquet) | "
                              "hf:<dataset>[:<config>] (openwebtext, text8, wikitext-103, lm1b)")
    tokenizer: str = text("auto", "auto | char | gpt2 | bpe | a tokenizer directory; auto = the "
                                  "source's own for synthetic sources, gpt2 if available else bpe")
    wrap: bool = flag(True, "MDLM wrapping: join docs with EOS, BOS..EOS blocks")
    valid_fraction: float = num(0.01, 0.0, 1.0, lo_open=True, hi_open=True,
                                help="documents held out for validation (deterministic by index)")
    streaming: bool = flag(False, "stream the corpus (larger than memory)")
    text_field: str = text("text", "JSON field / parquet or HF column holding the text")
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
    topics: int = num(8, 1, help="topics of the sticky-topic language (data.source=topics)")
    topics_switch: float = num(0.02, 0.0, 1.0, help="P(the topic changes at a sentence start)")
    topics_smoothing: float = num(0.002, 0.0, 1.0, lo_open=True, hi_open=True,
                                  help="ε mixed with uniform transitions and emissions (full support)")
    topics_seed: int = num(0, 0, help="seed that fixes the topic language's words and weights")


@dataclass
class TrainConfig:
    """Optimisation. ``batch_size`` is the global batch in sequences, whatever the worker count."""

    steps: int = num(1000, 1, help="optimizer steps")
    batch_size: int = num(32, 1, help="global batch (sequences per optimizer step)")
    micro_batch_size: int = num(0, 0, help="sequences per forward per worker; 0 = batch/workers")
    lr: float = num(3e-4, 0.0, lo_open=True, help="peak learning rate (MDLM: 3e-4)")
    beta1: float = num(0.9, 0.0, 1.0, hi_open=True, help="Adam β1")
    beta2: float = num(0.999, 0.0, 1.0, hi_open=True, help="Adam β2")
    adam_eps: float = num(1e-8, 0.0, lo_open=True, help="Adam ε")
    weight_decay: float = num(0.0, 0.0, help="AdamW weight decay")
    warmup_steps: int = num(0, 0, help="linear warm-up steps (App C.1 fine-tuning: 0)")
    lr_schedule: Literal["constant", "cosine", "linear"] = choice("constant", "learning-rate decay after warm-up")
    min_lr_ratio: float = num(0.1, 0.0, 1.0, help="final lr / peak for cosine and linear decay")
    grad_clip: float = num(1.0, 0.0, help="global grad-norm clip; 0 = off")
    ema: float = num(0.9999, 0.0, 1.0, hi_open=True, help="EMA decay (MDLM: 0.9999); 0 = off")
    precision: Literal["fp32", "bf16"] = choice("fp32", "bf16 = bf16 autocast of the forward (as MDLM trains; "
                                                "weights, optimizer, softmax and loss stay fp32); "
                                                "App C.1 uses fp32")
    compile: bool = flag(False, "torch.compile the model for training steps (faster GPU steps after the "
                                "first ones compile; validation stays eager); false = eager")
    eval_every: int = num(200, 0, help="validate every N steps; 0 = only at the end")
    eval_batches: int = num(4, 1, help="validation batches per evaluation")
    ckpt_every: int = num(200, 0, help="checkpoint every N steps; 0 = only at the end")
    keep_last: int = num(2, 1, help="checkpoints kept besides the best by validation loss (valid_loss)")
    log_every: int = num(10, 1, help="print/log training metrics every N steps")


@dataclass
class SamplingConfig:
    """What to draw and how: the masked and continuous samplers (Sec 5-6, App C.2; ReMDM)."""

    sampler: Literal["mdlm", "remdm-cap", "remdm-rescale", "remdm-conf", "remdm-loop",
                     "forward-backward", "remdm-official", "dsl-budget", "sde"] = choice(
        "dsl-budget", "remdm-official: cap for T<L, loop for T>=L; dsl-budget: loop with η_cap(T)")
    steps: int = num(128, 1, MAX_BUDGET, help="the sampler's step budget T")
    num_samples: int = num(16, 1, help="sequences each sampling run draws")
    length: int = num(0, 0, help="sequence length L of the samples; 0 = the model's/source's own")
    top_p: float = num(0.9, 0.0, 1.0, lo_open=True, help="nucleus mass (official rule)")
    eta: float = num(0.02, 0.0, 1.0, help="remasking η (cap/rescale/loop): a remasking probability σ or its "
                                          "share of σ_max (ReMDM §3.3-3.4), so at most 1")
    t_on: float = num(0.55, 0.0, 1.0, lo_open=True, hi_open=True,
                      help="loop window start (eq. 22); t_on=1 leaves no time to reach α_on")
    t_off: float = num(0.05, 0.0, 1.0, hi_open=True, help="loop window end (eq. 22)")
    alpha_on: float = num(0.9, 0.0, 1.0, lo_open=True, hi_open=True, help="α held in the loop (eq. 22)")
    eta_cap_table: str = text("", "η_cap(T) table or fitted rule (JSON file/URI); '' = Sec 6.1 values")
    eps: float = num(1e-5, 0.0, MAX_SAMPLING_EPS, lo_open=True,
                     help="final time of the grid (MDLM/ReMDM: 1e-5); larger values stop with tokens still masked")
    noise_removal: bool = flag(True, "final greedy pass (+1 NFE)")
    cache: bool = flag(True, "reuse p(x0) when the draft did not change")
    gamma_vis: float = num(50.0, 0.0, MAX_SNR, lo_open=True,
                           help="SNR of visible tokens for a DSL denoiser (trained up to channel.gamma_max)")
    sde_path: Literal["linear", "left-to-right", "random-order"] = choice("linear", "SNR path of the SDE sampler")
    sde_gamma_end: float = num(50.0, 0.0, MAX_SNR, lo_open=True, help="SNR at which the SDE stops")
    batch_size: int = num(16, 1, help="sequences per denoiser forward")
    rewrite_count: Literal["remask", "change"] = choice(
        "remask", "R_i reading (eq. 25): remask = times token i is masked and resampled (Sec 5.2; "
                  "reproduces Table 5), change = every change of x_i incl. reveals, mask as a symbol")
    diag_top_p: float = num(0.9, 0.0, 1.0, lo_open=True, hi_open=True,
                            help="p of the nucleus-size diagnostic k_t (Sec 7.4, Table 6: 0.9)")
    first_index: int = num(0, 0, help="global index of the first sample (workers splitting one run)")
    trajectory: str = text("", "also save the draft after every step as a (T, n, L) .npy file")
    plot: str = text("", "also draw the per-step diagnostics (Fig 2 panels) to this PNG")

    def validate(self) -> None:
        if self.t_off >= self.t_on:
            raise ConfigError(f"sampling.t_off={self.t_off} must be < sampling.t_on={self.t_on}")


# ----------------------------------------------------------------------------------------------
# Evaluation, search and service sections.


@dataclass
class EvalConfig:
    """Scoring: MAUVE / GenPPL / sentence entropy of samples (Table 1), calibration (Fig 4), likelihood (Table 3)."""

    protocol: Literal["none", "paper-table1"] = choice(
        "none", "paper-table1 = Table 1's protocol (GPT-2 Large, 1,024 tokens, K=n/10, seed 25, wrapped OWT "
                "held-out blocks): fixes every setting; stand-ins are recorded as deviations")
    samples: str = text("", "the samples to score: JSON lines with 'text' (+ 'ids') as jobs/sample.py writes, or .txt")
    reference: str = text("", "reference texts: a .jsonl/.txt file | hf:<dataset>[:<config>] (a hub name or a local "
                              "dataset dir/file) | source (drawn from the checkpoint's exact source, checkpoint=oracle:*)")
    reference_split: str = text("", "split of an hf: reference; '' = MDLM's held-out split (OWT and local "
                                    "datasets: the last eval.heldout_docs train documents; else validation)")
    heldout_docs: int = num(100_000, 1, help="documents held out at the end of a train-only dataset (MDLM's OWT: "
                                             "100,000)")
    reference_blocks: int = num(0, 0, help="wrap hf: reference documents into [BOS]…[EOS] blocks of N tokens "
                                           "(MDLM's validation layout; paper-table1: 1024); 0 = documents as stored")
    reference_tokenizer: str = text("gpt2", "tokenizer that wraps reference blocks, the samples' own: gpt2 | "
                                            "<tokenizer dir>")
    eot: Literal["keep", "drop"] = choice("keep", "literal <|endoftext|> in sample and reference texts alike: keep "
                                                  "(ReMDM decodes with special tokens) | drop")
    references: int = num(0, 0, help="reference texts drawn without replacement; 0 = as many as samples")
    reference_seed: int = num(1, 0, help="seed of the reference draw (MDLM/ReMDM loader seed: 1)")
    words_per_reference: int = num(0, 0, help="cut the reference corpus into chunks of N words; 0 = as stored")
    featurizer: str = text("minilm", "MAUVE featurizer: minilm (offline) | gpt2-large (the paper's) | "
                                     "<local HF model dir>")
    max_length: int = num(0, 0, help="featurizer max tokens; 0 = its default (minilm 128, gpt2-large 1024)")
    featurize_batch: int = num(32, 1, help="texts per featurizer forward")
    mauve_seeds: tuple[int, ...] = values((25, 26, 27), "k-means seeds MAUVE is averaged over (mauve-text's "
                                                         "default seed is 25)")
    num_buckets: str = text("auto", "k-means buckets K: auto = n/10 (K=500 for 5k samples) or an integer")
    match_length: bool = flag(True, "cut samples and references to one token budget (recorded as length_budget)")
    length_budget: int = num(0, 0, help="token budget when matching lengths; 0 = the shorter set's longest text")
    feature_cache: str = text("auto", "reference-feature cache: auto = <cache root>/mauve-features ($DSL_CACHE_DIR, "
                                      "else ~/.cache/dsl) | a local dir | s3://... | '' = off")
    workers: int = num(0, 0, help="MAUVE featurizer actors on Ray; 0 = featurize in this process")
    gpus_per_worker: float = num(0.0, 0.0, help="GPUs per MAUVE featurizer actor")
    judge: str = text("none", "GenPPL judge: none | source (the exact likelihood of checkpoint=oracle:*) | "
                              "oracle:hmm | oracle:cyclic | oracle:topics | gpt2-large | <local HF causal LM dir> | "
                              "<AR checkpoint dir or s3:// URI>")
    judge_max_length: int = num(1024, 1, help="re-tokenisation max length of an HF judge (ReMDM: 1024)")
    genppl_batch: int = num(8, 1, help="samples per judge forward")
    snr: tuple[float, ...] = values((1.0, 5.0, 10.0, 20.0, 50.0, 70.0, 80.0, 90.0, 95.0, 100.0),
                                    "calibration SNR grid (Fig 4a: the near-clean end 70..100)")
    calibration_bins: int = num(15, 2, help="equal-width confidence bins of the token ECE (paper: unstated)")
    reliability_snr: float = num(100.0, 0.0, lo_open=True, help="SNR of the reliability diagram (Fig 4b: 100)")
    batches: int = num(4, 1, help="held-out batches for calibration")
    batch_size: int = num(8, 1, help="held-out sequences per batch")
    n_mc: int = num(32, 2, help="likelihood: Monte Carlo draws of the path integral per sequence")
    max_sequences: int = num(0, 0, help="likelihood: held-out blocks scored; 0 = the whole held-out split "
                                        "(synthetic sources, which never end: batches × batch_size)")
    heldout: str = text("", "likelihood: held-out text file, laid out as the run's training blocks (text8 runs: "
                            "L-character documents, wrapped); '' = the run's own validation split")
    t_end: str = text("gamma_max", "likelihood: t* of eq. 4/10, the integral to t* + the model's factorised "
                                   "-log p(x | z_t*), an upper bound: gamma_max (of the run's channel) | a number "
                                   "| inf = eq. 3 (to γ=∞: diverges for a learned model, needs allow_eq3)")
    allow_eq3: bool = flag(False, "likelihood: allow t_end=inf for a learned model (its estimate has no finite mean)")




def _fmt(vals: tuple) -> str:
    return ",".join(f"{v:g}" for v in vals) or "''"


def check_search_range(key: str, rng: tuple[float, ...], *, lo: float, hi: float | None, lo_open: bool = False,
                       hi_open: bool = False, required: bool = False) -> None:
    if not rng and not required:
        return
    if len(rng) != 2:
        raise ConfigError(f"{key}={_fmt(rng)}: expected a range lo,hi (two numbers, lo < hi)")
    a, b = rng
    if not a < b:
        raise ConfigError(f"{key}={_fmt(rng)}: empty or inverted range; expected lo < hi")
    below = a < lo or (lo_open and a == lo)
    above = hi is not None and (b > hi or (hi_open and b == hi))
    if below or above:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{key}={_fmt(rng)}: both ends must lie in {left}{lo:g}, "
                          f"{'inf' if hi is None else f'{hi:g}'}{right}")


@dataclass
class SearchConfig:
    """The η_cap(T) search (Sec 5.2): budgets, search space, the band on E[R_i], trials, the Optuna study."""

    budgets: tuple[int, ...] = values((16, 32), "step budgets T searched, one study each "
                                                 "(paper: 128,256,512,1024 at L=1024)")
    trials: int = num(6, 1, help="finished trials per T (a resumed search counts the stored ones)")
    min_samples: int = num(8, 2, help="samples at ASHA's first rung (= sampling.num_samples: no early stopping)")
    asha_reduction: int = num(2, 2, help="ASHA reduction factor (rungs min_samples·r^k)")
    asha: bool = flag(True, "stop weak trials early with ASHA over the sample count")
    eta_cap_range: tuple[float, ...] = values((1e-3, 0.5), "η_cap range lo,hi searched log-uniformly (both > 0)")
    t_on_range: tuple[float, ...] = values((), "optional t_on range lo,hi in (0,1] ('' = sampling.t_on fixed)")
    t_off_range: tuple[float, ...] = values((), "optional t_off range lo,hi in [0,1) ('' = sampling.t_off fixed)")
    alpha_on_range: tuple[float, ...] = values((), "optional α_on range lo,hi in (0,1) ('' = fixed)")
    top_p_range: tuple[float, ...] = values((), "optional top-p range lo,hi in (0,1] ('' = fixed)")
    rewrite_target: tuple[float, ...] = values((1.0, 2.0), "band lo,hi for the mean rewrite count E[R_i] "
                                                           "(Sec 5.2: 1,2)")
    penalty: float = num(1.0, 0.0, help="score = MAUVE − penalty·distance of E[R_i] outside the band")
    study: str = text("eta-cap", "study name; one Optuna study per T named <study>:T=<T>")
    study_db: str = text("", "Optuna database URL: '' = sqlite:///<out>/study.db | postgresql://... | "
                             "none (in memory, nothing kept)")
    startup_trials: int = num(4, 1, help="random start-up trials of TPE before it models")
    max_concurrent: int = num(0, 0, help="concurrent trials; 0 = derived from the cluster's resources")
    trial_cpus: float = num(1.0, 0.0, lo_open=True, help="CPUs per trial (GPU clusters: 1 GPU per trial)")

    def validate(self) -> None:
        shown = ",".join(map(str, self.budgets))
        if not self.budgets:
            raise ConfigError("search.budgets= is empty: give step budgets T > 0, e.g. search.budgets=128,256")
        if any(t <= 0 or t > MAX_BUDGET for t in self.budgets):
            raise ConfigError(f"search.budgets={shown}: every T must be in [1, {MAX_BUDGET}]")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"search.budgets={shown} repeats a budget")
        check_search_range("search.eta_cap_range", self.eta_cap_range, lo=0.0, hi=None, lo_open=True, required=True)
        check_search_range("search.t_on_range", self.t_on_range, lo=0.0, hi=1.0, lo_open=True)
        check_search_range("search.t_off_range", self.t_off_range, lo=0.0, hi=1.0, hi_open=True)
        check_search_range("search.alpha_on_range", self.alpha_on_range, lo=0.0, hi=1.0, lo_open=True,
                           hi_open=True)
        check_search_range("search.top_p_range", self.top_p_range, lo=0.0, hi=1.0, lo_open=True)
        if len(self.rewrite_target) != 2:
            raise ConfigError(f"search.rewrite_target={_fmt(self.rewrite_target)}: expected two numbers lo,hi "
                              f"(e.g. search.rewrite_target=1,2)")
        lo, hi = self.rewrite_target
        if lo < 0 or lo > hi:
            raise ConfigError(f"search.rewrite_target={_fmt(self.rewrite_target)}: need 0 <= lo <= hi (e.g. 1,2)")
        if not self.study.strip():
            raise ConfigError("search.study= is empty: name the study (re-using a name continues that search)")


@dataclass
class PrepareConfig:
    """Corpus preparation (jobs/prepare_data.py): the corpus tokenized and wrapped once, on Ray Data, into a
    sharded token store that training reads as ``data.source=prepared:<out>``."""

    workers: int = num(2, 1, help="Ray Data tokenizer actors (and at most as many shard-writing tasks)")
    cpus_per_worker: float = num(1.0, 0.0, lo_open=True, help="logical CPUs per tokenizer actor (also the "
                                                              "tokenizer's threads)")
    shard_blocks: int = num(0, 0, help="L-token blocks per shard; 0 = about 64 MiB per shard")


@dataclass
class ServiceConfig:
    """Where and how a job executes and where it is tracked (never part of a checkpoint's config)."""

    workers: int = num(1, 1, help="Ray Train workers (DDP ranks)")
    gpus_per_worker: float = num(0.0, 0.0, help="GPUs per Ray Train worker; > 0 selects NCCL, else Gloo on CPU")
    cpus_per_worker: float = num(1.0, 0.0, lo_open=True, help="logical CPUs per Ray Train worker")
    threads_per_worker: int = num(0, 0, help="torch threads per Ray Train worker; 0 = cpus_per_worker rounded")
    max_failures: int = num(2, -1, help="Ray FailureConfig: worker-group restarts (-1 = unlimited)")
    storage: str = text("", "checkpoint root: '' = <out> | a (shared) directory | s3://bucket/prefix; "
                            "a run lives under <storage>/<name>")
    storage_endpoint: str = text("", "S3-compatible endpoint URL (MinIO, moto); '' = AWS_ENDPOINT_URL or AWS")
    ray_address: str = text("", "Ray cluster to join: '' = RAY_ADDRESS if set, else a private local Ray on "
                                "127.0.0.1 for this job")
    ray_cpus: int = num(0, 0, help="logical CPUs of a private local Ray; 0 = os.cpu_count()")
    device: str = text("cpu", "torch device of in-process work (cpu | cuda | cuda:N)")
    mlflow: Literal["auto", "on", "off"] = choice(
        "auto", "MLflow tracking: on | off | auto = on for finetune and search, and for sample/evaluate "
                "when a store exists (service.tracking_uri, $MLFLOW_TRACKING_URI or ./mlflow.db)")
    tracking_uri: str = text("", "MLflow tracking URI; '' = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    system_metrics: bool = flag(True, "MLflow system metrics (CPU, memory, GPU) from rank 0")


@dataclass
class ReportConfig:
    """The comparison report of a grid (``dashboards/report.py``): which grid, which cells' Fig 2 panels,
    how our step budgets meet the paper's."""

    grid: str = text("", "the grid to report: its MLflow parent run id | an experiment name (its latest grid "
                         "run) | a grid name (tag dsl.grid.name)")
    fig2: str = text("smallest", "cells whose Fig 2 panels the page shows: smallest (every row at the grid's "
                                 "smallest T) | all | none | a list of T, e.g. 128,1024")
    match: Literal["fraction", "steps"] = choice(
        "fraction", "which paper budget T' a cell meets: fraction = the same T/L (T' = T·1024/L; at L=1024 the "
                    "same T) | steps = the same T")
    log_artifacts: bool = flag(True, "log the page and its tables as artifacts of the grid's parent run")

    def validate(self) -> None:
        if self.fig2 not in ("smallest", "all", "none"):
            parts = [p.strip() for p in self.fig2.split(",") if p.strip()]
            if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ConfigError(f"report.fig2={self.fig2}: expected smallest, all, none or step budgets "
                                  f"T,T,... (e.g. 128,1024)")


@dataclass
class TableConfig:
    """The Table 1 grid (``jobs/grid.py``): which rows and step budgets, how each cell's samples are split
    over Ray workers. What a row samples with and how cells are scored are the ``sampling`` and ``eval`` keys."""

    spec: str = text("table1", "rows and columns: a named spec (dsl/config/presets/grid/<name>.toml: table1, "
                               "paper-table1) | a spec TOML file")
    models: str = text("", "the checkpoints the spec's rows name by role: role=<run dir|checkpoint dir|s3://...|"
                           "oracle:*>,... (e.g. mdlm=runs/mdlm-ft,dsl=runs/dsl-ft)")
    steps: tuple[int, ...] = values((), "step budgets T (the columns); '' = the spec's")
    name: str = text("", "the grid's name, its resume key (MLflow tag dsl.grid.name): re-running with the same "
                         "name skips finished cells; '' = derived from the spec, the models and the settings")
    workers: int = num(0, 0, help="sampling tasks each cell is split into, by sample index (a cell's samples do "
                                  "not depend on it); 0 = one per CPU (GPU) of the Ray cluster")
    gpus_per_worker: float = num(-1.0, -1.0, help="GPUs per sampling task; -1 = 1 when the Ray cluster has GPUs, "
                                                  "else 0")
    mauve_resamples: int = num(0, 0, help="bootstrap resamples of each cell's samples: MAUVE's sampling std "
                                          "(source-stats features only; 0 = off)")

    def validate(self) -> None:
        if any(t <= 0 or t > MAX_BUDGET for t in self.steps):
            raise ConfigError(f"table.steps={','.join(map(str, self.steps))}: every T must be in [1, {MAX_BUDGET}]")
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"table.steps={','.join(map(str, self.steps))} repeats a budget")


# ----------------------------------------------------------------------------------------------
# Roots.

# Help of the keys RunConfig and JobConfig share (one text per key).
NAME_HELP = ("run name: the MLflow run's name; a training run's stable name (re-using it resumes the run, "
             "and it becomes the storage prefix); '' = derived")
SEED_HELP = "seed of the job's randomness (training noise and init, per-sample sampling seeds, MC draws)"
OBJECTIVE_HELP = "training objective: dsl (Alg 1) | mdlm (MDLM SUBS) | ar"
INIT_HELP = ("weights training starts from: scratch | <checkpoint or run dir> | s3://... | "
             "hf:kuleshov-group/mdlm-owt | <MDLM Lightning .ckpt / .safetensors>")


@dataclass
class RunConfig:
    """A training run's science config: what every checkpoint stores as its resolved config."""

    name: str = text("", NAME_HELP)
    seed: int = num(0, 0, help=SEED_HELP)
    objective: Literal["dsl", "mdlm", "ar"] = choice("dsl", OBJECTIVE_HELP)
    init: str = text("scratch", INIT_HELP)
    out_dir: str = text("runs", "local root the run was written under when no storage URI was given")
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


@dataclass
class JobConfig:
    """The root every entry point parses. A job reads the keys it declares; the rest keep their defaults."""

    name: str = text("", NAME_HELP)
    experiment: str = text("dsl", "MLflow experiment the job's runs are logged to")
    seed: int = num(0, 0, help=SEED_HELP)
    objective: Literal["dsl", "mdlm", "ar"] = choice("dsl", OBJECTIVE_HELP)
    init: str = text("scratch", INIT_HELP)
    checkpoint: str = text("", "what the job loads: oracle:hmm|cyclic|topics | <run dir> (its latest "
                               "complete checkpoint) | <checkpoint dir> | s3://... (evaluate calibration/"
                               "likelihood: label=spec,... compares several)")
    out: str = text("", "where the job writes: sample → the .jsonl (a toy: the .png); evaluate, search → a "
                        "directory; finetune → local root of runs when service.storage is ''; prepare_data → "
                        "the token store (a shared directory or s3://bucket/prefix)")
    progress: bool = flag(True, "tqdm progress bars on long work")
    model: ModelConfig = section(ModelConfig)
    channel: ChannelConfig = section(ChannelConfig)
    mdlm: MDLMLossConfig = section(MDLMLossConfig)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    sampling: SamplingConfig = section(SamplingConfig)
    eval: EvalConfig = section(EvalConfig)
    search: SearchConfig = section(SearchConfig)
    prepare: PrepareConfig = section(PrepareConfig)
    service: ServiceConfig = section(ServiceConfig)
    report: ReportConfig = section(ReportConfig)
    table: TableConfig = section(TableConfig)


SCIENCE_SECTIONS = ("model", "channel", "mdlm", "data", "train")


def run_config_of(job: JobConfig) -> RunConfig:
    """The science part of ``job``: the :class:`RunConfig` a training run stores in its checkpoints."""
    import copy

    run = RunConfig(name=job.name, seed=job.seed, objective=job.objective, init=job.init,
                    out_dir=job.out or "runs")
    for name in SCIENCE_SECTIONS:
        setattr(run, name, copy.deepcopy(getattr(job, name)))
    return run


__all__ = ["ModelConfig", "ChannelConfig", "MDLMLossConfig", "DataConfig", "TrainConfig", "SamplingConfig",
           "EvalConfig", "SearchConfig", "PrepareConfig", "ServiceConfig", "ReportConfig", "TableConfig", "RunConfig", "JobConfig",
           "run_config_of",
           "check_search_range", "MAX_BUDGET", "field"]
