"""Reproduce the `perceiver_digits` preset: a small Perceiver trained on scikit-learn's 8x8
digits (shipped with scikit-learn, so no download), evaluated on a fixed held-out split.

    KERAS_BACKEND=jax python -m keras_perceiver.zoo.train_digits

Writes zoo/perceiver_digits.weights.h5 and the accuracy into zoo/perceiver_digits.json.
"""

import json
import time
from pathlib import Path

import numpy as np

ZOO = Path(__file__).resolve().parent
PRESET = "perceiver_digits"


def digits_split():
    """(x_train, y_train, x_test, y_test): images (N, 8, 8, 1) in [0, 1]; 25% held out,
    stratified, fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return x_train, y_train.astype("int32"), x_test, y_test.astype("int32")


def shifted_copies(images, labels):
    """Every image shifted by -1, 0 or +1 pixel on each axis (zero fill): 9x the data."""
    copies = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            moved = np.roll(images, (dy, dx), axis=(1, 2))
            if dy:
                moved[:, 0 if dy > 0 else -1] = 0
            if dx:
                moved[:, :, 0 if dx > 0 else -1] = 0
            copies.append(moved)
    return np.concatenate(copies), np.tile(labels, 9)


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def main(epochs=20, seed=0):
    import keras

    import keras_perceiver as kp

    keras.utils.set_random_seed(seed)
    entry = json.loads((ZOO / f"{PRESET}.json").read_text())
    model = kp.Perceiver(entry["config"], name=PRESET)
    x_train, y_train, x_test, y_test = digits_split()
    x_train, y_train = shifted_copies(x_train, y_train)
    steps = epochs * int(np.ceil(len(x_train) / 64))
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=5e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, shuffle=True, verbose=2)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, x_test, y_test)
    print(f"held-out accuracy {test_accuracy:.4f} after {epochs} epochs ({seconds:.0f} s, {keras.backend.backend()})")
    model.save_weights(ZOO / entry["weights"], overwrite=True)
    from keras_perceiver.storage import sha256_of

    entry["weights_sha256"] = sha256_of(ZOO / entry["weights"])  # checked by from_preset
    entry["parameter_count"] = model.count_params()
    entry["training"] = {
        "data": "sklearn.datasets.load_digits, 75/25 stratified split, random_state=0; "
        "training images with +-1 pixel shifts (9 copies)",
        "epochs": epochs,
        "backend": keras.backend.backend(),
        "seconds": round(seconds),
        "held_out_accuracy": round(test_accuracy, 4),
    }
    entry["paper_figure"] = f"{100 * test_accuracy:.1f}% held-out accuracy (this repository)"
    (ZOO / f"{PRESET}.json").write_text(json.dumps(entry, indent=2) + "\n")


if __name__ == "__main__":
    main()
