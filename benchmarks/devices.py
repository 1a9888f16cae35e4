"""The machine a run measures: its CPU and accelerators, how to wait for them, their memory,
and the GEMM peaks every cell's fraction is measured against.

One sampler makes every peak: `gemm_rate` times a square matrix product built from the same
operands (`square_operands`), best of bursts on the CPU, median on accelerators.
"""

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from keras_perceiver.timing import timed, timed_runs


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


# ---------------------------------------------------------------- GEMM peaks
def square_operands(size):
    """The two float32 (size x size) matrices every peak multiplies (seeded: the same each run)."""
    return tuple(np.random.default_rng(seed).random((size, size), dtype=np.float32) for seed in (0, 1))


def matmul_calls(a, b):
    """{library: a no-argument call of the product a @ b} of NumPy arrays `a`, `b`: NumPy's
    BLAS and, when installed, PyTorch's (oneDNN / MKL) on the same values."""
    calls = {"numpy": lambda: a @ b}
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch"] = lambda: ta @ tb
    except ImportError:
        pass
    return calls


def gemm_products(size=2048):
    """{library: a float32 (size x size) matmul}: NumPy's BLAS and, when installed, PyTorch's
    (oneDNN / MKL)."""
    return matmul_calls(*square_operands(size))


def gemm_rate(product, size, repeats, statistic=min):
    """GFLOP/s of `product`, a no-argument (size x size) matmul that returns once it is done,
    after one warm-up call, over the `statistic` of `repeats` timed calls: the best (`min`) on
    the CPU, a burst at its least disturbed; the `statistics.median` on accelerators."""
    return 2 * size**3 / statistic(timed_runs(product, repeats)) / 1e9


def gemm_peaks(size=2048, repeats=5):
    """Best float32 (size x size) matmul rate, GFLOP/s, of each GEMM library here
    (`gemm_products`; PyTorch's is often faster). The peak a run reports is the best of
    them, so that no library's slower GEMM flatters the fractions."""
    return {library: gemm_rate(product, size, repeats) for library, product in gemm_products(size).items()}


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
    size = 256
    while True:
        a, b = (torch.from_numpy(x).to(torch.bfloat16) for x in square_operands(size))
        if size >= max_size or timed(lambda: a @ b) > 0.05:
            break
        size *= 2
    return gemm_rate(lambda: a @ b, size, repeats)


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
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        try:
            # drawn on the CPU, then moved: MPS has no generator of its own in older PyTorch
            a, b = (torch.from_numpy(x).to(device, getattr(torch, dtype)) for x in square_operands(size))
            (a @ b).sum().item()  # library handles and kernel choice stay out of the timing
        except (RuntimeError, TypeError) as error:
            if dtype == "float32":
                raise
            print(f"bench: no {dtype} GEMM peak on {device}: {error}", file=sys.stderr, flush=True)
            continue
        synchronize(device)
        peaks[dtype] = gemm_rate(lambda: (a @ b, synchronize(device)), size, repeats, statistics.median)
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
            a, b = (jax.device_put(jnp.asarray(x, dtype), device) for x in square_operands(size))
            # the warm-up call compiles
            peaks[dtype] = gemm_rate(lambda: product(a, b).block_until_ready(), size, repeats, statistics.median)
            del a, b
    return peaks


SUSTAINED_WINDOW_S = 0.5  # the stretch over which `sustained_gemm` reports one rate


def sustained_gemm(seconds=10.0, size=2048, window=SUSTAINED_WINDOW_S):
    """{library: [GFLOP/s of each `window`-second stretch]} of the peak's own (size x size)
    product run back to back for `seconds` per library: what the GEMM alone keeps up for as
    long as a large preset's forward lasts, against the best-of-5 bursts the peak is made of."""
    flop = 2 * size**3
    rates = {}
    for library, product in gemm_products(size).items():
        product()
        rates[library], count = [], 0
        start = stretch = time.perf_counter()
        while time.perf_counter() - start < seconds:
            product()
            count += 1
            now = time.perf_counter()
            if now - stretch >= window:
                rates[library].append(flop * count / (now - stretch) / 1e9)
                stretch, count = now, 0
    return rates
