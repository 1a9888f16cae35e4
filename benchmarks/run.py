"""`keras-perceiver bench`: latency, compile time, memory and achieved FLOP/s per preset x
backend x mode, against a float32 GEMM peak measured in the same run (`report` merges the
result files).

Each backend runs in its own process (the backend is fixed at import): `run` starts
`python -m keras_perceiver.benchmarks.run JOB` per backend and merges what each writes. Presets are built at their
real sizes with random weights unless they ship weights.
"""

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from keras_perceiver.backend_process import run_under_backend
from keras_perceiver.benchmarks.cells import run_artefacts, run_cells
from keras_perceiver.benchmarks.devices import (
    accelerator_gemm_peaks, accelerators, bfloat16_gemm_peak, device_description, gemm_peaks, highest_peak, jax_gemm_peaks,
    torch_accelerator,
)
from keras_perceiver.benchmarks.peers import run_peers

DTYPES = ("float32", "bfloat16")  # precisions ours and the peers run in, in the order they run


def main_worker(job):
    """In one backend's process (`python -m keras_perceiver.benchmarks.run JOB`): the cells of
    `job` (ours, the artefacts, the peers), each against the peak of the unit and precision it
    runs in, written as one run's JSON to `job["out"]`."""
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
            done = run_under_backend("keras_perceiver.benchmarks.run", [json.dumps(job)], backend)
            if done.returncode:
                raise SystemExit(f"bench: the {backend} run failed (exit {done.returncode})")
            results["runs"].append(json.loads(Path(job["out"]).read_text()))
        elapsed = time.perf_counter() - started
        left = elapsed / (index + 1) * (total - index - 1)
        print(f"[{index + 1}/{total} backends done, about {left:.0f} s left]", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main_worker(json.loads(sys.argv[1]))
