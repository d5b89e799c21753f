"""Data at cluster scale: preparation throughput on Ray Data (1 vs 2 workers) and training-side reads
(local memmap vs streamed from an S3 server) against what a training step consumes, in one run.

    python bench/bench_data.py [--mb 24] [--length 1024] [--vocab 4096] [--batch 8] [--read-steps 400]

1. A local corpus of about ``--mb`` MB: the real English texts of the shared data folder, copied into
   several files (several parts, read in parallel). A byte-level BPE is trained on it once, outside
   the timings, and saved; both preparations use that saved tokenizer (``data.tokenizer=<dir>``).
2. ``jobs/prepare_data.py``'s code path (``dsl.service.prepare_ray.prepare``) with workers=1 and workers=2
   on a private 3-CPU Ray instance: tokens/s of the tokenize stage and of the whole preparation, the
   tokens/s of one busy worker (tokens over the summed time workers spent on chunks) and how busy the
   workers were (that sum over workers x stage time; the rest is actor start-up and scheduling). The
   two stores must be byte-identical (checked).
3. Reads of ``Data.batch`` over ``--read-steps`` training steps of ``--batch`` sequences: from the local
   store (memory-mapped) and from the same store on a moto S3 server in its own process (downloaded
   shards, sha256-checked, read-ahead). Blocks/s and tokens/s.
4. One training step of ``model=tiny-cpu`` (DSL objective) at the same L and batch on this CPU: the
   tokens/s a step consumes. The ratios say how many such steps one reader feeds.
Timings are noisy on a shared machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
SOURCES = ["wikitext2.valid.txt", "wikitext2.test.txt", "tinyshakespeare.txt", "webtext.valid.63tok.jsonl",
           "owt_valid_sample.txt"]
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def make_corpus(root: Path, mb: float) -> int:
    root.mkdir(parents=True)
    total, copy = 0, 0
    while total < mb * 1e6:
        for name in SOURCES:
            src = SHARED / name
            dst = root / f"{copy:03d}-{name}"
            shutil.copyfile(src, dst)
            total += dst.stat().st_size
        copy += 1
    return total


def train_tokenizer(corpus: Path, vocab: int, out: Path) -> None:
    from dsl.data import BPETokenizer

    texts = []
    for name in SOURCES[:3]:
        texts.extend(p for p in (SHARED / name).read_text().split("\n\n") if p.strip())
    BPETokenizer.train(texts, vocab).save(out)


def prepare_with(workers: int, corpus: Path, tok: Path, length: int, out: Path) -> dict:
    from dsl.cli import load_job, parse
    from dsl.service.prepare_ray import prepare

    _, cfg = parse(load_job("jobs/prepare_data.py"), [
        f"data.source={corpus}", f"data.tokenizer={tok}", f"data.length={length}", "data.valid_fraction=0.01",
        f"prepare.workers={workers}", f"out={out}", "service.mlflow=off"])
    result = prepare(cfg)
    return {"tokens": result.tokens, "seconds": result.seconds, "tokenize_seconds": result.tokenize_seconds,
            "worker_seconds": result.worker_seconds, "documents": result.documents}


def read_rate(source: str, length: int, batch: int, steps: int) -> tuple[float, float, float]:
    """(blocks/s over all steps, blocks/s of the first window (cold), seconds to open the store)."""
    from dsl.config import RunConfig, load
    from dsl.data import build_data

    cfg = load(RunConfig, ["model=tiny-cpu", f"model.length={length}", f"data.source=prepared:{source}",
                           f"train.batch_size={batch}"])
    t0 = time.perf_counter()
    data = build_data(cfg)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.batch("train", 0)
    cold = batch / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        data.batch("train", step)
    return batch * steps / (time.perf_counter() - t0), cold, t_open


def step_rate(source: str, length: int, batch: int, threads: int) -> float:
    """tokens/s one training step of model=tiny-cpu (DSL) consumes on this CPU (median of 3 timed steps)."""
    import torch

    from dsl.config import RunConfig, load
    from dsl.train import Trainer

    torch.set_num_threads(threads)
    cfg = load(RunConfig, ["model=tiny-cpu", f"model.length={length}", "objective=dsl",
                           f"data.source=prepared:{source}", f"train.batch_size={batch}", "train.ema=0",
                           "train.steps=10", "train.ckpt_every=0", "train.eval_every=0"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, storage=tmp)
        trainer.step()  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - t0)
    return batch * length / sorted(times)[1]


def start_moto(port: int, log: Path) -> subprocess.Popen:
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, **FAKE_AWS})
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=24.0, help="corpus size (MB of text)")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8, help="sequences per training step (reads and the step)")
    ap.add_argument("--read-steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    args = ap.parse_args()

    from dsl.service.local_cluster import free_port
    from dsl.service.ray_session import ray_session

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    moto = None
    try:
        corpus = work / "corpus"
        size = make_corpus(corpus, args.mb)
        tok = work / "tokenizer"
        train_tokenizer(corpus, args.vocab, tok)

        prep = {}
        with ray_session(cpus=3, object_store_mb=300, temp_prefix="bd-"):
            for workers in (1, 2):
                prep[workers] = prepare_with(workers, corpus, tok, args.length, work / f"store-{workers}")
        same = all((work / "store-1" / p.relative_to(work / "store-2")).read_bytes() == p.read_bytes()
                   for p in (work / "store-2").rglob("*") if p.is_file())

        port = free_port()
        moto = start_moto(port, work / "moto.log")
        os.environ.update(FAKE_AWS)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        from dsl.storage import open_storage

        s3 = open_storage(f"s3://{bucket}/store")
        for p in sorted((work / "store-1").rglob("*")):
            if p.is_file():
                s3.put_bytes(str(p.relative_to(work / "store-1")), p.read_bytes())

        local_rate, local_cold, local_open = read_rate(str(work / "store-1"), args.length, args.batch, args.read_steps)
        s3_rate, s3_cold, s3_open = read_rate(f"s3://{bucket}/store", args.length, args.batch, args.read_steps)
        consume = step_rate(str(work / "store-1"), args.length, args.batch, args.threads)
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(work, ignore_errors=True)

    L = args.length
    print(f"\ndata bench: {size / 1e6:.1f} MB of text ({len(SOURCES)} shared corpora, copied), byte-level BPE "
          f"V={args.vocab}, L={L}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'preparation':<18}{'tokens':>11}{'tokenize tok/s':>16}{'end-to-end tok/s':>18}{'vs 1 worker':>13}"
          f"{'tok/s per busy worker':>23}{'workers busy':>14}")
    base = prep[1]["tokens"] / prep[1]["tokenize_seconds"]
    for w, r in prep.items():
        rate = r["tokens"] / r["tokenize_seconds"]
        busy = r["worker_seconds"] / (w * r["tokenize_seconds"])
        print(f"{f'{w} Ray worker(s)':<18}{r['tokens']:>11,}{rate:>16,.0f}{r['tokens'] / r['seconds']:>18,.0f}"
              f"{rate / base:>13.2f}{r['tokens'] / r['worker_seconds']:>23,.0f}{busy:>14.0%}")
    print(f"stores byte-identical: {same}")
    print(f"\n{'training-side reads':<22}{'blocks/s':>12}{'tokens/s':>14}{'first batch blk/s':>19}{'open s':>8}"
          f"{'x step consumption':>20}")
    for name, rate, cold, t_open in (("local memmap", local_rate, local_cold, local_open),
                                     ("S3 (moto) streamed", s3_rate, s3_cold, s3_open)):
        print(f"{name:<22}{rate:>12,.0f}{rate * L:>14,.0f}{cold:>19,.0f}{t_open:>8.2f}{rate * L / consume:>20,.1f}")
    print(f"{'tiny-cpu DSL step':<22}{consume / L:>12,.1f}{consume:>14,.0f}   (batch {args.batch}, "
          f"{args.threads} thread(s): the tokens/s one training process consumes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
