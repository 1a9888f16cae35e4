"""Every public entry point, fed the mistakes a user makes: each gets a clear error (the type
a caller catches, a message naming the argument, what was expected and what was received),
never a silent result, a raw backend traceback or a NaN. The CLI answers with exit code 2
and one line. `test_the_count_of_bad_inputs` prints how many cases ran (the README states it).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import keras_perceiver as kp
from keras_perceiver.cli import main as cli_main
from keras_perceiver.converters import convert_checkpoint, export, export_all
from keras_perceiver.examples import build_small, example_inputs
from keras_perceiver.layers.attention import MultiHeadAttention, attention

from conftest import small_model as model


def inputs(name, **changes):
    """The small model's example inputs with `changes` applied ({name: function(array) -> array})."""
    values = example_inputs(model(name))
    for key, change in changes.items():
        values[key] = change(values[key])
    return values


def call(name, **changes):
    return lambda: model(name)(inputs(name, **changes))


def predict(name, **changes):
    return lambda: model(name).predict(inputs(name, **changes), verbose=0)


def _set(index, value):
    def change(array):
        array = array.copy()
        array[index] = value
        return array

    return change


def _empty_axis(axis):
    return lambda array: np.take(array, [], axis=axis)


def _user_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path


def _broken_preset(tmp_path, edit):
    directory = model("perceiver_resampler").save_to_preset(tmp_path / "preset")
    edit(directory)
    return str(directory)


def _without_class_name(directory):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({"config": config["config"]}))


def _truncated(directory):
    weights = directory / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])


_NAN = float("nan")

# (entry point, what is wrong, function(tmp_path) -> callable, exception, message pattern)
CASES = [
    # ------------------------------------------------------------------ layers
    ("layers", "heads do not divide the width", lambda t: lambda: MultiHeadAttention(3, 8, 8, 8),
     ValueError, r"`qk_channels` must be divisible by num_heads=3; received 8"),
    ("layers", "key mask of rank 4", lambda t: lambda: attention(
        np.zeros((1, 2, 1, 4), "float32"), np.zeros((1, 3, 1, 4), "float32"), np.zeros((1, 3, 1, 4), "float32"),
        key_mask=np.ones((1, 1, 2, 3), bool)), ValueError, r"`key_mask` must have shape \(batch, keys\)"),
    # ------------------------------------------------------------------ models, eager
    ("model", "wrong feature size", lambda t: call("perceiver", inputs=lambda a: a[..., :2]),
     ValueError, r"'inputs' must have shape \(batch, 16, 16, 3\); received \(2, 16, 16, 2\)"),
    ("model", "wrong rank", lambda t: lambda: model("perceiver_resampler")(np.zeros((2, 64), "float32")),
     ValueError, r"'media' must have rank 3"),
    ("model", "mask of another length", lambda t: call("perceiver_io", input_mask=lambda a: a[:, :7]),
     ValueError, r"'input_mask' must have shape \(2, 24\) to match 'token_ids'; received \(2, 7\)"),
    ("model", "missing input", lambda t: lambda: model("perceiver_io")({"input_mask": np.ones((2, 4), bool)}),
     ValueError, r"expected inputs \['input_mask', 'token_ids'\]; received \['input_mask'\]"),
    ("model", "unknown input", lambda t: lambda: model("perceiver_resampler")(
        {"media": np.zeros((1, 3, 64), "float32"), "mask": np.ones((1, 3), bool)}), ValueError, r"expected inputs \['media'\]"),
    ("model", "too many tokens", lambda t: lambda: model("perceiver_io")(example_inputs(model("perceiver_io"), length=129)),
     ValueError, r"max_positions=128"),
    ("model", "token id -1", lambda t: call("perceiver_io", token_ids=_set((0, 0), -1)),
     ValueError, r"'token_ids'.*\[0, 262\).*-1"),
    ("model", "token id = vocab", lambda t: call("perceiver_io", token_ids=_set((1, 3), 262)),
     ValueError, r"'token_ids'.*\[0, 262\).*262"),
    ("model", "batch of 0", lambda t: call("perceiver", inputs=_empty_axis(0), input_mask=_empty_axis(0)),
     ValueError, r"'inputs'.*at least 1"),
    ("model", "zero media tokens", lambda t: call("perceiver_resampler", media=_empty_axis(3)),
     ValueError, r"'media'.*at least 1"),
    ("model", "zero tokens", lambda t: call("perceiver_io", token_ids=_empty_axis(1), input_mask=_empty_axis(1)),
     ValueError, r"'token_ids'.*at least 1"),
    ("model", "output point past the grid", lambda t: call("perceiver_multimodal", image_output_points=_set((0, 0), 128)),
     ValueError, r"'image_output_points' holds indices in \[0, 128\)"),
    ("model", "negative output point", lambda t: call("perceiver_multimodal", audio_output_points=_set((0, 0), -1)),
     ValueError, r"'audio_output_points' holds indices in \[0, \d+\)"),
    ("model", "config of the wrong type", lambda t: lambda: kp.Perceiver(5), ValueError, r"`config` must be a PerceiverConfig"),
    ("model", "unknown config field", lambda t: lambda: build_small("perceiver", num_latent=3),
     ValueError, r"unknown argument\(s\) \['num_latent'\]"),
    ("model", "unknown pooling", lambda t: lambda: build_small("perceiver", pooling="max"), ValueError, r"pooling.*'max'"),
    ("model", "unknown activation", lambda t: lambda: build_small("perceiver", activation="swish"), ValueError, r"activation.*'swish'"),
    # ------------------------------------------------------------------ models, through Keras' loops
    ("predict", "token id -1", lambda t: predict("perceiver_io", token_ids=_set((0, 0), -1)),
     ValueError, r"'token_ids'.*\[0, 262\)"),
    ("predict", "wrong feature size", lambda t: predict("perceiver", inputs=lambda a: a[..., :2]),
     ValueError, r"'inputs' must have shape \(batch, 16, 16, 3\)"),
    ("predict", "zero media tokens", lambda t: predict("perceiver_resampler", media=_empty_axis(3)),
     ValueError, r"'media'.*at least 1"),
    ("evaluate", "token id = vocab", lambda t: lambda: model("perceiver_io").evaluate(
        inputs("perceiver_io", token_ids=_set((0, 0), 262)), np.zeros((2, 128, 262), "float32"), verbose=0),
     ValueError, r"'token_ids'"),
    # ------------------------------------------------------------------ from_preset
    ("from_preset", "unknown name", lambda t: lambda: kp.from_preset("flamingo_resampeler"),
     ValueError, r"Did you mean 'flamingo_resampler'"),
    ("from_preset", "preset without weights", lambda t: lambda: kp.from_preset("flamingo_resampler"),
     ValueError, r"ships no weights and has no public checkpoint"),
    ("from_preset", "structural override with trained weights", lambda t: lambda: kp.from_preset(
        "perceiver_digits", num_cross_attention_heads=2), ValueError, r"\['num_cross_attention_heads'\].*load_weights=False"),
    ("from_preset", "unknown override", lambda t: lambda: kp.from_preset("perceiver_digits", load_weights=False, depht=2),
     ValueError, r"unknown argument\(s\) \['depht'\]"),
    ("from_preset", "a file, not a directory", lambda t: lambda: kp.from_preset(str(_user_directory(t) / "notes.txt")),
     ValueError, r"received the file"),
    ("from_preset", "directory without config.json", lambda t: lambda: kp.from_preset(str(_user_directory(t))),
     ValueError, r"has no config\.json"),
    ("from_preset", "config.json without class_name", lambda t: (lambda path: lambda: kp.from_preset(path))(
        _broken_preset(t, _without_class_name)), ValueError, r"missing \['class_name'\]"),
    ("from_preset", "a class outside the project", lambda t: (lambda path: lambda: kp.from_preset(path))(
        _broken_preset(t, lambda d: (d / "config.json").write_text('{"class_name": "os.system", "config": {}}'))),
     ValueError, r"preset class must be one of"),
    ("from_preset", "truncated weights", lambda t: (lambda path: lambda: kp.from_preset(path))(_broken_preset(t, _truncated)),
     ValueError, r"model\.weights\.h5' is corrupt or truncated"),
    ("from_preset", "not a name", lambda t: lambda: kp.from_preset(3), TypeError, r"received int 3"),
    ("from_preset", "the wrong model class", lambda t: lambda: kp.Perceiver.from_preset("flamingo_resampler", load_weights=False),
     ValueError, r"the preset holds a PerceiverResampler"),
    # ------------------------------------------------------------------ save_to_preset
    ("save_to_preset", "the current directory", lambda t: (os.chdir(_user_directory(t)), lambda: model(
        "perceiver_resampler").save_to_preset(".", overwrite=True))[1], ValueError, r"current directory"),
    ("save_to_preset", "a parent of the current directory", lambda t: (os.chdir(_user_directory(t)), lambda: model(
        "perceiver_resampler").save_to_preset(str(t.parent), overwrite=True))[1], ValueError, r"current directory or one of its parents"),
    ("save_to_preset", "a user's directory", lambda t: lambda: model("perceiver_resampler").save_to_preset(
        _user_directory(t), overwrite=True), ValueError, r"not written by keras_perceiver"),
    ("save_to_preset", "a user's file", lambda t: lambda: model("perceiver_resampler").save_to_preset(
        _user_directory(t) / "notes.txt", overwrite=True), ValueError, r"not written by keras_perceiver"),
    ("save_to_preset", "existing without overwrite", lambda t: lambda: model("perceiver_resampler").save_to_preset(
        _user_directory(t)), FileExistsError, r"exists; pass overwrite=True"),
    ("save_to_preset", "a model that is not ours", lambda t: lambda: kp.save_to_preset(
        __import__("keras").Sequential([__import__("keras").layers.Dense(2)]), t / "p"), TypeError, r"`model` must be one of"),
    # ------------------------------------------------------------------ convert
    ("convert", "missing state dict", lambda t: lambda: convert_checkpoint(str(t / "missing.pt"), t / "out"),
     ValueError, r"does not exist"),
    ("convert", "target holds the source", lambda t: lambda: (
        (t / "ckpt.pt").write_bytes(b"x"), convert_checkpoint(str(t / "ckpt.pt"), t, overwrite=True)),
     ValueError, r"is or holds the source"),
    # ------------------------------------------------------------------ export
    ("export", "unknown target", lambda t: lambda: export("perceiver_digits", "tensorrt", t / "m"),
     ValueError, r"`target` must be one of"),
    ("export", "unknown quantization", lambda t: lambda: export("perceiver_digits", "onnx", t / "m.onnx", quantize="int4"),
     ValueError, r"`quantize` for 'onnx' must be one of \['dynamic_int8'\] or None; received 'int4'"),
    ("export", "a quantization one target lacks", lambda t: lambda: export_all("perceiver_digits", ["onnx", "openvino"], t,
                                                                             quantize="dynamic_int8"),
     ValueError, r"quantize"),
    ("export", "input shapes of the wrong form", lambda t: lambda: export("perceiver_digits", "onnx", t / "m.onnx",
                                                                        input_shapes={"inputs": (0, 8, 8, 1)}),
     ValueError, r"`input_shapes` must be a dict"),
    ("export", "a user's file", lambda t: lambda: export("perceiver_digits", "onnx", _user_directory(t) / "notes.txt",
                                                       overwrite=True), ValueError, r"not written by keras_perceiver"),
    ("export", "existing without overwrite", lambda t: lambda: export("perceiver_digits", "onnx", _user_directory(t) / "notes.txt"),
     FileExistsError, r"exists"),
    ("export", "preset without weights", lambda t: lambda: export("flamingo_resampler", "onnx", t / "m.onnx"),
     ValueError, r"random_weights=True"),
]

# (what is wrong, argv, text the one line holds)
CLI_CASES = [
    ("export: unknown quantization", ["export", "perceiver_digits", "--to", "onnx", "--quantize", "int4", "--out", "{t}"],
     "--quantize"),
    ("export: unknown target", ["export", "perceiver_digits", "--to", "tensorrt", "--out", "{t}"], "--to"),
    ("export: preset without weights", ["export", "flamingo_resampler", "--to", "onnx", "--out", "{t}"], "--random-weights"),
    ("export: unknown preset", ["export", "perceiver_digit", "--to", "onnx", "--out", "{t}"], "Did you mean"),
    ("convert: into the current directory", ["convert", "{t}/ckpt.pt", ".", "--overwrite"], "current directory"),
    ("convert: missing source", ["convert", "{t}/missing.pt", "{t}/out"], "does not exist"),
    ("zoo: unknown option", ["zoo", "--markdwn"], "unrecognized arguments"),
    ("demo: unknown model", ["demo", "--models", "nope"], "--models"),
    ("demo: unknown backend", ["demo", "--backends", "mxnet"], "mxnet"),
    ("bench: unknown preset", ["bench", "--presets", "nope"], "--presets"),
    ("bench: unknown precision", ["bench", "--dtypes", "float16"], "--dtypes"),
    ("bench: bad batch", ["bench", "--batch", "0"], "--batch"),
    ("bench-report: missing file", ["bench-report", "{t}/none.json"], "missing"),
    ("bench-profile: batch 0", ["bench-profile", "perceiver_digits", "--batch", "0"], "--batch"),
    ("unknown command", ["frobnicate"], "invalid choice"),
]


@pytest.fixture
def restore_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


@pytest.mark.parametrize("entry,wrong,make,error,pattern", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_gets_a_clear_error(tmp_path, restore_cwd, entry, wrong, make, error, pattern):
    thunk = make(tmp_path)
    with pytest.raises(error, match=pattern):
        thunk()
    if (tmp_path / "notes.txt").exists():  # a refused write left the user's file alone
        assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("wrong,argv,text", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, wrong, argv, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    try:
        code = cli_main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and text in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"


def test_the_count_of_bad_inputs():
    count = len(CASES) + len(CLI_CASES)
    print(f"bad inputs tried: {count} ({len(CASES)} through the Python API, {len(CLI_CASES)} through the CLI)")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"the suite feeds {count} distinct mistakes" in readme
