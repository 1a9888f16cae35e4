"""finetune(): a new head on perceiver_digits, the command, refused data and outputs, resuming."""

import hashlib
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_perceiver as kp
from keras_perceiver.cli import main
from keras_perceiver.finetuning import backup_dir

PRESET = "perceiver_digits"


@pytest.fixture(scope="module")
def five_digits():
    """Digits 0-4 as (x_train, y_train, x_held, y_held): 160 to train on, 300 held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 5
    x = (digits.images[keep] / 16.0).astype("float32")[..., None]
    y = digits.target[keep].astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:160], y[:160], x[160:460], y[160:460]


@pytest.fixture()
def npz(tmp_path, five_digits):
    path = tmp_path / "digits.npz"
    np.savez(path, x=five_digits[0], y=five_digits[1])
    return path


def _tree_digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_a_new_head_on_frozen_digits_weights_learns_held_out_digits(tmp_path, npz, five_digits):
    out = tmp_path / "five"
    # batches of 32 split the 160 examples evenly: one compiled step (JAX compiles one per batch shape)
    model, history = kp.finetune(
        PRESET, str(npz), out=str(out), epochs=3, num_classes=5, freeze="head", learning_rate=1e-2, verbose=0
    )
    assert len(history.history["loss"]) == 3
    assert not backup_dir(out).exists()  # removed once the preset is written
    saved = kp.from_preset(str(out))
    assert tuple(saved.get_layer("logits").kernel.shape) == (64, 5)
    # every weight but the head's is the preset's (copied, then frozen)
    original = {v.path: keras.ops.convert_to_numpy(v) for v in kp.from_preset(PRESET).weights}
    for variable in saved.weights:
        if not variable.path.startswith("logits/"):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), original[variable.path], err_msg=variable.path)
    _, _, x_held, y_held = five_digits
    accuracy = np.mean(np.argmax(saved.predict({"inputs": x_held}, batch_size=len(x_held), verbose=0), axis=-1) == y_held)
    assert accuracy >= 0.6, accuracy  # measured 0.97 (tensorflow), 0.96 (jax), 0.91 (torch); chance is 0.2


def test_the_command_writes_a_preset_and_never_overwrites_it(tmp_path, npz, capsys):
    out = tmp_path / "five"
    argv = ["finetune", PRESET, "--data", str(npz), "--out", str(out), "--num-classes", "5", "--freeze", "head",
            "--epochs", "1", "--batch-size", "64", "--validation-split", "0.2"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out} (Perceiver); final epoch: ") and "val_accuracy" in last
    assert kp.from_preset(str(out)).config.num_classes == 5
    before = _tree_digest(out)
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "exists; pass overwrite=True (--overwrite)" in error[0], error
    assert _tree_digest(out) == before
    with pytest.raises(FileExistsError):
        kp.finetune(PRESET, str(npz), out=str(out), num_classes=5)
    assert _tree_digest(out) == before


@pytest.mark.parametrize(
    "case, expected",
    [
        ("labels_out_of_range", "labels must lie in [0, 5) (num_classes=5); received labels from 0 to 9"),
        ("wrong_shape", "x must have shape (N, 8, 8, 1) for input 'inputs'; received (20, 8, 8)"),
        ("missing_file", "no such file or directory"),
        ("empty", "expected at least one example; received x of shape (0, 8, 8, 1)"),
        ("float_labels", "y must be integer class labels of shape (N,); received float32"),
        ("length_mismatch", "x and y must have the same length; received 20 examples and 19 labels"),
    ],
)
def test_bad_data_ends_the_command_with_one_line(tmp_path, capsys, case, expected):
    x = np.zeros((20, 8, 8, 1), "float32")
    y = np.arange(20) % 5
    arrays = {
        "labels_out_of_range": (x, np.arange(20) % 10),
        "wrong_shape": (x[..., 0], y),
        "empty": (x[:0], y[:0]),
        "float_labels": (x, y.astype("float32") + 0.5),
        "length_mismatch": (x, y[:19]),
    }
    path = tmp_path / "data.npz"
    if case in arrays:
        np.savez(path, x=arrays[case][0], y=arrays[case][1])
    out = tmp_path / "out"
    code = main(["finetune", PRESET, "--data", str(path), "--out", str(out), "--num-classes", "5"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert error[0].startswith("keras-perceiver finetune: error: ") and expected in error[0], error[0]
    if case == "missing_file":
        assert str(path) in error[0]
    assert not out.exists() and not backup_dir(out).exists()  # refused before training


def test_refused_arguments_name_the_choices(five_digits):
    x, y = five_digits[0][:8], five_digits[1][:8]
    with pytest.raises(ValueError, match=r"freeze: expected one of \[None, 'head'\]; received 'body'"):
        kp.finetune(PRESET, x=x, y=y, freeze="body")
    with pytest.raises(ValueError, match=r"validation_split: expected a number in \[0, 1\); received 1.0"):
        kp.finetune(PRESET, x=x, y=y, validation_split=1.0)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        kp.finetune(PRESET, x=x, y=y, dtype="int8")


_KILL_AT_STEP_3 = """
import os, signal, sys
import keras, numpy as np
import keras_perceiver as kp

class Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == 3:
            os.kill(os.getpid(), signal.SIGKILL)

arrays = np.load(sys.argv[1])
kp.finetune({preset!r}, x=arrays["x"], y=arrays["y"], out=sys.argv[2], callbacks=[Kill()], **{arguments!r})
"""


def test_a_run_killed_with_sigkill_resumes_with_the_same_number_of_steps(tmp_path, five_digits):
    # 2 steps per epoch, a backup after each: killed after the second epoch's first step, so the
    # backup is mid-epoch. Only the head trains: its backward pass traces in seconds.
    x, y = five_digits[0][:32], five_digits[1][:32]
    data, out = tmp_path / "data.npz", tmp_path / "resumed"
    np.savez(data, x=x, y=y)
    arguments = dict(epochs=3, batch_size=16, num_classes=5, freeze="head", backup_every_steps=1, verbose=0)
    code = _KILL_AT_STEP_3.format(preset=PRESET, arguments=arguments)
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code, str(data), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not out.exists() and (backup_dir(out) / "latest.weights.h5").is_file()
    with pytest.raises(ValueError, match="holds the backup of a run with other arguments"):
        kp.finetune(PRESET, x=x, y=y, out=str(out), **{**arguments, "epochs": 4})
    model, history = kp.finetune(PRESET, x=x, y=y, out=str(out), **arguments)
    assert history.epoch == [1, 2]  # the first epoch is not run again
    assert int(model.optimizer.iterations) == 3 * 2  # what an uninterrupted run takes (without the step
    # counter set back to the replayed epoch's start it would be 7)
    assert kp.from_preset(str(out)).config.num_classes == 5 and not backup_dir(out).exists()


def test_any_model_with_its_own_loss_from_arrays_or_a_pydataset(tmp_path):
    """The generic path: a resampler preset directory, MSE towards fixed targets, from NumPy
    arrays and from a keras.utils.PyDataset; the loss falls and the result reloads."""
    from keras_perceiver.examples import build_small

    source = tmp_path / "resampler"
    model = build_small("perceiver_resampler", num_media_embeds=None, max_num_frames=None)
    kp.save_to_preset(model, source)
    rng = np.random.default_rng(0)
    media = rng.normal(size=(16, 1, 1, 6, 64)).astype("float32")
    targets = 0.1 * rng.normal(size=(16, 1, 8, 64)).astype("float32")

    tuned, history = kp.finetune(str(source), x=media, y=targets, loss="mse", epochs=4, batch_size=8,
                                 learning_rate=1e-2, out=tmp_path / "tuned", verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kp.from_preset(str(tmp_path / "tuned"))(media[:2])),
                               keras.ops.convert_to_numpy(tuned(media[:2])), atol=1e-6)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return media[8 * index: 8 * index + 8], targets[8 * index: 8 * index + 8]

    _, history = kp.finetune(str(source), Batches(), loss="mse", epochs=2, learning_rate=1e-2,
                             out=tmp_path / "tuned_from_batches", verbose=0)
    assert len(history.history["loss"]) == 2 and kp.from_preset(str(tmp_path / "tuned_from_batches"))
    with pytest.raises(ValueError, match="loss"):
        kp.finetune(str(source), x=media, y=targets, out=tmp_path / "no_loss", verbose=0)


def test_data_of_the_wrong_kind_is_refused_before_training(tmp_path, five_digits):
    x, y = five_digits[0][:20], five_digits[1][:20]
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\).*2147483648"):
        kp.finetune(PRESET, x=x, y=np.where(np.arange(20) == 3, 2**31, 1).astype("int64"), verbose=0)
    with pytest.raises(ValueError, match="data: expected a path.*received ndarray"):
        kp.finetune(PRESET, x, verbose=0)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match="received the array file"):
        kp.finetune(PRESET, tmp_path / "x.npy", verbose=0)
    with pytest.raises(ValueError, match="arrays of examples"):
        kp.finetune(PRESET, x=np.float32(1.0), y=np.int32(1), verbose=0)
