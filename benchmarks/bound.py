"""`keras-perceiver bench-bound`: how close to the GEMM peak a forward pass could come if
everything but its matrix products were free.

One forward pass of ours (Keras on PyTorch, eager) and of the PyTorch original runs under
`torch.profiler`; every matrix product it makes (`mm`, `addmm`, `bmm`, `baddbmm` and the two
products inside the fused attention kernel) is then replayed alone, at its shapes, in PyTorch
(MKL / oneDNN) and in NumPy (OpenBLAS). Analytic FLOPs / (summed product time x GEMM peak) is
the best fraction of the peak any implementation built on those GEMM libraries can reach on
that model: the gap between it and 100% is the GEMMs' own efficiency at the model's shapes,
the gap between it and the measured fraction is everything else (norms, softmax, layouts).
PyTorch-only by construction (its profiler records the shapes), so it runs in a torch process.
"""

import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from keras_perceiver.backend_process import run_under_backend
from keras_perceiver.benchmarks.devices import (
    SUSTAINED_WINDOW_S, device_description, gemm_peaks, highest_peak, matmul_calls, sustained_gemm,
)
from keras_perceiver.benchmarks.peers import peer_call, peer_name
from keras_perceiver.benchmarks.subjects import bench_inputs, bench_model, peer_model
from keras_perceiver.timing import timed, timed_runs

FUSED_ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", FUSED_ATTENTION)


def products_of(op, shapes):
    """The matrix products, as (batch, m, k, n), that one recorded call of `op` makes
    (`shapes`: its tensor arguments' shapes, scalars dropped)."""
    if op == "aten::mm":
        (m, k), (_, n) = shapes[:2]
        return [(1, m, k, n)]
    if op == "aten::addmm":  # bias, mat1, mat2
        (m, k), (_, n) = shapes[1:3]
        return [(1, m, k, n)]
    if op in ("aten::bmm", "aten::baddbmm"):  # baddbmm: the added tensor first
        (b, m, k), (_, _, n) = shapes[:2] if op == "aten::bmm" else shapes[1:3]
        return [(b, m, k, n)]
    if op == FUSED_ATTENTION:  # query (..., L, E), key (..., S, E), value (..., S, Ev)
        query, key, value = shapes[:3]
        batch, length, width = int(np.prod(query[:-2])), query[-2], query[-1]
        return [(batch, length, width, key[-2]), (batch, length, key[-2], value[-1])]
    raise ValueError(f"products_of: `op` must be one of {PRODUCT_OPS}; received {op!r}")


def recorded_products(forward):
    """({(batch, m, k, n): calls} of the matrix products one call of `forward` makes, the ms
    those calls took inside it, the ms the whole profiled call took), after a warm-up call
    (so one-off set-up work is not counted)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        forward()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            start = time.perf_counter()
            forward()
            forward_ms = 1000 * (time.perf_counter() - start)
    counts = Counter()
    inside_ms = 0.0
    for event in profiler.events():
        if event.name in PRODUCT_OPS:
            inside_ms += event.cpu_time_total / 1000
            for product in products_of(event.name, [tuple(s) for s in event.input_shapes if s]):
                counts[product] += 1
    return counts, inside_ms, forward_ms


def product_seconds(product, library, repeats):
    """Best time of one float32 (batch, m, k, n) product alone, in "torch" or "numpy" (best of
    `repeats`, as the GEMM peak is: both then read the machine at its least disturbed)."""
    batch, m, k, n = product
    rng = np.random.default_rng(0)
    a = rng.random((batch, m, k), dtype=np.float32)
    b = rng.random((batch, k, n), dtype=np.float32)
    if batch == 1:  # a 2-D product, as mm / addmm make it (`@` of 3-D tensors is bmm)
        a, b = a[0], b[0]
    return min(timed_runs(matmul_calls(a, b)[library], repeats))


def _forward_ms(forward, repeats):
    """Median of `repeats` calls (already warmed up by `recorded_products`)."""
    import torch

    with torch.no_grad():
        return 1000 * statistics.median([timed(forward) for _ in range(repeats)])


def bound_row(preset, batch, implementation, forward, flops, repeats):
    """One implementation's forward pass and the time of its own matrix products alone; the
    fractions of the peak are filled in by `with_fractions` once the run's peak is known."""
    counts, inside_ms, profiled_ms = recorded_products(forward)
    forward_ms = _forward_ms(forward, repeats)
    ms = {p: {library: 1000 * product_seconds(p, library, repeats) for library in ("torch", "numpy")} for p in counts}
    recorded = sum(2 * n * b * m * k * q for (b, m, k, q), n in counts.items())
    row = dict(
        preset=preset, batch=batch, implementation=implementation, forward_ms=forward_ms, products=sum(counts.values()),
        recorded_gflop=recorded / 1e9, analytic_gflop=flops / 1e9,
        # the products' share of one profiled forward, both timed in the same call (so the
        # machine's drift between measurements does not enter it)
        products_share_of_forward=inside_ms / profiled_ms,
        products_gflops_in_forward=recorded / 1e6 / inside_ms,
        product_ms_torch=sum(n * ms[p]["torch"] for p, n in counts.items()),
        product_ms_numpy=sum(n * ms[p]["numpy"] for p, n in counts.items()),
        product_ms_best=sum(n * min(ms[p].values()) for p, n in counts.items()),
        # slowest first: where the products' time goes
        by_product=sorted(([list(p), n, ms[p]["torch"], ms[p]["numpy"]] for p, n in counts.items()), key=lambda r: -r[1] * r[2]),
    )
    print(json.dumps({k: v for k, v in row.items() if k != "by_product"}), file=sys.stderr, flush=True)
    return row


def with_fractions(row, peak):
    """`row` with its measured fraction of `peak` and the bounds its products set."""
    gflop_per_ms = row["analytic_gflop"] / peak * 1000
    return dict(row, peak_gflops=peak, achieved_fraction=gflop_per_ms / row["forward_ms"],
                bound_fraction_torch=gflop_per_ms / row["product_ms_torch"], bound_fraction_best=gflop_per_ms / row["product_ms_best"])


def worker(job):
    """In a torch process: ours and the peer, per preset x batch. The float32 GEMM peak is
    measured before each preset and at the end; the fractions use the highest
    sample (this machine's GEMM rate drifts by up to 20% within minutes: the highest is the
    closest to what the hardware can do, and never flatters a fraction)."""
    import keras

    from keras_perceiver.examples import outputs_to_numpy

    if keras.backend.backend() != "torch":
        raise SystemExit(f"bench-bound: the worker needs KERAS_BACKEND=torch; received {keras.backend.backend()!r}")
    sustained = sustained_gemm(job.get("sustained_s", 10.0))
    samples = []
    rows = []
    for name in job["presets"]:
        samples.append(gemm_peaks())
        model = bench_model(name)
        found = peer_model(name)
        for batch in job["batches"]:
            inputs = bench_inputs(name, batch)
            flops = model.flops(inputs)
            rows.append(bound_row(name, batch, "ours (Keras on torch, eager)", lambda: outputs_to_numpy(model(inputs)),
                                  flops, job["repeats"]))
            if found is not None:
                peer, to_torch = found
                call = peer_call(peer, peer, to_torch(inputs))
                rows.append(bound_row(name, batch, peer_name(peer), call,
                                      flops, job["repeats"]))
        del model, found
    samples.append(gemm_peaks())
    peak = highest_peak(samples)
    result = dict(device=device_description(), gemm_peak_gflops=peak, gemm_peak_samples_gflops=samples,
                  sustained_gemm_gflops=sustained, sustained_window_s=SUSTAINED_WINDOW_S, rows=[with_fractions(row, peak) for row in rows])
    Path(job["out"]).write_text(json.dumps(result, indent=1))


def run(presets, batches=(1,), repeats=5, out=None, sustained_s=10.0):
    """The bound rows of `presets` x `batches`, in a fresh torch process; written to `out` when
    given. `sustained_s`: seconds each GEMM library runs back to back (`sustained_gemm`)."""
    with tempfile.TemporaryDirectory() as work:
        job = dict(presets=list(presets), batches=list(batches), repeats=repeats, out=os.path.join(work, "r.json"),
                   sustained_s=sustained_s)
        done = run_under_backend("keras_perceiver.benchmarks.bound", [json.dumps(job)], "torch")
        if done.returncode:
            raise SystemExit(f"bench-bound: the torch run failed (exit {done.returncode})")
        result = json.loads(Path(job["out"]).read_text())
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def table(result):
    """Markdown: per preset x batch x implementation, the measured and the bounding fractions."""
    lowest = min(min(sample.values()) for sample in result["gemm_peak_samples_gflops"])
    lines = [
        f"{result['device']['cpu']} x{result['device']['threads']}; float32 GEMM peak {result['gemm_peak_gflops']:.0f} GFLOP/s "
        f"(highest of {len(result['gemm_peak_samples_gflops'])} samples taken through the run; lowest {lowest:.0f})",
    ]
    window = result.get("sustained_window_s", SUSTAINED_WINDOW_S)  # files of session 11 used the default
    for library, rates in result.get("sustained_gemm_gflops", {}).items():
        median = statistics.median(rates)
        lines.append(
            f"- the same product in {library}, back to back: median {median:.0f} GFLOP/s ({median / result['gemm_peak_gflops']:.0%} "
            f"of the peak) over {len(rates)} stretches of {window:g} s, {min(rates):.0f}-{max(rates):.0f}"
        )
    lines += [
        "",
        "| preset | batch | implementation | forward ms | % of peak | products | products' share of the forward | their GFLOP/s there | GFLOP (recorded / analytic) | products alone ms: torch / numpy / best | bound: torch GEMMs | bound: best GEMMs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['preset']} | {r['batch']} | {r['implementation']} | {r['forward_ms']:.0f} | {r['achieved_fraction']:.0%} | "
            f"{r['products']} | {r['products_share_of_forward']:.0%} | {r['products_gflops_in_forward']:.0f} | {r['recorded_gflop']:.3g} / {r['analytic_gflop']:.3g} | "
            f"{r['product_ms_torch']:.0f} / {r['product_ms_numpy']:.0f} / {r['product_ms_best']:.0f} | "
            f"{r['bound_fraction_torch']:.0%} | {r['bound_fraction_best']:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
