"""Prepared token stores: a corpus tokenized and wrapped once into fixed-size shards that every training
process reads (memory-mapped from a directory, streamed with read-ahead from an object store).

Layout under one root (a directory or an ``s3://`` prefix)::

    manifest.json                         written LAST: the store exists once it is there
    tokenizer/...                         the tokenizer's own files (reopened by ``load_tokenizer``)
    train/shard-00000-<sha256[:16]>.bin   ``blocks_per_shard`` blocks (the last shard of a split: fewer)
    valid/shard-00000-<sha256[:16]>.bin
    _work/...                             what an unfinished preparation has done so far (resume)

A shard is raw little-endian ``dtype`` ids of shape ``(blocks, L)`` (uint16 when every id fits, else
uint32); an unwrapped store follows them with each block's attended length as uint32. The manifest
lists every shard with its block count, byte size and sha256, the tokenizer files with theirs, L, the
wrapping rule, the corpus identity and each split's document, token and block counts.

How the blocks come out identical to the single-process wrapping (``dsl.data.wrapping``), whatever
the number of workers:

1. the corpus is read in *parts* (files; row ranges of a dataset) in corpus order; a document's split
   follows from its global index, so parts of a multi-file corpus first count their documents and a
   prefix sum gives each part its first index. Each split's documents are grouped into *chunks*
   ``(part, sub)`` of at most ``CHUNK_DOCS`` documents / ``CHUNK_CHARS`` characters.
2. every chunk is tokenized on its own into its token stream — each document followed by EOS — and
   saved under ``_work/``.
3. a prefix sum over the chunks' token counts, in (part, sub) order, places every token in the split's
   stream. Block k is ``[BOS] stream[k(L-2):(k+1)(L-2)] [EOS]``; the tail shorter than L-2 is dropped.
   Shard s holds blocks ``[sK, (s+1)K)`` and is cut out of the chunks that overlap its tokens, so the
   carry across documents, chunks and shards is exactly the sequential wrapping's carry.
   Unwrapped stores (``data.wrap=false``) have one block per document: ``[BOS] doc[:L-2] [EOS]`` + [PAD]s.
4. ``manifest.json`` is written after every shard, then ``_work/`` is removed.

Re-running a preparation into the same root resumes: chunks already tokenized and shards already
written are found by name and verified by their content hash, and only the rest is done. The steps
that touch many documents take a :class:`~dsl.data.prepared.preparation.Executor`;
:class:`~dsl.data.prepared.preparation.InProcess` runs them here, and
``dsl.service.prepare_ray`` runs the same :class:`~dsl.data.prepared.worker.PrepWorker` methods on Ray Data.

Modules: ``layout`` (names, manifest, dtypes), ``worker`` (the steps that touch documents),
``preparation`` (the driver: plan, resume, manifest) and ``reader`` (opening, verifying and reading a store).
"""
