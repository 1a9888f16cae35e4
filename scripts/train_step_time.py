"""Training step time of a preset's model on 1 and on N simulated JAX CPU devices.

    KERAS_BACKEND=jax .venv/bin/python scripts/train_step_time.py --preset perceiver_digits --batch-size 64

Each layout runs in its own process (the device count is fixed when JAX starts; on CPU it is
simulated with XLA_FLAGS=--xla_force_host_platform_device_count=N): one device, data-parallel
over N, and model-parallel on an (N / 2, 2) mesh, each the way `finetune` lays it out
(`distribution_for`), with finetune's optimizer. Prints the median of `--steps` timed
`train_on_batch` calls after `--warmup` untimed ones (the first compiles), in ms per step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(preset, batch_size, model_parallel, steps, warmup):
    import keras
    import numpy as np

    from keras_perceiver import presets
    from keras_perceiver.distribution import distribution_for
    from keras_perceiver.examples import example_inputs
    from keras_perceiver.finetuning import optimizer_for

    keras.utils.set_random_seed(0)
    distribution = distribution_for(presets.preset_class(preset), model_parallel)
    keras.distribution.set_distribution(distribution)
    model = presets.from_preset(preset, load_weights=False)
    x = example_inputs(model, batch=batch_size, seed=0)
    outputs = keras.ops.convert_to_numpy(model(x))
    y = np.random.default_rng(0).integers(0, outputs.shape[-1], size=outputs.shape[:-1]).astype("int32")
    model.compile(optimizer=optimizer_for(1e-3, 1000),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _ in range(warmup):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(model.train_on_batch(x, y))  # float(): wait for the step to finish
        times.append(time.perf_counter() - start)
    return {"devices": len(keras.distribution.list_devices()), "model_parallel": model_parallel,
            "ms_per_step": round(1000 * statistics.median(times), 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="perceiver_digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--devices", type=int, default=4, help="the N of the multi-device runs")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: its model_parallel
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.preset, args.batch_size, args.one, args.steps, args.warmup)))
        return 0
    for devices, model_parallel in ((1, 1), (args.devices, 1), (args.devices, 2)):
        env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        command = [sys.executable, __file__, "--preset", args.preset, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--one", str(model_parallel)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-3000:])
            return done.returncode
        print(done.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
