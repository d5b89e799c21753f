"""The science sections of the config tree: the model, the channel, the MDLM loss, the data, training
(what a checkpoint stores) and sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsl.config.fields import ConfigError, choice, flag, num, text

# The largest step budget T a sampler or a search accepts.
MAX_BUDGET = 1 << 20
# Sampling's final time: MDLM and ReMDM stop at 1e-5; past a few percent of the path a noticeable share
# of positions is still masked when the grid ends and the final pass fills them greedily.
MAX_SAMPLING_EPS = 0.05
# SNRs of the samplers: far above every trained γ_max (Sec 4.1, App C.1: 50), where the softmax of the
# exact posterior is already one-hot in float64.
MAX_SNR = 1.0e4


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
                                          "share of σ_max (ReMDM's cap, rescale and loop), so at most 1")
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
