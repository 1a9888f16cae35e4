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


def test_bench_commands_never_overwrite_a_result_file(tmp_path):
    saved = tmp_path / "bench.json"
    saved.write_text("{}")
    commands = [
        ["bench", "--presets", "perceiver_digits", "--out", str(saved)],
        ["bench-bound", "--presets", "perceiver_digits", "--json", str(saved)],
        ["bench-scale", "--lengths", "1000", "--json", str(saved)],
        ["bench-report", str(saved), "--markdown", str(saved)],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "keras_perceiver", *command], capture_output=True, text=True)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert f"expected a new path, or --overwrite to replace it; received existing {saved}" in done.stderr
        assert saved.read_text() == "{}"  # untouched


def test_bench_bound_refuses_an_unknown_preset():
    done = subprocess.run([sys.executable, "-m", "keras_perceiver", "bench-bound", "--presets", "gpt2"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--presets: expected names among" in done.stderr and "received 'gpt2'" in done.stderr
