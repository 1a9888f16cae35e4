"""Input adapters: turn raw inputs into a (batch, M, channels) array with positions."""

import math

import keras
from keras import ops

from keras_perceiver.layers.position_encoding import FourierPositionEncoding, TrainablePositionEncoding


def conv_stem_dims(index_dims):
    """Spatial sizes after the conv stem's convolution (7x7, stride 2, padded 3) and after its
    max pool (3x3, stride 2): 224 -> 112 -> 55."""
    conv = [(d + 6 - 7) // 2 + 1 for d in index_dims]
    return conv, [(d - 3) // 2 + 1 for d in conv]


@keras.saving.register_keras_serializable(package="keras_perceiver")
class FeatureAdapter(keras.layers.Layer):
    """(batch, *index_dims, C) -> (batch, prod(index_dims), C').

    An optional convolutional stem (`conv_stem_channels`: 7x7 stride-2 convolution padded 3,
    batch norm, ReLU, 3x3 stride-2 max pool: 224 -> 112 -> 55, as transformers' conv
    checkpoint), an optional per-position linear projection (a 1x1 convolution), then position features:
    `fourier` or `trainable`, optionally linearly projected to `position_projection_channels`,
    concatenated (or added with `combine="add"`); or none. `index_dims` entries may be None
    (any length) for Fourier or no positions.
    """

    def __init__(
        self,
        index_dims,
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
                self.index_dims, position_channels, name="trainable", dtype=self.dtype_policy
            )

    def output_channels(self, input_channels):
        channels = self.project_channels or self.conv_stem_channels or input_channels
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
        if self.project_channels:
            self.projection = keras.layers.Dense(self.project_channels, name="projection", dtype=self.dtype_policy)
            self.projection.build(input_shape)
        if self.position_encoding == "trainable":
            self.positions.build(input_shape)
        if self.position_projection_channels:
            self.position_projection = keras.layers.Dense(
                self.position_projection_channels, name="position_projection", dtype=self.dtype_policy
            )
            self.position_projection.build((None, None, self.positions.channels))

    def call(self, inputs):
        x = inputs
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

    def compute_output_shape(self, input_shape):
        dims = input_shape[1:-1]
        if self.conv_stem_channels and None not in dims:
            dims = conv_stem_dims(dims)[1]
        length = None if None in dims else math.prod(dims)
        return (input_shape[0], length, self.output_channels(input_shape[-1]))

    def get_config(self):
        return {
            **super().get_config(),
            "index_dims": list(self.index_dims),
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


ADAPTERS = {"features": FeatureAdapter, "tokens": TokenAdapter}


def build_input_adapter(spec, dtype=None):
    """`{"type": "features" | "tokens", **kwargs}` -> adapter layer."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in ADAPTERS:
        raise ValueError(f"input_adapter `type` must be one of {sorted(ADAPTERS)}; received {kind!r}")
    spec.pop("input_channels", None)  # describes the model input, not the layer
    return ADAPTERS[kind](**spec, name="input_adapter", dtype=dtype)


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

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.embedding.input_dim,)
