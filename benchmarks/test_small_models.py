"""pytest-benchmark suite: the small model of each family, eager and compiled, on the
current KERAS_BACKEND. Not part of the test run:

    KERAS_BACKEND=jax .venv/bin/python -m pytest benchmarks -p no:cacheprovider --benchmark-only
"""

import keras
import pytest

from keras_perceiver.examples import SMALL_MODELS, build_small, example_inputs


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_small_model_forward(benchmark, name, mode):
    keras.utils.set_random_seed(0)
    model = build_small(name)
    inputs = example_inputs(model)
    if mode == "compiled":
        model.compile(jit_compile=True)
        model.predict_on_batch(inputs)  # compile outside the timing
        benchmark(model.predict_on_batch, inputs)
    else:
        model(inputs)
        benchmark(lambda: keras.ops.convert_to_numpy(model(inputs)))
    benchmark.extra_info.update(backend=keras.backend.backend(), params=model.count_params())
