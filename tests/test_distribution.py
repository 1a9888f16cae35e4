"""Data and model parallelism through Keras' distribution API, on 4 simulated CPU devices
(`--xla_force_host_platform_device_count=4`) in a JAX subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_perceiver as kp
from keras_perceiver.distribution import distribution_for

WORKER = Path(__file__).with_name("distribution_worker.py")


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="runs its own JAX process with 4 simulated devices; once, in the KERAS_BACKEND=jax pass",
)
def test_data_and_model_parallel_training_match_one_device():
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, str(WORKER), "idefics_connector"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    one = result["one device"]["losses"]
    assert len(one) == 3 and len(set(one)) == 3  # three different steps
    for mode in ("data parallel", "model parallel"):
        np.testing.assert_allclose(result[mode]["losses"], one, rtol=1e-5)
    layouts = result["model parallel"]["layouts"]
    # kernels really split over the 2-wide model axis; latents and norms whole on each device
    assert layouts["resampler/block_0/attention/q_kernel"] == ["P(None, 'model')", [48, 24]]
    assert layouts["resampler/block_0/attention/out_kernel"] == ["P('model', None)", [24, 48]]
    assert layouts["resampler/block_1/feed_forward/dense_gate/kernel"] == ["P(None, 'model')", [48, 96]]
    assert layouts["resampler/projection/dense_out/kernel"] == ["P('model', None)", [28, 48]]
    assert layouts["resampler/latents"] == ["P(None, None)", [8, 48]]
    assert layouts["resampler/norm/scale"] == ["P(None,)", [48]]


def test_one_device_needs_no_distribution():
    assert distribution_for(kp.PerceiverResampler, devices=["cpu:0"]) is None


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the refusal of the backends Keras cannot distribute")
def test_other_backends_refuse_to_distribute():
    with pytest.raises(ValueError, match="needs KERAS_BACKEND=jax.*received backend"):
        distribution_for(kp.PerceiverResampler, devices=["gpu:0", "gpu:1"])


def test_layout_map_arguments_are_checked():
    with pytest.raises(TypeError, match="device_mesh"):
        kp.PerceiverResampler.get_layout_map("mesh")
    with pytest.raises(ValueError, match="model_parallel: expected a positive integer; received 0"):
        distribution_for(kp.PerceiverResampler, model_parallel=0, devices=["cpu:0"])
    if keras.backend.backend() == "jax":
        mesh = keras.distribution.DeviceMesh(shape=(1,), axis_names=("batch",), devices=keras.distribution.list_devices()[:1])
        with pytest.raises(ValueError, match="model_parallel_dim_name.*received 'model'"):
            kp.Perceiver.get_layout_map(mesh)


def test_visible_devices_on_every_backend():
    from keras_perceiver.distribution import visible_devices

    devices = visible_devices()
    assert devices and all(isinstance(d, str) and ":" in d for d in devices)
    if keras.backend.backend() != "jax" and len(devices) == 1:
        assert distribution_for(kp.PerceiverResampler) is None  # one device: nothing to refuse
