"""`keras-perceiver bench-profile`: where an ONNX artefact's time goes, in onnxruntime's own
profiler, node type by node type, and how fast its matrix products ran against the float32
GEMM peak of the same run.

The ONNX file is the fastest float32 route measured on CPU (benchmarks/NOTES.md), so its profile
says what is left between a preset and the peak: the products' own rate, and the element-wise
work, layouts and norms around them. `bench-bound` answers the same question for PyTorch.
"""

import json
import math
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from keras_perceiver.benchmarks.devices import device_description, gemm_peaks, highest_peak
from keras_perceiver.benchmarks.subjects import bench_inputs, export_bench_model

# onnxruntime's matrix-product kernels, float32 and int8 (after its graph fusions)
PRODUCT_OPS = (
    "MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul",
)


def product_flops(input_shapes, output_shape):
    """2 x the multiply-adds of one product node, from its first input, (..., m, k) or
    transposed (..., k, m), and its output (..., m, n): the profiler lists no shapes for
    constant operands, so the weights' shape is not needed."""
    first = input_shapes[0]
    if len(first) == 1:  # a vector times a matrix
        inner = first[0]
    elif len(output_shape) >= 2 and first[-2] == output_shape[-2]:
        inner = first[-1]
    else:
        inner = first[-2]
    return 2 * math.prod(output_shape) * inner


def _shapes(entries):
    """The profiler's [{dtype: shape}, ...] -> [shape, ...]."""
    return [list(next(iter(entry.values()))) for entry in entries]


def node_times(events):
    """([(op, input shapes, output shape, microseconds)] of the kernels that ran inside every
    model run but the first, [microseconds of each of those runs]). The first run is the
    warm-up: it allocates and packs weights once."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    timed = runs[1:]
    if not timed:
        raise ValueError(f"node_times: expected the events of at least 2 model runs; received {len(runs)}")
    nodes = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(start <= e["ts"] <= stop for start, stop in timed):
            continue
        args = e["args"]
        outputs = _shapes(args.get("output_type_shape", []))
        nodes.append((args["op_name"], _shapes(args.get("input_type_shape", [])), outputs[0] if outputs else [], e["dur"]))
    return nodes, [stop - start for start, stop in timed]


def summarize(nodes, run_us, peak_gflops):
    """Per forward, as means over the timed runs (so the kernels' ms stay within the call's):
    the call's ms, the kernels' ms, each node type's ms and share of the kernels' time, the
    products' GFLOP and rate, and the rows per (node type, input shapes), slowest first."""
    calls = len(run_us)
    totals = defaultdict(lambda: {"us": 0, "nodes": 0, "flops": 0})
    for op, inputs, output, us in nodes:
        total = totals[(op, tuple(map(tuple, inputs)))]
        total["us"] += us
        total["nodes"] += 1
        if op in PRODUCT_OPS:
            total["flops"] += product_flops(inputs, output)
    rows = []
    for (op, shapes), total in totals.items():
        row = dict(op=op, input_shapes=[list(s) for s in shapes], ms=total["us"] / calls / 1000, nodes=total["nodes"] // calls)
        if op in PRODUCT_OPS:
            row.update(gflop=total["flops"] / calls / 1e9, gflops=total["flops"] / total["us"] / 1e3)
        rows.append(row)
    kernels_ms = sum(row["ms"] for row in rows)
    by_op = defaultdict(float)
    for row in rows:
        row["share"] = row["ms"] / kernels_ms
        by_op[row["op"]] += row["ms"]
    products_ms = sum(row["ms"] for row in rows if "gflop" in row)
    products_gflop = sum(row["gflop"] for row in rows if "gflop" in row)
    products_rate = products_gflop / products_ms * 1e3 if products_ms else 0.0
    return dict(
        call_ms=statistics.mean(run_us) / 1000,
        timed_runs=calls,
        kernels_ms=kernels_ms,
        ops=[dict(op=op, ms=ms, share=ms / kernels_ms) for op, ms in sorted(by_op.items(), key=lambda x: -x[1])],
        products=dict(ms=products_ms, share=products_ms / kernels_ms, gflop=products_gflop, gflops=products_rate,
                      fraction_of_peak=products_rate / peak_gflops),
        rows=sorted(rows, key=lambda r: -r["ms"]),
    )


def profile_events(path, inputs, runs=3):
    """onnxruntime's profile events of 1 warm-up + `runs` calls of the file at `path` on `inputs`
    ({name: array}), on the CPU with its default options (as the bench runs it)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(work, "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name] for i in session.get_inputs()}
        for _ in range(1 + runs):
            session.run(None, feed)
        return json.loads(Path(session.end_profiling()).read_text())


def run(name, batch=1, onnx_path=None, quantize=None, static=False, runs=3, out=None):
    """Profile bench name `name` at `batch` (the bench's inputs): the ONNX file `onnx_path`, or
    the preset exported to a temporary one (verified on the way; `static`: every axis fixed,
    `quantize`: e.g. "dynamic_int8"). The GEMM peak is sampled before and after, and the
    highest sample is used. Returns the summary; writes it as JSON to `out` when given."""
    if runs < 1:
        raise ValueError(f"bench-profile: `runs` must be a positive integer; received {runs}")
    inputs = bench_inputs(name, batch)
    samples = [gemm_peaks()]
    given = onnx_path
    with tempfile.TemporaryDirectory() as work:
        if given is None:
            onnx_path = os.path.join(work, f"{name}.onnx")
            export_bench_model(name, "onnx", onnx_path, inputs, static, quantize)
        events = profile_events(onnx_path, inputs, runs)
    samples.append(gemm_peaks())
    peak = highest_peak(samples)
    result = dict(
        preset=name, batch=batch, file=None if given is None else str(given), static=static, quantize=quantize,
        device=device_description(), gemm_peak_gflops=peak, gemm_peak_samples_gflops=samples, **summarize(*node_times(events), peak),
    )
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def table(result, top=12):
    """Plain text: the call, the products against the peak, time by node type, the slowest rows."""
    from keras_perceiver.text_table import text_table

    p = result["products"]
    shown = [o for o in result["ops"] if o["ms"] >= 0.05]
    if result["file"]:
        artefact = result["file"]
    else:
        artefact = "ONNX, " + ("static" if result["static"] else "open axes") + (f", {result['quantize']}" if result["quantize"] else "")
    lines = [
        f"{result['preset']}, batch {result['batch']}, {artefact}, in onnxruntime; {result['device']['cpu']} x{result['device']['threads']}",
        f"call {result['call_ms']:.1f} ms (mean of {result['timed_runs']} profiled runs), kernels {result['kernels_ms']:.1f} ms",
        f"matrix products: {p['ms']:.1f} ms ({p['share']:.0%} of the kernels), {p['gflop']:.3g} GFLOP (int8: GOP) at "
        f"{p['gflops']:.0f}/s = {p['fraction_of_peak']:.0%} of the float32 GEMM peak {result['gemm_peak_gflops']:.0f} GFLOP/s "
        f"(highest of {len(result['gemm_peak_samples_gflops'])} samples)",
        "",
        text_table(("node type", "ms", "share"), [(o["op"], f"{o['ms']:.1f}", f"{o['share']:.1%}") for o in shown]),
        *([f"({len(result['ops']) - len(shown)} node types under 0.05 ms left out)"] if len(shown) < len(result["ops"]) else []),
        "",
        text_table(
            ("node type", "input shapes", "nodes", "ms", "share", "GFLOP/s"),
            [(r["op"], " ".join("x".join(map(str, s)) or "()" for s in r["input_shapes"]), str(r["nodes"]), f"{r['ms']:.1f}",
              f"{r['share']:.1%}", f"{r['gflops']:.0f}" if "gflops" in r else "")
             for r in result["rows"][:top]],
        ),
    ]
    return "\n".join(lines)
