"""Flamingo's gated cross-attention dense block, inserted between frozen LM layers."""

import keras
from keras import ops

from keras_perceiver.layers.attention import MultiHeadAttention
from keras_perceiver.layers.blocks import FeedForward, layer_norm


@keras.saving.register_keras_serializable(package="keras_perceiver")
class GatedCrossAttentionBlock(keras.layers.Layer):
    """`x += tanh(alpha_attn) * XAttn(LN(x), media)`, then `x += tanh(alpha_ff) * FF(x)`.

    call(text (B, L, D), media (B, T, n, D_media), media_locations (B, L) bool):
    a text token at position i sees media item t (1-based) where `t == cumsum(loc)[i]`
    (`only_immediate=True`, the last media before it) or `t <= cumsum(loc)[i]` (all
    previous). Tokens before any media get zeros from the attention. Both gates start at
    0, so a freshly inserted block leaves the language model unchanged.
    """

    def __init__(self, num_heads=8, head_channels=64, ff_mult=4, only_immediate=True, activation="gelu", **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_channels = head_channels
        self.ff_mult = ff_mult
        self.only_immediate = only_immediate
        self.activation = activation

    def build(self, text_shape, media_shape, media_locations_shape=None):
        dim = text_shape[-1]
        inner = self.num_heads * self.head_channels
        self.norm = layer_norm("norm", self.dtype_policy)
        self.attention = MultiHeadAttention(
            self.num_heads, inner, inner, dim, use_bias=False, name="attention", dtype=self.dtype_policy
        )
        self.feed_forward = FeedForward(
            self.ff_mult, self.activation, use_bias=False, name="feed_forward", dtype=self.dtype_policy
        )
        self.attention_gate = self.add_weight(name="attention_gate", shape=(), initializer="zeros")
        self.feed_forward_gate = self.add_weight(name="feed_forward_gate", shape=(), initializer="zeros")
        self.norm.build(text_shape)
        self.attention.build(text_shape, (None, None, media_shape[-1]))
        self.feed_forward.build(text_shape)

    def call(self, text, media, media_locations):
        shape = ops.shape(media)
        batch, times, per_media = shape[0], shape[1], shape[2]
        flat_media = ops.reshape(media, (batch, -1, media.shape[-1]))
        text_time = ops.cumsum(ops.cast(media_locations, "int32"), axis=-1)  # (B, L)
        media_time = ops.repeat(ops.arange(1, times + 1, dtype="int32"), per_media)  # (T * n,)
        text_time, media_time = ops.expand_dims(text_time, -1), ops.reshape(media_time, (1, 1, -1))
        mask = text_time == media_time if self.only_immediate else text_time >= media_time
        attended = self.attention(self.norm(text), flat_media, key_mask=mask)
        x = text + ops.tanh(ops.cast(self.attention_gate, text.dtype)) * attended
        return x + ops.tanh(ops.cast(self.feed_forward_gate, x.dtype)) * self.feed_forward(x)

    def compute_output_shape(self, text_shape, media_shape, media_locations_shape=None):
        return text_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_channels": self.head_channels,
            "ff_mult": self.ff_mult,
            "only_immediate": self.only_immediate,
            "activation": self.activation,
        }
