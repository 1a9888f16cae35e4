"""The Perceiver encoder: inputs are read into learned latents, latents think."""

import dataclasses
from typing import Optional

import keras
from keras import ops

from keras_perceiver.layers.blocks import CrossAttentionBlock, SelfAttentionBlock


@dataclasses.dataclass
class EncoderConfig:
    """Latent array and the read / think stack (transformers' Perceiver defaults)."""

    num_latents: int = 256
    latent_channels: int = 1280
    num_blocks: int = 1
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    self_attention_qk_channels: Optional[int] = None
    self_attention_v_channels: Optional[int] = None
    cross_attention_qk_channels: Optional[int] = None
    cross_attention_v_channels: Optional[int] = None
    self_attention_widening_factor: int = 1
    cross_attention_widening_factor: int = 1
    use_query_residual: bool = True
    # Iterative reads: blocks 0 .. num_cross_attends-1 each start with a cross-attend.
    # With sharing, every read after the first reuses one set of weights (the paper's choice).
    num_cross_attends: int = 1
    share_cross_attend_weights: bool = True
    activation: str = "gelu"

    def encoder_config(self):
        names = {f.name for f in dataclasses.fields(EncoderConfig)}
        return EncoderConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def validate(self):
        if not 1 <= self.num_cross_attends <= self.num_blocks:
            raise ValueError(
                f"`num_cross_attends` must be between 1 and num_blocks={self.num_blocks}; "
                f"received {self.num_cross_attends}"
            )


@keras.saving.register_keras_serializable(package="keras_perceiver")
class PerceiverEncoder(keras.layers.Layer):
    """call(inputs (B, M, C), input_mask (B, M) or None) -> latents (B, num_latents, D).

    Self-attention weights are shared across the `num_blocks` repeats.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = EncoderConfig(**config)
        self.config = config or EncoderConfig()
        self.config.validate()

    def build(self, inputs_shape, input_mask_shape=None):
        c = self.config
        latent_shape = (inputs_shape[0], c.num_latents, c.latent_channels)
        self.latents = self.add_weight(
            name="latents",
            shape=(c.num_latents, c.latent_channels),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )

        def cross_attend(name):
            block = CrossAttentionBlock(
                num_heads=c.num_cross_attention_heads,
                qk_channels=c.cross_attention_qk_channels,
                v_channels=c.cross_attention_v_channels,
                widening_factor=c.cross_attention_widening_factor,
                use_query_residual=c.use_query_residual,
                activation=c.activation,
                name=name,
                dtype=self.dtype_policy,
            )
            block.build(latent_shape, inputs_shape)
            return block

        self.cross_attends = [cross_attend("cross_attend")]
        if c.num_cross_attends > 1:
            if c.share_cross_attend_weights:
                self.cross_attends += [cross_attend("cross_attend_shared")] * (c.num_cross_attends - 1)
            else:
                self.cross_attends += [cross_attend(f"cross_attend_{i}") for i in range(1, c.num_cross_attends)]
        self.self_attends = []
        for i in range(c.num_self_attends_per_block):
            block = SelfAttentionBlock(
                num_heads=c.num_self_attention_heads,
                qk_channels=c.self_attention_qk_channels,
                v_channels=c.self_attention_v_channels,
                widening_factor=c.self_attention_widening_factor,
                activation=c.activation,
                name=f"self_attend_{i}",
                dtype=self.dtype_policy,
            )
            block.build(latent_shape)
            self.self_attends.append(block)

    def call(self, inputs, input_mask=None):
        latents = ops.cast(self.latents, inputs.dtype)
        x = ops.broadcast_to(ops.expand_dims(latents, 0), (ops.shape(inputs)[0],) + tuple(latents.shape))
        for block_index in range(self.config.num_blocks):
            if block_index < len(self.cross_attends):
                x = self.cross_attends[block_index](x, inputs, key_mask=input_mask)
            for layer in self.self_attends:
                x = layer(x)
        return x

    def flops(self, num_inputs):
        """FLOPs of the matrix products of one call (built layer), per example, reading
        `num_inputs` input rows: every read (shared weights or not) and every self-attend of
        every block."""
        c = self.config
        reads = sum(block.flops(c.num_latents, num_inputs) for block in self.cross_attends)
        thinks = c.num_blocks * sum(block.flops(c.num_latents) for block in self.self_attends)
        return reads + thinks

    def compute_output_shape(self, inputs_shape, input_mask_shape=None):
        return (inputs_shape[0], self.config.num_latents, self.config.latent_channels)

    def get_config(self):
        return {**super().get_config(), "config": dataclasses.asdict(self.config)}
