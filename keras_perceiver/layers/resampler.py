"""Flamingo's Perceiver Resampler: a fixed number of visual tokens per media item."""

import dataclasses
from typing import Optional

import keras
from keras import ops

from keras_perceiver.layers.attention import MultiHeadAttention
from keras_perceiver.layers.blocks import FeedForward, layer_norm


@dataclasses.dataclass
class ResamplerConfig:
    """Defaults are flamingo-pytorch's (depth 6, 8 heads x 64, 64 latents, GELU, no biases)."""

    dim: int = 1024
    depth: int = 6
    num_heads: int = 8
    head_channels: int = 64
    num_latents: int = 64
    ff_mult: int = 4
    activation: str = "gelu"
    use_bias: bool = False
    # Learned embeddings added per media item (time) and per frame; None = not used.
    # Longer inputs than these tables are served by linear interpolation.
    num_media_embeds: Optional[int] = None
    max_num_frames: Optional[int] = None


def interpolate_embeddings(table, length):
    """Rows 0..length-1 of `table` when it has enough rows, else `table` linearly
    interpolated (end points aligned) to `length` rows. `length` may be a tensor."""
    rows = table.shape[0]
    # `length` may be a torch.export SymInt, which ops.arange refuses; ops.ones takes it
    steps = ops.cumsum(ops.ones((length,), "float32")) - 1.0
    last = ops.max(steps)  # length - 1, as a tensor
    stretch = (rows - 1) / ops.maximum(last, 1.0)
    pos = ops.where(last >= rows, steps * stretch, steps)
    low = ops.cast(ops.floor(pos), "int32")
    high = ops.minimum(low + 1, rows - 1)
    weight = ops.cast(ops.expand_dims(pos - ops.cast(low, "float32"), -1), table.dtype)
    return ops.take(table, low, axis=0) * (1 - weight) + ops.take(table, high, axis=0) * weight


@keras.saving.register_keras_serializable(package="keras_perceiver")
class ResamplerBlock(keras.layers.Layer):
    """Latents attend to `concat(LN_m(media), LN_l(latents))`, residual; then residual FF."""

    def __init__(self, num_heads=8, head_channels=64, ff_mult=4, activation="gelu", use_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_channels = head_channels
        self.ff_mult = ff_mult
        self.activation = activation
        self.use_bias = use_bias

    def build(self, latents_shape, media_shape, media_mask_shape=None):
        dim = latents_shape[-1]
        inner = self.num_heads * self.head_channels
        self.media_norm = layer_norm("media_norm", self.dtype_policy)
        self.latents_norm = layer_norm("latents_norm", self.dtype_policy)
        self.attention = MultiHeadAttention(
            self.num_heads, inner, inner, dim, use_bias=self.use_bias, name="attention", dtype=self.dtype_policy
        )
        self.feed_forward = FeedForward(
            self.ff_mult, self.activation, use_bias=self.use_bias, name="feed_forward", dtype=self.dtype_policy
        )
        self.media_norm.build(media_shape)
        self.latents_norm.build(latents_shape)
        self.attention.build(latents_shape, latents_shape)
        self.feed_forward.build(latents_shape)

    def call(self, latents, media, media_mask=None):
        normed = self.latents_norm(latents)
        context = ops.concatenate([self.media_norm(media), normed], axis=1)
        key_mask = None
        if media_mask is not None:
            latent_keys = ops.ones((ops.shape(latents)[0], latents.shape[1]), dtype="bool")
            key_mask = ops.concatenate([ops.cast(media_mask, "bool"), latent_keys], axis=1)
        latents = latents + self.attention(normed, context, key_mask=key_mask)
        return latents + self.feed_forward(latents)

    def compute_output_shape(self, latents_shape, media_shape, media_mask_shape=None):
        return latents_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_channels": self.head_channels,
            "ff_mult": self.ff_mult,
            "activation": self.activation,
            "use_bias": self.use_bias,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class Resampler(keras.layers.Layer):
    """call(media, media_mask=None) -> (B, T, num_latents, dim).

    media: (B, V, D), (B, T, V, D) or (B, T, F, V, D) (batch, media items, frames, tokens);
    media_mask (optional, True = real token): media's shape without D.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = ResamplerConfig(**config)
        self.config = config or ResamplerConfig()

    def build(self, media_shape, media_mask_shape=None):
        c = self.config
        self.latents = self.add_weight(
            name="latents", shape=(c.num_latents, c.dim), initializer=keras.initializers.RandomNormal(stddev=1.0)
        )
        self.frame_embeddings = self.media_time_embeddings = None
        if c.max_num_frames:
            self.frame_embeddings = self.add_weight(
                name="frame_embeddings",
                shape=(c.max_num_frames, c.dim),
                initializer=keras.initializers.RandomNormal(stddev=1.0),
            )
        if c.num_media_embeds:
            self.media_time_embeddings = self.add_weight(
                name="media_time_embeddings",
                shape=(c.num_media_embeds, c.dim),
                initializer=keras.initializers.RandomNormal(stddev=1.0),
            )
        latents_shape = (None, c.num_latents, c.dim)
        self.blocks = []
        for i in range(c.depth):
            block = ResamplerBlock(
                c.num_heads, c.head_channels, c.ff_mult, c.activation, c.use_bias, name=f"block_{i}", dtype=self.dtype_policy
            )
            block.build(latents_shape, (None, None, c.dim))
            self.blocks.append(block)
        self.norm = layer_norm("norm", self.dtype_policy)
        self.norm.build(latents_shape)

    @staticmethod
    def to_five_dims(x, has_features=True):
        """(B, V[, D]) / (B, T, V[, D]) -> (B, T, F, V[, D]) by inserting unit axes."""
        rank = len(x.shape) - (1 if has_features else 0)
        if rank == 2:
            return ops.expand_dims(x, (1, 2))
        if rank == 3:
            return ops.expand_dims(x, 2)
        return x

    def call(self, media, media_mask=None):
        c = self.config
        x = self.to_five_dims(media)
        shape = ops.shape(x)
        batch, times, frames = shape[0], shape[1], shape[2]
        if self.frame_embeddings is not None:
            frame_emb = interpolate_embeddings(ops.convert_to_tensor(self.frame_embeddings), frames)
            x = x + ops.reshape(ops.cast(frame_emb, x.dtype), (1, 1, -1, 1, c.dim))
        x = ops.reshape(x, (batch, times, -1, c.dim))
        if self.media_time_embeddings is not None:
            time_emb = interpolate_embeddings(ops.convert_to_tensor(self.media_time_embeddings), times)
            x = x + ops.reshape(ops.cast(time_emb, x.dtype), (1, -1, 1, c.dim))
        x = ops.reshape(x, (-1, ops.shape(x)[2], c.dim))  # media items become batch
        mask = None
        if media_mask is not None:
            mask = ops.reshape(self.to_five_dims(media_mask, has_features=False), (ops.shape(x)[0], -1))
        latents = ops.cast(self.latents, x.dtype)
        latents = ops.broadcast_to(ops.expand_dims(latents, 0), (ops.shape(x)[0], c.num_latents, c.dim))
        for block in self.blocks:
            latents = block(latents, x, media_mask=mask)
        latents = self.norm(latents)
        return ops.reshape(latents, (batch, times, c.num_latents, c.dim))

    def compute_output_shape(self, media_shape, media_mask_shape=None):
        times = media_shape[1] if len(media_shape) > 3 else 1
        return (media_shape[0], times, self.config.num_latents, self.config.dim)

    def get_config(self):
        return {**super().get_config(), "config": dataclasses.asdict(self.config)}
