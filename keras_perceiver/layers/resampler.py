"""Flamingo's Perceiver Resampler: a fixed number of visual tokens per media item."""

import dataclasses
from typing import Optional

import keras
from keras import ops

from keras_perceiver.layers.attention import MultiHeadAttention, zero_masked
from keras_perceiver.layers.blocks import LAYER_NORM_EPSILON, NORMS, FeedForward, GatedProjection, make_norm


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
    # The Idefics connectors' options; the defaults are Flamingo's.
    # activation may also be "swiglu" (Idefics2) or "relu" (Idefics, with use_bias=False).
    norm: str = "layer"  # "layer" | "rms": every norm (media, latents, feed-forward, final)
    norm_epsilon: float = LAYER_NORM_EPSILON
    num_key_value_heads: Optional[int] = None  # grouped-query attention; None = num_heads
    qk_norm: bool = False  # LayerNorm over each head's channels on q and k (Idefics)
    qk_norm_epsilon: float = LAYER_NORM_EPSILON
    # Idefics2's modality projection: a SwiGLU MLP (no biases) media_dim -> projection_channels
    # -> dim applied to the media before the resampler; None = no projection (media width = dim).
    media_dim: Optional[int] = None
    projection_channels: Optional[int] = None

    def validate(self):
        if self.norm not in NORMS:
            raise ValueError(f"ResamplerConfig: `norm` must be one of {NORMS}; received {self.norm!r}")
        kv = self.num_key_value_heads
        if kv is not None and (kv < 1 or self.num_heads % kv):
            raise ValueError(
                f"ResamplerConfig: `num_key_value_heads` must divide num_heads={self.num_heads}; received {kv}"
            )
        if self.media_dim not in (None, self.dim) and not self.projection_channels:
            raise ValueError(
                f"ResamplerConfig: media_dim={self.media_dim} differs from dim={self.dim}: "
                "set `projection_channels` for the modality projection"
            )


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
    """Latents attend to `concat(LN_m(media), LN_l(latents))`, residual; then residual FF.

    `norm` / `norm_epsilon` choose every norm of the block (LayerNorm or RMSNorm);
    `num_key_value_heads` gives grouped-query attention, `qk_norm` per-head q/k LayerNorms.
    """

    def __init__(
        self,
        num_heads=8,
        head_channels=64,
        ff_mult=4,
        activation="gelu",
        use_bias=False,
        norm="layer",
        norm_epsilon=LAYER_NORM_EPSILON,
        num_key_value_heads=None,
        qk_norm=False,
        qk_norm_epsilon=LAYER_NORM_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_channels = head_channels
        self.ff_mult = ff_mult
        self.activation = activation
        self.use_bias = use_bias
        self.norm = norm
        self.norm_epsilon = norm_epsilon
        self.num_key_value_heads = num_key_value_heads
        self.qk_norm = qk_norm
        self.qk_norm_epsilon = qk_norm_epsilon

    def build(self, latents_shape, media_shape, media_mask_shape=None):
        dim = latents_shape[-1]
        inner = self.num_heads * self.head_channels
        self.media_norm = make_norm(self.norm, "media_norm", self.dtype_policy, self.norm_epsilon)
        self.latents_norm = make_norm(self.norm, "latents_norm", self.dtype_policy, self.norm_epsilon)
        self.attention = MultiHeadAttention(
            self.num_heads, inner, inner, dim, use_bias=self.use_bias, name="attention", dtype=self.dtype_policy,
            num_key_value_heads=self.num_key_value_heads, qk_norm=self.qk_norm, qk_norm_epsilon=self.qk_norm_epsilon,
        )
        self.feed_forward = FeedForward(
            self.ff_mult, self.activation, use_bias=self.use_bias, name="feed_forward", dtype=self.dtype_policy,
            norm=self.norm, norm_epsilon=self.norm_epsilon,
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

    def flops(self, num_latents, num_media):
        """FLOPs of the matrix products of one call (built block), per media item: the
        latents attend to `num_media` media tokens and themselves."""
        return self.attention.flops(num_latents, num_media + num_latents) + self.feed_forward.flops(num_latents)

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
            "norm": self.norm,
            "norm_epsilon": self.norm_epsilon,
            "num_key_value_heads": self.num_key_value_heads,
            "qk_norm": self.qk_norm,
            "qk_norm_epsilon": self.qk_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class Resampler(keras.layers.Layer):
    """call(media, media_mask=None) -> (B, T, num_latents, dim).

    media: (B, V, D), (B, T, V, D) or (B, T, F, V, D) (batch, media items, frames, tokens);
    media_mask (optional, True = real token): media's shape without D. Masked tokens are
    zeroed on entry: their values (NaN and Inf included) reach neither the output nor the
    gradients. The latents are always among the keys, so a media item whose tokens are all
    masked is defined: its latents attend to the latents alone (the output for no media).
    D is `media_dim` when a modality projection is configured (`projection_channels`), else dim.
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
        self.projection = None
        if c.projection_channels:
            self.projection = GatedProjection(c.projection_channels, c.dim, name="projection", dtype=self.dtype_policy)
            self.projection.build((None, None, c.media_dim or c.dim))
        self.blocks = []
        for i in range(c.depth):
            block = ResamplerBlock(
                c.num_heads, c.head_channels, c.ff_mult, c.activation, c.use_bias, name=f"block_{i}", dtype=self.dtype_policy,
                norm=c.norm, norm_epsilon=c.norm_epsilon, num_key_value_heads=c.num_key_value_heads,
                qk_norm=c.qk_norm, qk_norm_epsilon=c.qk_norm_epsilon,
            )
            block.build(latents_shape, (None, None, c.dim))
            self.blocks.append(block)
        self.norm = make_norm(c.norm, "norm", self.dtype_policy, c.norm_epsilon)
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
        if media_mask is not None:
            media_mask = self.to_five_dims(media_mask, has_features=False)
            x = zero_masked(x, media_mask)
        if self.projection is not None:
            x = self.projection(x)  # a masked (zero) token stays zero: no biases
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
            mask = ops.reshape(media_mask, (ops.shape(x)[0], -1))
        latents = ops.cast(self.latents, x.dtype)
        latents = ops.broadcast_to(ops.expand_dims(latents, 0), (ops.shape(x)[0], c.num_latents, c.dim))
        for block in self.blocks:
            latents = block(latents, x, media_mask=mask)
        latents = self.norm(latents)
        return ops.reshape(latents, (batch, times, c.num_latents, c.dim))

    def flops(self, num_media):
        """FLOPs of the matrix products of one call (built layer), per media item of
        `num_media` tokens (its frames x tokens per frame): the modality projection and the
        blocks (the embeddings are added, not multiplied)."""
        projection = self.projection.flops(num_media) if self.projection is not None else 0
        return projection + sum(block.flops(self.config.num_latents, num_media) for block in self.blocks)

    def compute_output_shape(self, media_shape, media_mask_shape=None):
        times = media_shape[1] if len(media_shape) > 3 else 1
        return (media_shape[0], times, self.config.num_latents, self.config.dim)

    def get_config(self):
        return {**super().get_config(), "config": dataclasses.asdict(self.config)}
