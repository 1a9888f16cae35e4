"""Timing cells, in the backend's own process: ours per preset x dtype x mode x batch, and our
exported artefacts in their runtimes; each cell with its FLOPs, memory and fraction of the
GEMM peak of the unit and precision it ran in, and, when paired, the float32 peer timed in
alternation with it."""

import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from keras_perceiver.benchmarks.devices import device_peak_memory_mb, on_device, wait_for
from keras_perceiver.benchmarks.peers import paired_peer_call, paired_peer_name
from keras_perceiver.benchmarks.subjects import bench_inputs, bench_model, export_bench_model
from keras_perceiver.timing import timed_runs

PAIR_BLOCK_S = 0.5  # how long each side of a paired round runs back to back


def alternated_runs(calls, repeats, block_s=PAIR_BLOCK_S):
    """`repeats` rounds of each of `calls` in turn, each timed over a block of back-to-back calls
    lasting about `block_s` (a single call where one takes longer): a list of per-call times per
    call, one a round (the block's mean). All run under the same machine state, so their ratios are free
    of the drift between cells timed minutes apart (up to 2x on the 2-core machines here). Blocks,
    not single calls: a millisecond call right after the other runtime's finds its threads parked
    and its caches cold, and ran 2-4x slower that way here, so each block starts with an untimed call."""
    counts = [max(1, round(block_s / timed_runs(f, 1)[0])) for f in calls]
    times = [[] for _ in calls]
    for _ in range(repeats):
        for f, count, durations in zip(calls, counts, times):
            if count > 1:
                f()
            start = time.perf_counter()
            for _ in range(count):
                f()
            durations.append((time.perf_counter() - start) / count)
    return times


def _measured(fn, name, batch, repeats, paired, reduced=False):
    """Durations of `fn`, and the cell fields of the float32 peer timed in alternation with it
    (`paired` and a peer exists; else no fields); a `reduced`-precision cell alternates with the
    peer under its own bfloat16 autocast too (`paired_peer_autocast_ms`)."""
    peer = paired_peer_call(name, batch) if paired else None
    if peer is None:
        return timed_runs(fn, repeats), {}
    calls = [fn, peer] + ([paired_peer_call(name, batch, autocast="bfloat16")] if reduced else [])
    times, peer_times, *autocast_times = alternated_runs(calls, repeats)
    fields = dict(paired_peer=paired_peer_name(name), paired_peer_ms=1000 * statistics.median(peer_times),
                  paired_peer_spread_ms=1000 * (max(peer_times) - min(peer_times)))
    if autocast_times:
        fields["paired_peer_autocast_ms"] = 1000 * statistics.median(autocast_times[0])
    return times, fields


def compiled_forward(model):
    """The compiled forward pass, outputs left on the device: `jax.jit` of the stateless call on
    JAX, Keras' own predict function (`torch.compile` / `tf.function(jit_compile=True)`) else."""
    import keras

    model.compile(jit_compile=True)
    if keras.backend.backend() == "jax":
        import jax

        state = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
        step = jax.jit(lambda t, n, x: model.stateless_call(t, n, x)[0])
        return lambda x: step(*state, x)
    model.make_predict_function()
    return lambda x: model.predict_function([(x,)])


def _inference(float32_matmuls=False):
    """The context timed calls run in: no autograd tape on PyTorch (the peers run under
    `torch.no_grad` too) and, where asked, float32 matmuls computed in float32 on JAX (its GPU
    default is TF32; PyTorch's default, and the measured float32 peak, are full float32)."""
    import contextlib

    import keras

    stack = contextlib.ExitStack()
    if keras.backend.backend() == "torch":
        import torch

        stack.enter_context(torch.no_grad())
    if float32_matmuls and keras.backend.backend() == "jax":
        import jax

        stack.enter_context(jax.default_matmul_precision("highest"))
    return stack


def _max_rel_error(got, expected):
    """max |got - expected| / max |expected|: how far a reduced-precision cell moved the output."""
    got, expected = np.asarray(got, "float32"), np.asarray(expected, "float32")
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def run_cells(presets, batches, repeats, modes, peaks, dtypes=("float32",), accelerated=False, paired=False):
    """Ours, per preset x dtype x mode x batch. On an accelerator inputs sit on the device and
    outputs stay there (the call is timed to completion); on the CPU outputs come back as NumPy,
    as a user gets them. A bfloat16 cell runs a copy of the float32 model with the same weights
    in Keras' "bfloat16" policy, and records its error against the float32 output. `paired`
    (CPU only): each cell is timed in alternation with the float32 peer (`paired_peer_ms`)."""
    import gc

    import keras

    from keras_perceiver.examples import outputs_to_numpy

    backend = keras.backend.backend()
    cells = []
    for name in presets:
        reference = bench_model(name)
        expected = {}
        for dtype in dtypes:
            model = reference if dtype == "float32" else _with_dtype(reference, dtype)
            for mode in modes:
                forward = compiled_forward(model) if mode == "compiled" else model
                for batch in batches:
                    inputs = bench_inputs(name, batch)
                    flops = model.flops(inputs)
                    if accelerated:
                        inputs = on_device(inputs)
                        fn = lambda: wait_for(forward(inputs))  # noqa: E731
                    elif mode == "eager":
                        fn = lambda: outputs_to_numpy(model(inputs))  # noqa: E731
                    else:
                        fn = lambda: model.predict_on_batch(inputs)  # noqa: E731
                    with _inference(float32_matmuls=dtype == "float32" and accelerated):
                        # the first call compiles (again for each new batch size), then one warm-up
                        start = time.perf_counter()
                        output = outputs_to_numpy(fn())
                        compile_s = time.perf_counter() - start if mode == "compiled" else 0.0
                        times, extra = _measured(fn, name, batch, repeats, paired and not accelerated, dtype != "float32")
                    extra.update(dtype=dtype, peak_device_mb=device_peak_memory_mb())
                    if dtype == "float32":
                        expected.setdefault(batch, output)
                    elif batch in expected:
                        extra["max_rel_error"] = _max_rel_error(output, expected[batch])
                    label = mode if dtype == "float32" else f"{mode} {dtype}"
                    cells.append(_cell(name, backend, label, batch, times, compile_s, flops, peaks[dtype], **extra))
            del model
            gc.collect()
        del reference
        gc.collect()
    return cells


def _with_dtype(model, dtype):
    """The same model and weights under another dtype policy (e.g. "bfloat16")."""
    config = model.get_config()
    config["dtype"] = dtype
    copy = type(model).from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def _cell(preset, backend, mode, batch, times, compile_s, flops, peak, **extra):
    median = statistics.median(times)
    cell = dict(
        preset=preset, backend=backend, mode=mode, batch=batch, median_ms=1000 * median,
        spread_ms=1000 * (max(times) - min(times)), throughput_per_s=batch / median, compile_s=compile_s,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        gflop=flops / 1e9, achieved_gflops=flops / median / 1e9, fraction_of_peak=flops / median / 1e9 / peak,
        peak_gflops=peak, **extra,
    )
    print(json.dumps(cell), file=sys.stderr, flush=True)
    return cell

# A bench target option that is not a quantization: the file traced at the bench inputs'
# shapes, every axis fixed (the torch.export routes, ONNX and CoreML: no shape arithmetic left
# in the graph).
STATIC = "static"


def artefact_options():
    """{target: its `target:option` choices} for the bench: every target whose runtime runs
    here (CoreML's only on macOS) with its quantizations, and "static" for ONNX and CoreML."""
    from keras_perceiver.converters.artefacts import QUANTIZE, ROUTES

    here = [t for t in ROUTES if t != "coreml" or platform.system() == "Darwin"]
    return {t: list(QUANTIZE.get(t, ())) + ([STATIC] if t in ("onnx", "coreml") else []) for t in here}


def run_artefacts(presets, targets, batches, repeats, peaks, paired=False, gpu_peak=None):
    """Cells for exported artefacts: each bench model exported to each `target[:option]`
    (option: a quantization, or "static" for a file per batch with every axis fixed; verified
    against Keras on the way), then timed in its runtime on the bench inputs; bfloat16
    artefacts are measured against `peaks["bfloat16"]`, the others `peaks["float32"]`, CoreML's
    against the higher of that and `gpu_peak` (CoreML may schedule them on an Apple GPU).
    Returns (cells, failures): an export that fails (e.g. a quantized file over its error
    bound) is reported on stderr and in `failures` with its reason, and the run goes on.
    `paired`: each cell is timed in alternation with the float32 peer (`paired_peer_ms`)."""
    from keras_perceiver.converters.artefacts import SUFFIXES, artefact_runner

    cells, failures = [], []
    for name in presets:
        model = bench_model(name)
        flops = {batch: model.flops(bench_inputs(name, batch)) for batch in batches}
        for spec in targets:
            target, _, option = spec.partition(":")
            static = option == STATIC
            quantize = None if static or not option else option
            mode = target + (f" {option}" if option else "")
            cell_peak = peaks["bfloat16" if quantize == "bfloat16" else "float32"]
            if target == "coreml":
                cell_peak = max(cell_peak, gpu_peak or 0)
            with tempfile.TemporaryDirectory() as work:
                report = export_s = None
                for batch in batches:
                    inputs = bench_inputs(name, batch)
                    path = Path(work) / f"{name}_{batch if static else 'any'}{SUFFIXES[target]}"
                    if static or report is None:
                        start = time.perf_counter()
                        try:
                            report = export_bench_model(name, target, path, inputs, static, quantize, model)
                        except RuntimeError as error:
                            reason = str(error).strip().splitlines()[-1]
                            print(f"bench: {name} {mode} not measured: {reason}", file=sys.stderr, flush=True)
                            failed_batches = [batch] if static else list(batches)  # an open-axes file serves them all
                            failures.append(dict(preset=name, backend="artefact", mode=mode, batches=failed_batches, error=reason))
                            if static:
                                continue
                            break
                        export_s = time.perf_counter() - start
                    run = artefact_runner(target, str(path), quantize)
                    times, extra = _measured(lambda: run(inputs), name, batch, repeats, paired, quantize is not None)
                    cells.append(_cell(name, "artefact", mode, batch, times, export_s, flops[batch], cell_peak,
                                       max_rel_error=report.max_rel_error, **extra))
        del model
    return cells, failures

