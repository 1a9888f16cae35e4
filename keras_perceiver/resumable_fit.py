"""What makes a `finetune` run resumable at the batch after its last backup: batches drawn
from (seed, epoch) alone, the rest of an interrupted epoch, a backup that records the
position and the metrics' states, the best epoch's weights, and the record of the call
(its fingerprint) that a resumed run must repeat."""

import json
import math
import os
import shutil
from pathlib import Path

import keras
import numpy as np

BACKUP_TAG = ".kp-backup"


def steps_per_epoch(data):
    """Batches per epoch of a PyDataset or a finite tf.data.Dataset."""
    if isinstance(data, keras.utils.PyDataset):
        return len(data)
    cardinality = int(data.cardinality())
    if cardinality < 1:
        raise ValueError(f"data: expected a finite, non-empty tf.data.Dataset; received cardinality {cardinality}")
    return cardinality


class EpochBatches(keras.utils.PyDataset):
    """Arrays (x, y[, sample weights]; x may be a dict) as one epoch of batches, shuffled by a
    permutation drawn from (seed, epoch) alone: a resumed run sees the batches an
    uninterrupted one does (Keras' own shuffle draws from a global generator, whose state a
    restarted process does not have). `EpochOf` sets `epoch` as each epoch begins.

    multiple_of: the number of devices a batch is split over; the last batch is cut to a
    multiple of it (those few examples sit that epoch out; each epoch others)."""

    def __init__(self, arrays, batch_size, seed, multiple_of=1):
        super().__init__()
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        count = len(arrays[1])
        self.used = count - (count % batch_size) % multiple_of
        if self.used == 0:
            raise ValueError(
                f"data: expected at least {multiple_of} training examples, one per data-parallel device; received {count}"
            )
        self.epoch, self._order = 0, (None, None)

    def __len__(self):
        return math.ceil(self.used / self.batch_size)

    def __getitem__(self, index):
        epoch, order = self._order
        if epoch != self.epoch:
            epoch, order = self.epoch, np.random.default_rng((self.seed, self.epoch)).permutation(len(self.arrays[1]))
            self._order = epoch, order  # one assignment: Keras may read batches from a prefetch thread
        rows = order[index * self.batch_size: min((index + 1) * self.batch_size, self.used)]
        return keras.tree.map_structure(lambda array: array[rows], self.arrays)


class EpochOf(keras.callbacks.Callback):
    """Tells an `EpochBatches` which epoch begins (a resumed run starts at a later one)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


class StepByStep(keras.callbacks.Callback):
    """Waits for each step's results before the next step is dispatched. Over several CPU
    devices (simulated, XLA_FLAGS=--xla_force_host_platform_device_count) XLA's collectives
    deadlock when many steps are in flight (jaxlib 0.10: three in four epochs of 190 steps hung
    here); on GPUs and TPUs steps stay asynchronous."""

    def on_train_batch_end(self, batch, logs=None):
        for value in (logs or {}).values():
            np.asarray(value)

    on_test_batch_end = on_train_batch_end


def on_cpu_devices(distribution):
    return distribution is not None and all(
        str(device).lower().startswith("cpu") for device in distribution.device_mesh.devices.flatten()
    )


class RestOfEpoch(keras.utils.PyDataset):
    """The batches of a PyDataset from `first` on: the rest of an epoch a kill interrupted."""

    def __init__(self, dataset, first):
        # the wrapped dataset's loading options: its workers still read the rest of the epoch
        super().__init__(workers=dataset.workers, use_multiprocessing=dataset.use_multiprocessing,
                         max_queue_size=dataset.max_queue_size)
        self.dataset, self.first = dataset, first

    def __len__(self):
        return len(self.dataset) - self.first

    def __getitem__(self, index):
        return self.dataset[self.first + index]

    def on_epoch_begin(self):
        self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()


def cut_for_devices(arrays, batch_size, multiple_of):
    """Validation arrays less the few examples that would leave the last batch indivisible
    over `multiple_of` devices."""
    count = len(arrays[1])
    keep = count - (count % batch_size) % multiple_of
    if keep == 0:
        raise ValueError(f"validation_split: expected at least {multiple_of} validation examples, one per device; received {count}")
    return arrays if keep == count else keras.tree.map_structure(lambda array: array[:keep], arrays)


def batch_shards(distribution):
    """How many devices a batch is split over: the distribution's batch axis (1 without one)."""
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[list(mesh.axis_names).index(distribution.batch_dim_name)]


def backup_dir(out):
    """Where a run writing `out` keeps its resumable state: beside `out`, not inside it."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}{BACKUP_TAG}"


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that resumes where its backup was taken, even mid-epoch.

    Keras' own restores weights and optimizer and replays the interrupted epoch from its
    first batch, so the batches before the kill train twice. This one records with the
    weights the position in the epoch (the next batch), the step count and the metrics'
    running states, and backs up at each epoch end (after validation and `KeepBest`);
    `finetune` restores it with `restore()` before training, then runs the rest of the
    interrupted epoch (`first_batch` on) and the epochs after it: the steps, weights and
    epoch metrics of an uninterrupted run."""

    def __init__(self, steps_per_epoch, **kwargs):
        super().__init__(**kwargs)
        self.steps_per_epoch = steps_per_epoch
        self.first_batch = 0  # the epoch's batch that this fit's first batch is
        self._next_batch, self._since_backup, self._metrics_to_restore = 0, 0, None

    def restore(self, model):
        """Load the backup into `model` (Keras' loading, falling back to the previous backup
        when the latest is unreadable); returns (epoch, batch) to go on from."""
        self.set_model(model)
        self.position = (0, 0)
        super().on_train_begin()
        return self.position

    def on_train_begin(self, logs=None):
        pass  # restored once, by `restore`, before the first of finetune's fits

    def _load_model(self):
        weights_exist = os.path.exists(self._weights_path)
        if not os.path.exists(self._training_metadata_path):
            if weights_exist and os.path.exists(self._prev_weights_path):  # a kill between the two files of a backup
                raise OSError(f"{self._weights_path} has no record beside it")
            if weights_exist:  # a kill inside the first backup: nothing to resume; its own half is dropped
                os.remove(self._weights_path)
            return
        try:
            state = json.loads(Path(self._training_metadata_path).read_text())
            super()._load_model()
        except (ValueError, KeyError) as error:  # a half-written record or weights file: the previous backup
            raise OSError(f"{self._training_metadata_path}: {error}") from None
        recorded = state.get("steps_per_epoch")  # absent from backups written before it was recorded
        if recorded is not None and recorded != self.steps_per_epoch:
            # its next batch and step count refer to epochs of the recorded length: resumed on
            # these, it would land on another batch
            raise ValueError(
                f"finetune: the backup in {self.backup_dir!r} is of a run with {recorded} steps per epoch; expected "
                f"data and batch_size giving {recorded} steps per epoch, received ones giving {self.steps_per_epoch}. "
                "Re-run with that run's data and batch_size to resume it, or delete the directory to start afresh"
            )
        self.model._initial_epoch = None  # finetune gives each fit its first epoch
        if int(self.model.optimizer.iterations) != state["step"]:  # files of two backups: a kill between the writes
            raise OSError(f"{self._weights_path} is at step {int(self.model.optimizer.iterations)}, its record at {state['step']}")
        self._current_epoch = state["epoch"]
        self.position = (state["epoch"], state["next_batch"])
        self._metrics_to_restore = state["metrics"] if state["next_batch"] else None

    def on_epoch_begin(self, epoch, logs=None):
        if self._metrics_to_restore is not None:  # fit has just reset them: the interrupted epoch's running means
            variables = self.model.metrics_variables
            if len(variables) != len(self._metrics_to_restore):
                raise ValueError(
                    f"finetune: the backup in {self.backup_dir!r} holds {len(self._metrics_to_restore)} metric states; "
                    f"the model has {len(variables)}"
                )
            for variable, value in zip(variables, self._metrics_to_restore):
                variable.assign(np.asarray(value, dtype=variable.dtype))
            self._metrics_to_restore = None

    def on_train_batch_end(self, batch, logs=None):
        self._next_batch = self.first_batch + batch + 1
        self._since_backup += 1
        # the epoch's last batch is backed up at the epoch's end, after validation
        if self._since_backup >= self.save_freq and self._next_batch < self.steps_per_epoch:
            self._save_model()

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch, self._next_batch = epoch + 1, 0
        self._save_model()

    def _save_model(self):
        self._since_backup = 0
        os.makedirs(self.backup_dir, exist_ok=True)
        for latest, previous in ((self._weights_path, self._prev_weights_path),
                                 (self._training_metadata_path, self._prev_training_metadata_path)):
            if self.double_checkpoint and os.path.exists(latest):  # a kill while writing leaves this pair
                shutil.copyfile(latest, previous)
        model = self.model
        model.save_weights(self._weights_path, overwrite=True)
        state = {
            "epoch": self._current_epoch, "next_batch": self._next_batch, "step": int(model.optimizer.iterations),
            "steps_per_epoch": self.steps_per_epoch,
            "metrics": [keras.ops.convert_to_numpy(v).tolist() for v in model.metrics_variables],
        }
        staged = f"{self._training_metadata_path}.staging"
        Path(staged).write_text(json.dumps(state))
        os.replace(staged, self._training_metadata_path)  # whole or absent


class KeepBest(keras.callbacks.Callback):
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


def claim_backup(directory, record_of_call):
    """Refuse a backup another call wrote; record this call's arguments in a new one."""
    record = directory / "finetune.json"
    if record.is_file():
        if json.loads(record.read_text()) != record_of_call:
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
    staged.write_text(json.dumps(record_of_call))
    os.replace(staged, record)  # whole or absent


def fingerprint(preset, arrays, epochs, batch_size, learning_rate, num_classes, freeze, dtype, validation_split, seed,
                 loss=None, metrics=None, from_scratch=False):
    """What a resumed run must share with the one that wrote the backup."""
    if arrays is None:
        data = None
    else:
        import hashlib

        digest = hashlib.sha256()
        for array in arrays:
            for part in ([array[key] for key in sorted(array)] if isinstance(array, dict) else [array]):
                digest.update(np.ascontiguousarray(part).tobytes())
        data = digest.hexdigest()
    return {
        "preset": str(preset), "data_sha256": data, "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "num_classes": num_classes, "freeze": freeze, "dtype": dtype,
        "validation_split": validation_split, "seed": seed, "loss": _described(loss),
        "metrics": [_described(m) for m in metrics] if isinstance(metrics, (list, tuple)) else _described(metrics),
        "from_scratch": from_scratch,
    }


def _described(value):
    """A loss or metric as the fingerprint compares it: a name, or a class and its config
    (never a repr with a memory address, which differs between runs)."""
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "get_config"):
        return [type(value).__name__, json.loads(json.dumps(value.get_config(), default=str))]
    return getattr(value, "__qualname__", type(value).__name__)


def fit_from(model, position, fit_data, epochs, resumable, **fit_options):
    """`model.fit` from `position` (epoch, batch) on: the rest of an interrupted epoch in a
    fit of its own (Keras runs whole epochs), then the epochs after it; one History of both."""
    epoch, batch = position
    runs = []
    if batch:
        data = fit_data["x"]
        tf_data = hasattr(data, "cardinality")
        rest = data.skip(batch) if tf_data else RestOfEpoch(data, batch)
        if keras.backend.backend() == "tensorflow":
            # TensorFlow builds the compiled metrics when it traces the first step (JAX and PyTorch
            # before fit's first callback): build them on one batch, for the backup to set the
            # interrupted epoch's running states
            first_batch = next(iter(rest)) if tf_data else rest[0]
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(first_batch))
            y_pred = model(x, training=False)
            model.compute_loss(x, y, y_pred, sample_weight, training=False)
            model.compute_metrics(x, y, y_pred, sample_weight)
        resumable.first_batch = batch
        runs.append(model.fit(**{**fit_data, "x": rest}, initial_epoch=epoch, epochs=epoch + 1, **fit_options))
        resumable.first_batch = 0
        epoch += 1
    if (epoch < epochs or not runs) and not (runs and model.stop_training):  # a callback's stop holds
        runs.append(model.fit(**fit_data, initial_epoch=epoch, epochs=epochs, **fit_options))
    history = runs[-1]
    if len(runs) == 2:
        first = runs[0]
        history.epoch = first.epoch + history.epoch
        history.history = {key: first.history.get(key, []) + values for key, values in history.history.items()}
    return history
