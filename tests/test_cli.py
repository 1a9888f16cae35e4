import os
import subprocess
import sys
from pathlib import Path

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


def _help_of(argv):
    """What `keras-perceiver ARGV --help` prints, in a fresh process under TensorFlow, and
    whether Keras or a backend was imported on the way (printed by the same process)."""
    code = (
        "import contextlib, io, sys\n"
        "from keras_perceiver.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        f"    main({list(argv) + ['--help']!r})\n"
        "print(out.getvalue())\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text, imported = done.stdout.rstrip().rsplit("\n", 1)
    return text, imported


def test_help_imports_no_backend():
    for argv in ([], ["export"], ["bench"], ["demo"]):
        text, imported = _help_of(argv)
        assert text.startswith("usage: keras-perceiver"), text[:200]
        assert imported == "[]", (argv, imported)


def test_the_help_command_runs():
    # the installed `keras-perceiver` script beside this Python, else the module
    script = Path(sys.executable).with_name("keras-perceiver")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "keras_perceiver"]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([*command, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "export" in done.stdout and "bench-report" in done.stdout


def test_help_lists_the_commands_and_hides_the_worker():
    text, _ = _help_of([])
    assert "==SUPPRESS==" not in text and "demo-worker" not in text
    for command in ("demo", "zoo", "convert", "export", "bench", "bench-report", "bench-bound", "bench-profile", "bench-scale"):
        assert f"\n    {command} " in text, command


def test_subcommand_help_lists_choices_and_defaults():
    from keras_perceiver.cli import build_parser
    from keras_perceiver.converters.artefacts import QUANTIZE, ROUTES

    export, _ = _help_of(["export"])
    flat = " ".join(export.split())
    assert f"targets among {','.join(ROUTES)}" in flat
    for target, options in QUANTIZE.items():
        assert f"{target}: {', '.join(options)}" in flat
    assert "(default: coreml,openvino,tflite,onnx)" in flat
    bench = " ".join(_help_of(["bench"])[0].split())
    assert "modes among eager,compiled" in bench and "(default: eager,compiled)" in bench
    assert "(default: perceiver_digits)" in bench and "(default: 1)" in bench
    # every argument of every command, hidden ones included, says what it is
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)


def test_calibration_data_that_is_not_an_npz_of_arrays_is_refused(tmp_path, capsys):
    import numpy as np
    import pytest

    from keras_perceiver.cli import main

    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8, 1), "float32"))
    base = ["export", "perceiver_digits", "--to", "openvino", "--quantize", "int8", "--out", str(tmp_path / "out")]
    for name, received in (("missing.npz", "which does not exist"), ("x.npy", "received the array file")):
        with pytest.raises(SystemExit) as stop:
            main([*base, "--calibration-data", str(tmp_path / name)])
        error = capsys.readouterr().err
        assert stop.value.code == 2, error
        assert "--calibration-data: expected an .npz file of input arrays; received" in error and received in error, error
    assert not (tmp_path / "out").exists()
