"""Run by tests/test_distribution.py in a JAX process with 4 simulated CPU devices:
`kp.finetune` of perceiver_digits with a new 5-class head on one device, data-parallel over
the 4 (chosen by finetune itself) and model-parallel on a 2 x 2 mesh; the model-parallel run
is stopped mid-epoch and resumed from its backup. Only the head trains (the loss still runs
through every split kernel), so that each run compiles in seconds. Prints one JSON line: per mode the training
loss after each step, the validation losses, the largest difference of its final weights
from the one-device run's, and for the model-parallel run a few variables' sharding specs and
shard shapes; and the error a batch size the devices cannot split gets.

With `--digits-from-scratch`: trains perceiver_digits from fresh weights, data-parallel over
the 4 devices, as zoo/train_digits.py trained the preset (its split, its 9 shifted copies of
each training image, 20 epochs of batches of 64 at a peak learning rate of 3e-3), and prints
the held-out accuracy, the epochs and the seconds it took."""

import json
import sys
import time

import keras
import numpy as np

import keras_perceiver as kp
from keras_perceiver import distribution

STOP_AT_STEP = 4  # 3 steps per epoch: the second epoch's first
SHOWN = ("encoder/self_attend_0/attention/qkv_kernel", "encoder/self_attend_0/feed_forward/dense_out/kernel",
         "encoder/latents", "logits/kernel")


class Losses(keras.callbacks.Callback):
    """The running training loss after each step, by step number."""

    def __init__(self, losses):
        super().__init__()
        self.losses = losses

    def on_train_batch_end(self, batch, logs=None):
        self.losses[int(self.model.optimizer.iterations)] = float(logs["loss"])


class Stop(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == STOP_AT_STEP:
            raise KeyboardInterrupt  # what Ctrl-C raises


def tune(x, y, out, model_parallel=1, callbacks=()):
    losses = {}
    model, history = kp.finetune(
        "perceiver_digits", x=x, y=y, out=out, epochs=2, batch_size=16, num_classes=5, freeze="head", learning_rate=3e-2,
        validation_split=0.25, backup_every_steps=1, model_parallel=model_parallel, verbose=0,
        callbacks=[Losses(losses), *callbacks],
    )
    return model, history, losses


def main(directory):
    assert keras.backend.backend() == "jax" and len(keras.distribution.list_devices()) == 4
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 5
    x = (digits.images[keep][:64] / 16.0).astype("float32")[..., None]  # 48 to train on: 3 batches of 16
    y = digits.target[keep][:64].astype("int32")

    every_device = distribution.visible_devices
    distribution.visible_devices = lambda: every_device()[:1]  # the reference: finetune sees one device
    one, one_history, one_losses = tune(x, y, f"{directory}/one")
    distribution.visible_devices = every_device
    assert keras.distribution.distribution() is None  # finetune leaves none behind

    result = {"one device": {"losses": one_losses, "val_loss": one_history.history["val_loss"]}}
    data_parallel, history, losses = tune(x, y, f"{directory}/data")
    result["data parallel"] = {"losses": losses, "val_loss": history.history["val_loss"], "model": data_parallel}
    try:
        tune(x, y, f"{directory}/model", model_parallel=2, callbacks=[Stop()])
    except KeyboardInterrupt:
        pass
    model_parallel, history, resumed = tune(x, y, f"{directory}/model", model_parallel=2)
    result["model parallel"] = {"resumed at step": min(resumed) - 1, "losses": resumed,
                                "val_loss": history.history["val_loss"], "model": model_parallel}
    for mode in ("data parallel", "model parallel"):
        tuned = result[mode].pop("model")
        result[mode]["largest weight difference"] = max(
            float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
            for a, b in zip(tuned.weights, one.weights)
        )
    weights = {v.path: v for v in model_parallel.weights}
    result["model parallel"]["layouts"] = {
        path: [str(weights[path].value.sharding.spec), list(weights[path].value.addressable_shards[0].data.shape)]
        for path in SHOWN
    }
    saved = kp.from_preset(f"{directory}/model")
    result["model parallel"]["saved = trained"] = all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(saved.weights, model_parallel.weights)
    )
    try:
        kp.finetune("perceiver_digits", x=x, y=y, batch_size=30, num_classes=5, verbose=0)
    except ValueError as error:
        result["batch_size=30"] = str(error)
    print(json.dumps(result))


def digits_from_scratch(epochs=20):
    assert keras.backend.backend() == "jax" and len(keras.distribution.list_devices()) == 4
    from keras_perceiver.zoo.train_digits import digits_split, shifted_copies

    x_train, y_train, x_test, y_test = digits_split()
    x_train, y_train = shifted_copies(x_train, y_train)
    start = time.perf_counter()
    model, history = kp.finetune("perceiver_digits", x=x_train, y=y_train, from_scratch=True, epochs=epochs,
                                 batch_size=64, learning_rate=3e-3, verbose=2)
    seconds = time.perf_counter() - start
    logits = model.predict({"inputs": x_test}, batch_size=len(x_test), verbose=0)
    print(json.dumps({
        "held_out_accuracy": float(np.mean(np.argmax(logits, axis=-1) == y_test)), "held_out": len(y_test),
        "epochs": len(history.epoch), "seconds": round(seconds), "final_loss": history.history["loss"][-1],
    }))


if __name__ == "__main__":
    if sys.argv[1] == "--digits-from-scratch":
        digits_from_scratch()
    else:
        main(sys.argv[1])
