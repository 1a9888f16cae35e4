"""`keras-perceiver bench`: latency, compile time, memory and achieved FLOP/s per preset x
backend x mode, against a float32 GEMM peak measured in the same run; `report` merges
result files from several machines into one Markdown matrix, opened by a `summary` of our
best routes against the originals, and a PNG plot.

Each backend runs in its own process (the backend is fixed at import). Presets are built
at their real sizes with random weights unless they ship weights.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DTYPES = ("float32", "bfloat16")  # precisions ours and the peers run in, in the order they run

BENCH_INPUTS = {  # what one forward pass is fed, per preset (batch given separately)
    "perceiver_vision_fourier": {"image": (224, 224, 3)},
    "perceiver_vision_learned": {"image": (224, 224, 3)},
    "perceiver_vision_conv": {"image": (224, 224, 3)},
    "perceiver_io_language": {"tokens": 2048},
    "flamingo_resampler": {"media": (8, 1, 257)},
    "open_flamingo_resampler": {"media": (8, 1, 257)},
    "perceiver_digits": {"image": (8, 8, 1)},
    "small_perceiver_vision_fourier": {"image": (32, 32, 3)},
    "small_perceiver_io_language": {"tokens": 128},
    "small_flamingo_resampler": {"media": (2, 1, 32)},
}

# Peers' configurations at the zoo's sizes (transformers' ImageNet / masked-LM checkpoints).
_VISION_PEER = dict(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                    num_self_attention_heads=8, num_cross_attention_heads=1, image_size=224, num_labels=1000)
_LANGUAGE_PEER = dict(num_latents=256, d_latents=1280, d_model=768, num_blocks=1, num_self_attends_per_block=26,
                      num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280,
                      vocab_size=262, max_position_embeddings=2048)
# Small configurations, where framework overhead rather than matrix products sets the time.
# They exist only here: ours is converted from the (seeded) peer, so both share
# configuration and weights.
SMALL_PEERS = {
    "small_perceiver_vision_fourier": ("PerceiverForImageClassificationFourier", dict(
        num_latents=64, d_latents=128, num_blocks=2, num_self_attends_per_block=2, num_self_attention_heads=4,
        num_cross_attention_heads=1, image_size=32, num_labels=10)),
    "small_perceiver_io_language": ("PerceiverForMaskedLM", dict(
        num_latents=32, d_latents=128, d_model=64, num_blocks=1, num_self_attends_per_block=2,
        num_self_attention_heads=4, num_cross_attention_heads=4, qk_channels=64, v_channels=128,
        vocab_size=262, max_position_embeddings=128)),
    "small_flamingo_resampler": ("PerceiverResampler", dict(
        dim=128, depth=2, dim_head=32, heads=4, num_latents=16, num_media_embeds=2, ff_mult=4)),
}


def gemm_products(size=2048):
    """{library: a float32 (size x size) matmul}: NumPy's BLAS and, when installed, PyTorch's
    (oneDNN / MKL)."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    b = np.random.default_rng(1).random((size, size), dtype=np.float32)
    products = {"numpy": lambda: a @ b}
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        products["torch"] = lambda: ta @ tb
    except ImportError:
        pass
    return products


def gemm_peaks(size=2048, repeats=5):
    """Best float32 (size x size) matmul rate, GFLOP/s, of each GEMM library here
    (`gemm_products`; PyTorch's is often faster). The peak a run reports is the best of
    them, so that no library's slower GEMM flatters the fractions."""
    peaks = {}
    for library, product in gemm_products(size).items():
        product()
        peaks[library] = 2 * size**3 / min(_timed(product) for _ in range(repeats)) / 1e9
    return peaks


def highest_peak(samples):
    """The highest GFLOP/s among `gemm_peaks` samples ([{library: GFLOP/s}, ...])."""
    return max(max(sample.values()) for sample in samples)


def bfloat16_gemm_peak(max_size=2048, repeats=5):
    """PyTorch's bfloat16 (size x size) matmul rate, GFLOP/s: the peak that bfloat16 cells are
    measured against (AMX / AVX512-BF16 CPUs run it in hardware). The size doubles from 256 to
    `max_size` while one product takes under 50 ms: CPUs without bfloat16 units run it at about
    1 GFLOP/s (2-core AMD EPYC, 2026-11-23), where a 2048 product takes 17 s. None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    generator = torch.Generator().manual_seed(0)
    size = 256
    while True:
        a, b = (torch.rand(size, size, generator=generator, dtype=torch.bfloat16) for _ in range(2))
        if size >= max_size or _timed(lambda: a @ b) > 0.05:
            break
        size *= 2
    a @ b
    return 2 * size**3 / min(_timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def torch_accelerator():
    """The GPU PyTorch computes on here, the one Keras' torch backend also places tensors on:
    "cuda", "mps" (Apple silicon), or None."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def synchronize(device):
    """Wait for the work queued on PyTorch's `device` ("cuda" or "mps"): their calls return
    before the GPU has finished."""
    import torch

    getattr(torch, device).synchronize()


def accelerator_gemm_peaks(size=8192, repeats=10):
    """Float32 and bfloat16 (size x size) matmul rates of the GPU (`torch_accelerator`),
    GFLOP/s, through PyTorch (float32 without TF32: the precision float32 cells run in); {}
    without one. A precision the GPU cannot multiply (bfloat16 on older macOS) has no entry."""
    try:
        import torch
    except ImportError:
        return {}
    device = torch_accelerator()
    if device is None:
        return {}
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)  # drawn on the CPU: MPS has no generator of its own in older PyTorch
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        try:
            a, b = (torch.rand(size, size, generator=generator).to(device, getattr(torch, dtype)) for _ in range(2))
            (a @ b).sum().item()  # warm-up: library handles and kernel choice stay out of the timing
        except (RuntimeError, TypeError) as error:
            if dtype == "float32":
                raise
            print(f"bench: no {dtype} GEMM peak on {device}: {error}", file=sys.stderr, flush=True)
            continue
        synchronize(device)
        peaks[dtype] = _median_matmul_rate(lambda: (a @ b, synchronize(device)), size, repeats)
        del a, b
    getattr(torch, device).empty_cache()
    return peaks


def jax_gemm_peaks(device, size=8192, repeats=10):
    """Float32 (at "highest" precision, as float32 cells run) and bfloat16 (size x size) matmul
    rates of a JAX `device`, GFLOP/s: the peaks of an accelerator PyTorch does not see (a TPU).
    Measured in the JAX backend's own process, the one that holds the device."""
    import jax
    import jax.numpy as jnp

    product = jax.jit(lambda a, b: a @ b)
    peaks = {}
    with jax.default_matmul_precision("highest"):
        for dtype in ("float32", "bfloat16"):
            a, b = (jax.device_put(jnp.asarray(np.random.default_rng(seed).random((size, size), dtype=np.float32), dtype), device)
                    for seed in (0, 1))
            product(a, b).block_until_ready()  # compiles
            peaks[dtype] = _median_matmul_rate(lambda: product(a, b).block_until_ready(), size, repeats)
            del a, b
    return peaks


def _median_matmul_rate(call, size, repeats):
    """GFLOP/s of `call`, a (size x size) matmul on an accelerator that returns once it is done,
    over the median of `repeats` calls (the accelerators' peaks; the CPU's is a best of bursts)."""
    return 2 * size**3 / statistics.median(_timed(call) for _ in range(repeats)) / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_runs(fn, repeats):
    """One warm-up call, then `repeats` timed calls: their durations in seconds."""
    fn()
    return [_timed(fn) for _ in range(repeats)]


PAIR_BLOCK_S = 0.5  # how long each side of a paired round runs back to back


def alternated_runs(fn, other, repeats, block_s=PAIR_BLOCK_S):
    """`repeats` rounds of `fn` then `other`, each side timed over a block of back-to-back calls
    lasting about `block_s` (a single call where one takes longer): both lists of per-call times,
    one a round (the block's mean). Both run under the same machine state, so their ratio is free
    of the drift between cells timed minutes apart (up to 2x on the 2-core machines here). Blocks,
    not single calls: a millisecond call right after the other runtime's finds its threads parked
    and its caches cold, and ran 2-4x slower that way here, so each block starts with an untimed call."""
    counts = [max(1, round(block_s / timed_runs(f, 1)[0])) for f in (fn, other)]
    times = ([], [])
    for _ in range(repeats):
        for f, count, durations in zip((fn, other), counts, times):
            if count > 1:
                f()
            start = time.perf_counter()
            for _ in range(count):
                f()
            durations.append((time.perf_counter() - start) / count)
    return times


def _measured(fn, name, batch, repeats, paired):
    """Durations of `fn`, and the cell fields of the float32 peer timed in alternation with it
    (`paired` and a peer exists; else no fields)."""
    peer = paired_peer_call(name, batch) if paired else None
    if peer is None:
        return timed_runs(fn, repeats), {}
    times, peer_times = alternated_runs(fn, peer, repeats)
    return times, dict(paired_peer=peer_name(_PAIRED_PEERS[name][0]), paired_peer_ms=1000 * statistics.median(peer_times),
                       paired_peer_spread_ms=1000 * (max(peer_times) - min(peer_times)))


def device_description():
    """The CPU by name ("AMD EPYC ...", "Apple M2 Pro"), its threads and the system."""
    cpu = platform.processor() or platform.machine()
    if platform.system() == "Darwin":  # the chip's name ("arm" is all platform.processor() says)
        named = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        cpu = named.stdout.strip() or cpu
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"cpu": cpu, "threads": os.cpu_count(), "system": platform.system()}


def accelerators():
    """GPUs / TPUs / Apple devices seen by the current backend (one function per backend)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform != "cpu"]
    if backend == "torch":
        import torch

        found = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            found.append("Apple MPS")
        return found
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices() if d.device_type != "CPU"]


def on_device(inputs):
    """`inputs` as tensors on the backend's default device (the GPU where there is one), so
    that timed calls exclude host-to-device copies."""
    import keras

    return {k: keras.ops.convert_to_tensor(v) for k, v in inputs.items()}


def wait_for(outputs):
    """Block until the device has computed `outputs` (calls are asynchronous on GPUs)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.block_until_ready(outputs)
    if backend == "torch":
        device = torch_accelerator()
        if device:
            synchronize(device)
        return outputs
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


def device_peak_memory_mb():
    """Peak accelerator memory the process has allocated so far, MB; None on the CPU and on
    Apple's MPS (PyTorch keeps no peak there)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return None


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


# ---------------------------------------------------------------- analytic FLOPs
def _attention_flops(queries, keys, q_in, kv_in, qk, v, out, self_attention=False, heads=1):
    from keras_perceiver.layers.attention import projections_on_query_side

    if not self_attention and projections_on_query_side(queries, heads, kv_in, qk, v):
        # what MultiHeadAttention computes then: the context is never projected
        width = kv_in + 1
        return 2 * (queries * q_in * qk + queries * width * (qk + v) + 2 * heads * queries * keys * width + queries * v * out)
    projections = queries * q_in * qk + keys * kv_in * (qk + v) if not self_attention else queries * q_in * (2 * qk + v)
    return 2 * (projections + queries * keys * (qk + v) + queries * v * out)


def forward_flops(model, inputs):
    """Multiply-adds x 2 of the matrix products of one forward pass (softmax, norms and
    element-wise work left out: under 1% at these sizes)."""
    from keras_perceiver.layers.adapters import conv_stem_dims
    from keras_perceiver.models import PerceiverResampler

    c = model.config
    batch = next(iter(inputs.values())).shape[0]
    if isinstance(model, PerceiverResampler):
        b, t, f, v = inputs["media"].shape[:4]
        keys = f * v + c.num_latents
        inner = c.num_heads * c.head_channels
        per_layer = _attention_flops(c.num_latents, keys, c.dim, c.dim, inner, inner, c.dim, heads=c.num_heads) + (
            4 * c.num_latents * c.dim * c.ff_mult * c.dim
        )
        return b * t * c.depth * per_layer
    adapter = model.get_layer("input_adapter")
    data = inputs.get("inputs", inputs.get("token_ids"))
    length = int(np.prod(data.shape[1:-1])) if "inputs" in inputs else data.shape[1]
    channels = adapter.output_channels(data.shape[-1] if "inputs" in inputs else None)
    if getattr(adapter, "conv_stem_channels", None):
        convolved, pooled = conv_stem_dims(data.shape[1:-1])
        flops = 2 * int(np.prod(convolved)) * 49 * data.shape[-1] * adapter.conv_stem_channels
        length = int(np.prod(pooled))
    else:
        flops = 2 * length * data.shape[-1] * (getattr(adapter, "project_channels", None) or 0)
    n, d = c.num_latents, c.latent_channels
    qk = c.cross_attention_qk_channels or channels
    v = c.cross_attention_v_channels or qk
    flops += c.num_cross_attends * (_attention_flops(n, length, d, channels, qk, v, d, heads=c.num_cross_attention_heads) + 4 * n * d * d * c.cross_attention_widening_factor)
    sqk = c.self_attention_qk_channels or d
    sv = c.self_attention_v_channels or sqk
    per_self = _attention_flops(n, n, d, d, sqk, sv, d, self_attention=True) + 4 * n * d * d * c.self_attention_widening_factor
    flops += c.num_blocks * c.num_self_attends_per_block * per_self
    if hasattr(c, "output_queries"):
        spec = c.output_queries
        queries = spec.get("num_queries") or int(np.prod(spec["index_dims"]))
        width = model.get_layer("decoder").input[0].shape[-1]
        dqk = c.decoder_qk_channels or d
        dv = c.decoder_v_channels or dqk
        flops += _attention_flops(queries, n, width, d, dqk, dv, width, heads=c.decoder_num_heads) + 4 * queries * width * width * c.decoder_widening_factor
        if c.output_channels:
            flops += 2 * queries * width * c.output_channels
            width = c.output_channels
        if c.tie_output_to_input_embedding:
            flops += 2 * queries * width * c.input_adapter["vocab_size"]
    else:
        if c.pooling == "query":
            dqk = c.decoder_qk_channels or d
            flops += _attention_flops(1, n, d, d, dqk, c.decoder_v_channels or dqk, d, heads=c.decoder_num_heads) + 4 * d * d
        flops += 2 * d * c.num_classes
    return batch * flops


# ---------------------------------------------------------------- one backend, in-process
def bench_inputs(name, batch, seed=0):
    """Inputs of one forward pass; media width from the preset's config."""
    rng = np.random.default_rng(seed)
    spec = BENCH_INPUTS[name]
    if "image" in spec:
        return {"inputs": rng.normal(size=(batch,) + spec["image"]).astype("float32")}
    if "tokens" in spec:
        return {
            "token_ids": rng.integers(0, 262, size=(batch, spec["tokens"])).astype("int32"),
            "input_mask": np.ones((batch, spec["tokens"]), bool),
        }
    if name in SMALL_PEERS:
        dim = SMALL_PEERS[name][1]["dim"]
    else:
        from keras_perceiver.presets import zoo_entries

        dim = zoo_entries()[name]["config"]["dim"]
    return {"media": rng.normal(size=(batch,) + spec["media"] + (dim,)).astype("float32")}


def bench_model(name):
    """Our model for a bench name: a small configuration converted from its seeded peer
    (same weights), else the preset (random weights where it ships none)."""
    import keras_perceiver as kp

    if name in SMALL_PEERS:
        peer, _ = peer_model(name)
        if "resampler" in name:
            from keras_perceiver.converters.flamingo import resampler_from_state_dict

            return resampler_from_state_dict(peer.state_dict(), num_heads=SMALL_PEERS[name][1]["heads"])
        from keras_perceiver.converters.transformers_perceiver import from_transformers

        return from_transformers(peer)
    try:
        return kp.from_preset(name)
    except ValueError:
        return kp.from_preset(name, load_weights=False)


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
                    flops = forward_flops(model, inputs)
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
                        times, extra = _measured(fn, name, batch, repeats, paired and not accelerated)
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


def export_bench_model(name, target, path, inputs, static=False, quantize=None, model=None):
    """Export bench model `name` to `target` at `path`, verified against Keras on the way: a
    preset from its own files, a small configuration from `model` (default: converted anew
    from its seeded peer). `static`: every axis fixed at the shapes of `inputs`. Returns the
    export's report."""
    from keras_perceiver.converters.artefacts import export

    source = name if name not in SMALL_PEERS else model if model is not None else bench_model(name)
    shapes = {n: v.shape for n, v in inputs.items()} if static else None
    return export(source, target, path, input_shapes=shapes, dynamic=not static, quantize=quantize)


def run_artefacts(presets, targets, batches, repeats, peaks, paired=False, gpu_peak=None):
    """Cells for exported artefacts: each bench model exported to each `target[:option]`
    (option: a quantization, or "static" for a file per batch with every axis fixed; verified
    against Keras on the way), then timed in its runtime on the bench inputs; bfloat16
    artefacts are measured against `peaks["bfloat16"]`, the others `peaks["float32"]`, CoreML's
    against the higher of that and `gpu_peak` (CoreML may schedule them on an Apple GPU).
    Returns (cells, failures): an export that fails (e.g. a quantized file over its error
    bound) is reported on stderr and in `failures` with its reason, and the run goes on.
    `paired`: each cell is timed in alternation with the float32 peer (`paired_peer_ms`)."""
    from keras_perceiver.converters.artefacts import SUFFIXES, _runner

    cells, failures = [], []
    for name in presets:
        model = bench_model(name)
        flops = {batch: forward_flops(model, bench_inputs(name, batch)) for batch in batches}
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
                    run = _runner(target, str(path), quantize)
                    times, extra = _measured(lambda: run(inputs), name, batch, repeats, paired)
                    cells.append(_cell(name, "artefact", mode, batch, times, export_s, flops[batch], cell_peak,
                                       max_rel_error=report.max_rel_error, **extra))
        del model
    return cells, failures


def main_worker(job):
    import keras

    found = accelerators()
    accelerator_peaks = job.get("accelerator_peaks") or {}
    if found and not accelerator_peaks and keras.backend.backend() == "jax":
        import jax

        # a device PyTorch does not see (a TPU): its peaks through JAX, in this process, which holds it
        accelerator_peaks = jax_gemm_peaks(next(d for d in jax.devices() if d.platform != "cpu"))
    accelerated = bool(found and accelerator_peaks)
    samples = [job["gemm_peaks"], gemm_peaks()]  # the run's start, this process's start (and its end, below)
    cpu_peak = highest_peak(samples)
    # each cell is measured against the peak of the unit and precision it runs in
    # (a CPU without bfloat16 units computes bfloat16 products fastest through float32)
    cpu_peaks = {"float32": cpu_peak, "bfloat16": max(job.get("bfloat16_peak") or 0, cpu_peak)}
    peaks = dict(accelerator_peaks) if accelerated else cpu_peaks
    dtypes = job.get("dtypes", ["float32"])
    paired = job.get("paired", False)
    cells = run_cells(job["presets"], job["batches"], job["repeats"], job["modes"], peaks, dtypes, accelerated,
                      paired) if job["modes"] else []
    failures = []
    if job.get("targets"):
        artefact_cells, failures = run_artefacts(job["presets"], job["targets"], job["batches"], job["repeats"], cpu_peaks, paired,
                                                 gpu_peak=accelerator_peaks.get("float32"))
        cells += artefact_cells
    peers = run_peers(job["presets"], job["batches"], job["repeats"], dtypes=dtypes, peaks=peaks, accelerated=accelerated) if job.get("peers") else []
    samples.append(gemm_peaks())
    # a CPU's GEMM rate drifts (by up to 20% within minutes on the 2-core machines here): the
    # highest sample is the closest to what it can do, and a fraction of it never flatters a cell
    cpu_peaks = _raised_peaks(cells + peers, cpu_peaks, highest_peak(samples))
    if not accelerated:
        peaks = cpu_peaks
    Path(job["out"]).write_text(
        json.dumps(
            {
                "device": dict(device_description(), accelerators=found),
                "versions": {"keras": keras.version(), "backend": keras.backend.backend(), "python": platform.python_version(),
                             keras.backend.backend(): _backend_version()},
                "accelerated": accelerated,
                "gemm_peak_gflops": peaks["float32"],
                "gemm_peaks_gflops": job["gemm_peaks"],
                "gemm_peak_samples_gflops": samples,
                "accelerator_gemm_peaks_gflops": accelerator_peaks,
                "bfloat16_gemm_peak_gflops": peaks["bfloat16"],
                "torch_cpu_bfloat16_matmul_gflops": job.get("bfloat16_peak"),
                "cells": cells,
                "failed_cells": failures,
                "peers": peers,
            }
        )
    )


def _raised_peaks(cells, cpu_peaks, sampled):
    """The CPU peaks with float32's raised to `sampled` where that is higher (bfloat16's too: a
    CPU computes bfloat16 no slower than through float32), and `cells` (ours and the peers)
    re-measured against the raised peak they were measured against before."""
    raised = {dtype: max(peak, sampled) for dtype, peak in cpu_peaks.items()}
    moved = {cpu_peaks[dtype]: raised[dtype] for dtype in cpu_peaks}
    for cell in cells:
        if cell.get("peak_gflops") in moved:
            cell["peak_gflops"] = moved[cell["peak_gflops"]]
            if "fraction_of_peak" in cell:
                cell["fraction_of_peak"] = cell["achieved_gflops"] / cell["peak_gflops"]
    return raised


def _backend_version():
    import importlib

    import keras

    return importlib.import_module(keras.backend.backend()).__version__


def run(presets, backends, batches=(1,), repeats=5, modes=("eager", "compiled"), out="bench.json", peers=True, targets=(),
        dtypes=("float32",), paired=False):
    """Run every backend in its own process (peers in the torch one, same process as ours,
    so the same machine state; exported artefacts, `target[:quantize]`, in the first);
    merge into one JSON at `out`. The GEMM peaks (float32; bfloat16 for bfloat16 cells; the
    GPU's, where there is one) are measured here, once, before the runs. `dtypes`: the
    precisions ours and the peers run in, "float32" and / or "bfloat16". `paired`: every CPU
    cell is also timed in alternation with its float32 peer, in its own process (twice the
    time; the ratio is then free of the machine's drift between cells)."""
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown or not dtypes:
        raise ValueError(f"bench: `dtypes` must be one or more of 'float32', 'bfloat16'; received {list(dtypes)!r}")
    # float32 first, whatever the order asked: its output is what bfloat16 cells' errors are
    # measured against, and the peers are cast to bfloat16 in place after it
    dtypes = [d for d in DTYPES if d in dtypes]
    results = {"device": device_description(), "runs": []}
    peaks = gemm_peaks()
    accelerator_peaks = accelerator_gemm_peaks()
    missing = [d for d in dtypes if accelerator_peaks and d not in accelerator_peaks]
    if missing:
        raise ValueError(f"bench: `dtypes` {missing} cannot be multiplied on this GPU ({torch_accelerator()}); "
                         f"received {list(dtypes)}: run with --dtypes float32")
    wants_bf16 = "bfloat16" in dtypes or any(t.endswith(":bfloat16") for t in targets)
    bf16_peak = bfloat16_gemm_peak() if wants_bf16 else None
    total = len(backends)
    started = time.perf_counter()
    for index, backend in enumerate(backends):
        with tempfile.TemporaryDirectory() as work:
            job = dict(presets=presets, batches=list(batches), repeats=repeats, modes=list(modes), out=os.path.join(work, "r.json"),
                       peers=peers and backend == "torch", targets=list(targets) if index == 0 else [], gemm_peaks=peaks,
                       bfloat16_peak=bf16_peak, accelerator_peaks=accelerator_peaks, dtypes=list(dtypes), paired=paired)
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            done = subprocess.run([sys.executable, "-m", "keras_perceiver.bench", json.dumps(job)], env=env)
            if done.returncode:
                raise SystemExit(f"bench: the {backend} run failed (exit {done.returncode})")
            results["runs"].append(json.loads(Path(job["out"]).read_text()))
        elapsed = time.perf_counter() - started
        left = elapsed / (index + 1) * (total - index - 1)
        print(f"[{index + 1}/{total} backends done, about {left:.0f} s left]", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps(results, indent=1))
    return results


def _precision(cell):
    """"float32", or the reduced precision a cell (ours or a peer's) ran in: "int8", "bfloat16", "float16"."""
    return next((kind for kind in ("int8", "bfloat16", "float16") if kind in cell["mode"]), "float32")


def _reduced(cell):
    """Whether a cell ran in reduced precision (a quantized, float16 or bfloat16 artefact)."""
    return _precision(cell) != "float32"


def _machine(device):
    """A run's machine as the report names it: CPU x threads, + accelerators."""
    accelerators = f" + {', '.join(device['accelerators'])}" if device["accelerators"] else ""
    return f"{device['cpu']} x{device['threads']}{accelerators}"


def _fastest_peer(peers, cell):
    """The fastest peer of the cell's preset and batch in the cell's precision, else in float32 (the
    reduced-precision targets are set against the float32 peers); None if there is none."""
    same = [p for p in peers if p["preset"] == cell["preset"] and p["batch"] == cell["batch"]]
    matching = [p for p in same if _precision(p) == _precision(cell)] or [p for p in same if not _reduced(p)]
    return min(matching, key=lambda p: p["median_ms"], default=None)


def _span(values, digits, unit):
    """"low-high" + unit, or one value where the two print the same."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return (low if low == high else f"{low}-{high}") + unit


def _ms(ms):
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"  # millisecond models keep two digits


TIMED_AGAINST_PEER = ("in alternation", "same run", "another run")  # how a summary ratio was timed, best first


def summary(results):
    """Markdown: per machine, preset, batch and precision, our route with the best median ratio to
    the peer over every run given, and the range of that ratio over the runs.

    A cell timed in alternation with its peer (`--paired`) is compared in those rounds; otherwise
    with the fastest peer of its own run, else of another run on the same machine (drift between
    runs enters that ratio; the column says which). The peer is one that ran in the cell's
    precision where there is one, else a float32 one."""
    runs = [(_machine(run_["device"]), run_) for data in results for run_ in data["runs"]]
    peers_on = {}
    for machine, run_ in runs:
        peers_on.setdefault(machine, []).extend(run_.get("peers", []))
    routes = {}  # (machine, preset, batch, precision, route) -> [(ratio, how timed, peer, cell)]
    for machine, run_ in runs:
        for c in run_["cells"]:
            key = (machine, c["preset"], c["batch"], _precision(c), f"{c['backend']} {c['mode']}")
            if "paired_peer_ms" in c:
                routes.setdefault(key, []).append((c["paired_peer_ms"] / c["median_ms"], "in alternation", c["paired_peer"], c))
                continue
            for how, pool in (("same run", run_.get("peers", [])), ("another run", peers_on[machine])):
                peer = _fastest_peer(pool, c)
                if peer:
                    routes.setdefault(key, []).append((peer["median_ms"] / c["median_ms"], how, peer["peer"], c))
                    break
    best = {}
    for key, measured in routes.items():
        ratio = statistics.median(m[0] for m in measured)
        if key[:4] not in best or ratio > best[key[:4]][0]:
            best[key[:4]] = (ratio, key[4], measured)
    lines = [
        "| machine | preset | batch | precision | our best route | runs | ms (median of the runs) | % of GEMM peak "
        "| peer | peer time / our time | timed against the peer | error / output range |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in sorted(best, key=lambda g: (g[0], g[1], g[2], g[3] != "float32", g[3])):
        machine, preset, batch, precision = group
        _, route, measured = best[group]
        cells = [m[3] for m in measured]
        # int8 has no measured peak of its own; against the float32 one it reads over 100%
        peak = "-" if precision == "int8" else _span([100 * c["fraction_of_peak"] for c in cells], 0, "%")
        errors = [c["max_rel_error"] for c in cells if "max_rel_error" in c]
        lines.append(
            f"| {machine} | {preset} | {batch} | {precision} | {route} | {len(cells)} | "
            f"{_ms(statistics.median(c['median_ms'] for c in cells))} | {peak} | "
            f"{', '.join(sorted({m[2] for m in measured}))} | {_span([m[0] for m in measured], 2, 'x')} | "
            f"{', '.join(how for how in TIMED_AGAINST_PEER if how in {m[1] for m in measured})} | {f'{max(errors):.1e}' if errors else '-'} |"
        )
    return "\n".join(lines)


def report(paths, markdown_out=None, plot_out=None):
    """Merge result files (several machines) into one Markdown document (and a PNG plot): the
    files it came from, the `summary` of our best routes, then every cell and the peers."""
    lines = [
        "| machine | preset | backend | mode | batch | median ms | spread ms | compile s | peak RSS MB | peak device MB | GFLOP | GFLOP/s | % of GEMM peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    results = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "runs" not in data:
            raise ValueError(f"bench-report: expected result files of `keras-perceiver bench`; received {str(path)!r}")
        results.append(data)
        for run_ in data["runs"]:
            machine = _machine(run_["device"])
            for c in run_["cells"]:
                rows.append((machine, c))
                lines.append(
                    f"| {machine} | {c['preset']} | {c['backend']} | {c['mode']} | {c['batch']} | {c['median_ms']:.1f} | "
                    f"{c['spread_ms']:.1f} | {c['compile_s']:.1f} | {c['peak_rss_mb']:.0f} | "
                    f"{'%.0f' % c['peak_device_mb'] if c.get('peak_device_mb') else '-'} | {c['gflop']:.1f} | "
                    f"{c['achieved_gflops']:.1f} | {100 * c['fraction_of_peak']:.0f}% "
                    f"(peak {c.get('peak_gflops', run_['gemm_peak_gflops']):.0f}{' bf16' if 'bfloat16' in c['mode'] else ''}) |"
                )
    peer_lines = [
        "",
        "| machine | preset | batch | peer | peer mode | peer ms | peer % of GEMM peak | our best, same precision | our ms "
        "| peer time / our time | our best reduced precision | its ms | peer time / its time | its error / output range |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in results:
        ours = [c for run_ in data["runs"] for c in run_["cells"]]
        for run_ in data["runs"]:
            machine = _machine(run_["device"])
            for p in run_.get("peers", []):
                # a bfloat16 peer is compared with our bfloat16 cells, a float32 one with our float32
                # cells and, in the reduced-precision columns, with our fastest reduced-precision cell
                same = [c for c in ours if c["preset"] == p["preset"] and c["batch"] == p["batch"]]
                matching = [c for c in same if _reduced(c) == _reduced(p)]
                if not matching:
                    continue
                best = min(matching, key=lambda c: c["median_ms"])
                peer_fraction = best["gflop"] / (p["median_ms"] / 1000) / (p.get("peak_gflops") or run_["gemm_peak_gflops"])
                reduced = None if _reduced(p) else min([c for c in same if _reduced(c)], key=lambda c: c["median_ms"], default=None)
                reduced_cells = "- | - | - | -"
                if reduced:
                    error = f"{reduced['max_rel_error']:.1e}" if "max_rel_error" in reduced else "-"
                    reduced_cells = (f"{reduced['mode']} | {reduced['median_ms']:.1f} | "
                                     f"{p['median_ms'] / reduced['median_ms']:.2f}x | {error}")
                peer_lines.append(
                    f"| {machine} | {p['preset']} | {p['batch']} | {p['peer']} | {p['mode']} | {p['median_ms']:.1f} | "
                    f"{100 * peer_fraction:.0f}% | {best['backend']} {best['mode']} | {best['median_ms']:.1f} | "
                    f"{p['median_ms'] / best['median_ms']:.2f}x | {reduced_cells} |"
                )
    if len(peer_lines) > 3:
        lines += peer_lines
    paired = [(machine, c) for machine, c in rows if "paired_peer_ms" in c]
    if paired:
        lines += [
            "", "Timed in alternation with the float32 peer, in one process (rounds of ours, then the peer, each side about "
            f"{PAIR_BLOCK_S:g} s of back-to-back calls; a spread is that of the rounds' per-call means):", "",
            "| machine | preset | batch | ours | ms | spread ms | peer | peer ms, same rounds | spread ms | peer time / our time |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ] + [
            f"| {machine} | {c['preset']} | {c['batch']} | {c['backend']} {c['mode']} | {c['median_ms']:.1f} | {c['spread_ms']:.1f} | "
            f"{c['paired_peer']} | {c['paired_peer_ms']:.1f} | {c['paired_peer_spread_ms']:.1f} | {c['paired_peer_ms'] / c['median_ms']:.2f}x |"
            for machine, c in paired
        ]
    failed = [(_machine(run_["device"]), f) for data in results for run_ in data["runs"] for f in run_.get("failed_cells", [])]
    if failed:
        lines += ["", "Not measured:", ""] + [
            f"- {machine}: {f['preset']} {f['mode']}, batch {', '.join(map(str, f['batches']))}: {f['error']}" for machine, f in failed
        ]
    names = ", ".join(Path(path).name for path in paths)
    table = "\n".join([
        f"Merged from: {names}", "",
        "Our best route per machine, preset, batch and precision: the highest median ratio to the peer (its range over the runs):", "",
        summary(results), "", "Every cell:", "",
    ] + lines)
    if markdown_out:
        Path(markdown_out).write_text(table + "\n")
    if plot_out and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{c['preset']} b{c['batch']}  {c['backend']} {c['mode']}" for _, c in rows]
        machines = list(dict.fromkeys(machine for machine, _ in rows))  # one colour per machine
        colours = [f"C{machines.index(machine) % 10}" for machine, _ in rows]
        fig, ax = plt.subplots(figsize=(9, 1 + 0.2 * len(rows)))  # one readable row per cell
        ax.barh(range(len(rows)), [100 * c["fraction_of_peak"] for _, c in rows], color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("% of the run's measured GEMM peak in the cell's precision (float32; bfloat16 cells: bfloat16)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i % 10}") for i in range(len(machines))]
        ax.legend(handles, machines, fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(plot_out, dpi=120)
    return table


# ---------------------------------------------------------------- peers (PyTorch originals)
def peer_model(name):
    """The reference implementation of a bench name, seeded (so a small configuration and
    its conversion share weights), and its inputs builder; None where there is none."""
    import torch

    torch.manual_seed(0)
    if name in SMALL_PEERS:
        class_name, kwargs = SMALL_PEERS[name]
    elif name == "open_flamingo_resampler":  # flamingo_resampler's squared ReLU is not in flamingo-pytorch
        from keras_perceiver.presets import zoo_entries

        c = zoo_entries()[name]["config"]
        class_name, kwargs = "PerceiverResampler", dict(
            dim=c["dim"], depth=c["depth"], dim_head=c["head_channels"], heads=c["num_heads"],
            num_latents=c["num_latents"], num_media_embeds=8, ff_mult=c["ff_mult"],
        )
    elif name == "perceiver_io_language":
        class_name, kwargs = "PerceiverForMaskedLM", _LANGUAGE_PEER
    elif name.startswith("perceiver_vision_"):
        kind = name.rsplit("_", 1)[1]
        class_name = {"fourier": "PerceiverForImageClassificationFourier", "learned": "PerceiverForImageClassificationLearned",
                      "conv": "PerceiverForImageClassificationConvProcessing"}[kind]
        kwargs = _VISION_PEER
    else:
        return None
    if class_name == "PerceiverResampler":
        import flamingo_pytorch

        model = flamingo_pytorch.PerceiverResampler(**kwargs)
        return model.eval(), lambda x: (torch.from_numpy(x["media"][:, :, 0]),)
    import transformers

    model = getattr(transformers, class_name)(transformers.PerceiverConfig(**kwargs)).eval()
    if class_name == "PerceiverForMaskedLM":
        return model, lambda x: (torch.from_numpy(x["token_ids"].astype("int64")), torch.from_numpy(x["input_mask"].astype("int64")))
    return model, lambda x: (torch.from_numpy(x["inputs"].transpose(0, 3, 1, 2).copy()),)


_PAIRED_PEERS = {}  # bench name -> peer_model(name), built once per process for paired timing


def paired_peer_call(name, batch):
    """The float32 peer of `name` on the CPU as a no-argument call on the bench inputs of
    `batch` (what `run_peers` times), or None where there is no peer."""
    import torch

    if name not in _PAIRED_PEERS:
        _PAIRED_PEERS[name] = peer_model(name)
    if _PAIRED_PEERS[name] is None:
        return None
    model, to_torch = _PAIRED_PEERS[name]
    forward = peer_call(model, model, to_torch(bench_inputs(name, batch)))

    def call():
        with torch.no_grad():
            return forward()

    return call


def peer_name(model):
    """A peer as the tables name it: its package and class, e.g. "transformers.PerceiverForMaskedLM"."""
    return type(model).__module__.split(".")[0] + "." + type(model).__name__


def peer_call(fn, model, args):
    """A no-argument call of the peer `model` (through `fn`: the model or its compiled form) on
    the tensors `to_torch` made: (token ids, mask) for the language model, (media,) for the
    resampler, (pixels,) for the image models."""
    if len(args) == 2:
        return lambda: fn(inputs=args[0], attention_mask=args[1])
    if "Resampler" in type(model).__name__:
        return lambda: fn(*args)
    return lambda: fn(inputs=args[0])


def run_peers(presets, batches, repeats, compiled=False, dtypes=("float32",), peaks=None, accelerated=False):
    """The PyTorch originals, per preset x dtype x batch, on the GPU when `accelerated`
    (inputs moved there first, each call timed to completion)."""
    import torch

    device = torch_accelerator() if accelerated else "cpu"
    cells = []
    for name in presets:
        # the peer a paired cell already built (seeded: the same weights) is taken and released
        found = _PAIRED_PEERS.pop(name, None) or peer_model(name)
        if found is None:
            continue
        model, to_torch = found
        for dtype in dtypes:
            model = model.to(device=device, dtype=getattr(torch, dtype))
            fn = model if not compiled else torch.compile(model)
            for batch in batches:
                args = [a.to(device, getattr(torch, dtype)) if a.is_floating_point() else a.to(device)
                        for a in to_torch(bench_inputs(name, batch))]
                forward = peer_call(fn, model, args)
                call = (lambda: (forward(), synchronize(device))) if accelerated else forward  # noqa: E731
                with torch.no_grad():
                    compile_s = _timed(call)
                    times = [_timed(call) for _ in range(repeats)]
                median = statistics.median(times)
                mode = ("torch.compile" if compiled else "eager") + ("" if dtype == "float32" else f" {dtype}")
                cells.append(dict(preset=name, peer=peer_name(model),
                                  mode=mode, dtype=dtype, batch=batch, median_ms=1000 * median,
                                  spread_ms=1000 * (max(times) - min(times)), compile_s=compile_s if compiled else 0.0,
                                  peak_gflops=(peaks or {}).get(dtype)))
                print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
        del model
    return cells


# ---------------------------------------------------------------- scaling in the input length
SCALE_CONFIG = dict(  # a Perceiver encoder reading M 1-D points with 3 features into 256 latents
    input_adapter={"type": "features", "input_channels": 3, "index_dims": [None], "num_bands": 16, "max_resolution": [1_000_000]},
    num_latents=256, latent_channels=256, num_blocks=1, num_self_attends_per_block=2,
    num_self_attention_heads=8, num_cross_attention_heads=1, num_classes=10,
)


def scale_worker(job):
    import keras

    import keras_perceiver as kp

    keras.utils.set_random_seed(0)
    model = kp.Perceiver(SCALE_CONFIG)
    x = np.random.default_rng(0).normal(size=(1, job["length"], 3)).astype("float32")
    model.compile(jit_compile=True)
    compile_s = _timed(lambda: model.predict_on_batch(x))
    times = [_timed(lambda: model.predict_on_batch(x)) for _ in range(job["repeats"])]
    result = dict(
        length=job["length"], backend=keras.backend.backend(), median_s=statistics.median(times), compile_s=compile_s,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    Path(job["out"]).write_text(json.dumps(result))


def scale(lengths, backend="jax", repeats=3, plot_out=None):
    """Time and peak RSS against the input length M, each length in a fresh process."""
    rows = []
    for index, length in enumerate(lengths):
        with tempfile.TemporaryDirectory() as work:
            job = dict(length=length, repeats=repeats, out=os.path.join(work, "r.json"), scale=True)
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            done = subprocess.run([sys.executable, "-m", "keras_perceiver.bench", json.dumps(job)], env=env)
            if done.returncode:
                raise SystemExit(f"bench-scale: M={length} failed under {backend} (exit {done.returncode})")
            rows.append(json.loads(Path(job["out"]).read_text()))
        print(f"[{index + 1}/{len(lengths)}] M={length}: {rows[-1]['median_s']:.3f} s, {rows[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    if plot_out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        ms = [r["length"] for r in rows]
        left.loglog(ms, [r["median_s"] for r in rows], "o-")
        left.set_xlabel("input length M")
        left.set_ylabel("forward time, s")
        right.semilogx(ms, [r["peak_rss_mb"] for r in rows], "o-")
        right.set_xlabel("input length M")
        right.set_ylabel("peak RSS, MB")
        fig.suptitle(f"Perceiver encoder, 256 latents, {backend} compiled")
        fig.tight_layout()
        fig.savefig(plot_out, dpi=120)
    return rows


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    scale_worker(job) if job.get("scale") else main_worker(job)
