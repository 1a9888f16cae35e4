"""Flamingo's Perceiver Resampler as a functional model."""

import dataclasses

import keras

from keras_perceiver.layers.resampler import Resampler, ResamplerConfig
from keras_perceiver.models.base import ConfiguredModel, check_mask_matches


@dataclasses.dataclass
class PerceiverResamplerConfig(ResamplerConfig):
    use_media_mask: bool = False  # adds a `media_mask` input (True = real token)


@keras.saving.register_keras_serializable(package="keras_perceiver")
class PerceiverResampler(ConfiguredModel):
    """media (B, T, F, V, D) -> (B, T, num_latents, D).

    Inputs of rank 3 (B, V, D) or 4 (B, T, V, D) are accepted and given unit T / F axes,
    as flamingo-pytorch does; a `media_mask` follows the same rule without D.
    """

    config_class = PerceiverResamplerConfig
    primary_input = "media"

    @classmethod
    def build_graph(cls, config, dtype):
        inputs = {"media": keras.Input((None, None, None, config.dim), name="media")}
        if config.use_media_mask:
            inputs["media_mask"] = keras.Input((None, None, None), dtype="bool", name="media_mask")
        resampler_config = ResamplerConfig(
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(ResamplerConfig)}
        )
        outputs = Resampler(resampler_config, name="resampler", dtype=dtype)(
            inputs["media"], media_mask=inputs.get("media_mask")
        )
        return inputs, outputs

    def standardize_inputs(self, inputs):
        if not isinstance(inputs, dict):
            inputs = {"media": inputs}
        inputs = dict(inputs)
        media_rank = len(inputs["media"].shape) if "media" in inputs else 5
        if media_rank not in (3, 4, 5):
            raise ValueError(
                f"PerceiverResampler: input 'media' must have rank 3 (batch, V, {self.config.dim}), "
                f"4 (batch, T, V, {self.config.dim}) or 5 (batch, T, F, V, {self.config.dim}); "
                f"received shape {tuple(inputs['media'].shape)}"
            )
        if "media_mask" in inputs:
            check_mask_matches(self, "media_mask", inputs["media_mask"].shape, "media", inputs["media"].shape[:-1])
            inputs["media_mask"] = Resampler.to_five_dims(inputs["media_mask"], has_features=False)
        if "media" in inputs:
            inputs["media"] = Resampler.to_five_dims(inputs["media"])
        return super().standardize_inputs(inputs)
