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
    assert accuracy >= 0.6, accuracy  # measured 0.97 (tensorflow), 0.96 (jax), 0.90 (torch); chance is 0.2


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


def test_a_run_killed_with_sigkill_resumes_to_the_steps_and_weights_of_an_uninterrupted_run(tmp_path, five_digits):
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
    assert int(model.optimizer.iterations) == 3 * 2  # what an uninterrupted run takes
    assert kp.from_preset(str(out)).config.num_classes == 5 and not backup_dir(out).exists()
    # the same seed without a kill: the same batches in the same order, so the same weights,
    # optimizer moments and epoch metrics (the interrupted epoch's too: its running means are restored)
    whole, whole_history = kp.finetune(PRESET, x=x, y=y, out=str(tmp_path / "whole"), **arguments)
    assert whole_history.epoch == [0, 1, 2]
    for resumed, uninterrupted in zip(model.weights + model.optimizer.variables, whole.weights + whole.optimizer.variables):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(resumed), keras.ops.convert_to_numpy(uninterrupted),
                                   rtol=1e-6, atol=1e-7, err_msg=resumed.path)
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(history.history[name], whole_history.history[name][1:], rtol=1e-6, err_msg=name)


def test_a_kill_inside_the_first_backup_starts_afresh(tmp_path, five_digits):
    # killed after step 1's backup; its record then removed: what a kill between the first
    # backup's weights file and its record leaves. No earlier backup exists to fall back to.
    x, y = five_digits[0][:32], five_digits[1][:32]
    data, out = tmp_path / "data.npz", tmp_path / "tuned"
    np.savez(data, x=x, y=y)
    arguments = dict(epochs=1, batch_size=16, num_classes=5, freeze="head", backup_every_steps=1, verbose=0)
    code = _KILL_AT_STEP_3.replace("== 3:", "== 1:").format(preset=PRESET, arguments=arguments)
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code, str(data), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    backup = backup_dir(out)
    assert (backup / "latest.weights.h5").is_file()
    (backup / "training_metadata.json").unlink()
    assert not list(backup.glob("*.bkp"))  # the first backup: none before it
    model, history = kp.finetune(PRESET, x=x, y=y, out=str(out), **arguments)
    assert history.epoch == [0] and int(model.optimizer.iterations) == 2  # the whole run, from its start
    assert kp.from_preset(str(out)).config.num_classes == 5 and not backup.exists()


class _Batches(keras.utils.PyDataset):
    """`count` batches of 8 from `arrays` (x, y), in order."""

    def __init__(self, arrays, count, **kwargs):
        super().__init__(**kwargs)
        self.arrays, self.count = arrays, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return tuple(array[8 * index: 8 * index + 8] for array in self.arrays)


def test_a_backup_is_refused_on_data_of_another_epoch_length(tmp_path):
    # a dataset's contents are not in the fingerprint: the steps per epoch the backup records
    # are what tells another epoch length (its next batch would be another batch)
    from keras_perceiver.examples import build_small

    source, out = tmp_path / "resampler", tmp_path / "tuned"
    kp.save_to_preset(build_small("perceiver_resampler", num_media_embeds=None, max_num_frames=None), source)
    rng = np.random.default_rng(0)
    arrays = rng.normal(size=(32, 1, 1, 6, 64)).astype("float32"), 0.1 * rng.normal(size=(32, 1, 8, 64)).astype("float32")

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations) == 3:
                raise RuntimeError("stopped at step 3")

    arguments = dict(loss="mse", epochs=2, out=out, backup_every_steps=1, verbose=0)
    with pytest.raises(RuntimeError, match="stopped at step 3"):
        kp.finetune(str(source), _Batches(arrays, 4), callbacks=[Stop()], **arguments)
    assert (backup_dir(out) / "training_metadata.json").is_file()  # backed up at step 3, mid-epoch
    with pytest.raises(ValueError, match=r"4 steps per epoch; expected data and batch_size giving 4 steps per epoch, "
                                         r"received ones giving 2\..*delete the directory to start afresh"):
        kp.finetune(str(source), _Batches(arrays, 2), **arguments)
    assert not out.exists() and backup_dir(out).is_dir()  # the backup is kept for the right data
    model, history = kp.finetune(str(source), _Batches(arrays, 4), **arguments)
    assert history.epoch == [0, 1] and int(model.optimizer.iterations) == 2 * 4  # resumed at batch 3
    assert not backup_dir(out).exists()


def test_the_rest_of_an_epoch_keeps_the_datasets_loading_options():
    from keras_perceiver.resumable_fit import RestOfEpoch

    arrays = np.arange(40)[:, None], np.arange(40)
    dataset = _Batches(arrays, 5, workers=3, use_multiprocessing=True, max_queue_size=7)
    rest = RestOfEpoch(dataset, 2)
    assert (rest.workers, rest.use_multiprocessing, rest.max_queue_size) == (3, True, 7)
    assert len(rest) == 3 and np.array_equal(rest[0][1], np.arange(16, 24))  # batch 2 on


def test_npz_data_that_cannot_be_read_is_refused_naming_it(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not an npz")
    with pytest.raises(ValueError, match=r"^data: expected an \.npz file with x and y, or an image folder; "
                                         r"received '.*bad\.npz', not readable as one"):
        kp.finetune(PRESET, bad, verbose=0)


def test_array_batches_follow_the_seed_and_epoch_and_split_over_the_devices():
    from keras_perceiver.resumable_fit import EpochBatches, cut_for_devices

    x, y = np.arange(54, dtype="float32")[:, None], np.arange(54)

    def epoch(batches, number):
        batches.epoch = number
        return [batches[i] for i in range(len(batches))]

    on_four = EpochBatches(({"inputs": x}, y), 16, seed=3, multiple_of=4)
    first = epoch(on_four, 0)
    # 54 = 3 x 16 + 6: the last batch cut to 4, a multiple of the devices
    assert [len(labels) for _, labels in first] == [16, 16, 16, 4]
    labels = np.concatenate([labels for _, labels in first])
    assert len(set(labels)) == 52 and all(np.array_equal(x["inputs"][:, 0], y) for x, y in first)
    # another object (as in a resumed process) gives the same order; the next epoch another
    again = epoch(EpochBatches(({"inputs": x}, y), 16, seed=3, multiple_of=4), 0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    assert not np.array_equal(np.concatenate([labels for _, labels in epoch(on_four, 1)]), labels)
    assert [len(labels) for _, labels in epoch(EpochBatches((x, y), 16, seed=3), 0)] == [16, 16, 16, 6]
    kept = cut_for_devices((x[:18], y[:18]), 16, 4)
    assert len(kept[0]) == len(kept[1]) == 16
    with pytest.raises(ValueError, match="expected at least 4 training examples, one per data-parallel device; received 3"):
        EpochBatches((x[:3], y[:3]), 4, seed=0, multiple_of=4)


def test_from_scratch_trains_the_presets_config_from_fresh_weights(tmp_path, npz):
    out = tmp_path / "scratch"
    assert main(["finetune", PRESET, "--data", str(npz), "--out", str(out), "--from-scratch", "--freeze", "head",
                 "--epochs", "1", "--batch-size", "80"]) == 0
    preset, scratch = kp.from_preset(PRESET), kp.from_preset(str(out))
    assert scratch.config == preset.config
    trained = {v.path: keras.ops.convert_to_numpy(v) for v in preset.weights}
    for variable in scratch.weights:
        if variable.path.endswith("kernel"):  # every kernel freshly drawn (norms start at ones and zeros)
            assert not np.allclose(keras.ops.convert_to_numpy(variable), trained[variable.path]), variable.path


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


# ------------------------------------------------------- masked-byte modelling of a text file
TEXT = "the cat sat on the mat. " * 20 + "and the dog sat too."  # 500 bytes: 15 windows of 32 and one of 20
WINDOW = 32


def _small_language_preset(directory):
    """A byte-level Perceiver IO masked language model with 32-token windows, as a preset directory."""
    from keras_perceiver.layers import TokenInput
    from keras_perceiver.models import LearnedQueries, PerceiverIO

    model = PerceiverIO(dict(
        num_latents=8, latent_channels=32, num_blocks=1, num_self_attends_per_block=1, num_self_attention_heads=2,
        num_cross_attention_heads=1, input_adapter=TokenInput(vocab_size=262, channels=32, max_positions=WINDOW),
        use_input_mask=True, output_queries=LearnedQueries(num_queries=WINDOW, channels=32), decoder_num_heads=1,
        decoder_use_query_residual=False, tie_output_to_input_embedding=True,
    ))
    kp.save_to_preset(model, directory)
    return directory


def test_masked_byte_windows_mask_a_seeded_share_of_the_real_tokens_and_never_padding():
    from keras_perceiver.finetune_data import MASK_ID, PAD_ID, encode_bytes, masked_byte_windows, masked_positions

    assert encode_bytes("aé").tolist() == [ord("a") + 6, 0xC3 + 6, 0xA9 + 6]  # UTF-8 bytes offset by the specials
    tokens = encode_bytes("x" * 100 + "yz" * 50)  # 200 tokens: 3 full windows of 64 and 8 real in the last
    windows = masked_byte_windows(tokens, 64, seed=7)
    ids, real, labels = windows["token_ids"], windows["input_mask"], windows["labels"]
    assert ids.shape == real.shape == labels.shape == (4, 64)
    assert real.sum(axis=1).tolist() == [64, 64, 64, 8]
    np.testing.assert_array_equal(labels[real], tokens)  # labels: the original tokens, in order
    assert np.all(labels[~real] == PAD_ID) and np.all(ids[~real] == PAD_ID)  # padding: never masked
    masked = ids == MASK_ID
    assert masked.sum(axis=1).tolist() == [10, 10, 10, 1]  # round(15% of the real tokens), at least one
    np.testing.assert_array_equal(ids[~masked], labels[~masked])  # every other token as it was
    weights = masked_positions(windows)
    np.testing.assert_array_equal(weights, masked.astype("float32"))
    assert not masked_positions(labels).any()  # a window with no [MASK] counts nothing
    again, other = masked_byte_windows(tokens, 64, seed=7), masked_byte_windows(tokens, 64, seed=8)
    np.testing.assert_array_equal(again["token_ids"], ids)
    assert not np.array_equal(other["token_ids"], ids)


def test_masked_byte_finetuning_on_a_text_file_counts_only_the_masked_positions(tmp_path):
    from keras_perceiver.finetune_data import encode_bytes, masked_byte_windows, masked_positions

    source = _small_language_preset(tmp_path / "language")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    # 16 windows in batches of 8: one batch shape, one compiled step
    model, history = kp.finetune(str(source), str(corpus), out=tmp_path / "tuned", epochs=6, batch_size=8,
                                 learning_rate=1e-2, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert "masked_accuracy" in history.history

    # the compiled loss is the cross-entropy averaged over the masked positions, nothing else
    windows = masked_byte_windows(encode_bytes(TEXT), WINDOW, seed=0)  # finetune's windows (seed 0)
    x = {"token_ids": windows["token_ids"], "input_mask": windows["input_mask"]}
    labels, weights = windows["labels"], masked_positions(windows)
    logits = model.predict(x, batch_size=len(labels), verbose=0).astype("float64")  # (eager JAX compiles op by op)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0][weights > 0].mean()
    result = model.evaluate(x, labels, sample_weight=weights, batch_size=len(labels), return_dict=True, verbose=0)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-4)
    accuracy = np.mean(logits.argmax(-1)[weights > 0] == labels[weights > 0])
    np.testing.assert_allclose(result["masked_accuracy"], accuracy, atol=1e-6)
    unmasked_changed = np.where(weights > 0, labels, (labels + 1) % 262)
    changed = model.evaluate(x, unmasked_changed, sample_weight=weights, batch_size=len(labels), verbose=0,
                             return_dict=True)
    np.testing.assert_allclose(changed["loss"], result["loss"], rtol=1e-6)

    saved = kp.from_preset(str(tmp_path / "tuned"))
    np.testing.assert_allclose(saved.predict(x, batch_size=len(labels), verbose=0), logits, atol=1e-4)


def test_the_command_trains_a_language_preset_on_a_text_file_by_itself(tmp_path, capsys):
    source = _small_language_preset(tmp_path / "language")
    corpus, out = tmp_path / "corpus.txt", tmp_path / "tuned"
    corpus.write_text(TEXT, encoding="utf-8")
    assert main(["finetune", str(source), "--data", str(corpus), "--out", str(out), "--validation-split", "0.25"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out} (PerceiverIO); final epoch: loss ") and "val_masked_accuracy" in last, last
    assert kp.from_preset(str(out)).config.output_queries.num_queries == WINDOW


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not_utf8", "expected a UTF-8 text file; received"),
        ("empty", "expected a text of at least 32 bytes (one window of the model's 32 tokens); received an empty file"),
        ("too_short", "expected a text of at least 32 bytes (one window of the model's 32 tokens); received 31 bytes"),
        ("directory", "takes a UTF-8 text file (or an .npz of token ids x and labels y); received the directory"),
    ],
)
def test_a_bad_text_file_ends_the_command_with_one_line(tmp_path, capsys, case, expected):
    source = _small_language_preset(tmp_path / "language")
    data = tmp_path / "corpus.txt"
    if case == "directory":
        data.mkdir()
    else:
        data.write_bytes({"not_utf8": b"caf\xe9 " * 20, "empty": b"", "too_short": b"a" * 31}[case])
    out = tmp_path / "out"
    code = main(["finetune", str(source), "--data", str(data), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert error[0].startswith("keras-perceiver finetune: error: data: ") and expected in error[0], error[0]
    assert str(data) in error[0]
    if case == "not_utf8":
        assert "byte 0xe9 at offset 3 is not UTF-8" in error[0]
    assert not out.exists() and not backup_dir(out).exists()


# ------------------------------------------------- a class head on a resampler's pooled latents
def _separable_media(count, seed, width=40, tokens=6):
    """Media (count, tokens, width) whose label is the sign of a shift added to every real token,
    and a padding mask (the last two tokens of every third example are padding, set to 1e3)."""
    rng = np.random.default_rng(seed)
    shift = np.where(rng.random(count) < 0.5, -1.0, 1.0)
    media = (rng.normal(size=(count, tokens, width)) + 0.5 * shift[:, None, None]).astype("float32")
    mask = np.ones((count, tokens), bool)
    mask[::3, -2:] = False
    media[~mask] = 1e3  # masked tokens must not reach the logits
    return media, mask, (shift > 0).astype("int32")


def test_a_connector_learns_a_class_head_on_its_pooled_latents_and_reloads(tmp_path):
    from keras_perceiver.examples import build_small

    source = tmp_path / "connector"
    kp.save_to_preset(build_small("idefics_connector", depth=1), source)  # (B, V, 40) media with a mask
    media, mask, labels = _separable_media(96, seed=0)
    np.savez(tmp_path / "train.npz", x=media[:64], mask=mask[:64], y=labels[:64])
    out = tmp_path / "classifier"
    model, history = kp.finetune(str(source), str(tmp_path / "train.npz"), num_classes=2, out=out, epochs=5,
                                 batch_size=16, learning_rate=3e-3, verbose=0)
    assert "accuracy" in history.history and history.history["loss"][-1] < history.history["loss"][0]
    held = {"media": media[64:], "media_mask": mask[64:]}
    logits = model.predict(held, batch_size=32, verbose=0)
    assert logits.shape == (32, 2)
    accuracy = np.mean(logits.argmax(-1) == labels[64:])
    assert accuracy >= 0.8, accuracy  # measured 1.0 (jax); chance is 0.5

    saved = kp.from_preset(str(out))
    assert saved.config.num_classes == 2 and tuple(saved.get_layer("logits").kernel.shape) == (48, 2)
    np.testing.assert_allclose(saved.predict(held, batch_size=32, verbose=0), logits, atol=1e-4)
    original = {v.path: keras.ops.convert_to_numpy(v) for v in kp.from_preset(str(source)).weights}
    assert set(original) == {v.path for v in saved.weights if not v.path.startswith("logits/")}


def test_the_command_trains_a_five_axis_resampler_head_from_rank_3_media(tmp_path, capsys):
    from keras_perceiver.examples import build_small

    source = tmp_path / "resampler"
    kp.save_to_preset(build_small("perceiver_resampler", depth=1), source)  # (B, T, F, V, 64) media, no mask
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "train.npz", x=rng.normal(size=(16, 5, 64)).astype("float32"), y=np.arange(16) % 3)
    out = tmp_path / "classifier"
    argv = ["finetune", str(source), "--data", str(tmp_path / "train.npz"), "--out", str(out), "--batch-size", "16"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "error: num_classes: a PerceiverResampler trains a class head" in error[0], error
    assert main(argv + ["--num-classes", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out} (PerceiverResampler); final epoch: ") and "accuracy" in last, last
    assert kp.from_preset(str(out)).config.num_classes == 3


def test_a_resampler_with_num_classes_keeps_its_config_flops_and_layout():
    from keras_perceiver.examples import build_small
    from keras_perceiver.models import PerceiverResampler

    headless, model = build_small("perceiver_resampler"), build_small("perceiver_resampler", num_classes=5)
    assert model.get_config()["config"]["num_classes"] == 5 and headless.get_config()["config"]["num_classes"] is None
    assert PerceiverResampler.from_config(model.get_config()).get_config() == model.get_config()
    media = np.random.default_rng(0).normal(size=(2, 3, 2, 4, 64)).astype("float32")
    assert model.flops(media) == headless.flops(media) + 2 * 2 * 64 * 5  # the head: batch x 2 x dim x classes
    assert tuple(model.output.shape) == (None, 5)
    # the mean over media items leaves out a media item whose tokens are all masked
    masked = build_small("perceiver_resampler", depth=1, num_classes=5, use_media_mask=True)
    mask = np.ones(media.shape[:-1], bool)
    mask[:, 2] = False
    with_padding = masked.predict({"media": media, "media_mask": mask}, verbose=0)
    without = masked.predict({"media": media[:, :2], "media_mask": mask[:, :2]}, verbose=0)
    np.testing.assert_allclose(with_padding, without, atol=1e-5)
    assert not np.allclose(with_padding, masked.predict({"media": media, "media_mask": np.ones_like(mask)}, verbose=0))
    layouts = model.get_layout_map(keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices=["cpu:0"]))
    assert layouts["logits/kernel"] is None and layouts["logits/bias"] is None  # the head is replicated
    assert layouts["resampler/block_0/attention/q_kernel"] is not None
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 1 or None; received 0"):
        build_small("perceiver_resampler", num_classes=0)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_num_classes", "num_classes: a PerceiverResampler trains a class head on its pooled latents"),
        ("labels_out_of_range", "labels must lie in [0, 2) (num_classes=2); received labels from 0 to 2"),
        ("wrong_width", "x must have shape (N, None, 40) for input 'media'; received (12, 6, 32)"),
        ("wrong_mask", "'media_mask' must be a boolean mask of shape (12, 6) (True = real) to match x; received"),
        ("mask_without_input", "x must hold arrays for the model's inputs ['media']"),
    ],
)
def test_bad_resampler_data_is_refused_before_training(tmp_path, case, expected):
    from keras_perceiver.examples import build_small

    source = tmp_path / "connector"
    kp.save_to_preset(build_small("idefics_connector", depth=1, use_media_mask=case != "mask_without_input"), source)
    media, mask, labels = _separable_media(12, seed=0)
    arrays = {"x": media, "mask": mask, "y": labels}
    if case == "labels_out_of_range":
        arrays["y"] = np.arange(12) % 3
    elif case == "wrong_width":
        arrays["x"] = media[..., :32]
    elif case == "wrong_mask":
        arrays["mask"] = mask[:, :5]
    np.savez(tmp_path / "data.npz", **arrays)
    out = tmp_path / "out"
    num_classes = None if case == "missing_num_classes" else 2
    with pytest.raises(ValueError) as refused:
        kp.finetune(str(source), str(tmp_path / "data.npz"), num_classes=num_classes, out=out, verbose=0)
    assert expected in str(refused.value), str(refused.value)
    assert not out.exists() and not backup_dir(out).exists()
