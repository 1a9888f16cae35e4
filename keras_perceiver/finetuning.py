"""Fine-tune a preset: `finetune(preset, data, out=...)` and `keras-perceiver finetune`.

What each family takes, and the loss and metric it trains with by default:

- Perceiver classifier: an .npz of x (N, ...input shape) and integer labels y, or an image
  folder (one sub-folder per class); sparse categorical cross-entropy on its logits, accuracy.
- Perceiver IO masked-byte language model (perceiver_io_language): a UTF-8 text file of at
  least one window of bytes, encoded as the byte tokenizer does (byte b -> id b + 6; ids 0-5
  are [PAD] [BOS] [EOS] [MASK] [CLS] [SEP]), cut into windows of the model's length (its
  output queries), the last one padded ([PAD], input_mask False); in each window 15% of the
  real tokens, drawn with `seed` once (static masking), become [MASK] (id 3) and the labels
  are the original ids. Sparse categorical cross-entropy from the logits and accuracy
  ("masked_accuracy"), both over the masked positions only (sample weights). An .npz of
  token ids x holding [MASK] and labels y trains the same way.
- Perceiver Resampler / connector (flamingo_resampler, idefics_resampler, idefics2_connector,
  ...): an .npz of media features x (the model's media shape; (N, V, D) and (N, T, V, D)
  fit a five-axis resampler too), an optional boolean `mask` of x's shape less D, and integer
  labels y; `num_classes` (required unless the preset already has a head) sets the config
  field of that name: the latents' mean (over latents and media items) feeds a "logits"
  Dense head. Cross-entropy and accuracy as for the classifier.
- any other model (or one of the above with its own objective): `loss` (and `metrics`).

A new `num_classes` gets a fresh head ("logits") and every other weight from the preset.
AdamW with a linear warm-up over the first 10% of the steps, then cosine decay.

Resuming: the training state (weights, optimizer, position in the epoch, the metrics' running
states) is backed up every `backup_every_steps` steps and at each epoch end into
`.<out name>.kp-backup` beside `out` (not inside it: `out` stays absent, or the user's old
preset, until the final `save_to_preset` swaps the new one in atomically). Re-running the same
call after a kill resumes from the last backup, at the batch after it: array data is shuffled
per epoch from (seed, epoch) alone and a dataset is read in its own order, so the resumed run
trains on the batches, and ends with the steps, weights and epoch metrics, of an uninterrupted
one. The backup is removed when training ends. A backup written by a different call (other
arguments or data, or data giving another number of steps per epoch) is refused.
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
from keras_perceiver.storage import check_target, read_npz

FREEZE_CHOICES = (None, "head")  # "head": train the head only, everything else frozen
DTYPE_CHOICES = (None, "float32", "mixed_bfloat16", "mixed_float16")
BACKUP_TAG = ".kp-backup"
HEAD_LAYER = "logits"  # the class head of a Perceiver, or of a resampler with num_classes
# The byte tokenizer of Perceiver IO's language model (transformers' PerceiverTokenizer):
# ids 0-5 are [PAD] [BOS] [EOS] [MASK] [CLS] [SEP], a UTF-8 byte b is id b + BYTE_OFFSET.
PAD_ID, MASK_ID, BYTE_OFFSET = 0, 3, 6
MASK_RATE = 0.15  # of each window's real tokens, replaced by [MASK]


# ------------------------------------------------------------------------ the model
def is_classifier(model):
    """A model with a class head ('logits'), trained on integer labels: a Perceiver, or a
    PerceiverResampler whose config sets num_classes."""
    from keras_perceiver.models import Perceiver, PerceiverResampler

    return isinstance(model, Perceiver) or (
        isinstance(model, PerceiverResampler) and model.config.num_classes is not None
    )


def _takes_num_classes(model):
    from keras_perceiver.models import Perceiver, PerceiverResampler

    return isinstance(model, (Perceiver, PerceiverResampler))


def is_masked_byte_model(model):
    """A Perceiver IO masked language model on bytes: token ids in, one logit row over the
    vocabulary per learned output query out, as many queries as an input window holds."""
    from keras_perceiver.layers import TokenInput
    from keras_perceiver.models import LearnedQueries, PerceiverIO

    if not isinstance(model, PerceiverIO):
        return False
    tokens, queries = model.config.input_adapter, model.config.output_queries
    return (
        isinstance(tokens, TokenInput) and tokens.vocab_size >= 256 + BYTE_OFFSET
        and isinstance(queries, LearnedQueries) and queries.num_queries <= tokens.max_positions
        and tuple(model.outputs[0].shape[1:]) == (queries.num_queries, tokens.vocab_size)
    )


def load_model(preset, num_classes=None, dtype=None, from_scratch=False):
    """The preset's model; with a `num_classes` other than the preset's, a new model with
    that head whose every other weight is copied from the preset (matched by variable path).
    With `from_scratch`, the preset's config (and `num_classes`) with fresh weights only."""
    overrides = {"dtype": dtype} if dtype else {}
    loaded = presets.from_preset(preset, load_weights=not from_scratch, **overrides)
    if num_classes is None or num_classes == getattr(loaded.config, "num_classes", None):
        return loaded
    if not _takes_num_classes(loaded):
        raise ValueError(
            f"num_classes: only a Perceiver classifier or a PerceiverResampler takes a class head; "
            f"received num_classes={num_classes} for a {type(loaded).__name__}"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2; received {num_classes!r}")
    fresh = presets.from_preset(preset, load_weights=False, num_classes=num_classes, name=loaded.name, **overrides)
    if from_scratch:
        return fresh
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


def encode_bytes(text):
    """UTF-8 text (a str, or bytes already encoded) -> the byte tokenizer's ids (int32)."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype("int32") + BYTE_OFFSET


def masked_byte_windows(tokens, window, seed=0, rate=MASK_RATE):
    """Token ids (1-D) cut into windows of `window` ids for masked-byte modelling.

    Returns {"token_ids", "input_mask", "labels"}, arrays of shape (windows, window): the last
    window padded with [PAD] (input_mask False there); in each window round(rate x its real
    tokens) of them, at least one, drawn by a NumPy RNG seeded with `seed`, replaced by
    [MASK]; labels are the original ids. The loss counts the positions whose input is [MASK]
    (`masked_positions`), never padding."""
    tokens = np.asarray(tokens, "int32")
    if tokens.ndim != 1 or not len(tokens):
        raise ValueError(f"tokens: expected a non-empty 1-D array of token ids; received shape {tokens.shape}")
    if not 0 < rate <= 1:
        raise ValueError(f"rate: expected a number in (0, 1]; received {rate!r}")
    count = -(-len(tokens) // window)
    labels = np.full((count, window), PAD_ID, "int32")
    labels.flat[: len(tokens)] = tokens
    input_mask = np.zeros((count, window), bool)
    input_mask.flat[: len(tokens)] = True
    token_ids = labels.copy()
    rng = np.random.default_rng(seed)
    for row, real in enumerate(input_mask.sum(axis=1)):  # real tokens lead each window
        token_ids[row, rng.choice(real, size=max(1, round(rate * real)), replace=False)] = MASK_ID
    return {"token_ids": token_ids, "input_mask": input_mask, "labels": labels}


def masked_positions(x):
    """The sample weights of masked-byte modelling: 1.0 where the input is [MASK], else 0.0
    (the text itself never holds the id: bytes start at BYTE_OFFSET)."""
    token_ids = x["token_ids"] if isinstance(x, dict) else x
    return (np.asarray(token_ids) == MASK_ID).astype("float32")


def _text_windows(path, model, seed):
    """A UTF-8 text file -> (x {"token_ids", "input_mask"}, labels) for `model`'s windows."""
    window = model.config.output_queries.num_queries
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"data: expected a UTF-8 text file; received {str(path)!r}, whose byte {raw[error.start]:#04x} "
            f"at offset {error.start} is not UTF-8"
        ) from None
    if len(raw) < window:
        received = "an empty file" if not raw else f"{len(raw)} bytes"
        raise ValueError(
            f"data: expected a text of at least {window} bytes (one window of the model's {window} tokens); "
            f"received {received} in {str(path)!r}"
        )
    windows = masked_byte_windows(encode_bytes(raw), window, seed)
    x = {"token_ids": windows["token_ids"]}
    if "input_mask" in model.named_inputs:  # without one, padding reads as [PAD] tokens (never counted)
        x["input_mask"] = windows["input_mask"]
    return x, windows["labels"]


def read_data(data, model, seed=0):
    """`data` -> (x, y) arrays: an .npz path with x and y (and an optional `mask`, which goes
    to the model's mask input), an image folder, or for a masked-byte model a UTF-8 text file
    (masked windows; `seed` draws the masks). x is a dict of named inputs where there are
    several."""
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or directory: {str(path)!r}")
    if is_masked_byte_model(model) and path.suffix.lower() != ".npz":
        if path.is_dir():
            raise ValueError(
                f"data: a masked-byte {type(model).__name__} takes a UTF-8 text file (or an .npz of token ids x "
                f"and labels y); received the directory {str(path)!r}"
            )
        return _text_windows(path, model, seed)
    if path.is_dir():
        return _images_from_directory(path, model)
    arrays = read_npz(path, "data", expected="an .npz file with x and y, or an image folder")
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise ValueError(f"data: {str(path)!r} must hold arrays 'x' and 'y'; missing {missing} (holds {sorted(arrays)})")
    if "mask" not in arrays:
        return arrays["x"], arrays["y"]
    name, mask = _input_shape(model)[0], getattr(model, "mask_input", None) or "mask"
    return {name: arrays["x"], mask: arrays["mask"]}, arrays["y"]


def check_arrays(x, y, model, classifier):
    """Refuse data that cannot train `model` before any step runs. x: an array for the
    model's first input, or a dict {input name: array}, that input's and others' (a mask)."""
    name, shape = _input_shape(model)
    others = {}
    if isinstance(x, dict):
        expected = sorted(getattr(model, "named_inputs", None) or [name])
        if name not in x or set(x) - set(expected):
            raise ValueError(
                f"data: x must hold arrays for the model's inputs {expected} ({name!r} required; a mask needs a "
                f"model built with its mask input); received arrays for {sorted(x)}"
            )
        others = {key: np.asarray(value) for key, value in x.items() if key != name}
        x = x[name]
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"data: x and y must be arrays of examples; received shapes {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError(f"data: expected at least one example; received x of shape {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"data: x and y must have the same length; received {len(x)} examples and {len(y)} labels")
    given = x.shape
    x, others = _with_unit_axes(model, x, others)
    if x.ndim != len(shape) + 1 or any(e is not None and e != r for e, r in zip(shape, x.shape[1:])):
        shown = tuple("None" if e is None else e for e in shape)
        raise ValueError(f"data: x must have shape (N, {', '.join(map(str, shown))}) for input {name!r}; received {given}")
    for key, value in others.items():  # masks: x's shape less its feature axis, if it has one
        expected = x.shape[:-1] if len(shape) > len(model.named_inputs[key].shape) - 1 else x.shape
        if value.shape != expected or not (value.dtype == bool or np.all((value == 0) | (value == 1))):
            raise ValueError(
                f"data: {key!r} must be a boolean mask of shape {expected} (True = real) to match x; "
                f"received {value.dtype} of shape {value.shape}"
            )
        others[key] = value.astype(bool)
    if classifier:
        num_classes = model.config.num_classes
        y = _integer_labels(y, (len(y),), "class labels of shape (N,)", num_classes, f"num_classes={num_classes}")
    elif is_masked_byte_model(model):
        vocab = model.config.input_adapter.vocab_size
        y = _integer_labels(y, x.shape, f"token labels of x's shape {x.shape}", vocab, f"vocab_size={vocab}")
        if not masked_positions(x).any():
            raise ValueError(f"data: x holds no [MASK] token (id {MASK_ID}): no position to predict; received x of shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype("float32")  # float64 arrays would be cast on every step
    return ({name: x, **others} if others else x), y


def _integer_labels(y, shape, what, limit, limit_name):
    """y as int32, refused unless it has `shape` and integer values in [0, limit)."""
    if y.shape != tuple(shape) or not (np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))
    )):
        raise ValueError(f"data: y must be integer {what}; received {y.dtype} of shape {y.shape}")
    if y.min() < 0 or y.max() >= limit:  # before the cast: int64 labels past 2**31 would wrap
        raise ValueError(f"data: labels must lie in [0, {limit}) ({limit_name}); received labels from {y.min()} to {y.max()}")
    return y.astype("int32")


def _with_unit_axes(model, x, others):
    """Media of rank 3 (N, V, D) or 4 (N, T, V, D) for a five-axis resampler, and their masks,
    with the unit T / F axes the model would give them."""
    from keras_perceiver.models import PerceiverResampler

    if not isinstance(model, PerceiverResampler) or model.config.media_rank != 5 or x.ndim not in (3, 4):
        return x, others
    expand = (lambda a: a[:, None, None]) if x.ndim == 3 else (lambda a: a[:, :, None])
    return expand(x), {key: expand(value) for key, value in others.items()}


def split(x, y, validation_split, seed):
    """(train, validation or None): a seeded shuffle, then the last fraction held out."""
    if validation_split == 0:
        return (x, y), None
    order = np.random.default_rng(seed).permutation(len(y))
    held = int(round(len(y) * validation_split))
    if held < 1 or held >= len(y):
        raise ValueError(
            f"validation_split: {validation_split} of {len(y)} examples leaves no training or no validation example"
        )
    train, valid = order[:-held], order[-held:]
    return (_rows(x, train), y[train]), (_rows(x, valid), y[valid])


def _rows(x, index):
    """Examples `index` of x, an array or a dict of arrays."""
    return {key: value[index] for key, value in x.items()} if isinstance(x, dict) else x[index]


def _steps_per_epoch(data):
    """Batches per epoch of a PyDataset or a finite tf.data.Dataset."""
    if isinstance(data, keras.utils.PyDataset):
        return len(data)
    cardinality = int(data.cardinality())
    if cardinality < 1:
        raise ValueError(f"data: expected a finite, non-empty tf.data.Dataset; received cardinality {cardinality}")
    return cardinality


class _EpochBatches(keras.utils.PyDataset):
    """Arrays (x, y[, sample weights]; x may be a dict) as one epoch of batches, shuffled by a
    permutation drawn from (seed, epoch) alone: a resumed run sees the batches an
    uninterrupted one does (Keras' own shuffle draws from a global generator, whose state a
    restarted process does not have). `_EpochOf` sets `epoch` as each epoch begins.

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


class _EpochOf(keras.callbacks.Callback):
    """Tells an `_EpochBatches` which epoch begins (a resumed run starts at a later one)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


class _StepByStep(keras.callbacks.Callback):
    """Waits for each step's results before the next step is dispatched. Over several CPU
    devices (simulated, XLA_FLAGS=--xla_force_host_platform_device_count) XLA's collectives
    deadlock when many steps are in flight (jaxlib 0.10: three in four epochs of 190 steps hung
    here); on GPUs and TPUs steps stay asynchronous."""

    def on_train_batch_end(self, batch, logs=None):
        for value in (logs or {}).values():
            np.asarray(value)

    on_test_batch_end = on_train_batch_end


def _on_cpu_devices(distribution):
    return distribution is not None and all(
        str(device).lower().startswith("cpu") for device in distribution.device_mesh.devices.flatten()
    )


class _RestOfEpoch(keras.utils.PyDataset):
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


def _cut_for_devices(arrays, batch_size, multiple_of):
    """Validation arrays less the few examples that would leave the last batch indivisible
    over `multiple_of` devices."""
    count = len(arrays[1])
    keep = count - (count % batch_size) % multiple_of
    if keep == 0:
        raise ValueError(f"validation_split: expected at least {multiple_of} validation examples, one per device; received {count}")
    return arrays if keep == count else keras.tree.map_structure(lambda array: array[:keep], arrays)


def _batch_shards(distribution):
    """How many devices a batch is split over: the distribution's batch axis (1 without one)."""
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[list(mesh.axis_names).index(distribution.batch_dim_name)]


# ------------------------------------------------------------------------ resuming
def backup_dir(out):
    """Where a run writing `out` keeps its resumable state: beside `out`, not inside it."""
    out = Path(out).expanduser()
    return out.parent / f".{out.name}{BACKUP_TAG}"


class _ResumableBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that resumes where its backup was taken, even mid-epoch.

    Keras' own restores weights and optimizer and replays the interrupted epoch from its
    first batch, so the batches before the kill train twice. This one records with the
    weights the position in the epoch (the next batch), the step count and the metrics'
    running states, and backs up at each epoch end (after validation and `_KeepBest`);
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


def _fit_from(model, position, fit_data, epochs, resumable, **fit_options):
    """`model.fit` from `position` (epoch, batch) on: the rest of an interrupted epoch in a
    fit of its own (Keras runs whole epochs), then the epochs after it; one History of both."""
    epoch, batch = position
    runs = []
    if batch:
        data = fit_data["x"]
        tf_data = hasattr(data, "cardinality")
        rest = data.skip(batch) if tf_data else _RestOfEpoch(data, batch)
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
    from_scratch=False, overwrite=False, backup_every_steps=20, verbose="auto", callbacks=(),
):
    """Fine-tune `preset` (a zoo name or preset directory) and return `(model, history)`.

    data: a path to an `.npz` holding `x` and `y` (and an optional `mask`), an image folder
    (one sub-folder per class; resized to the model's input size, scaled to [0, 1]), a UTF-8
    text file for a masked-byte language model (see the module docstring), or a
    `tf.data.Dataset` / `keras.utils.PyDataset` of (x, y) batches; or give NumPy arrays
    (or a dict of them by input name) as `x` and `y`.
    num_classes: a new class count (a fresh head, every other weight from the preset);
    required for a resampler without a head, unless it trains with its own `loss`.
    freeze: None (train everything) or "head" (train only the head). dtype: None, "float32",
    "mixed_bfloat16" or "mixed_float16". validation_split: the fraction of array data held
    out (seeded shuffle). loss / metrics: needed for any model but a classifier or a masked-byte
    language model (whose metrics count the masked positions).
    out: where the best model (lowest validation loss, else training loss, at an epoch end)
    is written with `save_to_preset`; an existing `out` is replaced only with `overwrite` and
    only when keras_perceiver wrote it. With `out`, a killed run resumes when re-run (see
    the module docstring). model_parallel: see `keras_perceiver.distribution.distribution_for`;
    with several devices a batch is split over them, so `batch_size` must be a multiple of
    their number on the batch axis (the last batch of an epoch is cut to one; validation too).
    from_scratch: train the preset's config from freshly initialised weights.
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
    shards = _batch_shards(distribution)
    if batch_size % shards:
        raise ValueError(
            f"batch_size: expected a multiple of {shards}, the devices each batch is split over "
            f"(model_parallel={model_parallel}); received {batch_size}"
        )
    previous = keras.distribution.distribution()
    if distribution is not None:
        keras.distribution.set_distribution(distribution)
    try:
        model = load_model(preset, num_classes, dtype, from_scratch)
        classifier, masked_bytes = is_classifier(model), is_masked_byte_model(model)
        if loss is None and not (classifier or masked_bytes):
            if _takes_num_classes(model):  # a resampler without a class head
                raise ValueError(
                    f"num_classes: a {type(model).__name__} trains a class head on its pooled latents with num_classes "
                    "(integer labels y), or its latents with a loss of yours; received num_classes=None and loss=None"
                )
            raise ValueError(
                f"loss: a {type(model).__name__} needs a loss (only classifiers and masked-byte language models "
                "have a default); received None"
            )
        apply_freeze(model, freeze)

        arrays = None
        if isinstance(data, (str, os.PathLike)):
            x, y = read_data(data, model, seed)
        elif data is not None and not isinstance(data, keras.utils.PyDataset) and not hasattr(data, "cardinality"):
            raise ValueError(
                "data: expected a path (.npz or image folder), a tf.data.Dataset or a keras.utils.PyDataset "
                f"(arrays go in x= and y=); received {type(data).__name__}"
            )
        if x is not None:
            arrays = check_arrays(x, y, model, classifier)
            train, valid = split(*arrays, validation_split, seed)
            name = getattr(model, "primary_input", None)
            feed = (lambda a: a if isinstance(a, dict) else {name: a}) if name else (lambda a: a)  # named inputs
            # the loss and metrics of masked bytes count the masked positions only (sample weights)
            weights = (lambda a: (masked_positions(a),)) if masked_bytes else (lambda a: ())
            # our own shuffle (the same batches after a resume), in batches that split over the devices
            batches = _EpochBatches((feed(train[0]), train[1], *weights(train[0])), batch_size, seed, shards)
            fit_data = {"x": batches, "shuffle": False}
            if valid is not None:
                fit_data["validation_data"] = _cut_for_devices(
                    (feed(valid[0]), valid[1], *weights(valid[0])), batch_size, shards
                )
                fit_data["validation_batch_size"] = batch_size
            steps = len(batches)
        else:
            if validation_split:
                raise ValueError("validation_split: only array data is split; pass a validation set in the dataset's stead")
            fit_data = {"x": data, "shuffle": False}  # in its own order: a resumed run reads the same batches
            steps = _steps_per_epoch(data)

        optimizer = optimizer_for(learning_rate, epochs * steps)
        if dtype == "mixed_float16":  # our models set the policy per layer: wrap it here
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        weighted_metrics = None
        if classifier:
            loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            metrics = ["accuracy"] if metrics is None else metrics
        elif masked_bytes:  # weighted by the sample weights: the mean over the masked positions
            loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy(name="masked_accuracy")] if metrics is None else metrics
            metrics = None
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, weighted_metrics=weighted_metrics)

        own = [_EpochOf(fit_data["x"])] if isinstance(fit_data["x"], _EpochBatches) else []
        if _on_cpu_devices(distribution):
            own.append(_StepByStep())
        keep_best, resumable, position = None, None, (0, 0)
        if out is not None:
            backup = backup_dir(out)
            _claim_backup(backup, _fingerprint(
                preset, arrays, epochs, batch_size, learning_rate, num_classes, freeze, dtype, validation_split, seed,
                given_loss, given_metrics, from_scratch,
            ))
            monitor = "val_loss" if "validation_data" in fit_data else "loss"
            keep_best = _KeepBest(monitor, backup)
            resumable = _ResumableBackup(
                steps, backup_dir=str(backup), save_freq=backup_every_steps, delete_checkpoint=False,
                double_checkpoint=True,  # a kill while writing one backup leaves the one before
            )
            # _KeepBest first: the epoch-end backup holds its choice; both before the caller's
            # callbacks, so that one raising at a step finds that step backed up
            own += [keep_best, resumable]
            position = resumable.restore(model)
        history = _fit_from(model, position, fit_data, epochs, resumable, callbacks=own + list(callbacks), verbose=verbose)
        if out is not None:
            if keep_best.weights is not None:
                model.set_weights(keep_best.weights)
            presets.save_to_preset(model, out, overwrite=overwrite, protected=protected)
            shutil.rmtree(backup_dir(out))  # only once the preset is safely written
    finally:
        if distribution is not None:
            keras.distribution.set_distribution(previous)
    return model, history
