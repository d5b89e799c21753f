"""dsl.checkpoint: format, verification, fallback, retention, atomic writes, no unpickling."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import dsl.checkpoint as ck
from dsl.checkpoint import (
    apply_retention,
    latest_complete,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from dsl.data import CharTokenizer
from dsl.errors import UserError
from dsl.models.loading import load_weights
from dsl.storage import LocalStorage, open_storage, register_storage


def _tiny(seed: int = 0, width: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def _save(root: Path | str, step: int, metrics: dict | None = None, seed: int = 0) -> str:
    model, opt = _tiny(seed)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    return save_checkpoint(root, step, config={"seed": seed}, model_state=model.state_dict(), ema_state=ema,
                           optim_state=opt.state_dict(), state={"data": {"pos": step}},
                           metrics=metrics or {}, tokenizer=CharTokenizer())


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    model, opt = _tiny()
    uri = _save(tmp_path, 5, {"valid_nll": 1.5})
    assert uri == str(tmp_path / "step-5")
    manifest = json.loads((tmp_path / "step-5" / "manifest.json").read_text())
    assert manifest["format"] == "dsl-checkpoint/1" and manifest["step"] == 5
    assert manifest["config"] == {"seed": 0} and manifest["metrics"] == {"valid_nll": 1.5}
    for name, meta in manifest["files"].items():
        data = (tmp_path / "step-5" / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert {"model.safetensors", "ema.safetensors", "optim.safetensors", "state.json",
            "tokenizer/dsl_tokenizer.json"} <= set(manifest["files"])

    ckpt = load_checkpoint(uri)
    assert ckpt.step == 5 and ckpt.state["data"] == {"pos": 5}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model_state[k], v) and torch.equal(ckpt.ema_state[k], v + 1)
    fresh, fresh_opt = _tiny(seed=1)
    fresh_opt.load_state_dict(ckpt.optim_state)
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert list(saved) == list(restored)
    for i in saved:
        assert set(saved[i]) == set(restored[i]) and all(torch.equal(saved[i][k], restored[i][k]) for k in saved[i])
    assert isinstance(ckpt.tokenizer(), CharTokenizer)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch) -> None:
    uri = _save(tmp_path, 1)

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_checkpoint(uri).step == 1


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_damaged_file_is_named_and_skipped(tmp_path: Path, damage: str) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    victim = tmp_path / "step-2" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[:-7]))
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x10
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    with pytest.raises(UserError) as err:
        load_checkpoint(tmp_path / "step-2")
    msg = str(err.value)
    assert "\n" not in msg and str(victim) in msg
    assert {"truncate": "bytes", "bitflip": "sha256 mismatch", "delete": "missing"}[damage] in msg
    assert latest_complete(tmp_path) == str(tmp_path / "step-1")


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    _save(tmp_path, 4)
    (tmp_path / "step-4" / "manifest.json").unlink()  # a save that died before its manifest
    assert list_checkpoints(tmp_path) == [3, 4]
    assert latest_complete(tmp_path) == str(tmp_path / "step-3")
    with pytest.raises(UserError, match="manifest.json: missing"):
        load_checkpoint(tmp_path / "step-4")
    assert latest_complete(tmp_path / "empty") is None
    _save(tmp_path, 4)  # re-saving the step replaces the debris
    assert latest_complete(tmp_path) == str(tmp_path / "step-4")


def test_existing_checkpoint_is_never_overwritten(tmp_path: Path, monkeypatch) -> None:
    _save(tmp_path, 7)
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match="already exists"):
        _save(tmp_path, 7, seed=3)
    assert _snapshot(tmp_path) == before

    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 8)
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    assert _snapshot(tmp_path) == before  # no step-8, no temporary debris, step-7 byte-identical
    assert sorted(os.listdir(tmp_path)) == ["step-7"]


@pytest.mark.parametrize("metric", ["valid_loss", "valid_nll"])  # valid_nll: checkpoints of older versions
def test_retention_keeps_last_and_best(tmp_path: Path, metric: str) -> None:
    loss = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: 2.2}
    for step, value in loss.items():
        _save(tmp_path, step, {metric: value})
    deleted = apply_retention(tmp_path, keep_last=2)
    assert deleted == [1, 3]
    assert list_checkpoints(tmp_path) == [2, 4, 5]


def test_wrong_shapes_is_one_clear_error() -> None:
    model, _ = _tiny(width=3)
    other, _ = _tiny(width=5)
    with pytest.raises(UserError) as err:
        load_weights(model, other.state_dict(), "ckpt/model.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and "0.weight (4, 5) != (4, 3)" in msg and "ckpt/model.safetensors" in msg
    with pytest.raises(UserError, match="missing: 1.bias"):
        load_weights(model, {k: v for k, v in model.state_dict().items() if k != "1.bias"}, "x")


class MemoryStorage:
    """An object store stand-in that records the order of writes."""

    def __init__(self, uri: str) -> None:
        self.uri, self.objects, self.writes, self.deletes = uri, {}, [], []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = data
        self.writes.append(key)

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        for k in sorted(k for k in self.objects if k == key or k.startswith(key.rstrip("/") + "/")):
            del self.objects[k]
            self.deletes.append(k)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {k: len(self.objects[k]) for k in self.list(prefix)}

    def put_files(self, prefix: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            self.put_bytes(f"{prefix}/{name}", data)

    def delete_prefix(self, prefix: str, first: tuple[str, ...] = ()) -> None:
        for name in first:
            self.delete(f"{prefix}/{name}")
        self.delete(prefix)

    def local_path(self, key: str) -> None:
        return None


def test_registered_scheme_and_object_store_write_order() -> None:
    stores: dict[str, MemoryStorage] = {}
    register_storage("mem", lambda uri: stores.setdefault(uri, MemoryStorage(uri)))
    _save("mem://bucket/run", 2, {"valid_nll": 1.0})
    store = stores["mem://bucket/run"]
    assert store.writes[-1] == "step-2/manifest.json"  # manifest last: readers never see a partial one
    assert latest_complete("mem://bucket/run") == "mem://bucket/run/step-2"
    assert load_checkpoint(store, "step-2").step == 2
    _save("mem://bucket/run", 3, {"valid_nll": 2.0})
    assert apply_retention("mem://bucket/run", keep_last=1, metric="valid_nll") == [] and not store.deletes
    _save("mem://bucket/run", 4, {"valid_nll": 3.0})
    assert apply_retention("mem://bucket/run", keep_last=1, metric="valid_nll") == [3]
    assert store.deletes[0] == "step-3/manifest.json" and not store.list("step-3/")   # never half-trusted
    store.objects["step-2/state.json"] = b"{}"
    with pytest.raises(UserError, match="step-2/state.json: 2 bytes"):
        load_checkpoint(store, "step-2")


def test_open_storage_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert open_storage(f"file://{tmp_path}").root == tmp_path
    with pytest.raises(UserError) as err:
        open_storage("gopher://x/y")
    assert "unsupported storage scheme 'gopher'" in str(err.value) and "s3://" in str(err.value)
