"""Weights saved under this backend must give the same outputs under the next one.

The three CI passes form a cycle (jax -> tensorflow -> torch -> jax), so every backend both
saves and loads; the main job checks jax -> tensorflow and jax -> torch as well.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_perceiver.examples import SMALL_MODELS, build_small, example_inputs

WORKER = Path(__file__).with_name("cross_backend_worker.py")
CYCLE = ("jax", "tensorflow", "torch")
NEXT = CYCLE[(CYCLE.index(keras.backend.backend()) + 1) % len(CYCLE)]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("parity")
    for name in SMALL_MODELS:
        keras.utils.set_random_seed(0)
        model = build_small(name)
        inputs = example_inputs(model, seed=1)
        model.save(directory / f"{name}.keras")
        np.savez(directory / f"{name}_inputs.npz", **inputs)
        np.save(directory / f"{name}_expected.npy", to_numpy(model(inputs)))
    return directory


def test_outputs_agree_on_the_next_backend(saved_models):
    other = NEXT
    env = dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(saved_models), *SMALL_MODELS], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == set(SMALL_MODELS)
    for name, error in errors.items():
        assert error["backend"] == other
        assert error["max_abs"] <= 1e-5, f"{name}: {keras.backend.backend()} -> {other} differs by {error['max_abs']}"
