"""One GPU check: training, converter and sampler speed at the paper's shape, as one JSON line.

    python bench/gpu_check.py [--batch 64] [--steps 10] [--sample-steps 32] [--compile]
    python bench/gpu_check.py --smoke          # reduced shapes on the CPU (what the test suite runs)

Measures, on one device, in this order (about 3 minutes on an H100/H200-class GPU):

* ``matmul``: a large bf16 matmul, the practical peak that MFU is reported against;
* ``train``: MDLM and DSL training steps at MDLM's ``small`` shape (V=50258, L=1024) under bf16 autocast
  (the trainer's step: loss, backward, clip, fused AdamW), with the largest batch from ``--batch`` down
  that fits: step time, tokens/s, achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode, plus the
  in-place addmm_), MFU, peak memory, and the DSL/MDLM ratio. Batches come from pinned host memory (non-blocking copies) and the
  step reads nothing back to the host;
* ``converter``: the converter alone, forward + backward over B·L positions, for each implementation
  (chunked, attention) in fp32 and bf16 — which one ``model.converter_impl=auto`` should pick on this
  device (``dsl.converter.AUTO_IMPL``);
* ``sampler``: seconds per sampler step at B=64, L=1024 for MDLM (``sampler=mdlm``) and the step-budget
  protocol (``sampler=dsl-budget`` on a DSL model), next to one denoiser forward at the same batch.
  Weights are random (the output layer scaled so predictions are broad, like the first steps of
  Table 6): speed does not depend on what was learned.

Every figure is timed after warm-up, between device synchronisations. Failures of one part (e.g. an
attention kernel the device lacks) are recorded in the JSON instead of stopping the check.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from contextlib import nullcontext

import torch
from machine import flop_counter, refuse_counts_below_one

SMALL = dict(preset="small", vocab=50258, length=1024)
SMOKE = dict(preset="toy", vocab=512, length=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def matmul_peak(device: torch.device, n: int) -> float:
    """TFLOP/s of an (n, n) @ (n, n) bf16 matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _timed(lambda: a @ b, device, repeats=10, warmup=3) / 1e12


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train_step_fn(objective: str, shape: dict, batch: int, device: torch.device, compile_model: bool):
    """(step function, model) of one optimizer step: bf16 autocast loss, backward, clip, AdamW."""
    from dsl.config import RunConfig, load
    from dsl.devices import to_device
    from dsl.models import build_model
    from dsl.objectives import select_objective
    from dsl.seeding import sample_generator

    cfg = load(RunConfig, [f"model={shape['preset']}", f"model.length={shape['length']}", f"objective={objective}",
                           "model.dropout=0.0", f"train.batch_size={batch}"])
    loss_of = select_objective(cfg)  # the trainer's loss: no diagnostics, nothing read back
    model = build_model(cfg, shape["vocab"]).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    forward = torch.compile(model) if compile_model else model
    length = shape["length"]
    host_ids = torch.randint(shape["vocab"] - 1, (batch, length), generator=sample_generator(0, "gpu-check"))
    rows = torch.arange(batch)
    counter = [0]

    class _View:  # the objective calls model(...) and model.embed / model.mask_id
        def __call__(self, *args, **kwargs):
            return forward(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(model, name)

    view = _View()

    def step() -> None:
        counter[0] += 1
        ids = to_device(host_ids, device)  # as the trainer's batches: pinned, non-blocking
        mask = torch.ones_like(ids)
        gens = [sample_generator(0, "gpu-check", counter[0], r) for r in range(batch)]
        with _autocast(device):
            loss, n, _ = loss_of(view, ids, mask, gens, rows)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def measure_training(shape: dict, batch: int, steps: int, device: torch.device, peak: float,
                     compile_model: bool) -> dict:
    out: dict = {"shape": shape, "precision": "bf16 autocast", "compile": compile_model}
    while True:  # the largest batch from ``batch`` down that fits both objectives
        try:
            results = {}
            for objective in ("mdlm", "dsl"):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                step, model = train_step_fn(objective, shape, batch, device, compile_model)
                seconds = _timed(step, device, repeats=steps, warmup=3)
                memory = _peak_memory_gib(device)
                with flop_counter() as counter:
                    step()
                flops = counter.get_total_flops()
                tokens = batch * shape["length"]
                results[objective] = {
                    "step_s": seconds, "tokens_per_s": tokens / seconds, "flops_per_step": flops,
                    "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak,
                    "peak_mem_gib": memory, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
                _log(f"train {objective} batch {batch}: {seconds:.3f} s/step, "
                     f"{results[objective]['tflops']:.1f} TFLOP/s")
                del step, model
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # out of the handler: its traceback (whose frames hold the failed step's activations) is gone, so the
        # failed attempt's model, optimizer state and activations are freed before the smaller batch is tried
        step = model = results = None
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
        _log(f"out of memory: batch {batch}")
    out.update(batch=batch, **results)
    out["dsl_over_mdlm_step"] = results["dsl"]["step_s"] / results["mdlm"]["step_s"]
    out["dsl_over_mdlm_flops"] = results["dsl"]["flops_per_step"] / results["mdlm"]["flops_per_step"]
    return out


def measure_converter(positions: int, vocab: int, hidden: int, device: torch.device, repeats: int) -> dict:
    from dsl.converter import SoftmaxConverter

    dim = 64
    conv = SoftmaxConverter(vocab, dim, hidden, vocab - 1, gen=torch.Generator().manual_seed(0)).to(device)
    z = (torch.randn(positions, dim, generator=torch.Generator().manual_seed(1)) * 3).to(device).requires_grad_()
    upstream = torch.randn(positions, hidden, generator=torch.Generator().manual_seed(2)).to(device)
    flops = 2 * positions * vocab * (2 * dim + hidden) + 2 * positions * vocab * (3 * dim + 2 * hidden)
    out: dict = {"positions": positions, "vocab": vocab, "embed_dim": dim, "hidden": hidden,
                 "gemm_flops": flops}
    for impl in ("chunked", "attention"):
        for precision in ("fp32", "bf16"):
            conv.impl = impl
            context = _autocast(device) if precision == "bf16" else nullcontext()

            def run(context=context):
                with context:
                    h = conv(z)
                (h.float() * upstream).sum().backward()

            key = f"{impl}_{precision}"
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = _timed(run, device, repeats=repeats, warmup=1)
                out[key] = {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12,
                            "peak_mem_gib": _peak_memory_gib(device)}
                _log(f"converter {key}: {1e3 * seconds:.1f} ms")
            except Exception as exc:  # e.g. no fused attention kernel for these shapes on this device
                out[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                _log(f"converter {key}: {out[key]['error']}")
    return out


def _broad_output(model: torch.nn.Module, scale: float) -> None:
    """Random output weights of a std that gives broad predictions (random-init DiTs output zeros)."""
    layer = model.output_layer if hasattr(model, "output_layer") else model.backbone.output_layer
    with torch.no_grad():
        layer.linear.weight.normal_(0.0, scale / math.sqrt(layer.linear.in_features),
                                    generator=torch.Generator(device=layer.linear.weight.device).manual_seed(0))


def _sampler_model(name: str, shape: dict, device: torch.device):
    """A random-weight denoiser for ``sampler=name``: a DiT for mdlm, a DSL model for dsl-budget."""
    from dsl.config import RunConfig, load
    from dsl.models import build_model
    from dsl.sampling import DSLDenoiser, MDLMDenoiser

    torch.manual_seed(0)
    objective = "mdlm" if name == "mdlm" else "dsl"
    run = load(RunConfig, [f"model={shape['preset']}", f"model.length={shape['length']}", f"objective={objective}",
                           "model.dropout=0.0"])
    model = build_model(run, shape["vocab"]).to(device).eval()
    _broad_output(model, scale=3.0)
    return MDLMDenoiser(model) if objective == "mdlm" else DSLDenoiser(model, gamma_vis=50.0)


def _sampler_speed(name: str, shape: dict, batch: int, steps: int, device: torch.device) -> dict:
    from dsl.config import SamplingConfig
    from dsl.sampling import generate

    length = shape["length"]
    denoiser = _sampler_model(name, shape, device)
    draft = torch.full((batch, length), denoiser.mask_id, device=device)
    forward = _timed(lambda: denoiser._scores(draft), device, repeats=3, warmup=1)
    generate(denoiser, SamplingConfig(sampler=name, steps=2, batch_size=batch), batch, length, seed=0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    result = generate(denoiser, SamplingConfig(sampler=name, steps=steps, batch_size=batch, top_p=0.9), batch,
                      length, seed=1)
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    nfe = float(result.nfe.double().mean())
    math_s = max(seconds - forward * nfe / steps, 0.0)  # per step: what is not the network
    return {"step_s": seconds, "forward_s": forward, "nfe": nfe, "math_s_per_step": math_s,
            "math_over_forward": math_s / forward, "peak_mem_gib": _peak_memory_gib(device)}


def measure_sampler(shape: dict, batch: int, steps: int, device: torch.device) -> dict:
    out: dict = {"batch": batch, "length": shape["length"], "vocab": shape["vocab"], "steps": steps}
    for name in ("mdlm", "dsl-budget"):
        try:
            out[name] = _sampler_speed(name, shape, batch, steps, device)
            _log(f"sampler {name}: {out[name]['step_s']:.3f} s/step, forward {out[name]['forward_s']:.3f} s")
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            _log(traceback.format_exc())
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="reduced shapes on the CPU (seconds, for tests)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--batch", type=int, default=64, help="training batch to try first (halved until it fits)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per objective")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model for the training steps")
    args = ap.parse_args(argv)
    refuse_counts_below_one(ap, args, "batch", "steps", "sample_batch", "sample_steps")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if args.smoke:
        shape, batch, steps, sample_batch, sample_steps, matmul_n = SMOKE, 2, 2, 2, 3, 256
        converter = dict(positions=64, vocab=SMOKE["vocab"], hidden=32, repeats=2)
    else:
        shape, batch, steps, sample_batch, sample_steps, matmul_n = (
            SMALL, args.batch, args.steps, args.sample_batch, args.sample_steps, 8192)
        converter = dict(positions=16 * 1024, vocab=SMALL["vocab"], hidden=768, repeats=5)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; bf16 runs say so
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "smoke": args.smoke}
    report["matmul_bf16_tflops"] = peak = matmul_peak(device, matmul_n)
    _log(f"bf16 matmul {matmul_n}^3: {peak:.1f} TFLOP/s")
    report["train"] = measure_training(shape, batch, steps, device, peak, args.compile)
    report["converter"] = measure_converter(device=device, **converter)
    report["sampler"] = measure_sampler(shape, sample_batch, sample_steps, device)
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
