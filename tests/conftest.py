import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_state():
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


def to_numpy(x):
    from keras_perceiver.examples import outputs_to_numpy

    return outputs_to_numpy(x)


def weight(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype="float64")


_SMALL_MODELS = {}


def small_model(name, **overrides):
    """`examples.build_small(name, **overrides)`, built once per test process: for tests that
    feed a model bad inputs (and a few good calls) and never change its weights."""
    from keras_perceiver.examples import build_small

    key = (name, tuple(sorted(overrides.items())))
    if key not in _SMALL_MODELS:
        _SMALL_MODELS[key] = build_small(name, **overrides)
    return _SMALL_MODELS[key]
