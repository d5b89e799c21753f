"""Checkpoints: safetensors + JSON under ``step-<N>/``, with ``manifest.json`` written last.

Layout of one checkpoint (a local directory or an object-store prefix)::

    step-<N>/model.safetensors    model parameters and buffers
    step-<N>/ema.safetensors      EMA shadow weights (absent when train.ema=0)
    step-<N>/optim.safetensors    optimizer tensors, flattened to "state.<param index>.<key>"
    step-<N>/state.json           step, optimizer non-tensor state, RNG states (base64), data position, metrics
    step-<N>/tokenizer/...        the run's tokenizer files
    step-<N>/manifest.json        {format, step, config, metrics, files: {name: {sha256, bytes}}}  (LAST)

A reader trusts a checkpoint only when its manifest exists and every listed file exists with the
listed size and sha256; loading uses safetensors and JSON only, never pickle. Locally the whole
directory is written under a temporary name and renamed into place, so a failed save leaves nothing
half-written under ``step-<N>`` and never touches an existing checkpoint.

Where the bytes go is :mod:`dsl.storage` (a local directory, or ``s3://`` through its adapter).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsl.errors import UserError
from dsl.storage import Storage, join_uri, open_storage

FORMAT = "dsl-checkpoint/1"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------
# Encoding.


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # safetensors refuses shared or non-contiguous storage; a contiguous copy on CPU is always safe
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error type for malformed headers
        raise UserError(f"{where}: not a valid safetensors file ({type(exc).__name__})") from None


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": dict(sorted(state.items())), "param_groups": rest["param_groups"]}


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


# ----------------------------------------------------------------------------------------------
# Save / load.


@dataclass
class LoadedCheckpoint:
    uri: str
    step: int
    config: dict
    metrics: dict
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optim_state: dict | None
    state: dict
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)

    def tokenizer(self) -> Any:
        """The run's tokenizer, rebuilt from the files saved with the checkpoint (or None)."""
        if not self.tokenizer_files:
            return None
        from dsl.data import load_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in self.tokenizer_files.items():
                path = Path(tmp).joinpath(*name.split("/"))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return load_tokenizer(tmp)


def step_dir(step: int) -> str:
    return f"step-{int(step)}"


def save_checkpoint(storage: Storage | str, step: int, *, config: dict, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None = None, optim_state: dict | None = None,
                    state: dict | None = None, metrics: dict | None = None,
                    tokenizer: Any = None) -> str:
    """Write ``step-<step>/`` (manifest last) and return its URI; refuses to replace a complete one."""
    storage = open_storage(storage)
    prefix = step_dir(step)
    if storage.exists(f"{prefix}/{MANIFEST}"):
        raise UserError(f"{join_uri(storage.uri, prefix)}: a checkpoint for step {step} already exists; "
                        "refusing to overwrite it")
    files: dict[str, bytes] = {"model.safetensors": tensors_to_bytes(model_state)}
    if ema_state is not None:
        files["ema.safetensors"] = tensors_to_bytes(ema_state)
    state = dict(state or {})
    if optim_state is not None:
        tensors, rest = flatten_optimizer(optim_state)
        files["optim.safetensors"] = tensors_to_bytes(tensors)
        state["optimizer"] = rest
    state["step"] = int(step)
    files["state.json"] = json.dumps(state, sort_keys=True).encode()
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    files["tokenizer/" + str(path.relative_to(tmp)).replace(os.sep, "/")] = path.read_bytes()
    manifest = {"format": FORMAT, "step": int(step), "config": config, "metrics": metrics or {},
                "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()}}
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()

    if storage.list(prefix + "/"):  # an earlier save died before its manifest: garbage, never trusted by readers
        storage.delete_prefix(prefix)
    storage.put_files(prefix, files)  # dict order: the manifest is the last object written
    return join_uri(storage.uri, prefix)


def _split_uri(uri: str | os.PathLike | Storage, prefix: str) -> tuple[Storage, str]:
    if isinstance(uri, Storage):
        return uri, prefix.strip("/")
    return open_storage(uri), prefix.strip("/")


def read_manifest(storage: Storage, prefix: str) -> dict:
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    where = join_uri(storage.uri, key)
    if not storage.exists(key):
        raise UserError(f"{where}: missing (incomplete checkpoint, or not a checkpoint)")
    try:
        manifest = json.loads(storage.get_bytes(key))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{where}: not valid JSON") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{where}: expected a JSON object with format, step, config, metrics and files, "
                        f"not a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{where}: format {manifest.get('format')!r} is not {FORMAT!r}")
    check_manifest(manifest, where)
    return manifest


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_manifest(manifest: dict, where: str) -> None:
    """One UserError naming the first field of ``manifest`` that is not what :func:`save_checkpoint` writes."""
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{where}: 'step' must be a step number >= 0, not {step!r}")
    for key in ("config", "metrics"):
        if not isinstance(manifest.get(key, {}), dict):
            raise UserError(f"{where}: {key!r} must be a JSON object, not a {type(manifest[key]).__name__}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{where}: 'files' must be a JSON object {{name: {{sha256, bytes}}}}, not "
                        f"{'empty' if files in ({}, [], None) else 'a ' + type(files).__name__}")
    for name, meta in files.items():
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts):
            raise UserError(f"{where}: file name {name!r} is not a relative path inside the checkpoint")
        ok = (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _SHA256.match(meta["sha256"])
              and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool) and meta["bytes"] >= 0)
        if not ok:
            raise UserError(f"{where}: files[{name!r}] must be {{\"sha256\": <64 hex>, \"bytes\": <int >= 0>}}")


def _verified_files(storage: Storage, prefix: str, manifest: dict) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, meta in manifest["files"].items():
        key = f"{prefix}/{name}" if prefix else name
        where = join_uri(storage.uri, key)
        if not storage.exists(key):
            raise UserError(f"{where}: listed in the manifest but missing")
        data = storage.get_bytes(key)
        if len(data) != meta["bytes"]:
            raise UserError(f"{where}: {len(data)} bytes, manifest says {meta['bytes']} (truncated or replaced)")
        if _sha256(data) != meta["sha256"]:
            raise UserError(f"{where}: sha256 mismatch with the manifest (corrupt file)")
        out[name] = data
    return out


def verify_checkpoint(uri: str | os.PathLike | Storage, prefix: str = "") -> dict:
    """The manifest of a complete, intact checkpoint; one UserError naming the bad file otherwise."""
    storage, prefix = _split_uri(uri, prefix)
    manifest = read_manifest(storage, prefix)
    _verified_files(storage, prefix, manifest)
    return manifest


def load_checkpoint(uri: str | os.PathLike | Storage, prefix: str = "") -> LoadedCheckpoint:
    """Verify and load the checkpoint at ``uri`` (its ``step-<N>`` directory/prefix). Never unpickles."""
    storage, prefix = _split_uri(uri, prefix)
    manifest = read_manifest(storage, prefix)
    files = _verified_files(storage, prefix, manifest)
    where = join_uri(storage.uri, prefix)
    if "model.safetensors" not in files or "state.json" not in files:
        raise UserError(f"{where}: manifest lists no model.safetensors/state.json")
    state = json.loads(files["state.json"])
    optim = None
    if "optim.safetensors" in files:
        optim = unflatten_optimizer(tensors_from_bytes(files["optim.safetensors"], where + "/optim.safetensors"),
                                    state.get("optimizer", {"param_groups": []}))
    ema = (tensors_from_bytes(files["ema.safetensors"], where + "/ema.safetensors")
           if "ema.safetensors" in files else None)
    return LoadedCheckpoint(
        uri=where, step=int(manifest["step"]), config=manifest["config"], metrics=manifest.get("metrics", {}),
        model_state=tensors_from_bytes(files["model.safetensors"], where + "/model.safetensors"),
        ema_state=ema, optim_state=optim, state=state,
        tokenizer_files={k[len("tokenizer/"):]: v for k, v in files.items() if k.startswith("tokenizer/")})


def read_tokenizer(uri: str | os.PathLike | Storage, prefix: str = "") -> Any:
    """The tokenizer saved with a checkpoint (its files verified), or None if it has none."""
    storage, prefix = _split_uri(uri, prefix)
    manifest = read_manifest(storage, prefix)
    names = {k: v for k, v in manifest["files"].items() if k.startswith("tokenizer/")}
    files = _verified_files(storage, prefix, {"files": names})
    return LoadedCheckpoint(join_uri(storage.uri, prefix), int(manifest["step"]), manifest["config"], {}, {},
                            None, None, {}, {k[len("tokenizer/"):]: v for k, v in files.items()}).tokenizer()


# A checkpoint directory being written under a temporary name, beside the run's ``step-<N>`` ones
# (``.step-<N>.<random>.tmp`` from LocalStorage.put_files and dsl.atomic alike; ``.tmp-step-<N>.<random>``
# from the saves of earlier versions).
INTERRUPTED_SAVE = re.compile(r"^\.(?:tmp-)?step-\d+\.[^/]+$")


def remove_interrupted_saves(root: str | os.PathLike | Storage) -> list[str]:
    """Delete the temporary directories that saves killed mid-write left in a local run's root; returns
    their names. Call it when the run (re)starts, before it saves again: no save is in flight then."""
    storage = open_storage(root)
    base = storage.local_path("")
    if base is None or not base.is_dir():
        return []  # object stores write the manifest last instead: nothing is left under a temporary name
    removed = []
    for entry in sorted(Path(base).iterdir()):
        if entry.is_dir() and INTERRUPTED_SAVE.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def list_checkpoints(root: str | os.PathLike | Storage) -> list[int]:
    """Steps that have a ``step-<N>/`` entry under ``root`` (complete or not), ascending."""
    storage = open_storage(root)
    steps = set()
    for key in storage.list(""):
        m = STEP_DIR.match(key.split("/", 1)[0])
        if m:
            steps.add(int(m.group(1)))
    return sorted(steps)


def latest_complete(root: str | os.PathLike | Storage) -> str | None:
    """URI of the newest checkpoint under ``root`` that verifies; incomplete/corrupt ones are skipped."""
    storage = open_storage(root)
    for step in reversed(list_checkpoints(storage)):
        try:
            verify_checkpoint(storage, step_dir(step))
        except UserError:
            continue
        return join_uri(storage.uri, step_dir(step))
    return None


def apply_retention(root: str | os.PathLike | Storage, keep_last: int, metric: str = "valid_loss") -> list[int]:
    """Keep the newest ``keep_last`` complete checkpoints and the best (lowest) by ``metric``; return deleted
    steps. Checkpoints written before ``valid_loss`` existed are ranked by their ``valid_nll``.

    Incomplete checkpoints older than the newest complete one are debris of failed saves and go too.
    """
    storage = open_storage(root)
    complete: list[tuple[int, dict]] = []
    steps = list_checkpoints(storage)
    for step in steps:
        try:
            complete.append((step, read_manifest(storage, step_dir(step))))
        except UserError:
            continue
    if not complete:
        return []
    keep = {s for s, _ in complete[-keep_last:]}
    def score(manifest: dict) -> object:
        metrics = manifest.get("metrics", {})
        return metrics.get(metric, metrics.get("valid_nll") if metric == "valid_loss" else None)

    scored = [(score(m), s) for s, m in complete if isinstance(score(m), (int, float))]
    if scored:
        keep.add(min(scored)[1])
    newest = complete[-1][0]
    done = {s for s, _ in complete}
    deleted = [s for s in steps if s not in keep and (s in done or s < newest)]
    for step in deleted:  # the manifest goes first, so a half-deleted checkpoint is never trusted
        storage.delete_prefix(step_dir(step), first=(MANIFEST,))
    return deleted


__all__ = ["FORMAT", "MANIFEST", "LoadedCheckpoint",
           "save_checkpoint", "load_checkpoint", "verify_checkpoint", "read_manifest", "list_checkpoints",
           "latest_complete", "apply_retention", "check_manifest", "remove_interrupted_saves", "read_tokenizer", "step_dir",
           "tensors_to_bytes", "tensors_from_bytes", "encode_rng", "decode_rng"]
