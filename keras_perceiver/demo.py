"""The main job: build each family small, run it eager and compiled on each backend, and
check that weights saved under the first backend give the same outputs on the others."""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from keras_perceiver.backend_process import run_under_backend
from keras_perceiver.timing import timed_runs
from keras_perceiver.text_table import text_table

BACKENDS = ("jax", "tensorflow", "torch")


def _median_ms(fn, repeats):
    return 1000 * statistics.median(timed_runs(fn, repeats))


def worker(workdir, reference, repeats, models=None):
    """Runs under one backend (the process's KERAS_BACKEND); writes results_<backend>.json."""
    import keras

    from keras_perceiver.examples import SMALL_MODELS, build_small, example_inputs, outputs_to_numpy

    workdir = Path(workdir)
    backend = keras.backend.backend()
    rows = []
    for name in models or SMALL_MODELS:
        model_path, inputs_path = workdir / f"{name}.keras", workdir / f"{name}_inputs.npz"
        if reference:
            keras.utils.set_random_seed(0)
            model = build_small(name)
            model.save(model_path)
            inputs = example_inputs(model)
            np.savez(inputs_path, **inputs)
        else:
            model = keras.saving.load_model(model_path)
            inputs = dict(np.load(inputs_path))
        eager_ms = _median_ms(lambda: model(inputs), repeats)
        eager = outputs_to_numpy(model(inputs))
        model.compile(jit_compile=True)
        start = time.perf_counter()
        compiled = outputs_to_numpy(model.predict_on_batch(inputs))
        compile_s = time.perf_counter() - start
        compiled_ms = _median_ms(lambda: model.predict_on_batch(inputs), repeats)
        outputs_path = workdir / f"{name}_outputs.npy"
        if reference:
            np.save(outputs_path, eager)
            parity = 0.0
        else:
            parity = float(np.max(np.abs(eager - np.load(outputs_path))))
        rows.append(
            dict(
                model=name,
                backend=backend,
                params=model.count_params(),
                eager_ms=eager_ms,
                compiled_ms=compiled_ms,
                compile_s=compile_s,
                compiled_vs_eager=float(np.max(np.abs(compiled - eager))),
                parity=parity,
            )
        )
    (workdir / f"results_{backend}.json").write_text(json.dumps(rows))


def run(backends, repeats=10, models=None):
    """Run the worker once per backend (each in its own process); return all rows."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for index, backend in enumerate(backends):
            arguments = ["demo-worker", workdir, "--repeats", str(repeats)]
            if models:
                arguments += ["--models", ",".join(models)]
            if index == 0:
                arguments.append("--reference")
            done = run_under_backend("keras_perceiver", arguments, backend, capture=True)
            if done.returncode:
                sys.stderr.write(done.stdout + done.stderr)
                raise SystemExit(f"demo: the {backend} run failed (exit {done.returncode})")
            rows += json.loads((Path(workdir) / f"results_{backend}.json").read_text())
    return rows


def format_table(rows, first_backend):
    header = (
        "model", "backend", "params", "eager ms", "compiled ms", "compile s",
        "compiled vs eager", f"parity vs {first_backend}",
    )
    return text_table(
        header,
        [
            (
                r["model"], r["backend"], f"{r['params']:,}", f"{r['eager_ms']:.2f}", f"{r['compiled_ms']:.2f}",
                f"{r['compile_s']:.1f}", f"{r['compiled_vs_eager']:.1e}", f"{r['parity']:.1e}",
            )
            for r in rows
        ],
    )
