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

from keras_perceiver import PerceiverIO, PerceiverResampler
from keras_perceiver.examples import SMALL_MODELS, build_small, example_inputs

WORKER = Path(__file__).with_name("cross_backend_worker.py")
CYCLE = ("jax", "tensorflow", "torch")
NEXT = CYCLE[(CYCLE.index(keras.backend.backend()) + 1) % len(CYCLE)]


def random_masked_models(count, seed=0):
    """{name: (model, inputs)}: random small resamplers and Perceiver IO models with random
    masks (a fully masked item included) and NaN at every masked-out position."""
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(count):
        heads = int(rng.choice([1, 2, 4]))
        if i % 2 == 0:
            model = PerceiverResampler(
                dim=int(rng.choice([16, 24])), depth=int(rng.integers(1, 3)), num_heads=heads,
                head_channels=int(rng.choice([4, 8])), num_latents=int(rng.integers(1, 6)), use_media_mask=True,
            )
            shape = (int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 9)))
            mask = rng.random(shape) < 0.6
            mask[0, 0, 0] = False  # one media item with no real token
            media = rng.normal(size=shape + (model.config.dim,)).astype("float32")
            media[~mask] = np.nan
            inputs = {"media": media, "media_mask": mask}
        else:
            channels = heads * int(rng.choice([4, 8]))
            model = PerceiverIO(
                input_adapter={"type": "tokens", "vocab_size": 50, "channels": channels, "max_positions": 16},
                num_latents=int(rng.integers(1, 6)), latent_channels=channels, num_blocks=1,
                num_self_attends_per_block=int(rng.integers(1, 3)), num_self_attention_heads=heads,
                num_cross_attention_heads=heads, output_queries={"type": "learned", "num_queries": 3, "channels": channels},
                output_channels=50, use_input_mask=True,
            )
            shape = (int(rng.integers(1, 4)), int(rng.integers(1, 17)))
            mask = rng.random(shape) < 0.6
            mask[0] = False
            inputs = {"token_ids": rng.integers(0, 50, size=shape).astype("int32"), "input_mask": mask}
        cases[f"random_{i}"] = (model, inputs)
    return cases


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("parity")
    keras.utils.set_random_seed(0)
    cases = {name: (build_small(name), None) for name in SMALL_MODELS} | random_masked_models(6)
    for name, (model, inputs) in cases.items():
        inputs = inputs or example_inputs(model, seed=1)
        model.save(directory / f"{name}.keras")
        np.savez(directory / f"{name}_inputs.npz", **inputs)
        expected = to_numpy(model(inputs))
        assert np.isfinite(expected).all(), name
        np.save(directory / f"{name}_expected.npy", expected)
    return directory, sorted(cases)


def test_outputs_agree_on_the_next_backend(saved_models):
    """Every small family, and random masked configurations (NaN at masked positions)."""
    directory, names = saved_models
    other = NEXT
    env = dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(directory), *names], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == set(names)
    for name, error in errors.items():
        assert error["backend"] == other
        assert error["max_abs"] <= 1e-5, f"{name}: {keras.backend.backend()} -> {other} differs by {error['max_abs']}"
