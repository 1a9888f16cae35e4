"""`keras-perceiver bench-scale`: time and peak memory of a Perceiver encoder against its input
length M, each length in a fresh process (`python -m keras_perceiver.benchmarks.scaling JOB`)."""

import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from keras_perceiver.backend_process import run_under_backend
from keras_perceiver.timing import timed

SCALE_CONFIG = dict(  # a Perceiver encoder reading M 1-D points with 3 features into 256 latents
    input_adapter={"type": "features", "input_channels": 3, "index_dims": [None], "num_bands": 16, "max_resolution": [1_000_000]},
    num_latents=256, latent_channels=256, num_blocks=1, num_self_attends_per_block=2,
    num_self_attention_heads=8, num_cross_attention_heads=1, num_classes=10,
)


def scale_worker(job):
    """In a fresh process under one backend: the compiled encoder of `SCALE_CONFIG` at input
    length `job["length"]`, timed; its row written as JSON to `job["out"]`."""
    import keras

    import keras_perceiver as kp

    keras.utils.set_random_seed(0)
    model = kp.Perceiver(SCALE_CONFIG)
    x = np.random.default_rng(0).normal(size=(1, job["length"], 3)).astype("float32")
    model.compile(jit_compile=True)
    compile_s = timed(lambda: model.predict_on_batch(x))
    times = [timed(lambda: model.predict_on_batch(x)) for _ in range(job["repeats"])]
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
            job = dict(length=length, repeats=repeats, out=os.path.join(work, "r.json"))
            done = run_under_backend("keras_perceiver.benchmarks.scaling", [json.dumps(job)], backend)
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
    scale_worker(json.loads(sys.argv[1]))
