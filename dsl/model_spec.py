"""What a model spec names: one parser for every key that points at a model.

``checkpoint=`` (sample, search, calibration, likelihood), ``init=`` (training) and ``eval.judge=``
(GenPPL) all take a word that names weights somewhere. :func:`parse_model_spec` says which kind it is,
and refuses, in one line naming the key and what that key accepts, a kind the caller cannot load:

======================  ============  =========================================================
spec                    kind          what it is
======================  ============  =========================================================
``none``                none          no model (a judge that is off)
``scratch``             scratch       random initialisation
``source``              source        the exact likelihood of the ``oracle:*`` being searched
``oracle:<source>``     oracle        an exactly solvable source (hmm, cyclic, topics) as denoiser or judge
``<dir>/manifest.json`` checkpoint    one ``step-<N>`` checkpoint of ours
``<dir>/step-<N>/``     run           a run of ours: its latest complete checkpoint
``s3://...``            uri           a checkpoint or run of ours in object storage
``hf:<owner>/<name>``   hf            an MDLM hub snapshot (kuleshov-group/mdlm-owt)
``<dir>/config.json``   hf_dir        a local Hugging Face model directory
``<file>.ckpt|...``     weights       an MDLM Lightning ``.ckpt`` or a ``.safetensors``/``.bin`` file
``gpt2-large``          hub           a Hugging Face hub model id (a judge)
======================  ============  =========================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dsl.config import ConfigError
from dsl.errors import UserError
from dsl.sources import SOURCE_NAMES

ORACLES = SOURCE_NAMES
WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt")
DESCRIBE = {
    "none": "none", "scratch": "scratch", "source": "source", "oracle": " | ".join(f"oracle:{n}" for n in ORACLES),
    "checkpoint": "a checkpoint directory (step-<N>)", "run": "a run directory", "uri": "s3://...",
    "hf": "hf:<owner>/<name>", "hf_dir": "a local Hugging Face model directory",
    "weights": "an MDLM .ckpt/.safetensors file", "hub": "a hub model id (e.g. gpt2-large)",
}
OURS = ("checkpoint", "run", "uri")        # loaded with dsl.models.loading.load_run / load_checkpoint
INIT_KINDS = ("scratch", *OURS, "hf", "hf_dir", "weights")   # what training can start from (init=)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelSpec:
    kind: str      # one of DESCRIBE
    target: str    # the oracle's name, the path, the URI or the hub id

    @property
    def ours(self) -> bool:
        """A checkpoint or run this package wrote (a manifest-verified checkpoint format)."""
        return self.kind in OURS


def accepted(kinds: Sequence[str]) -> str:
    return " | ".join(DESCRIBE[k] for k in kinds)


def classify(text: str) -> ModelSpec | None:
    """The kind of ``text``, or None for a path that does not exist (and is no hub id)."""
    if text in ("none", "scratch", "source"):
        return ModelSpec(text, text)
    if text.startswith("oracle:"):
        return ModelSpec("oracle", text.split(":", 1)[1])
    if text.startswith("hf:"):
        return ModelSpec("hf", text[3:])
    if "://" in text:
        return ModelSpec("uri", text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return ModelSpec("checkpoint", text)
        if any(p.is_dir() and re.fullmatch(r"step-\d+", p.name) for p in path.iterdir()):
            return ModelSpec("run", text)
        if (path / "config.json").is_file():
            return ModelSpec("hf_dir", text)
        return ModelSpec("dir", text)
    if path.is_file():
        return ModelSpec("weights" if path.suffix in WEIGHT_SUFFIXES else "file", text)
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        return ModelSpec("hub", text)
    return None


def parse_model_spec(spec: str, key: str, accept: Sequence[str]) -> ModelSpec:
    """The :class:`ModelSpec` of ``spec`` if its kind is in ``accept``; else one ConfigError/UserError line
    naming ``key`` and what it accepts."""
    text = (spec or "").strip()
    if not text:
        raise ConfigError(f"{key}='' : give {accepted(accept)}")
    found = classify(text)
    if found is not None and found.kind == "hub" and "hub" not in accept:
        found = None   # a missing relative path that merely looks like a hub id
    if found is None:
        raise UserError(f"{key}={text}: no such file or directory; accepted: {accepted(accept)}")
    if found.kind == "oracle" and found.target not in ORACLES:
        raise ConfigError(f"{key}={text!r}: oracles are {', '.join('oracle:' + n for n in ORACLES)}")
    if found.kind == "dir":
        raise UserError(f"{key}={text}: a directory with no manifest.json, no step-<N>/ checkpoints and no "
                        f"config.json; accepted: {accepted(accept)}")
    if found.kind == "file":
        raise UserError(f"{key}={text}: not a weights file ({', '.join(WEIGHT_SUFFIXES)}); "
                        f"accepted: {accepted(accept)}")
    if found.kind not in accept:
        raise ConfigError(f"{key}={text} is {DESCRIBE[found.kind]}, which {key} does not take; "
                          f"accepted: {accepted(accept)}")
    return found


__all__ = ["ModelSpec", "parse_model_spec", "classify", "accepted", "DESCRIBE", "OURS", "INIT_KINDS", "ORACLES"]
