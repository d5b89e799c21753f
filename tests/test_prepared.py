"""dsl.data.prepared: prepared token stores block-identical to build_data, resume, reading (memmap and
S3 streaming), and bad input (local directory and the moto S3 server) — the steps run in this process;
tests/test_prepare_job.py runs them on Ray Data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dsl.config import RunConfig, load
from dsl.data import CharTokenizer, build_data, heldout_blocks
from dsl.data.prepared.layout import MANIFEST
from dsl.data.prepared.preparation import InProcess, Preparation
from dsl.data.prepared.reader import PreparedStore
from dsl.data.prepared.worker import PrepWorker
from dsl.data.wrapping import wrap_documents
from dsl.errors import UserError

torch.set_num_threads(1)
L = 16
RUN = ["model=toy", f"model.length={L}", "train.batch_size=4", "data.shuffle_window=5"]
CORPUS = ["data.valid_fraction=0.25", "data.tokenizer=char"]


def write_corpus(root: Path) -> Path:
    """Three files of documents from 1 to ~60 characters: blocks straddle documents, chunks and shards."""
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran far away from home in the rain".split()
    root.mkdir(parents=True, exist_ok=True)
    for f in range(3):
        docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(25 + 10 * f)]
        (root / f"part{f}.txt").write_text("<|endoftext|>".join(docs))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def raw_cfg(corpus: Path, *extra: str) -> RunConfig:
    return load(RunConfig, [*RUN, f"data.source={corpus}", *CORPUS, *extra])


def prepared_cfg(out: str | Path, *extra: str) -> RunConfig:
    return load(RunConfig, [*RUN, f"data.source=prepared:{out}", *extra])


def prepare(corpus: Path, out: str | Path, *extra: str, shard_blocks: int = 7, chunk_docs: int = 4,
            executor=InProcess) -> tuple[Preparation, dict]:
    cfg = raw_cfg(corpus, *extra)
    prep = Preparation(cfg.data, L, str(out), shard_blocks=shard_blocks, chunk_docs=chunk_docs)
    return prep, prep.run(executor)


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.bin"))}


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def store(corpus: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "wrapped"
    prepare(corpus, out)
    return out


@pytest.fixture
def damaged(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    return copy


# -- identical blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["true", "false"])
def test_prepared_batches_equal_build_data_for_every_step(corpus: Path, tmp_path: Path, wrap: str) -> None:
    _, manifest = prepare(corpus, tmp_path / "s", f"data.wrap={wrap}")
    ref = build_data(raw_cfg(corpus, f"data.wrap={wrap}"))
    got = build_data(prepared_cfg(tmp_path / "s", f"data.wrap={wrap}"))
    assert len(manifest["splits"]["train"]["shards"]) > 3  # several shards, and chunks of 4 documents
    for split in ("train", "valid"):
        ids, mask = ref.store.arrays[split]
        stored = np.concatenate([np.fromfile(tmp_path / "s" / s["file"], dtype=manifest["dtype"])
                                 [: s["blocks"] * L].reshape(-1, L) for s in manifest["splits"][split]["shards"]])
        assert np.array_equal(stored, ids)  # corpus order, block for block
        for step in range(2 * ids.shape[0] // 4 + 3):  # more than two epochs through the shuffle windows
            a, b = ref.batch(split, step), got.batch(split, step)
            assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["mask"], b["mask"]), (split, step)
    # evaluation's held-out blocks (calibration, likelihood) of a run trained from the store
    want, got_ids = heldout_blocks(raw_cfg(corpus, f"data.wrap={wrap}"), ref.tokenizer), \
        heldout_blocks(prepared_cfg(tmp_path / "s", f"data.wrap={wrap}"), got.tokenizer)
    assert torch.equal(want[0], got_ids[0]) and torch.equal(want[1], got_ids[1])


def test_blocks_are_the_sequential_wrapping_of_the_split(corpus: Path, store: Path) -> None:
    cfg = raw_cfg(corpus)
    from dsl.data.corpora import LocalCorpus

    tok = CharTokenizer()
    docs = [tok.encode(t) for t in LocalCorpus(str(corpus), cfg.data).documents("train")]
    expected = np.array([b for b, _ in wrap_documents(docs, L, tok.bos_id, tok.eos_id)])
    manifest = json.loads((store / MANIFEST).read_text())
    got = np.concatenate([np.fromfile(store / s["file"], dtype="<u2").reshape(-1, L)
                          for s in manifest["splits"]["train"]["shards"]])
    assert np.array_equal(got, expected)
    train = manifest["splits"]["train"]
    assert train["tokens"] == sum(len(d) + 1 for d in docs) and train["documents"] == len(docs)
    assert train["dropped_tokens"] == train["tokens"] - len(expected) * (L - 2) < L - 2


def test_shards_do_not_depend_on_chunking(corpus: Path, store: Path, tmp_path: Path) -> None:
    prepare(corpus, tmp_path / "big-chunks", chunk_docs=1000)
    prepare(corpus, tmp_path / "one-doc-chunks", chunk_docs=1)
    assert shard_bytes(tmp_path / "big-chunks") == shard_bytes(store) == shard_bytes(tmp_path / "one-doc-chunks")


def test_manifest_describes_the_store(store: Path) -> None:
    m = json.loads((store / MANIFEST).read_text())
    assert m["format"] == "dsl-prepared/1" and m["length"] == L and m["dtype"] == "uint16"
    assert m["wrap"]["enabled"] and "carries over" in m["wrap"]["rule"]
    assert m["tokenizer"]["kind"] == "char" and m["tokenizer"]["vocab_size"] == 35
    assert set(m["tokenizer"]["files"]) == {"tokenizer/dsl_tokenizer.json"}
    assert json.loads(m["corpus"]["identity"])["valid"] == 0.25
    for split in ("train", "valid"):
        shards = m["splits"][split]["shards"]
        assert all(s["blocks"] == 7 for s in shards[:-1]) and 0 < shards[-1]["blocks"] <= 7
        assert sum(s["blocks"] for s in shards) == m["splits"][split]["blocks"]
        for s in shards:
            assert s["bytes"] == s["blocks"] * L * 2 and (store / s["file"]).stat().st_size == s["bytes"]
    assert not (store / "_work").exists()


def test_bpe_tokenizer_is_trained_once_and_saved_beside_the_shards(corpus: Path, tmp_path: Path) -> None:
    extra = ("data.tokenizer=bpe", "data.bpe_vocab=300")
    _, manifest = prepare(corpus, tmp_path / "bpe", *extra)
    data = build_data(prepared_cfg(tmp_path / "bpe"))
    assert data.tokenizer.kind == "bpe" and manifest["tokenizer"]["kind"] == "bpe"
    assert "tokenizer/tokenizer.json" in manifest["tokenizer"]["files"]
    ref = build_data(raw_cfg(corpus, *extra), tokenizer=data.tokenizer)  # the same tokenizer, tokenizing now
    for step in range(6):
        assert torch.equal(ref.batch("train", step)["ids"], data.batch("train", step)["ids"])


def test_hugging_face_corpus_parts_give_the_same_blocks(tmp_path: Path, monkeypatch) -> None:
    """Row ranges of a (memory-mapped) dataset split, read independently, in dataset order."""
    import datasets

    from dsl.data.corpora import HFCorpus

    rng = np.random.default_rng(1)
    words = "a stitch in time saves nine but only when the needle is sharp".split()
    rows = {s: [" ".join(rng.choice(words, size=int(rng.integers(0, 9)))) for _ in range(n)]
            for s, n in (("train", 40), ("validation", 15))}

    def load_dataset(path, name=None, split=None, streaming=False, **kw):
        assert (path, name, streaming) == ("wikitext", "wikitext-103-raw-v1", False)
        return datasets.Dataset.from_dict({"text": rows[split]})  # includes empty texts, which are skipped

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(HFCorpus, "ROWS_PER_PART", 7)
    cfg = load(RunConfig, [*RUN, "data.source=hf:wikitext-103", "data.tokenizer=char"])
    prep = Preparation(cfg.data, L, str(tmp_path / "hf"), shard_blocks=5, chunk_docs=3)
    assert len(prep.corpus.parts()) == 6 + 3
    prep.run(InProcess)
    ref, got = build_data(cfg), build_data(prepared_cfg(tmp_path / "hf"))
    for split in ("train", "valid"):
        assert got.store.readers[split].blocks == ref.store.arrays[split][0].shape[0]
        for step in range(8):
            assert torch.equal(ref.batch(split, step)["ids"], got.batch(split, step)["ids"]), (split, step)


def test_training_reads_never_tokenize(store: Path, monkeypatch) -> None:
    def refuse(self, text):
        raise AssertionError("a training process tokenized")

    monkeypatch.setattr(CharTokenizer, "encode", refuse)
    data = build_data(prepared_cfg(store))
    assert data.batch("train", 3)["ids"].shape == (4, L) and data.state_dict() == {}


def test_trainer_losses_are_bit_identical_to_the_raw_corpus(corpus: Path, store: Path, tmp_path: Path) -> None:
    from dsl.train import Trainer

    extra = ["train.steps=3", "train.ckpt_every=0", "train.eval_every=0", "train.eval_batches=1", "train.lr=3e-3",
             "name=t"]
    runs = {}
    for label, cfg in (("raw", raw_cfg(corpus, *extra)), ("prepared", prepared_cfg(store, *extra))):
        trainer = Trainer(cfg, storage=tmp_path / label)
        losses = [trainer.step()["loss"] for _ in range(3)]
        runs[label] = (losses, trainer.raw_model.state_dict(), trainer.validate())
    assert runs["raw"][0] == runs["prepared"][0]
    assert runs["raw"][2] == runs["prepared"][2]
    for k, v in runs["raw"][1].items():
        assert torch.equal(v, runs["prepared"][1][k]), k


# -- resume ---------------------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def crashing(after_chunks: int | None = None, after_shards: int | None = None):
    class Crashing(InProcess):
        def tokenize(self, items):
            for i, rec in enumerate(super().tokenize(items)):
                if after_chunks is not None and i == after_chunks:
                    raise Crash("killed while tokenizing")
                yield rec

        def write(self, specs):
            for i, rec in enumerate(super().write(specs)):
                if after_shards is not None and i == after_shards:
                    raise Crash("killed while writing shards")
                yield rec

    return Crashing


def test_rerun_resumes_from_verified_chunks_and_shards(corpus: Path, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        prepare(corpus, out, executor=crashing(after_chunks=5))
    assert not (out / MANIFEST).exists()
    with pytest.raises(Crash):
        prepare(corpus, out, executor=crashing(after_shards=4))
    assert not (out / MANIFEST).exists() and len(list(out.rglob("shard-*.bin"))) >= 4
    victim = sorted(out.rglob("shard-*.bin"))[1]
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])  # a damaged shard is written again, not trusted
    prep, _ = prepare(corpus, out)
    assert prep.stats.reused_chunks >= 5 and prep.stats.reused_shards >= 3
    assert shard_bytes(out) == shard_bytes(store)
    assert not (out / "_work").exists()
    again, _ = prepare(corpus, out)  # complete: verified, nothing redone
    assert again.stats.chunks == 0


def test_an_existing_store_of_another_recipe_is_never_overwritten(corpus: Path, store: Path, tmp_path: Path) -> None:
    before = shard_bytes(store)
    with pytest.raises(UserError) as err:
        prepare(corpus, store, "data.wrap=false")
    assert "refusing to overwrite" in one_line(err) and "wrap" in str(err.value)
    assert shard_bytes(store) == before
    out = tmp_path / "unfinished"
    with pytest.raises(Crash):
        prepare(corpus, out, executor=crashing(after_chunks=2))
    with pytest.raises(UserError) as err:
        prepare(corpus, out, shard_blocks=9)
    assert "unfinished preparation made differently (shard_blocks)" in one_line(err)


# -- bad input: local directory ------------------------------------------------------------------


def first_shard(root: Path) -> Path:
    m = json.loads((root / MANIFEST).read_text())
    return root / m["splits"]["train"]["shards"][0]["file"]


def test_missing_partial_and_corrupt_shards_are_one_clear_line(damaged: Path) -> None:
    shard = first_shard(damaged)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        build_data(prepared_cfg(damaged))
    assert shard.name in one_line(err) and "partial" in str(err.value)
    shard.unlink()
    with pytest.raises(UserError) as err:
        build_data(prepared_cfg(damaged))
    assert shard.name in one_line(err) and "missing" in str(err.value)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    data_obj = build_data(prepared_cfg(damaged, "data.shuffle_window=0"))
    with pytest.raises(UserError) as err:  # the first read of that shard, before any block of it is used
        data_obj.batch("train", 0)
    assert shard.name in one_line(err) and "sha256 mismatch" in str(err.value)
    with pytest.raises(UserError, match="sha256 mismatch"):
        PreparedStore(str(damaged)).verify()


def test_unfinished_or_foreign_store_is_one_clear_line(damaged: Path, tmp_path: Path) -> None:
    (damaged / MANIFEST).unlink()
    with pytest.raises(UserError) as err:
        build_data(prepared_cfg(damaged))
    assert "manifest.json: missing" in one_line(err) and "prepare_data.py" in str(err.value)
    (damaged / MANIFEST).write_text(json.dumps({"format": "dsl-checkpoint/1"}))
    with pytest.raises(UserError, match="is not 'dsl-prepared/1'"):
        build_data(prepared_cfg(damaged))
    with pytest.raises(UserError, match="expected prepared:<directory"):
        build_data(load(RunConfig, [*RUN, "data.source=prepared:"]))


def test_length_tokenizer_and_layout_must_match_the_model(store: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        build_data(load(RunConfig, ["model=toy", "model.length=32", f"data.source=prepared:{store}"]))
    assert "L=16" in one_line(err) and "model.length=32" in str(err.value)
    with pytest.raises(UserError) as err:
        build_data(load(RunConfig, ["model=toy", "model.length=32", "data.length=12", f"data.source=prepared:{store}"]))
    assert "data.length=12" in one_line(err)
    assert build_data(load(RunConfig, ["model=toy", "model.length=32", "data.length=16",
                                       f"data.source=prepared:{store}"])).length == L
    with pytest.raises(UserError) as err:
        build_data(prepared_cfg(store, "data.tokenizer=gpt2"))
    assert "prepared with char" in one_line(err)
    from dsl.data import BPETokenizer

    other = BPETokenizer.train(["a cat sat on the mat"] * 20, vocab_size=280)
    with pytest.raises(UserError) as err:  # e.g. the tokenizer saved with the checkpoint being resumed
        build_data(prepared_cfg(store), tokenizer=other)
    assert "differs from the model's (bpe" in one_line(err)
    saved = tmp_path / "tok"
    other.save(saved)
    with pytest.raises(UserError, match="differs from the tokenizer the store was prepared with"):
        build_data(prepared_cfg(store, f"data.tokenizer={saved}"))
    with pytest.raises(UserError, match="data.wrap=false"):
        build_data(prepared_cfg(store, "data.wrap=false"))
    with pytest.raises(UserError, match="model.vocab_size=50"):
        build_data(prepared_cfg(store, "model.vocab_size=50"))


def test_driver_check_refuses_an_init_checkpoint_of_another_tokenizer(store: Path, tmp_path: Path) -> None:
    from dsl.checkpoint import save_checkpoint
    from dsl.data import BPETokenizer
    from dsl.service.prepare_ray import check_prepared_data

    other = BPETokenizer.train(["a cat sat on the mat"] * 20, vocab_size=280)
    save_checkpoint(tmp_path / "run", 5, config={}, model_state={"w": torch.zeros(1)}, tokenizer=other)
    with pytest.raises(UserError) as err:
        check_prepared_data(prepared_cfg(store, f"init={tmp_path / 'run'}"))
    assert one_line(err).startswith(f"init={tmp_path / 'run'}: the checkpoint's tokenizer (bpe")
    save_checkpoint(tmp_path / "same", 5, config={}, model_state={"w": torch.zeros(1)}, tokenizer=CharTokenizer())
    check_prepared_data(prepared_cfg(store, f"init={tmp_path / 'same' / 'step-5'}"))  # verifies every shard


def test_unwritable_out_is_one_clear_line(corpus: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError) as err:
        prepare(corpus, blocker / "store")
    assert one_line(err).startswith(f"out={blocker / 'store'}: not writable")


def test_a_split_without_blocks_is_one_clear_line(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a<|endoftext|>b")
    with pytest.raises(UserError) as err:
        prepare(tiny, tmp_path / "s")
    assert "yields no 16-token blocks" in one_line(err)


# -- the moto S3 server ---------------------------------------------------------------------------


def upload(local: Path, uri: str) -> None:
    from dsl.storage import open_storage

    st = open_storage(uri)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            st.put_bytes(str(p.relative_to(local)), p.read_bytes())


def s3_key(uri: str, key: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, f"{prefix}/{key}" if prefix else key


@pytest.mark.integration
def test_s3_store_streams_with_read_ahead_and_equals_local(corpus: Path, store: Path, s3_bucket: str) -> None:
    uri = f"{s3_bucket}/owt"
    prep, manifest = prepare(corpus, uri)  # prepared straight into the bucket
    assert manifest["splits"] == json.loads((store / MANIFEST).read_text())["splits"]
    local, remote = build_data(prepared_cfg(store)), build_data(prepared_cfg(uri))
    n = manifest["splits"]["train"]["blocks"]
    for split in ("train", "valid"):
        for step in range(2 * n // 4 + 3):
            assert torch.equal(local.batch(split, step)["ids"], remote.batch(split, step)["ids"]), (split, step)
    reader = remote.store.readers["train"]
    remote.batch("train", 0)  # the first window: blocks 0-4 of shard 0; the next window starts in shard 0/1
    held = set(reader._arrays) | set(reader._pending)
    assert held and held <= {0, 1} and not reader.local


@pytest.mark.integration
def test_s3_bad_input_is_one_clear_line(store: Path, s3_server, s3_bucket: str) -> None:
    uri = f"{s3_bucket}/bad"
    upload(store, uri)
    client = s3_server.client()
    manifest = json.loads((store / MANIFEST).read_text())
    key = manifest["splits"]["train"]["shards"][0]["file"]
    bucket, obj = s3_key(uri, key)
    data = (store / key).read_bytes()
    client.put_object(Bucket=bucket, Key=obj, Body=data[:10])
    with pytest.raises(UserError) as err:
        build_data(prepared_cfg(uri))
    assert one_line(err).startswith(f"{uri}/{key}: 10 bytes") and "partial" in str(err.value)
    client.delete_object(Bucket=bucket, Key=obj)
    with pytest.raises(UserError) as err:
        build_data(prepared_cfg(uri))
    assert one_line(err).startswith(f"{uri}/{key}: listed in the manifest but missing")
    client.put_object(Bucket=bucket, Key=obj, Body=bytes([data[0] ^ 1]) + data[1:])
    data_obj = build_data(prepared_cfg(uri, "data.shuffle_window=0"))
    with pytest.raises(UserError) as err:
        data_obj.batch("train", 0)
    assert one_line(err).startswith(f"{uri}/{key}: sha256 mismatch")
    with pytest.raises(UserError, match="sha256 mismatch"):
        PreparedStore(uri).verify()
    client.delete_object(Bucket=bucket, Key=s3_key(uri, MANIFEST)[1])
    with pytest.raises(UserError, match="manifest.json: missing"):
        build_data(prepared_cfg(uri))
    upload(store, f"{s3_bucket}/ok")
    with pytest.raises(UserError, match="L=16"):
        build_data(load(RunConfig, ["model=toy", "model.length=32", f"data.source=prepared:{s3_bucket}/ok"]))
    with pytest.raises(UserError, match="prepared with char"):
        build_data(prepared_cfg(f"{s3_bucket}/ok", "data.tokenizer=gpt2"))
    assert build_data(prepared_cfg(f"{s3_bucket}/ok")).batch("valid", 0)["ids"].shape == (4, L)


@pytest.mark.integration
def test_s3_prefix_that_is_not_writable_is_one_clear_line(corpus: Path, s3_server, s3_bucket: str) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/frozen/*"}]}
    s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    with pytest.raises(UserError) as err:
        prepare(corpus, f"{s3_bucket}/frozen/owt")
    assert one_line(err).startswith(f"out={s3_bucket}/frozen/owt: not writable") and "denied" in str(err.value)
    keys = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert keys == []  # nothing was tokenized before the check
    with pytest.raises(UserError, match="bucket 'no-such-bucket-9x' does not exist"):
        prepare(corpus, "s3://no-such-bucket-9x/owt")


def test_worker_steps_round_trip_through_json(corpus: Path, tmp_path: Path) -> None:
    """Ray Data hands the workers JSON rows: a worker rebuilt from the context does the same work."""
    cfg = raw_cfg(corpus)
    prep = Preparation(cfg.data, L, str(tmp_path / "w"), chunk_docs=4)
    prep.check_writable()
    prep.load_or_build_tokenizer()
    ctx = json.loads(json.dumps({**prep.worker_context(), "tokenizer_files": {}}))
    worker = PrepWorker({**ctx, "tokenizer_files": prep.tok_files})
    part = prep.corpus.parts()[1]
    chunks = list(worker.chunks({"part": part, "index": 1, "first_doc": 25, "skip": [["train", 0]]}))
    assert chunks and all(c["part"] == 1 for c in chunks) and ("train", 0) not in {(c["split"], c["sub"]) for c in chunks}
    rec = worker.tokenize(chunks[0])
    assert (tmp_path / "w" / rec["key"]).stat().st_size == rec["units"] * 2
