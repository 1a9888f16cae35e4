"""Position encodings: Fourier features (as the DeepMind checkpoints use) and trainable ones."""

import math

import keras
from keras import ops


def grid_positions(index_dims):
    """Positions in [-1, 1] per axis (linspace), `ij` meshgrid, flattened row-major: (N, d).

    Entries of `index_dims` may be Python ints or scalar tensors (dynamic sizes).
    """
    axes = []
    for n in index_dims:
        steps = ops.cast(ops.arange(n), "float32")
        denom = ops.cast(ops.maximum(n - 1, 1), "float32")
        axes.append(-1.0 + 2.0 * steps / denom)
    grids = ops.meshgrid(*axes, indexing="ij") if len(axes) > 1 else axes
    return ops.stack([ops.reshape(g, (-1,)) for g in grids], axis=-1)


def fourier_features(positions, num_bands, max_resolution, concat_pos=True, sine_only=False):
    """Fourier features of `positions` (N, d).

    Per axis, frequencies `linspace(1, max_resolution[axis] / 2, num_bands)`; features
    `sin(pi * pos * f)` and `cos(pi * pos * f)`, axis-major then frequency; channel order
    `[positions, sines, cosines]`: d * (2 * num_bands + 1) channels with `concat_pos`.
    """
    if len(max_resolution) != positions.shape[-1]:
        raise ValueError(
            f"fourier_features: `max_resolution` must have one entry per axis ({positions.shape[-1]}); "
            f"received {tuple(max_resolution)}"
        )
    freqs = ops.stack(
        [ops.linspace(1.0, res / 2.0, num_bands) for res in max_resolution], axis=0
    )  # (d, K)
    scaled = ops.expand_dims(positions, -1) * ops.expand_dims(ops.cast(freqs, "float32"), 0)  # (N, d, K)
    scaled = ops.reshape(scaled, (-1, len(max_resolution) * num_bands)) * math.pi
    parts = [positions] if concat_pos else []
    parts.append(ops.sin(scaled))
    if not sine_only:
        parts.append(ops.cos(scaled))
    return ops.concatenate(parts, axis=-1)


def fourier_channels(num_axes, num_bands, concat_pos=True, sine_only=False):
    return num_axes * (num_bands * (1 if sine_only else 2) + (1 if concat_pos else 0))


@keras.saving.register_keras_serializable(package="keras_perceiver")
class FourierPositionEncoding(keras.layers.Layer):
    """Fourier features of a grid: the fixed `index_dims` if given, else the index axes of
    the input.

    call(inputs (batch, *index_dims, C)) -> (batch, prod(index_dims), channels).
    """

    def __init__(self, num_bands, max_resolution, concat_pos=True, sine_only=False, index_dims=None, **kwargs):
        super().__init__(**kwargs)
        self.index_dims = tuple(index_dims) if index_dims else None
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only

    @property
    def channels(self):
        return fourier_channels(len(self.max_resolution), self.num_bands, self.concat_pos, self.sine_only)

    def build(self, input_shape=None):
        # A grid of known size has input-independent features: computed once here, eagerly,
        # instead of on every call (on a 224 x 224 image, 50,176 x 258 sines and cosines: about
        # 100 ms a call on this CPU). Not a weight: never saved, rebuilt on load.
        dims = self.index_dims or (tuple(input_shape[1:-1]) if input_shape is not None else None)
        self._grid_dims = dims if dims and all(isinstance(d, int) for d in dims) else None
        self._features = None
        if self._grid_dims:
            # NumPy, so that a traced graph holds it as a constant (a captured backend
            # tensor became an extra input of TensorFlow-traced artefacts)
            self._features = ops.convert_to_numpy(self._compute(self._grid_dims))

    def _compute(self, index_dims):
        return fourier_features(
            grid_positions(index_dims), self.num_bands, self.max_resolution, self.concat_pos, self.sine_only
        )

    def call(self, inputs):
        shape = ops.shape(inputs)
        dims = self.index_dims or tuple(shape[1:-1])
        # plain ints only: comparing a symbolic size (a torch.export SymInt) would pin the
        # exported program to this one size
        if self._features is not None and all(isinstance(d, int) for d in dims) and tuple(dims) == self._grid_dims:
            features = ops.convert_to_tensor(self._features)
        else:  # dynamic or other index dims (a model run at another size)
            features = self._compute(dims)
        features = ops.cast(features, self.compute_dtype)
        return ops.broadcast_to(ops.expand_dims(features, 0), (shape[0],) + tuple(ops.shape(features)))

    def compute_output_shape(self, input_shape):
        dims = self.index_dims or input_shape[1:-1]
        return (input_shape[0], None if None in dims else math.prod(dims), self.channels)

    def get_config(self):
        return {
            **super().get_config(),
            "num_bands": self.num_bands,
            "max_resolution": list(self.max_resolution),
            "concat_pos": self.concat_pos,
            "sine_only": self.sine_only,
            "index_dims": list(self.index_dims) if self.index_dims else None,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class TrainablePositionEncoding(keras.layers.Layer):
    """A learned (prod(index_dims), channels) table.

    call(inputs, index_dims=None): on other index dims than it was built for, the
    table is either cut to the first positions (`resize="truncate"`, 1-D only, what the
    byte-level language model does for shorter texts) or bilinearly interpolated on the
    grid (`resize="interpolate"`, 1-D or 2-D, half-pixel centres as torch's
    `interpolate(align_corners=False)`, to run an image model at another resolution).
    """

    def __init__(self, index_dims, channels, resize="interpolate", **kwargs):
        super().__init__(**kwargs)
        if resize not in ("interpolate", "truncate"):
            raise ValueError(f"`resize` must be 'interpolate' or 'truncate'; received {resize!r}")
        self.index_dims = tuple(int(d) for d in index_dims)
        self.channels = channels
        self.resize = resize

    def build(self, *args, **kwargs):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(math.prod(self.index_dims), self.channels),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )

    def _table(self, index_dims):
        table = ops.convert_to_tensor(self.embeddings)
        if index_dims is None:
            return table
        if self.resize == "truncate":
            if len(index_dims) != 1 or len(self.index_dims) != 1:
                raise ValueError(
                    f"TrainablePositionEncoding: truncation is 1-D; received index_dims {tuple(index_dims)}"
                )
            return table[: index_dims[0]]
        if tuple(index_dims) == self.index_dims:
            return table
        if len(index_dims) != len(self.index_dims) or len(index_dims) > 2 or None in index_dims:
            raise ValueError(
                "TrainablePositionEncoding: interpolation needs static index_dims with the same "
                f"number of axes as {self.index_dims} (1 or 2); received {tuple(index_dims)}"
            )
        pad = (1,) * (2 - len(index_dims))
        grid = ops.reshape(table, (1,) + self.index_dims + pad + (self.channels,))
        grid = ops.image.resize(grid, tuple(index_dims) + pad, interpolation="bilinear", antialias=False)
        return ops.reshape(grid, (-1, self.channels))

    def call(self, inputs, index_dims=None):
        """(batch, ...) -> (batch, prod(index_dims), channels); `inputs` gives the batch size."""
        table = ops.cast(self._table(index_dims), self.compute_dtype)
        return ops.broadcast_to(ops.expand_dims(table, 0), (ops.shape(inputs)[0],) + tuple(ops.shape(table)))

    def get_config(self):
        return {
            **super().get_config(),
            "index_dims": list(self.index_dims),
            "channels": self.channels,
            "resize": self.resize,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class FourierPointEncoding(FourierPositionEncoding):
    """Fourier features of chosen points of a grid, for decoding a subset of a large output
    (a chunk of a video's pixels) at a time.

    call(points (batch, n) int, flat row-major indices into `index_dims`) ->
    (batch, n, channels). A point's coordinate on an axis of size `s` is `-1 + 2 * i / s`
    (not the linspace of `grid_positions`: what transformers' subsampled decoder queries use).
    """

    def __init__(self, index_dims, num_bands, max_resolution, concat_pos=True, sine_only=False, **kwargs):
        super().__init__(
            num_bands, max_resolution, concat_pos, sine_only, index_dims=[int(d) for d in index_dims], **kwargs
        )

    def call(self, points):
        rest = ops.cast(points, "int32")
        coords = []
        for size in reversed(self.index_dims):
            coords.append(-1.0 + 2.0 * ops.cast(ops.mod(rest, size), "float32") / size)
            rest = ops.floor_divide(rest, size)
        positions = ops.stack(coords[::-1], axis=-1)  # (batch, n, d)
        features = fourier_features(
            ops.reshape(positions, (-1, len(self.index_dims))),
            self.num_bands,
            self.max_resolution,
            self.concat_pos,
            self.sine_only,
        )
        shape = ops.shape(points)
        return ops.cast(ops.reshape(features, (shape[0], shape[1], self.channels)), self.compute_dtype)

    def compute_output_shape(self, points_shape):
        return tuple(points_shape) + (self.channels,)
