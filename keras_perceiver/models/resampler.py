"""Flamingo's Perceiver Resampler as a functional model."""

import dataclasses
from typing import Optional

import keras
import numpy as np

from keras_perceiver.layers.adapters import check_int
from keras_perceiver.layers.attention import dense_flops
from keras_perceiver.layers.resampler import Resampler, ResamplerConfig
from keras_perceiver.models.base import ConfiguredModel, check_mask_matches, rank_of


@dataclasses.dataclass
class PerceiverResamplerConfig(ResamplerConfig):
    use_media_mask: bool = False  # adds a `media_mask` input (True = real token)
    # 5: media (B, T, F, V, D) (ranks 3 and 4 accepted) -> (B, T, num_latents, dim), Flamingo's;
    # 3: media (B, V, D), mask (B, V) -> (B, num_latents, dim), the Idefics connectors' own.
    media_rank: int = 5
    # A classifier: the latents averaged (over media items too, those with a real token) into a
    # Dense head named "logits"; the model then outputs (B, num_classes). None = the latents.
    num_classes: Optional[int] = None

    def validate(self):
        super().validate()
        if self.media_rank not in (3, 5):
            raise ValueError(f"PerceiverResamplerConfig: `media_rank` must be 3 or 5; received {self.media_rank}")
        check_int(self, "num_classes", self.num_classes, optional=True)


@keras.saving.register_keras_serializable(package="keras_perceiver")
class PerceiverResampler(ConfiguredModel):
    """media (B, T, F, V, D) -> (B, T, num_latents, D).

    Inputs of rank 3 (B, V, D) or 4 (B, T, V, D) are accepted and given unit T / F axes,
    as flamingo-pytorch does; a `media_mask` follows the same rule without D. With
    `num_classes` set, the output is the logits (B, num_classes) of a "logits" Dense on the
    latents' mean (over media items too; a media item with no real token is left out).
    """

    config_class = PerceiverResamplerConfig
    primary_input = "media"
    mask_input = "media_mask"

    @classmethod
    def build_graph(cls, config, dtype):
        width, unit_axes = config.media_dim or config.dim, (None,) * (config.media_rank - 2)
        inputs = {"media": keras.Input(unit_axes + (width,), name="media")}
        if config.use_media_mask:
            inputs["media_mask"] = keras.Input(unit_axes, dtype="bool", name="media_mask")
        resampler_config = ResamplerConfig(
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(ResamplerConfig)}
        )
        outputs = Resampler(resampler_config, name="resampler", dtype=dtype)(
            inputs["media"], media_mask=inputs.get("media_mask")
        )
        if config.media_rank == 3:
            outputs = keras.ops.squeeze(outputs, axis=1)
        if config.num_classes:
            outputs = keras.layers.Dense(config.num_classes, name="logits", dtype=dtype)(_pooled(outputs, inputs))
        return inputs, outputs

    def check_inputs(self, inputs):
        if not isinstance(inputs, dict):
            inputs = {"media": inputs}
        inputs = self.with_default_mask(dict(inputs))  # before media gets its unit axes
        if self.config.media_rank == 3:  # no unit axes to add: the base checks cover it
            if "media_mask" in inputs and "media" in inputs:
                check_mask_matches(self, "media_mask", inputs["media_mask"].shape, "media", inputs["media"].shape[:-1])
            return super().check_inputs(inputs)
        media_rank = rank_of(inputs["media"].shape) if "media" in inputs else 5
        if media_rank is None:  # unknown rank (a generalised TensorFlow trace): nothing to check
            return inputs
        if media_rank not in (3, 4, 5):
            raise ValueError(
                f"PerceiverResampler: input 'media' must have rank 3 (batch, V, {self.config.dim}), "
                f"4 (batch, T, V, {self.config.dim}) or 5 (batch, T, F, V, {self.config.dim}); "
                f"received shape {tuple(inputs['media'].shape)}"
            )
        if "media" in inputs:
            self._check_not_empty("media", inputs["media"].shape)  # the shape as given, before unit axes
        if "media_mask" in inputs:
            check_mask_matches(self, "media_mask", inputs["media_mask"].shape, "media", inputs["media"].shape[:-1])
            inputs["media_mask"] = _to_five_dims(inputs["media_mask"], has_features=False)
        if "media" in inputs:
            inputs["media"] = _to_five_dims(inputs["media"])
        return super().check_inputs(inputs)

    def _flops_from_shapes(self, shapes):
        batch, *middle, tokens = shapes["media"][:-1]
        times, frames = (middle + [1, 1])[:2]  # (B, V, D) and (B, T, V, D) get unit axes (to_five_dims)
        flops = batch * times * self.get_layer("resampler").flops(frames * tokens)  # per media item
        if self.config.num_classes:
            flops += batch * dense_flops(self.get_layer("logits"), 1)
        return flops


def _pooled(latents, inputs):
    """The latents (B, L, D) or (B, T, L, D) averaged into (B, D); over T, only the media
    items with at least one real token (when there is a `media_mask`)."""
    ops = keras.ops
    if len(latents.shape) == 3:
        return ops.mean(latents, axis=1)
    per_item = ops.mean(latents, axis=2)  # (B, T, D)
    if "media_mask" not in inputs:
        return ops.mean(per_item, axis=1)
    real = ops.max(ops.cast(inputs["media_mask"], per_item.dtype), axis=(2, 3))[..., None]  # (B, T, 1)
    return ops.sum(per_item * real, axis=1) / ops.maximum(ops.sum(real, axis=1), 1.0)


def _to_five_dims(x, has_features=True):
    """`Resampler.to_five_dims`, staying NumPy for NumPy input (no device copy for a check)."""
    if isinstance(x, np.ndarray):
        rank = x.ndim - (1 if has_features else 0)
        return x[:, None, None] if rank == 2 else x[:, :, None] if rank == 3 else x
    return Resampler.to_five_dims(x, has_features)
