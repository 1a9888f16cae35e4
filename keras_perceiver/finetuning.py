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

import os
import shutil

import keras

import keras_perceiver.models  # noqa: F401 (registers the classes a preset names)
from keras_perceiver import presets
from keras_perceiver.finetune_data import (
    check_arrays, is_masked_byte_model, masked_positions, read_data, split,
)
from keras_perceiver.resumable_fit import (
    EpochBatches, EpochOf, KeepBest, ResumableBackup, StepByStep, backup_dir, batch_shards, claim_backup,
    cut_for_devices, fingerprint, fit_from, on_cpu_devices, steps_per_epoch,
)
from keras_perceiver.storage import check_target

FREEZE_CHOICES = (None, "head")  # "head": train the head only, everything else frozen
DTYPE_CHOICES = (None, "float32", "mixed_bfloat16", "mixed_float16")
HEAD_LAYER = "logits"  # the class head of a Perceiver, or of a resampler with num_classes


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
    shards = batch_shards(distribution)
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
            batches = EpochBatches((feed(train[0]), train[1], *weights(train[0])), batch_size, seed, shards)
            fit_data = {"x": batches, "shuffle": False}
            if valid is not None:
                fit_data["validation_data"] = cut_for_devices(
                    (feed(valid[0]), valid[1], *weights(valid[0])), batch_size, shards
                )
                fit_data["validation_batch_size"] = batch_size
            steps = len(batches)
        else:
            if validation_split:
                raise ValueError("validation_split: only array data is split; pass a validation set in the dataset's stead")
            fit_data = {"x": data, "shuffle": False}  # in its own order: a resumed run reads the same batches
            steps = steps_per_epoch(data)

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

        own = [EpochOf(fit_data["x"])] if isinstance(fit_data["x"], EpochBatches) else []
        if on_cpu_devices(distribution):
            own.append(StepByStep())
        keep_best, resumable, position = None, None, (0, 0)
        if out is not None:
            backup = backup_dir(out)
            claim_backup(backup, fingerprint(
                preset, arrays, epochs, batch_size, learning_rate, num_classes, freeze, dtype, validation_split, seed,
                given_loss, given_metrics, from_scratch,
            ))
            monitor = "val_loss" if "validation_data" in fit_data else "loss"
            keep_best = KeepBest(monitor, backup)
            resumable = ResumableBackup(
                steps, backup_dir=str(backup), save_freq=backup_every_steps, delete_checkpoint=False,
                double_checkpoint=True,  # a kill while writing one backup leaves the one before
            )
            # KeepBest first: the epoch-end backup holds its choice; both before the caller's
            # callbacks, so that one raising at a step finds that step backed up
            own += [keep_best, resumable]
            position = resumable.restore(model)
        history = fit_from(model, position, fit_data, epochs, resumable, callbacks=own + list(callbacks), verbose=verbose)
        if out is not None:
            if keep_best.weights is not None:
                model.set_weights(keep_best.weights)
            presets.save_to_preset(model, out, overwrite=overwrite, protected=protected)
            shutil.rmtree(backup_dir(out))  # only once the preset is safely written
    finally:
        if distribution is not None:
            keras.distribution.set_distribution(previous)
    return model, history
