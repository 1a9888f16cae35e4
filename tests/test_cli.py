import os
import subprocess
import sys

import keras


def test_demo_prints_the_table_for_the_current_backend():
    # one family keeps this test short: it checks the command and its table; test_models
    # (compiled against eager) and test_cross_backend (parity) cover every family
    backend = keras.backend.backend()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    models = ["perceiver_resampler"]  # the smallest
    done = subprocess.run(
        [sys.executable, "-m", "keras_perceiver", "demo", "--backends", backend, "--repeats", "1", "--export-to", "",
         "--models", ",".join(models)],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].split(" | ")[0].strip() == "model" and "compile s" in lines[0]
    rows = [line for line in lines if f"| {backend}" in line]
    assert {row.split("|")[0].strip() for row in rows} == set(models)


def test_unknown_backend_is_refused():
    done = subprocess.run(
        [sys.executable, "-m", "keras_perceiver", "demo", "--backends", "jax,mxnet"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "received 'mxnet'" in done.stderr


def test_bad_bench_batch_is_refused():
    batch = "1,x"
    done = subprocess.run(
        [sys.executable, "-m", "keras_perceiver", "bench", "--batch", batch], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert f"--batch: expected comma-separated positive integers, e.g. 1,8; received {batch!r}" in done.stderr


def test_batch_sizes_are_parsed_and_checked():
    import argparse

    import pytest

    from keras_perceiver.cli import _batches

    assert _batches("1,16") == [1, 16]
    for bad in ("0", "", "2,-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"received {bad!r}"):
            _batches(bad)
