"""Shared by the checkpoint importers: fill a model's variables by path, all or nothing."""

import re

import numpy as np

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # the files a flamingo state dict is read from


def to_numpy(tensor):
    """A torch tensor (or anything array-like) as a float32/int NumPy array."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor)


def assign_by_path(model, values):
    """Assign `values` ({variable path: array}) to `model`; every variable must be covered.

    Raises ValueError naming missing, unexpected or mis-shaped entries before writing any.
    """
    variables = {v.path: v for v in model.weights}
    missing = sorted(set(variables) - set(values))
    unexpected = sorted(set(values) - set(variables))
    wrong = [
        f"{path}: expected {tuple(variables[path].shape)}, received {np.shape(array)}"
        for path, array in values.items()
        if path in variables and tuple(variables[path].shape) != np.shape(array)
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "checkpoint does not match the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; shapes {wrong[:5]}"
        )
    for path, array in values.items():
        variables[path].assign(np.asarray(array, dtype=variables[path].dtype))
    return model


def linear(weight, bias=None):
    """torch Linear (out, in) -> Keras kernel (in, out) [, bias]."""
    return to_numpy(weight).T, (None if bias is None else to_numpy(bias))


def block_count(state_dict, pattern):
    """How many numbered blocks a state dict holds: 1 + the largest index `pattern` (a regex
    with one group, matched at the start of each key) finds. ValueError when it finds none."""
    found = [int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))]
    if not found:
        raise ValueError(f"checkpoint does not match the model: no key matches {pattern!r} (its resampler layers)")
    return 1 + max(found)
