"""Run by test_cross_backend.py under another KERAS_BACKEND: load, run, print max errors."""

import json
import sys
from pathlib import Path

import keras
import numpy as np

from keras_perceiver.examples import outputs_to_numpy  # also registers the classes


def main(directory, names):
    directory = Path(directory)
    errors = {}
    for name in names:
        model = keras.saving.load_model(directory / f"{name}.keras")
        inputs = dict(np.load(directory / f"{name}_inputs.npz"))
        out = outputs_to_numpy(model(inputs))
        expected = np.load(directory / f"{name}_expected.npy")
        errors[name] = {"backend": keras.backend.backend(), "max_abs": float(np.max(np.abs(out - expected)))}
    print(json.dumps(errors))


if __name__ == "__main__":

    main(sys.argv[1], sys.argv[2:])
