"""dsl.data: tokenizers, wrapping, split, sharding, streaming, caching and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsl.config import ConfigError, RunConfig, load
from dsl.data import BPETokenizer, CharTokenizer, SourceTokenizer, build_data, global_rows, load_tokenizer
from dsl.data.corpora import LocalCorpus, is_valid_doc
from dsl.data.wrapping import WrapState, pad_document, wrap_documents
from dsl.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")


def _cfg(*args: str) -> RunConfig:
    return load(RunConfig, ["model=toy", "model.length=16", "train.batch_size=4", "data.valid_fraction=0.2", *args])


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """40 short lowercase documents separated by <|endoftext|>."""
    words = "the cat sat on a mat while dogs ran far away from home".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 7)) for i in range(40)]
    path = tmp_path / "docs.txt"
    path.write_text("<|endoftext|>".join(docs))
    return path


# -- tokenizers ---------------------------------------------------------------------------------


def test_char_tokenizer_matches_text8_ids(tmp_path: Path) -> None:
    tok = CharTokenizer()
    assert (tok.vocab_size, tok.mask_id, tok.bos_id, tok.eos_id) == (35, 4, 2, 3)
    assert tok.encode("Ab z!") == [8, 9, 34, 33, 7]  # lowercased; '!' is [UNK]=7
    assert tok.decode([2, 8, 34, 33, 4, 3]) == "[BOS]a z[MASK][EOS]"
    tok.save(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert isinstance(again, CharTokenizer) and again.encode("hello world") == tok.encode("hello world")


def test_bpe_train_save_load_round_trip(tmp_path: Path) -> None:
    text = (SHARED / "tinyshakespeare.txt").read_text()[:60_000]
    docs = [d for d in text.split("\n\n") if d.strip()]
    tok = BPETokenizer.train(docs, vocab_size=400)
    assert tok.mask_id == tok.vocab_size - 1 and tok.vocab_size <= 400
    assert tok.bos_id == tok.eos_id == 0
    sample = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcödé ok?"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample  # byte-level: lossless even for unseen characters
    assert tok.mask_id not in ids and tok.eos_id not in ids
    tok.save(tmp_path / "bpe")
    again = load_tokenizer(tmp_path / "bpe")
    assert isinstance(again, BPETokenizer)
    assert again.encode(sample) == ids and again.vocab_size == tok.vocab_size


def test_gpt2_offline_is_one_clear_error_and_auto_falls_back(corpus: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="data.tokenizer=gpt2") as err:
        build_data(_cfg(f"data.source={corpus}", "data.tokenizer=gpt2"))
    assert "\n" not in str(err.value)
    data = build_data(_cfg(f"data.source={corpus}", "data.tokenizer=auto", "data.bpe_vocab=300"))
    assert isinstance(data.tokenizer, BPETokenizer)


@pytest.mark.parametrize("source", [("data.source=hmm",), ("data.source=topics", "data.topics=3",
                                                           "data.topics_seed=4", "data.topics_smoothing=0.01")])
def test_source_tokenizer_round_trip(tmp_path: Path, source: tuple[str, ...]) -> None:
    data = build_data(_cfg(*source))
    tok = data.tokenizer
    ids = data.batch("train", 0)["ids"][0].tolist()
    assert tok.encode(tok.decode(ids)) == ids
    tok.save(tmp_path / "src")
    again = load_tokenizer(tmp_path / "src")
    assert again.decode(ids) == tok.decode(ids) and again.vocab_size == data.vocab_size
    assert vars(again.source).get("topics") == vars(tok.source).get("topics")  # its own parameters came back


# -- wrapping -----------------------------------------------------------------------------------


def test_wrap_layout_exact() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    blocks = [b for b, _ in wrap_documents(docs, length=5, bos_id=0, eos_id=99)]
    # stream 1 2 3 E 4 5 E 6 7 8 9 E cut into chunks of L-2 = 3, each framed by BOS ... EOS
    assert blocks == [[0, 1, 2, 3, 99], [0, 99, 4, 5, 99], [0, 99, 6, 7, 99], [0, 8, 9, 99, 99]]


def test_wrap_resumes_from_state() -> None:
    docs = [list(range(10 * i, 10 * i + 2 + i)) for i in range(8)]
    full = list(wrap_documents(docs, 6, 100, 101))
    block, state = full[2]
    rest = [b for b, _ in wrap_documents(docs[state.doc:], 6, 100, 101, WrapState.from_json(state.to_json()))]
    assert rest == [b for b, _ in full[3:]]


def test_pad_document_masks_padding() -> None:
    ids, mask = pad_document([5, 6], 6, 1, 2, 9)
    assert ids == [1, 5, 6, 2, 9, 9] and mask == [1, 1, 1, 1, 0, 0]
    ids, mask = pad_document(list(range(10, 20)), 5, 1, 2, 9)
    assert ids == [1, 10, 11, 12, 2] and mask == [1] * 5


def test_unwrapped_rows_pad_with_mdlms_pad_id(corpus: Path, tmp_path: Path) -> None:
    """MDLM pads lm1b-style rows with [PAD] (text8: id 5; GPT-2: 50257, the id it also uses as mask);
    its DiT attends to padding, so the id matters."""
    from transformers import GPT2TokenizerFast

    from dsl.data import GPT2Tokenizer

    data = build_data(_cfg(f"data.source={corpus}", "data.tokenizer=char", "data.wrap=false",
                           "model.length=32", "data.shuffle_window=0"))
    rows = torch.cat([data.batch("train", s)["ids"] for s in range(3)])
    mask = torch.cat([data.batch("train", s)["mask"] for s in range(3)])
    assert (mask == 0).any()
    assert (rows[mask == 0] == CharTokenizer().pad_id).all() and CharTokenizer().pad_id == 5
    assert ((rows == data.tokenizer.eos_id).sum(-1) == 1).all()  # one EOS per row, then [PAD]

    docs = (SHARED / "owt_valid_sample.txt").read_text()[:20_000].split("<|endoftext|>")
    hf = GPT2TokenizerFast(tokenizer_object=BPETokenizer.train(docs, vocab_size=320)._tok,
                           bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "gpt2")
    gpt2 = GPT2Tokenizer.from_pretrained(str(tmp_path / "gpt2"))
    assert gpt2.pad_id == gpt2.mask_id == hf.vocab_size
    data = build_data(_cfg(f"data.source={corpus}", f"data.tokenizer={tmp_path / 'gpt2'}", "data.wrap=false",
                           "model.length=32", "data.shuffle_window=0"), tokenizer=gpt2)
    b = data.batch("train", 0)
    assert (b["mask"] == 0).any() and (b["ids"][b["mask"] == 0] == gpt2.mask_id).all()


def test_text_blocks_are_bos_docs_eos(corpus: Path) -> None:
    data = build_data(_cfg(f"data.source={corpus}", "data.tokenizer=char", "data.shuffle_window=0",
                           "data.valid_fraction=0.2"))
    tok = data.tokenizer
    ids = torch.cat([data.batch("train", s)["ids"] for s in range(3)])
    assert (ids[:, 0] == tok.bos_id).all() and (ids[:, -1] == tok.eos_id).all()
    stream = torch.cat([row[1:-1] for row in ids]).tolist()
    train_docs = list(LocalCorpus(str(corpus), data_cfg=_cfg(f"data.source={corpus}",
                                                             "data.valid_fraction=0.2").data).documents("train"))
    expected = []
    for d in train_docs:
        expected += tok.encode(d) + [tok.eos_id]
    assert stream == expected[:len(stream)]  # documents in order, separated by EOS


# -- split, determinism, sharding ----------------------------------------------------------------


def test_split_is_deterministic_and_disjoint(corpus: Path) -> None:
    cfg = _cfg(f"data.source={corpus}", "data.valid_fraction=0.25").data
    c = LocalCorpus(str(corpus), cfg)
    train, valid = list(c.documents("train")), list(c.documents("valid"))
    every = list(LocalCorpus(str(corpus), _cfg(f"data.source={corpus}", "data.valid_fraction=0.999999").data)
                 .documents("valid"))
    assert len(train) + len(valid) == len(every) == 40 and 0 < len(valid) < 40
    assert [is_valid_doc(i, 0.25) for i in range(40)] == [is_valid_doc(i, 0.25) for i in range(40)]
    assert list(c.documents("train", start=3)) == train[3:]


def test_batches_are_a_function_of_seed_split_step(corpus: Path) -> None:
    args = (f"data.source={corpus}", "data.tokenizer=char", "data.shuffle_window=5")
    a, b = build_data(_cfg(*args)), build_data(_cfg(*args))
    for step in (0, 7, 3):
        assert torch.equal(a.batch("train", step)["ids"], b.batch("train", step)["ids"])
    other = build_data(_cfg(*args, "seed=1"))
    assert not all(torch.equal(a.batch("train", s)["ids"], other.batch("train", s)["ids"]) for s in range(4))


@pytest.mark.parametrize("source", ["hmm", "text"])
def test_shard_union_equals_single_process_batch(source: str, corpus: Path) -> None:
    args = ["train.batch_size=8"] + (["data.source=hmm"] if source == "hmm" else
                                     [f"data.source={corpus}", "data.tokenizer=char", "data.shuffle_window=4"])
    data = build_data(_cfg(*args))
    for step in (0, 5):
        whole = data.batch("train", step)
        assert whole["rows"].tolist() == list(range(8))
        ranks = [data.batch("train", step, rank=r, world=2) for r in range(2)]
        assert torch.equal(torch.cat([b["ids"] for b in ranks]), whole["ids"])
        sliced = [data.batch("train", step, rank=r, world=2, micro=2, accum=a) for a in range(2) for r in range(2)]
        assert torch.equal(torch.cat([b["ids"] for b in sliced]), whole["ids"])
        assert torch.cat([b["rows"] for b in sliced]).tolist() == list(range(8))
    with pytest.raises(ValueError, match="past the global batch"):
        global_rows(8, rank=1, world=2, micro=2, accum=2)


def test_streaming_equals_in_memory(corpus: Path) -> None:
    args = (f"data.source={corpus}", "data.tokenizer=char", "data.shuffle_window=3", "data.valid_fraction=0.2")
    mem = build_data(_cfg(*args))
    stream = build_data(_cfg(*args, "data.streaming=true"))
    n_train = mem.store.arrays["train"][0].shape[0]
    steps = range(0, 2 * n_train // 4 + 3)  # more than two epochs, several windows each
    for split in ("train", "valid"):
        for step in steps:
            assert torch.equal(mem.batch(split, step)["ids"], stream.batch(split, step)["ids"]), (split, step)
    # a fresh stream restored from a saved position continues identically
    probe = build_data(_cfg(*args, "data.streaming=true"))
    for step in range(6):
        probe.batch("train", step)
    state = json.loads(json.dumps(probe.state_dict()))
    resumed = build_data(_cfg(*args, "data.streaming=true"))
    resumed.load_state_dict(state)
    assert state["train"]["g_start"] > 0
    for step in range(6, 12):
        assert torch.equal(resumed.batch("train", step)["ids"], mem.batch("train", step)["ids"])


def test_block_cache_is_reused(corpus: Path, tmp_path: Path) -> None:
    args = (f"data.source={corpus}", "data.tokenizer=char", f"data.cache_dir={tmp_path / 'cache'}")
    first = build_data(_cfg(*args))
    cached = list((tmp_path / "cache").rglob("train.ids.npy"))
    assert len(cached) == 1
    second = build_data(_cfg(*args))
    assert type(second.store.arrays["train"][0]).__name__ == "memmap"
    for step in range(3):
        assert torch.equal(first.batch("train", step)["ids"], second.batch("train", step)["ids"])


def test_jsonl_and_parquet_sources(tmp_path: Path) -> None:
    jsonl = build_data(_cfg(f"data.source={SHARED / 'webtext.valid.63tok.jsonl'}", "data.tokenizer=char",
                            "data.streaming=true"))
    text = CharTokenizer().decode(jsonl.batch("train", 0)["ids"][0].tolist())
    assert text.startswith("[BOS]") and len(text) > 16
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {'abcdefghijklmnopqrstuvwxyz'[i % 26]} says hello" for i in range(30)]
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    data = build_data(_cfg(f"data.source={tmp_path / 'c.parquet'}", "data.tokenizer=char", "data.text_field=body",
                           "data.shuffle_window=0", "data.valid_fraction=0.01"))
    bodies = sum((row[1:-1] for row in data.batch("train", 0)["ids"].tolist()), [])
    assert CharTokenizer().decode(bodies).startswith("document a says hello[EOS]document b says")


# -- bad input ----------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_and_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        build_data(_cfg(f"data.source={tmp_path / 'nope.txt'}", "data.tokenizer=char"))
    assert "nope.txt" in _one_line(err) and "no such file" in str(err.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(UserError) as err:
        build_data(_cfg(f"data.source={empty}", "data.tokenizer=char"))
    assert "empty.txt" in _one_line(err) and "no 16-token blocks" in str(err.value)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="holds no"):
        build_data(_cfg(f"data.source={tmp_path / 'dir'}", "data.tokenizer=char"))


def test_sequence_longer_than_model(corpus: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_data(_cfg(f"data.source={corpus}", "data.length=32"))
    assert "model.length=16" in _one_line(err)
    # a saved source tokenizer (e.g. from another run) that makes longer sequences than this model takes
    longer = SourceTokenizer.for_source("cyclic", _cfg().data, 32)
    with pytest.raises(UserError) as err:
        build_data(_cfg("data.source=cyclic"), tokenizer=longer)
    assert "32 tokens are longer than the model (model.length=16)" in _one_line(err)


def test_unknown_tokenizer_and_bad_overrides(corpus: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_data(_cfg(f"data.source={corpus}", "data.tokenizer=wordpiece"))
    assert "data.tokenizer='wordpiece'" in _one_line(err) and "bpe" in str(err.value)
    with pytest.raises(ConfigError, match="malformed override"):
        _cfg("data.source")
    with pytest.raises(ConfigError, match="unknown preset"):
        load(RunConfig, ["preset=nope"])
    with pytest.raises(UserError, match="unknown Hugging Face corpus"):
        build_data(_cfg("data.source=hf:c4"))


def test_hugging_face_corpora_use_mdlm_splits_and_fail_in_one_line(monkeypatch) -> None:
    import datasets

    calls: list[tuple] = []

    def offline(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        raise ConnectionError("Couldn't reach 'openwebtext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for source, expected in [("hf:openwebtext", ("openwebtext", None, "train[:-100000]")),
                             ("hf:wikitext-103", ("wikitext", "wikitext-103-raw-v1", "train")),
                             ("hf:lm1b", ("lm1b", None, "train"))]:
        with pytest.raises(UserError) as err:
            build_data(_cfg(f"data.source={source}", "data.tokenizer=char"))
        assert calls[-1] == expected
        assert _one_line(err).startswith(f"data.source={source}: cannot load Hugging Face dataset")
        assert "offline?" in str(err.value)
    corpus = build_data.__globals__["open_corpus"]("hf:openwebtext", _cfg().data, 16)
    with pytest.raises(UserError):
        next(corpus.documents("valid"))
    assert calls[-1] == ("openwebtext", None, "train[-100000:]")  # MDLM: the last 100k documents


def test_gpt2_tokenizer_from_a_local_directory(tmp_path: Path) -> None:
    """MDLM's GPT-2 conventions on a small GPT-2-format tokenizer: mask = vocab_size, V = vocab_size + 1."""
    from transformers import GPT2TokenizerFast

    from dsl.data import GPT2Tokenizer

    docs = (SHARED / "owt_valid_sample.txt").read_text()[:20_000].split("<|endoftext|>")
    base = BPETokenizer.train(docs, vocab_size=320)._tok
    hf = GPT2TokenizerFast(tokenizer_object=base, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "gpt2")
    tok = GPT2Tokenizer.from_pretrained(str(tmp_path / "gpt2"))
    assert tok.mask_id == hf.vocab_size and tok.vocab_size == hf.vocab_size + 1
    assert tok.bos_id == tok.eos_id == hf.convert_tokens_to_ids("<|endoftext|>")
    text = "LOUISVILLE, Ky. — A few reviews"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert isinstance(again, GPT2Tokenizer) and again.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size


def test_paragraph_documents_allow_whitespace_only_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "wiki.txt"
    path.write_text(" = Title = \n \n first paragraph . \n \n\t\nsecond one . \n\nthird\n")
    docs = list(LocalCorpus(str(path), _cfg(f"data.source={path}", "data.valid_fraction=0.000001").data)
                .documents("train"))
    assert docs == ["= Title =", "first paragraph .", "second one .", "third"]
