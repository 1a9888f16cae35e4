"""Input adapters: turn raw inputs into a (batch, M, channels) array with positions."""

import dataclasses
import math
import numbers
from typing import Optional

import keras
from keras import ops

from keras_perceiver.layers.attention import dense_flops, matmul_flops, zero_masked
from keras_perceiver.layers.position_encoding import FourierPositionEncoding, TrainablePositionEncoding


def space_to_depth(x, patch_size=1, temporal_patch_size=1):
    """Cut the index axes into patches and stack each patch into channels.

    (B, N, C) -> (B, N/p, p*C); (B, H, W, C) -> (B, H/p, W/p, p*p*C);
    (B, T, H, W, C) -> (B, T/t, H/p, W/p, t*p*p*C), and a time axis of length 1 after
    patching is dropped (two frames -> one flow field). Within a patch the channel order is
    (time, row, column, channel), as DeepMind's and transformers' `space_to_depth`. Kept at
    rank <= 5 for the export runtimes (CoreML refuses rank 6).
    """
    p, t = patch_size or 1, temporal_patch_size or 1
    dims = tuple(x.shape[1:-1])
    c = x.shape[-1]
    if len(dims) == 1:
        return ops.reshape(x, (-1, dims[0] // p, p * c))
    time, (h, w) = (dims[0] if len(dims) == 3 else 1), dims[-2:]
    if p > 1:
        # (rows of patches, p, W/p, p*C): W and C are adjacent, so a reshape cuts the columns
        x = ops.reshape(x, (-1, p, w // p, p * c))
        x = ops.transpose(x, (0, 2, 1, 3))
        h, w, c = h // p, w // p, p * p * c
    if len(dims) == 2:
        return ops.reshape(x, (-1, h, w, c))
    x = ops.reshape(x, (-1, time // t, t, h * w, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4))
    if time // t == 1:
        return ops.reshape(x, (-1, h, w, t * c))
    return ops.reshape(x, (-1, time // t, h, w, t * c))


def patched_dims(index_dims, patch_size=1, temporal_patch_size=1):
    """Index dims after `space_to_depth` (a time axis of length 1 is dropped)."""
    p, t = patch_size or 1, temporal_patch_size or 1
    if len(index_dims) == 1:
        return [index_dims[0] // p]
    dims = [d // p for d in index_dims[-2:]]
    if len(index_dims) == 3 and index_dims[0] // t != 1:
        dims = [index_dims[0] // t] + dims
    return dims


def conv_stem_dims(index_dims):
    """Spatial sizes after the conv stem's convolution (7x7, stride 2, padded 3) and after its
    max pool (3x3, stride 2): 224 -> 112 -> 55."""
    conv = [(d + 6 - 7) // 2 + 1 for d in index_dims]
    return conv, [(d - 3) // 2 + 1 for d in conv]


@keras.saving.register_keras_serializable(package="keras_perceiver")
class FeatureAdapter(keras.layers.Layer):
    """(batch, *index_dims, C) -> (batch, prod(index_dims), C').

    Optional patches first (`patch_size`, `temporal_patch_size`: `space_to_depth`, as
    transformers' "patches" preprocessing of video, audio and flow), an optional convolutional stem (`conv_stem_channels`: 7x7 stride-2 convolution padded 3,
    batch norm, ReLU, 3x3 stride-2 max pool: 224 -> 112 -> 55, as transformers' conv
    checkpoint), an optional per-position linear projection (a 1x1 convolution), then position features:
    `fourier` or `trainable`, optionally linearly projected to `position_projection_channels`,
    concatenated (or added with `combine="add"`); or none. `index_dims` entries may be None
    (any length) for Fourier or no positions.
    """

    def __init__(
        self,
        index_dims,
        patch_size=None,
        temporal_patch_size=None,
        conv_stem_channels=None,
        project_channels=None,
        position_encoding="fourier",
        num_bands=64,
        max_resolution=None,
        concat_pos=True,
        sine_only=False,
        position_channels=None,
        position_projection_channels=None,
        combine="concat",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.index_dims = tuple(index_dims)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        if (patch_size or temporal_patch_size) and conv_stem_channels:
            raise ValueError("FeatureAdapter: use patches or a conv stem, not both")
        for axis, (size, step) in enumerate(zip(self.index_dims, self._patch_steps())):
            if step > 1 and (size is None or size % step):
                raise ValueError(
                    f"FeatureAdapter: index_dims {self.index_dims} must be static multiples of the patch "
                    f"sizes {self._patch_steps()}; axis {axis} is {size}"
                )
        self.conv_stem_channels = conv_stem_channels
        self.project_channels = project_channels
        self.position_encoding = position_encoding
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution) if max_resolution else None
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        self.position_channels = position_channels
        self.position_projection_channels = position_projection_channels
        self.combine = combine
        if position_encoding not in ("fourier", "trainable", None):
            raise ValueError(
                f"`position_encoding` must be 'fourier', 'trainable' or None; received {position_encoding!r}"
            )
        if combine not in ("concat", "add"):
            raise ValueError(f"`combine` must be 'concat' or 'add'; received {combine!r}")
        if position_encoding == "fourier":
            resolution = self.max_resolution or self.index_dims
            if None in resolution:
                raise ValueError(
                    "FeatureAdapter: Fourier features over variable index_dims need `max_resolution`; "
                    f"received index_dims={self.index_dims}, max_resolution={self.max_resolution}"
                )
            self.positions = FourierPositionEncoding(
                num_bands, resolution, concat_pos, sine_only, name="fourier", dtype=self.dtype_policy
            )
        elif position_encoding == "trainable":
            if conv_stem_channels:
                raise ValueError("FeatureAdapter: `conv_stem_channels` works with Fourier positions or none")
            if None in self.index_dims or not position_channels:
                raise ValueError(
                    "FeatureAdapter: trainable positions need static `index_dims` and `position_channels`; "
                    f"received index_dims={self.index_dims}, position_channels={position_channels}"
                )
            self.positions = TrainablePositionEncoding(
                tuple(self.grid_dims()), position_channels, name="trainable", dtype=self.dtype_policy
            )

    def _patch_steps(self):
        """The patch length along each index axis."""
        p, t = self.patch_size or 1, self.temporal_patch_size or 1
        if len(self.index_dims) == 3:
            return (t, p, p)
        return (p,) * len(self.index_dims)

    def grid_dims(self, index_dims=None):
        """Index dims of the adapted input (after patches or the conv stem), for inputs with
        `index_dims` (default: the layer's own)."""
        dims = list(self.index_dims if index_dims is None else index_dims)
        if self.patch_size or self.temporal_patch_size:
            return patched_dims(dims, self.patch_size, self.temporal_patch_size)
        if self.conv_stem_channels and None not in dims:
            return conv_stem_dims(dims)[1]
        return dims

    def output_channels(self, input_channels):
        patched = input_channels * math.prod(self._patch_steps()) if input_channels else input_channels
        channels = self.project_channels or self.conv_stem_channels or patched
        if self.position_encoding is None or self.combine == "add":
            return channels
        return channels + self._position_width()

    def _position_width(self):
        if self.position_projection_channels:
            return self.position_projection_channels
        return self.positions.channels

    def build(self, input_shape):
        if self.conv_stem_channels:
            policy = self.dtype_policy
            self.stem = [
                keras.layers.ZeroPadding2D(3, name="stem_pad", dtype=policy),
                keras.layers.Conv2D(self.conv_stem_channels, 7, strides=2, use_bias=False, name="stem_conv", dtype=policy),
                keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="stem_norm", dtype=policy),
                keras.layers.ReLU(name="stem_relu", dtype=policy),
                keras.layers.MaxPooling2D(3, strides=2, name="stem_pool", dtype=policy),
            ]
            shape = input_shape
            for layer in self.stem:
                layer.build(shape)
                shape = layer.compute_output_shape(shape)
            input_shape = shape
        if self.patch_size or self.temporal_patch_size:
            grid = patched_dims(list(input_shape[1:-1]), self.patch_size, self.temporal_patch_size)
            input_shape = (input_shape[0], *grid, input_shape[-1] * math.prod(self._patch_steps()))
        if self.project_channels:
            self.projection = keras.layers.Dense(self.project_channels, name="projection", dtype=self.dtype_policy)
            self.projection.build(input_shape)
        if self.position_encoding:
            self.positions.build(input_shape)  # here, eagerly: Fourier features are computed once at build
        if self.position_projection_channels:
            self.position_projection = keras.layers.Dense(
                self.position_projection_channels, name="position_projection", dtype=self.dtype_policy
            )
            self.position_projection.build((None, None, self.positions.channels))

    def call(self, inputs):
        x = inputs
        if self.patch_size or self.temporal_patch_size:
            x = space_to_depth(x, self.patch_size, self.temporal_patch_size)
        for layer in getattr(self, "stem", ()):
            x = layer(x)
        x = self.projection(x) if self.project_channels else x
        flat = ops.reshape(x, (ops.shape(x)[0], -1, x.shape[-1]))
        if self.position_encoding is None:
            return flat
        if self.position_encoding == "fourier":
            pos = self.positions(x)
        else:
            pos = self.positions(x, index_dims=tuple(x.shape[1:-1]))
        if self.position_projection_channels:
            pos = self.position_projection(pos)
        x = flat
        if self.combine == "add":
            return x + pos
        return ops.concatenate([x, pos], axis=-1)

    def flops(self, index_dims):
        """FLOPs of the matrix products of one call (built layer), per example, for inputs
        with `index_dims` (their axes between batch and channels): the conv stem's
        convolution, the input projection and the position projection (position features are
        per example once broadcast to the batch)."""
        flops = 0
        if self.conv_stem_channels:
            convolved = conv_stem_dims(index_dims)[0]
            flops += 2 * math.prod(convolved) * math.prod(self.stem[1].kernel.shape)  # a tap per kernel entry
        rows = math.prod(self.grid_dims(index_dims))
        if self.project_channels:
            flops += dense_flops(self.projection, rows)
        if self.position_projection_channels:
            flops += dense_flops(self.position_projection, rows)
        return flops

    def compute_output_shape(self, input_shape):
        dims = self.grid_dims(input_shape[1:-1])
        length = None if None in dims else math.prod(dims)
        return (input_shape[0], length, self.output_channels(input_shape[-1]))

    def get_config(self):
        return {
            **super().get_config(),
            "index_dims": list(self.index_dims),
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "conv_stem_channels": self.conv_stem_channels,
            "project_channels": self.project_channels,
            "position_encoding": self.position_encoding,
            "num_bands": self.num_bands,
            "max_resolution": list(self.max_resolution) if self.max_resolution else None,
            "concat_pos": self.concat_pos,
            "sine_only": self.sine_only,
            "position_channels": self.position_channels,
            "position_projection_channels": self.position_projection_channels,
            "combine": self.combine,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class TokenAdapter(keras.layers.Layer):
    """(batch, length) token ids -> embeddings + learned positions (first `length` of the table)."""

    def __init__(self, vocab_size, channels, max_positions, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.channels = channels
        self.max_positions = max_positions
        self.embedding = keras.layers.Embedding(
            vocab_size,
            channels,
            embeddings_initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="embedding",
            dtype=self.dtype_policy,
        )
        self.positions = TrainablePositionEncoding(
            (max_positions,), channels, resize="truncate", name="positions", dtype=self.dtype_policy
        )

    def output_channels(self, input_channels=None):
        return self.channels

    def build(self, input_shape):
        self.embedding.build(input_shape)
        self.positions.build(input_shape)

    def call(self, token_ids):
        x = self.embedding(token_ids)
        return x + self.positions(x, index_dims=(ops.shape(token_ids)[1],))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.channels,)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "channels": self.channels,
            "max_positions": self.max_positions,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class GridMask(keras.layers.Layer):
    """(batch, *index_dims) input mask -> (batch, M) over the adapted positions of a
    `FeatureAdapter` with patches or a conv stem: a patch, or a stem output, is kept when any
    position it reads is (what it reads at the others is zero: see `ZeroMasked`)."""

    def __init__(self, patch_size=None, temporal_patch_size=None, conv_stem=False, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.conv_stem = conv_stem

    def call(self, mask):
        m = ops.expand_dims(ops.cast(mask, "float32"), -1)
        if self.conv_stem:  # the stem's windows: 7x7 stride 2 padded 3, then 3x3 stride 2
            m = ops.pad(m, [[0, 0], [3, 3], [3, 3], [0, 0]])
            m = ops.max_pool(ops.max_pool(m, 7, strides=2), 3, strides=2)
        else:
            m = ops.max(space_to_depth(m, self.patch_size, self.temporal_patch_size), axis=-1, keepdims=True)
        return ops.reshape(m, (ops.shape(m)[0], -1)) > 0.5

    def compute_output_spec(self, mask):
        dims = list(mask.shape[1:])
        if None in dims:
            length = None
        elif self.conv_stem:
            length = math.prod(conv_stem_dims(dims)[1])
        else:
            length = math.prod(patched_dims(dims, self.patch_size, self.temporal_patch_size))
        return keras.KerasTensor((mask.shape[0], length), dtype="bool")

    def get_config(self):
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "conv_stem": self.conv_stem,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class ZeroMasked(keras.layers.Layer):
    """call(x, keep) -> x with zeros where `keep` (boolean, x's leading axes) is False.

    Put before an input adapter: an adapter may mix positions (a conv stem, patches), so
    values at masked positions (NaN and Inf included) are removed before it, and token ids
    there become id 0."""

    def call(self, x, keep):
        return zero_masked(x, keep)

    def compute_output_shape(self, x_shape, keep_shape=None):
        return x_shape

    def compute_output_spec(self, x, keep=None):
        return keras.KerasTensor(x.shape, dtype=x.dtype)


# ------------------------------------------------------------------ typed specs
class TypedSpec:
    """Base of the typed specs (frozen dataclasses) that configs hold for a choice of kind,
    such as `PerceiverConfig.input_adapter`. `kind` is the spec's "type" in config dicts:
    `spec_from` reads `{"type": kind, field: value, ...}` and `to_dict` writes it back."""

    kind = None

    def to_dict(self):
        """`{"type": kind, field: value, ...}` (lists for tuples): the keys of the dict the
        spec was read from, in its order, so that a file read and written back is unchanged
        (zoo entries are compared key by key with converted models' configs); else the
        required fields and those that differ from their defaults."""
        keys = getattr(self, "_dict_keys", None)
        if keys is None:
            keys = [
                f.name for f in dataclasses.fields(self)
                if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default
            ]
        return {"type": self.kind, **{key: _as_list(getattr(self, key)) for key in keys}}


def _as_list(value):
    return list(value) if isinstance(value, tuple) else value


def spec_from(field, value, spec_classes):
    """`value`, a typed spec or its dict form `{"type": ..., field: value, ...}`, as an
    instance of one of `spec_classes`; `field` names the config field in messages."""
    if isinstance(value, tuple(spec_classes)):
        return value
    kinds = {cls.kind: cls for cls in spec_classes}
    if not isinstance(value, dict):
        raise ValueError(
            f"`{field}` must be a {' or '.join(cls.__name__ for cls in spec_classes)}, or a dict with a 'type' "
            f"key; received {value!r}"
        )
    kind = value.get("type")
    if kind not in kinds:
        raise ValueError(f"{field} `type` must be one of {sorted(kinds)}; received {kind!r}")
    cls = kinds[kind]
    fields = {key: item for key, item in value.items() if key != "type"}
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"{field} of type {kind!r}: unknown key(s) {unknown}; valid keys: {['type'] + names}")
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in fields
    ]
    if missing:
        raise ValueError(f"{field} of type {kind!r} needs the key(s) {missing}; received {value}")
    spec = cls(**fields)
    object.__setattr__(spec, "_dict_keys", tuple(fields))  # not a field: equality ignores it
    return spec


def check_int(spec, name, value, minimum=1, optional=False):
    """Raise unless `value` (field `name` of `spec`) is an int >= `minimum` (or None if `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{type(spec).__name__}: `{name}` must be {expected}; received {value!r}")


def check_bool(spec, name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{type(spec).__name__}: `{name}` must be True or False; received {value!r}")


def dims_tuple(spec, name, value, allow_none=False, optional=False):
    """`value` (field `name` of `spec`: a non-empty list or tuple of ints >= 1, entries None too
    if `allow_none`) as a tuple, or None when `optional` and None; raises otherwise."""
    if value is None and optional:
        return None
    if not (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(
            (d is None and allow_none) or (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1)
            for d in value
        )
    ):
        entries = "ints >= 1" + (" or None" if allow_none else "")
        expected = f"a non-empty list of {entries}" + (" or None" if optional else "")
        raise ValueError(f"{type(spec).__name__}: `{name}` must be {expected}; received {value!r}")
    return tuple(value)


def check_choice(spec, name, value, choices):
    if value not in choices:
        raise ValueError(f"{type(spec).__name__}: `{name}` must be one of {list(choices)}; received {value!r}")


@dataclasses.dataclass(frozen=True)
class TokenInput(TypedSpec):
    """Token ids in (`token_ids`, (batch, length)): the `TokenAdapter`. Dict form
    `{"type": "tokens", ...}`. All fields are required ints >= 1.

    vocab_size: the number of token ids (ids lie in [0, vocab_size)).
    channels: the embedding width.
    max_positions: the length of the learned position table, the most tokens an input may have.
    """

    kind = "tokens"
    vocab_size: int
    channels: int
    max_positions: int

    def __post_init__(self):
        for name in ("vocab_size", "channels", "max_positions"):
            check_int(self, name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class FeatureInput(TypedSpec):
    """Arrays in (`inputs`, (batch, *index_dims, input_channels)): the `FeatureAdapter`.
    Dict form `{"type": "features", ...}`. Lists are kept as tuples.

    input_channels (required): the channels of the model input (its last axis).
    index_dims (required): the sizes of the axes between batch and channels; None for an
        axis of any length (Fourier or no positions).
    patch_size (None): cut the last two axes (or the one axis) into patches of this size.
    temporal_patch_size (None): cut the first of three axes (time) into this many frames.
    conv_stem_channels (None): a 7x7 stride-2 convolution, batch norm, ReLU and 3x3 stride-2
        max pool with this many channels first (not with patches).
    project_channels (None): a per-position linear projection to this many channels.
    position_encoding ("fourier"): "fourier", "trainable" or None (no position features).
    num_bands (64): Fourier frequency bands per axis.
    max_resolution (None): the resolution the Fourier bands span (default: index_dims);
        needed where index_dims has a None.
    concat_pos (True): the Fourier features include the positions themselves.
    sine_only (False): Fourier features are sines only (no cosines).
    position_channels (None): the width of trainable positions (needed for "trainable").
    position_projection_channels (None): project the position features to this many channels.
    combine ("concat"): "concat" the position features to the inputs, or "add" them.
    """

    kind = "features"
    input_channels: int
    index_dims: tuple
    patch_size: Optional[int] = None
    temporal_patch_size: Optional[int] = None
    conv_stem_channels: Optional[int] = None
    project_channels: Optional[int] = None
    position_encoding: Optional[str] = "fourier"
    num_bands: int = 64
    max_resolution: Optional[tuple] = None
    concat_pos: bool = True
    sine_only: bool = False
    position_channels: Optional[int] = None
    position_projection_channels: Optional[int] = None
    combine: str = "concat"

    def __post_init__(self):
        check_int(self, "input_channels", self.input_channels)
        object.__setattr__(self, "index_dims", dims_tuple(self, "index_dims", self.index_dims, allow_none=True))
        for name in (
            "patch_size", "temporal_patch_size", "conv_stem_channels", "project_channels",
            "position_channels", "position_projection_channels",
        ):
            check_int(self, name, getattr(self, name), optional=True)
        check_choice(self, "position_encoding", self.position_encoding, ("fourier", "trainable", None))
        check_int(self, "num_bands", self.num_bands)
        object.__setattr__(
            self, "max_resolution", dims_tuple(self, "max_resolution", self.max_resolution, optional=True)
        )
        check_bool(self, "concat_pos", self.concat_pos)
        check_bool(self, "sine_only", self.sine_only)
        check_choice(self, "combine", self.combine, ("concat", "add"))

    @property
    def patches(self):
        """Whether the input is cut into patches."""
        return bool(self.patch_size or self.temporal_patch_size)


INPUT_SPECS = (FeatureInput, TokenInput)


def input_spec(value):
    """`value` (a `FeatureInput`, a `TokenInput` or its dict form) as a typed input spec."""
    return spec_from("input_adapter", value, INPUT_SPECS)


def build_input_adapter(spec, dtype=None):
    """A `FeatureInput` or `TokenInput` (or its dict form) -> its adapter layer."""
    spec = input_spec(spec)
    if isinstance(spec, TokenInput):
        return TokenAdapter(spec.vocab_size, spec.channels, spec.max_positions, name="input_adapter", dtype=dtype)
    kwargs = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    kwargs.pop("input_channels")  # describes the model input, not the layer
    return FeatureAdapter(**kwargs, name="input_adapter", dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_perceiver")
class TiedEmbeddingLogits(keras.layers.Layer):
    """`x @ embedding.T + bias`: decoded queries -> token logits through the input embedding
    (the masked language model's output). Built inside a model, never serialised alone."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=(self.embedding.input_dim,), initializer="zeros")

    def call(self, x):
        table = ops.cast(self.embedding.embeddings, x.dtype)
        return ops.matmul(x, ops.transpose(table)) + ops.cast(self.bias, x.dtype)

    def flops(self, rows):
        """FLOPs of the product with the embedding table for `rows` rows."""
        return matmul_flops(rows, self.embedding.output_dim, self.embedding.input_dim)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.embedding.input_dim,)
