import os
import subprocess
import sys

import keras

from keras_perceiver.examples import SMALL_MODELS


def test_demo_prints_the_table_for_the_current_backend():
    backend = keras.backend.backend()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-m", "keras_perceiver", "demo", "--backends", backend, "--repeats", "1", "--export-to", ""],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].split(" | ")[0].strip() == "model" and "compile s" in lines[0]
    rows = [line for line in lines if f"| {backend}" in line]
    assert {row.split("|")[0].strip() for row in rows} == set(SMALL_MODELS)


def test_unknown_backend_is_refused():
    done = subprocess.run(
        [sys.executable, "-m", "keras_perceiver", "demo", "--backends", "jax,mxnet"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "received 'mxnet'" in done.stderr
