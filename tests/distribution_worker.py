"""Run by tests/test_distribution.py in a JAX process with 4 simulated CPU devices: a few
training steps of a small model on one device, data-parallel over 4 and model-parallel on a
2 x 2 mesh, from the same weights on the same batches. Prints one JSON line: per mode the
losses, and for the model-parallel run each variable's sharding spec and shard shape."""

import json
import sys

import keras
import numpy as np

from keras_perceiver.distribution import distribution_for
from keras_perceiver.examples import build_small, example_inputs


def _targets(name, model, inputs, rng):
    outputs = model(inputs)
    if name == "perceiver":
        return rng.integers(0, outputs.shape[-1], size=outputs.shape[:1]).astype("int32"), "sparse_categorical_crossentropy"
    return rng.normal(size=outputs.shape).astype("float32"), "mse"


def run(name, model_parallel, initial, batches):
    keras.distribution.set_distribution(None)
    distribution = distribution_for(type(build_small(name)), model_parallel=model_parallel) if model_parallel else None
    keras.distribution.set_distribution(distribution)
    model = build_small(name)
    model(batches[0][0])
    model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=batches[0][2])
    losses = [float(model.train_on_batch(x, y)) for x, y, _ in batches]
    layouts = {v.path: [str(getattr(v.value.sharding, "spec", "single device")), list(v.value.addressable_shards[0].data.shape)] for v in model.weights}
    keras.distribution.set_distribution(None)
    return losses, layouts


def main(name):
    assert keras.backend.backend() == "jax" and len(keras.distribution.list_devices()) == 4
    keras.utils.set_random_seed(0)
    reference = build_small(name)
    rng = np.random.default_rng(0)
    batches = []
    for step in range(3):
        x = example_inputs(reference, batch=8, seed=step)
        y, loss = _targets(name, reference, x, rng)
        batches.append((x, y, loss))
    initial = reference.get_weights()
    result = {}
    for mode, model_parallel in (("one device", 0), ("data parallel", 1), ("model parallel", 2)):
        losses, layouts = run(name, model_parallel, initial, batches)
        result[mode] = {"losses": losses, "layouts": layouts if mode == "model parallel" else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
