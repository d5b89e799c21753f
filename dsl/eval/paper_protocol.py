"""Table 1's evaluation protocol as data: every setting, which of them may be stood in for, and the check.

The paper's Table 1 (Sec 6.1, App C.2) follows MDLM/ReMDM's evaluation (kuleshov-group/remdm ``main.py``):
5,000 samples of L = 1024 GPT-2 tokens (top-p 0.9) against 5,000 references from MDLM's OWT validation
set — the last 100,000 documents of OpenWebText's train split, wrapped into 1,024-token ``[BOS] … [EOS]``
blocks with documents joined by ``<|endoftext|>`` — both decoded with special tokens kept; MAUVE with
mauve-text's defaults: GPT-2 Large features (last layer, last token, texts cut at 1,024 tokens), K = n/10
= 500 buckets, k-means/divergence seed 25; GenPPL under GPT-2 Large with 1,024-token re-tokenisation.

``eval.protocol=paper-table1`` applies all of it. Two kinds of setting:

- **fixed** — what the number *means* (K's rule, the token cut, the reference layout, the text rule, the
  headline seed, ...). Changing one is a different measurement, so a command line that sets one to another
  value fails with one line;
- **stand-ins** — what the number is *measured with* (the featurizer and judge weights, the reference
  corpus and tokenizer, how many held-out documents and samples). They may be replaced — a local copy of
  OWT, a small GPT-2 for an offline check, 500 samples for a quick look — and every replacement is
  recorded as a deviation beside the score.

Our readings, recorded in every result: references are drawn *without* replacement (ReMDM's loop draws
5,000 blocks with replacement, by accident of re-created iterators); the headline MAUVE is the seed-25
value, the mean ± std over the other seeds is reported beside it, never instead of it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from dsl.config import ConfigError, EvalConfig

PROTOCOLS = ("none", "paper-table1")


@dataclass(frozen=True)
class PaperTable1:
    """Every setting of Table 1's MAUVE / GenPPL protocol, by its ``eval.`` key."""

    # fixed: the measurement itself
    max_length: int = 1024             # mauve-text max_text_length: texts cut at 1,024 featurizer tokens
    num_buckets: str = "auto"          # K = max(2, round(n/10)): 500 for 5,000 samples
    match_length: bool = False         # no further length matching: mauve-text only cuts at max_length
    length_budget: int = 0
    reference_blocks: int = 1024       # references are wrapped L-token blocks, as training data
    reference_split: str = ""          # MDLM's held-out split: OWT train[-heldout_docs:]
    words_per_reference: int = 0
    eot: str = "keep"                  # ReMDM's batch_decode keeps <|endoftext|> on both sides
    judge_max_length: int = 1024       # GenPPL re-tokenisation (ReMDM eval_retokenize)
    headline_seed: int = 25            # mauve-text's seed: eval.mauve_seeds must start with it
    # stand-ins: what it is measured with
    featurizer: str = "gpt2-large"
    judge: str = "gpt2-large"
    reference: str = "hf:openwebtext"
    reference_tokenizer: str = "gpt2"
    heldout_docs: int = 100_000
    samples: int = 5000                # and as many references (eval.references=0)
    top_p: float = 0.9                 # of the samples (read from their recorded settings)
    length: int = 1024                 # tokens per sample

    name: ClassVar[str] = "paper-table1"
    FIXED: ClassVar[tuple[str, ...]] = ("max_length", "num_buckets", "match_length", "length_budget",
                                        "reference_blocks", "reference_split", "words_per_reference", "eot",
                                        "judge_max_length")
    STAND_INS: ClassVar[tuple[str, ...]] = ("featurizer", "judge", "reference", "reference_tokenizer",
                                            "heldout_docs")

    def apply(self, ev: EvalConfig, named: Collection[str]) -> None:
        """Set the protocol's values on ``ev``: every fixed key (one ConfigError line if the command line
        ``named`` it with another value) and every stand-in the command line did not name."""
        for key in self.FIXED:
            value, paper = getattr(ev, key), getattr(self, key)
            if key in named and value != paper and not (key == "num_buckets" and value == str(self.k)):
                raise ConfigError(f"eval.protocol={self.name} fixes eval.{key}={_show(paper)}; drop "
                                  f"eval.{key}={_show(value)} or use eval.protocol=none")
            setattr(ev, key, paper)
        if ev.mauve_seeds[:1] != (self.headline_seed,):
            raise ConfigError(f"eval.protocol={self.name}: the headline MAUVE is mauve-text's seed "
                              f"{self.headline_seed}, so eval.mauve_seeds must start with it (got "
                              f"{','.join(map(str, ev.mauve_seeds)) or 'none'})")
        if ev.references != 0:
            raise ConfigError(f"eval.protocol={self.name} draws as many references as samples; drop "
                              f"eval.references={ev.references} or use eval.protocol=none")
        for key in self.STAND_INS:
            if key not in named:
                setattr(ev, key, getattr(self, key))
        if not ev.reference.startswith("hf:"):
            raise ConfigError(f"eval.protocol={self.name} draws references from the held-out tail of a dataset's "
                              f"train split: give eval.reference=hf:openwebtext or hf:<local dataset dir or "
                              f"file in that layout>, not {ev.reference}")

    @property
    def k(self) -> int:
        """mauve-text's K = max(2, round(n/10)) at the paper's sample count: 500."""
        return max(2, round(self.samples / 10))

    def deviations(self, used: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """``{setting: {"paper": value, "used": value}}`` for every setting of ``used`` that differs
        (``used`` holds settings by the names above, plus ``references`` and ``K``)."""
        paper = {f.name: getattr(self, f.name) for f in fields(self)}
        paper.update(references=self.samples, K=self.k)
        return {k: {"paper": paper[k], "used": v} for k, v in used.items() if k in paper and v != paper[k]}


def _show(value: Any) -> str:
    return "''" if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def protocol_record(ev: EvalConfig, *, n_samples: int, n_references: int, num_buckets: int,
                    sample_settings: dict[str, Any] | None) -> dict[str, Any]:
    """What a result says about its protocol: the name, the settings that deviate from Table 1's (for
    ``eval.protocol=none`` too, so any score shows how far it is from the paper's), and our readings."""
    table1 = PaperTable1()
    used: dict[str, Any] = {k: getattr(ev, k) for k in table1.FIXED + table1.STAND_INS}
    used.update(headline_seed=ev.mauve_seeds[0] if ev.mauve_seeds else None, samples=n_samples,
                references=n_references, K=num_buckets)
    settings = sample_settings or {}
    used.update(top_p=settings.get("top_p", "unknown"), length=settings.get("length", "unknown"))
    return {"name": ev.protocol, "deviations": table1.deviations(used),
            "readings": ["references drawn without replacement (ReMDM: with replacement)",
                         f"headline MAUVE at seed {table1.headline_seed}; mean ± std over eval.mauve_seeds beside it"]}


__all__ = ["PROTOCOLS", "PaperTable1", "protocol_record"]
