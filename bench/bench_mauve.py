"""MAUVE throughput: featurization (texts/s) and end-to-end MAUVE time, in-process vs 1 and 2 Ray actors.

    python bench/bench_mauve.py [n=500] [featurizer=minilm] [max_length=128] [seeds=3] [threads=1]

Samples and references are n web-text excerpts each (/work/shared/data); end to end = featurize both
sets + k-means/MAUVE over the seeds. Every actor and the in-process run use ``threads`` torch threads,
so the features agree bit for bit (checked and printed). Starts a private loopback Ray and stops it.
Prints one table; the ratio column is time relative to the in-process run (lower is faster).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from dsl.eval.featurizers import get_featurizer
from dsl.eval.mauve import DEFAULT_SEEDS, mauve_score, read_records

DATA = "/work/shared/data/webtext.valid.63tok.jsonl"


def _args(argv: list[str]) -> dict[str, str]:
    out = {"n": "500", "featurizer": "minilm", "max_length": "128", "seeds": "3", "threads": "1"}
    for a in argv:
        k, _, v = a.partition("=")
        if k not in out:
            sys.exit(f"error: unknown argument {k!r}; known: {', '.join(out)}")
        out[k] = v
    return out


def _timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main(argv: list[str]) -> None:
    args = _args(argv)
    n, threads = int(args["n"]), int(args["threads"])
    seeds = DEFAULT_SEEDS[: int(args["seeds"])] if int(args["seeds"]) <= 3 else tuple(range(25, 25 + int(args["seeds"])))
    texts = [r["text"] for r in read_records(DATA)][: 2 * n]
    samples, refs = texts[:n], texts[n:2 * n]
    torch.set_num_threads(threads)

    rows = []
    local = get_featurizer(args["featurizer"], int(args["max_length"]))
    local.featurize_batch(["warm up"])  # model load is not throughput
    q_ref, t_feat = _timed(lambda: local.featurize(samples))
    p_ref, t_refs = _timed(lambda: local.featurize(refs))
    _, t_mauve = _timed(lambda: mauve_score(p_ref, q_ref, seeds=seeds))
    rows.append(("in-process", t_feat, t_feat + t_refs, t_mauve, True))

    from dsl.service.mauve_pool import MauvePool
    from dsl.service.ray_session import ray_session

    with ray_session(cpus=2, temp_prefix="bm-"):
        for workers in (1, 2):
            pool = MauvePool(args["featurizer"], workers, int(args["max_length"]), threads_per_worker=threads)
            try:
                q, t_feat = _timed(lambda pool=pool: pool.featurize(samples))
                p, t_refs = _timed(lambda pool=pool: pool.featurize(refs))
                _, t_mauve = _timed(lambda p=p, q=q: mauve_score(p, q, seeds=seeds))
                same = bool(np.array_equal(q, q_ref) and np.array_equal(p, p_ref))
                rows.append((f"{workers} Ray actor{'s' if workers > 1 else ''}", t_feat, t_feat + t_refs, t_mauve, same))
            finally:
                pool.close()

    base_feat, base_total = rows[0][1], rows[0][2] + rows[0][3]
    print(f"\nMAUVE bench: {n} samples vs {n} references, {args['featurizer']} max_length={args['max_length']}, "
          f"{len(seeds)} k-means seeds, {threads} torch thread(s) per worker, {os.cpu_count()} CPUs")
    print(f"{'path':<16}{'feat texts/s':>14}{'feat time/in-proc':>19}{'end-to-end s':>14}{'e2e time/in-proc':>18}"
          f"{'bit-identical':>15}")
    for name, t_feat, t_both, t_mauve, same in rows:
        total = t_both + t_mauve
        print(f"{name:<16}{n / t_feat:>14.1f}{t_feat / base_feat:>19.2f}{total:>14.1f}{total / base_total:>18.2f}"
              f"{str(same):>15}")


if __name__ == "__main__":
    main(sys.argv[1:])
