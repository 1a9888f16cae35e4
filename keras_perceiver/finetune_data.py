"""The training data of `finetune`: read from a path (.npz, image folder, UTF-8 text for a
masked-byte model), checked against the model before any step runs, and split."""

from pathlib import Path

import keras
import numpy as np

from keras_perceiver.storage import read_npz

# The byte tokenizer of Perceiver IO's language model (transformers' PerceiverTokenizer):
# ids 0-5 are [PAD] [BOS] [EOS] [MASK] [CLS] [SEP], a UTF-8 byte b is id b + BYTE_OFFSET.
PAD_ID, MASK_ID, BYTE_OFFSET = 0, 3, 6
MASK_RATE = 0.15  # of each window's real tokens, replaced by [MASK]


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


def input_shape(model):
    """(name of the input arrays go to, its shape less the batch axis)."""
    name = getattr(model, "primary_input", None)
    if name is not None:
        return name, tuple(model.named_inputs[name].shape[1:])
    return None, tuple(model.inputs[0].shape[1:])


def _images_from_directory(path, model):
    """An image folder (one sub-folder per class, `image_dataset_from_directory` layout) as
    arrays in [0, 1], resized to the model's input size."""
    _, shape = input_shape(model)
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
    name, mask = input_shape(model)[0], getattr(model, "mask_input", None) or "mask"
    return {name: arrays["x"], mask: arrays["mask"]}, arrays["y"]


def check_arrays(x, y, model, classifier):
    """Refuse data that cannot train `model` before any step runs. x: an array for the
    model's first input, or a dict {input name: array}, that input's and others' (a mask)."""
    name, shape = input_shape(model)
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
