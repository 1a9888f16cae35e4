"""Fine-tune a preset: `finetune(preset, data, out=...)` and `keras-perceiver finetune`.

A Perceiver classifier trains with sparse categorical cross-entropy on its logits and reports
accuracy; any other model takes `loss` (and `metrics`). A new `num_classes` gets a fresh
head ("logits") and every other weight from the preset. AdamW with a linear warm-up over the
first 10% of the steps, then cosine decay.

Resuming: the training state (weights, optimizer, epoch) is backed up every
`backup_every_steps` steps into `.<out name>.kp-backup` beside `out` (not inside it: `out`
stays absent, or the user's old preset, until the final `save_to_preset` swaps the new one in
atomically). Re-running the same call after a kill resumes from the last backup; the
interrupted epoch is run again from its first batch, starting from the backed-up weights,
with the optimizer's step counter set back to that epoch's start, so that the schedule and
the total number of steps match an uninterrupted run. The backup is removed when training
ends. A backup written by a different call (other arguments or data) is refused.
"""

import json
import math
import os
import shutil
from pathlib import Path

import keras
import numpy as np

import keras_perceiver.models  # noqa: F401 (registers the classes a preset names)
from keras_perceiver import presets
from keras_perceiver.storage import check_target

FREEZE_CHOICES = (None, "head")  # "head": train the head only, everything else frozen
DTYPE_CHOICES = (None, "float32", "mixed_bfloat16", "mixed_float16")
BACKUP_TAG = ".kp-backup"
HEAD_LAYER = "logits"  # the Perceiver classifier's head


# ------------------------------------------------------------------------ the model
def is_classifier(model):
    """A Perceiver classifier: trained on integer labels with its 'logits' head."""
    from keras_perceiver.models import Perceiver

    return isinstance(model, Perceiver)


def load_model(preset, num_classes=None, dtype=None):
    """The preset's model; with a `num_classes` other than the preset's, a new model with
    that head whose every other weight is copied from the preset (matched by variable path)."""
    overrides = {"dtype": dtype} if dtype else {}
    loaded = presets.from_preset(preset, **overrides)
    if num_classes is None or num_classes == getattr(loaded.config, "num_classes", None):
        return loaded
    if not is_classifier(loaded):
        raise ValueError(
            f"num_classes: only a Perceiver classifier has a class head; received num_classes={num_classes} "
            f"for a {type(loaded).__name__}"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2; received {num_classes!r}")
    fresh = presets.from_preset(preset, load_weights=False, num_classes=num_classes, name=loaded.name, **overrides)
    trained = {v.path: v for v in loaded.weights}
    for variable in fresh.weights:
        if variable.path.startswith(HEAD_LAYER + "/"):
            continue  # the new head keeps its fresh initialisation
        if variable.path not in trained or tuple(trained[variable.path].shape) != tuple(variable.shape):
            raise ValueError(f"num_classes: the preset has no weight matching {variable.path!r} {tuple(variable.shape)}")
        variable.assign(trained[variable.path])
    return fresh


def head_layer(model):
    """The layer `freeze="head"` leaves trainable: a classifier's 'logits', else the last
    layer with weights."""
    if is_classifier(model):
        return model.get_layer(HEAD_LAYER)
    return [layer for layer in model.layers if layer.weights][-1]


def apply_freeze(model, freeze):
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze: expected one of {list(FREEZE_CHOICES)}; received {freeze!r}")
    if freeze == "head":
        head = head_layer(model)
        for layer in model.layers:
            layer.trainable = layer is head


# ------------------------------------------------------------------------ the data
def _input_shape(model):
    """(name of the input arrays go to, its shape less the batch axis)."""
    name = getattr(model, "primary_input", None)
    if name is not None:
        return name, tuple(model.named_inputs[name].shape[1:])
    return None, tuple(model.inputs[0].shape[1:])


def _images_from_directory(path, model):
    """An image folder (one sub-folder per class, `image_dataset_from_directory` layout) as
    arrays in [0, 1], resized to the model's input size."""
    _, shape = _input_shape(model)
    if len(shape) != 3 or None in shape[:2] or shape[2] not in (1, 3, 4):
        raise ValueError(f"data: an image folder needs a model with (height, width, 1|3|4) inputs; received {shape}")
    color = {1: "grayscale", 3: "rgb", 4: "rgba"}[shape[2]]
    dataset = keras.utils.image_dataset_from_directory(
        path, image_size=shape[:2], color_mode=color, batch_size=None, shuffle=False, verbose=False
    )
    xs, ys = [], []
    for image, label in dataset.as_numpy_iterator():
        xs.append(image)
        ys.append(label)
    if not xs:
        raise ValueError(f"data: the image folder {str(path)!r} holds no images")
    return np.stack(xs).astype("float32") / 255.0, np.asarray(ys)


def read_data(data, model):
    """`data` (an .npz path with x and y, or an image folder) -> (x, y) arrays."""
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or directory: {str(path)!r}")
    if path.is_dir():
        return _images_from_directory(path, model)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"data: expected an .npz file with x and y, or an image folder; received the array file {str(path)!r}")
        with loaded as arrays:
            missing = [key for key in ("x", "y") if key not in arrays.files]
            if missing:
                raise ValueError(f"data: {str(path)!r} must hold arrays 'x' and 'y'; missing {missing} (holds {arrays.files})")
            return arrays["x"], arrays["y"]
    except (OSError, EOFError) as error:  # not a readable .npz (NumPy's ValueError passes through)
        raise ValueError(f"data: expected an .npz file with x and y, or an image folder; {str(path)!r}: {error}") from None


def check_arrays(x, y, model, classifier):
    """Refuse data that cannot train `model` before any step runs."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"data: x and y must be arrays of examples; received shapes {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError(f"data: expected at least one example; received x of shape {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"data: x and y must have the same length; received {len(x)} examples and {len(y)} labels")
    name, shape = _input_shape(model)
    if x.ndim != len(shape) + 1 or any(e is not None and e != r for e, r in zip(shape, x.shape[1:])):
        shown = tuple("None" if e is None else e for e in shape)
        raise ValueError(f"data: x must have shape (N, {', '.join(map(str, shown))}) for input {name!r}; received {x.shape}")
    if classifier:
        num_classes = model.config.num_classes
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))
        )):
            raise ValueError(f"data: y must be integer class labels of shape (N,); received {y.dtype} of shape {y.shape}")
        if y.min() < 0 or y.max() >= num_classes:  # before the cast: int64 labels past 2**31 would wrap
            raise ValueError(
                f"data: labels must lie in [0, {num_classes}) (num_classes={num_classes}); "
                f"received labels from {y.min()} to {y.max()}"
            )
        y = y.astype("int32")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype("float32")  # float64 arrays would be cast on every step
    return x, y


def split(x, y, validation_split, seed):
    """(train, validation or None): a seeded shuffle, then the last fraction held out."""
    if validation_split == 0:
        return (x, y), None
    order = np.random.default_rng(seed).permutation(len(x))
    held = int(round(len(x) * validation_split))
    if held < 1 or held >= len(x):
        raise ValueError(
            f"validation_split: {validation_split} of {len(x)} examples leaves no training or no validation example"
        )
    train, valid = order[:-held], order[-held:]
    return (x[train], y[train]), (x[valid], y[valid])


def _steps_per_epoch(data, batch_size):
    """Batches per epoch of arrays (an int), a PyDataset or a finite tf.data.Dataset."""
    if isinstance(data, tuple):
        return math.ceil(len(data[0]) / batch_size)
    if isinstance(data, keras.utils.PyDataset):
        return len(data)
    cardinality = int(data.cardinality())
    if cardinality < 1:
        raise ValueError(f"data: expected a finite, non-empty tf.data.Dataset; received cardinality {cardinality}")
    return cardinality


# ------------------------------------------------------------------------ resuming
def backup_dir(out):
    """Where a run writing `out` keeps its resumable state: beside `out`, not inside it."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}{BACKUP_TAG}"


class _ResumableBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that, on resuming an epoch, sets the step counter back to the
    epoch's first step (Keras replays that epoch from its first batch) and keeps counting
    epochs from there (Keras starts its count at 0 on every run)."""

    def __init__(self, steps_per_epoch, **kwargs):
        super().__init__(**kwargs)
        self.steps_per_epoch = steps_per_epoch

    def _load_model(self):
        super()._load_model()
        if os.path.exists(self._training_metadata_path):
            epoch = json.loads(Path(self._training_metadata_path).read_text())["epoch"]
            self._current_epoch = epoch
            self.model.optimizer.iterations.assign(epoch * self.steps_per_epoch)


class _KeepBest(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest `monitor`, in memory and in the backup
    directory (so a resumed run still knows the best epoch before the kill)."""

    def __init__(self, monitor, directory):
        super().__init__()
        self.monitor, self.directory = monitor, Path(directory)
        self.best, self.weights = math.inf, None

    def on_train_begin(self, logs=None):
        saved = self.directory / "best.npz"
        if saved.is_file():
            with np.load(saved) as arrays:
                self.best = float(arrays["best"])
                self.weights = [arrays[f"w{i}"] for i in range(len(arrays.files) - 1)]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not value < self.best:
            return
        self.best, self.weights = float(value), self.model.get_weights()
        self.directory.mkdir(parents=True, exist_ok=True)
        staged = self.directory / "best.staging.npz"
        np.savez(staged, best=self.best, **{f"w{i}": w for i, w in enumerate(self.weights)})
        os.replace(staged, self.directory / "best.npz")


def _claim_backup(directory, fingerprint):
    """Refuse a backup another call wrote; record this call's arguments in a new one."""
    record = directory / "finetune.json"
    if record.is_file():
        if json.loads(record.read_text()) != fingerprint:
            raise ValueError(
                f"finetune: {str(directory)!r} holds the backup of a run with other arguments or data; "
                "re-run that call to resume it, or delete the directory to start over"
            )
        return
    if directory.exists():
        if {p.name for p in directory.iterdir()} - {"finetune.json.staging"}:
            raise ValueError(f"finetune: {str(directory)!r} exists and is not a finetune backup; expected a new path")
        shutil.rmtree(directory)  # a run killed before it recorded itself
    directory.mkdir(parents=True)
    staged = directory / "finetune.json.staging"
    staged.write_text(json.dumps(fingerprint))
    os.replace(staged, record)  # whole or absent


def _fingerprint(preset, arrays, epochs, batch_size, learning_rate, num_classes, freeze, dtype, validation_split, seed,
                 loss=None, metrics=None):
    """What a resumed run must share with the one that wrote the backup."""
    if arrays is None:
        data = None
    else:
        import hashlib

        digest = hashlib.sha256()
        for array in arrays:
            digest.update(np.ascontiguousarray(array).tobytes())
        data = digest.hexdigest()
    return {
        "preset": str(preset), "data_sha256": data, "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "num_classes": num_classes, "freeze": freeze, "dtype": dtype,
        "validation_split": validation_split, "seed": seed, "loss": _described(loss),
        "metrics": [_described(m) for m in metrics] if isinstance(metrics, (list, tuple)) else _described(metrics),
    }


def _described(value):
    """A loss or metric as the fingerprint compares it: a name, or a class and its config
    (never a repr with a memory address, which differs between runs)."""
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "get_config"):
        return [type(value).__name__, json.loads(json.dumps(value.get_config(), default=str))]
    return getattr(value, "__qualname__", type(value).__name__)


# ------------------------------------------------------------------------ finetune
def _check_arguments(epochs, batch_size, learning_rate, validation_split, dtype, backup_every_steps):
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("backup_every_steps", backup_every_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive integer; received {value!r}")
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate: expected a positive number; received {learning_rate!r}")
    if not isinstance(validation_split, (int, float)) or not 0 <= validation_split < 1:
        raise ValueError(f"validation_split: expected a number in [0, 1); received {validation_split!r}")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype: expected one of {list(DTYPE_CHOICES)}; received {dtype!r}")


def optimizer_for(learning_rate, total_steps):
    """AdamW: linear warm-up from 0 over the first 10% of the steps (at least 1), then cosine decay."""
    warmup = max(1, total_steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup), warmup_target=learning_rate, warmup_steps=warmup
    )
    return keras.optimizers.AdamW(learning_rate=schedule)


def finetune(
    preset, data=None, x=None, y=None, *, out=None, epochs=1, batch_size=32, learning_rate=1e-3, num_classes=None,
    freeze=None, dtype=None, validation_split=0.0, seed=0, loss=None, metrics=None, model_parallel=1,
    overwrite=False, backup_every_steps=20, verbose="auto", callbacks=(),
):
    """Fine-tune `preset` (a zoo name or preset directory) and return `(model, history)`.

    data: a path to an `.npz` holding `x` and `y`, an image folder (one sub-folder per
    class; resized to the model's input size, scaled to [0, 1]), or a `tf.data.Dataset` /
    `keras.utils.PyDataset` of (x, y) batches; or give NumPy arrays as `x` and `y`.
    num_classes: a new class count (a fresh head, every other weight from the preset).
    freeze: None (train everything) or "head" (train only the head). dtype: None, "float32",
    "mixed_bfloat16" or "mixed_float16". validation_split: the fraction of array data held
    out (seeded shuffle). loss / metrics: needed for any model but a Perceiver classifier.
    out: where the best model (lowest validation loss, else training loss, at an epoch end)
    is written with `save_to_preset`; an existing `out` is replaced only with `overwrite` and
    only when keras_perceiver wrote it. With `out`, a killed run resumes when re-run (see
    the module docstring). model_parallel: see `keras_perceiver.distribution.distribution_for`.
    callbacks: more Keras callbacks for `fit`.
    """
    from keras_perceiver.distribution import distribution_for

    _check_arguments(epochs, batch_size, learning_rate, validation_split, dtype, backup_every_steps)
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze: expected one of {list(FREEZE_CHOICES)}; received {freeze!r}")
    if (data is None) == (x is None):
        raise ValueError("finetune: expected `data` or `x` and `y`; received " + ("both" if x is not None else "neither"))
    if x is not None and y is None:
        raise ValueError("finetune: `x` needs its labels `y`; received y=None")
    given_loss, given_metrics = loss, metrics  # as the caller gave them: what a resumed run must repeat
    protected = [data] if isinstance(data, (str, os.PathLike)) else []
    if out is not None:
        out = check_target(out, "finetune", overwrite, presets.is_preset_directory, sources=protected)  # before any training
    keras.utils.set_random_seed(seed)

    distribution = distribution_for(presets.preset_class(preset), model_parallel)
    previous = keras.distribution.distribution()
    if distribution is not None:
        keras.distribution.set_distribution(distribution)
    try:
        model = load_model(preset, num_classes, dtype)
        classifier = is_classifier(model)
        if loss is None and not classifier:
            raise ValueError(f"loss: a {type(model).__name__} needs a loss (only a Perceiver classifier has a default); received None")
        apply_freeze(model, freeze)

        arrays = None
        if isinstance(data, (str, os.PathLike)):
            x, y = read_data(data, model)
        elif data is not None and not isinstance(data, keras.utils.PyDataset) and not hasattr(data, "cardinality"):
            raise ValueError(
                "data: expected a path (.npz or image folder), a tf.data.Dataset or a keras.utils.PyDataset "
                f"(arrays go in x= and y=); received {type(data).__name__}"
            )
        if x is not None:
            arrays = check_arrays(x, y, model, classifier)
            train, valid = split(*arrays, validation_split, seed)
            name = getattr(model, "primary_input", None)
            feed = (lambda a: {name: a}) if name else (lambda a: a)  # named input of our models
            fit_data = {"x": feed(train[0]), "y": train[1], "batch_size": batch_size, "shuffle": True}
            if valid is not None:
                fit_data["validation_data"] = (feed(valid[0]), valid[1])
            steps = _steps_per_epoch(train, batch_size)
        else:
            if validation_split:
                raise ValueError("validation_split: only array data is split; pass a validation set in the dataset's stead")
            fit_data = {"x": data}
            steps = _steps_per_epoch(data, batch_size)

        optimizer = optimizer_for(learning_rate, epochs * steps)
        if dtype == "mixed_float16":  # our models set the policy per layer: wrap it here
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        if classifier:
            loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            metrics = ["accuracy"] if metrics is None else metrics
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics)

        callbacks = list(callbacks)
        keep_best = None
        if out is not None:
            backup = backup_dir(out)
            _claim_backup(backup, _fingerprint(
                preset, arrays, epochs, batch_size, learning_rate, num_classes, freeze, dtype, validation_split, seed,
                given_loss, given_metrics,
            ))
            monitor = "val_loss" if "validation_data" in fit_data else "loss"
            keep_best = _KeepBest(monitor, backup)
            callbacks = [
                _ResumableBackup(
                    steps, backup_dir=str(backup), save_freq=backup_every_steps, delete_checkpoint=False,
                    double_checkpoint=True,  # a kill while writing one backup leaves the one before
                ),
                keep_best,
                *callbacks,  # after the backup, so that one raising at a step finds that step backed up
            ]
        history = model.fit(**fit_data, epochs=epochs, callbacks=callbacks, verbose=verbose)
        if out is not None:
            if keep_best.weights is not None:
                model.set_weights(keep_best.weights)
            presets.save_to_preset(model, out, overwrite=overwrite, protected=protected)
            shutil.rmtree(backup_dir(out))  # only once the preset is safely written
    finally:
        if distribution is not None:
            keras.distribution.set_distribution(previous)
    return model, history
