"""Perceiver IO multimodal autoencoder (video + audio + class label, Kinetics-700)."""

import dataclasses
import math
from typing import Optional

import keras
from keras import ops

from keras_perceiver.layers.adapters import FeatureAdapter
from keras_perceiver.layers.attention import dense_flops
from keras_perceiver.layers.blocks import CrossAttentionBlock
from keras_perceiver.layers.encoder import EncoderConfig, PerceiverEncoder
from keras_perceiver.layers.position_encoding import FourierPointEncoding, TrainablePositionEncoding
from keras_perceiver.models.base import ConfiguredModel, check_index_range

MODALITIES = ("audio", "image", "label")  # the order they are concatenated in (sorted)


@keras.saving.register_keras_serializable(package="keras_perceiver")
class PadChannels(keras.layers.Layer):
    """(batch, n, c) -> (batch, n, c + width): appends one learned vector to every row, so that
    modalities of different widths can share one array."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width

    def build(self, input_shape):
        self.padding = self.add_weight(
            name="padding", shape=(self.width,), initializer=keras.initializers.RandomNormal(stddev=1.0)
        )

    def call(self, x):
        shape = ops.shape(x)
        padding = ops.cast(ops.reshape(self.padding, (1, 1, self.width)), x.dtype)
        return ops.concatenate([x, ops.broadcast_to(padding, (shape[0], shape[1], self.width))], axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] + self.width,)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


@dataclasses.dataclass
class PerceiverMultimodalConfig(EncoderConfig):
    """Defaults: deepmind/multimodal-perceiver as transformers builds it."""

    num_latents: int = 784
    latent_channels: int = 512
    num_self_attends_per_block: int = 8
    num_cross_attention_heads: int = 1
    # Video: (frames, height, width, channels), cut into `image_patch_size` squares.
    image_shape: list = dataclasses.field(default_factory=lambda: [16, 224, 224, 3])
    image_patch_size: int = 4
    image_num_bands: int = 32
    # transformers uses (frames, image_size, image_size) with the config's image_size (56 for
    # the converted checkpoint) for the input features and the decoder queries alike.
    image_max_resolution: list = dataclasses.field(default_factory=lambda: [16, 56, 56])
    audio_samples: int = 30720  # 16 frames x 1920 samples
    audio_samples_per_patch: int = 16
    audio_num_bands: int = 192
    num_labels: int = 700
    input_padding: int = 4  # width added past the widest modality in the encoder input
    query_padding: int = 2  # the same for the decoder queries
    label_query_channels: int = 1024
    decoder_channels: int = 512
    decoder_num_heads: int = 1
    decoder_qk_channels: Optional[int] = None
    decoder_v_channels: Optional[int] = None
    decoder_widening_factor: int = 1

    def validate(self):
        super().validate()
        if len(self.image_shape) != 4 or len(self.image_max_resolution) != 3:
            raise ValueError(
                "`image_shape` must be [frames, height, width, channels] and `image_max_resolution` "
                f"[frames, height, width]; received {self.image_shape} and {self.image_max_resolution}"
            )
        if self.audio_samples % self.audio_samples_per_patch:
            raise ValueError(
                f"`audio_samples` must be a multiple of audio_samples_per_patch={self.audio_samples_per_patch}; "
                f"received {self.audio_samples}"
            )

    @property
    def audio_patches(self):
        return self.audio_samples // self.audio_samples_per_patch

    @property
    def output_point_limits(self):
        """{input name: number of points it indexes}."""
        return {"image_output_points": math.prod(self.image_shape[:3]), "audio_output_points": self.audio_patches}


@keras.saving.register_keras_serializable(package="keras_perceiver")
class PerceiverMultimodalAutoencoder(ConfiguredModel):
    """Video, audio and a class label in, reconstructions of all three out.

    Inputs: `image` (batch, frames, H, W, C), `audio` (batch, samples, 1), and which outputs
    to decode: `image_output_points` (batch, n) flat indices into (frames, H, W) and
    `audio_output_points` (batch, m) indices of audio patches. A whole video is too many
    queries at once (16 x 224 x 224), so it is decoded in chunks, as in the paper.
    Outputs: `reconstructed_image` (batch, n, C), `reconstructed_audio` (batch, m *
    samples_per_patch) and `label_logits` (batch, num_labels); transformers' `audio`, `image`,
    `label` (output names that differ from the input names keep the exported graphs unambiguous).

    The label enters the encoder as a learned mask token, as in the checkpoint at inference
    (transformers masks the label input with probability 1, so its values never matter):
    the autoencoder is then a Kinetics-700 video classifier.
    """

    config_class = PerceiverMultimodalConfig

    @classmethod
    def build_graph(cls, config, dtype):
        frames, height, width, channels = config.image_shape
        inputs = {
            "image": keras.Input((frames, height, width, channels), name="image"),
            "audio": keras.Input((config.audio_samples, 1), name="audio"),
            "image_output_points": keras.Input((None,), dtype="int32", name="image_output_points"),
            "audio_output_points": keras.Input((None,), dtype="int32", name="audio_output_points"),
        }
        adapters = {
            "audio": FeatureAdapter(
                [config.audio_samples],
                patch_size=config.audio_samples_per_patch,
                num_bands=config.audio_num_bands,
                max_resolution=[config.audio_samples],
                name="audio_adapter",
                dtype=dtype,
            ),
            "image": FeatureAdapter(
                [frames, height, width],
                patch_size=config.image_patch_size,
                num_bands=config.image_num_bands,
                max_resolution=config.image_max_resolution,
                name="image_adapter",
                dtype=dtype,
            ),
        }
        widths = {
            "audio": adapters["audio"].output_channels(1),
            "image": adapters["image"].output_channels(channels),
            "label": config.num_labels,
        }
        input_width = max(widths.values()) + config.input_padding
        parts = {
            name: PadChannels(input_width - widths[name], name=f"{name}_input_padding", dtype=dtype)(
                adapters[name](inputs[name])
            )
            for name in ("audio", "image")
        }
        parts["label"] = TrainablePositionEncoding((1,), input_width, name="label_mask_token", dtype=dtype)(
            inputs["image"]
        )
        encoded = keras.layers.Concatenate(axis=1, name="inputs", dtype=dtype)([parts[m] for m in MODALITIES])
        latents = PerceiverEncoder(config.encoder_config(), name="encoder", dtype=dtype)(encoded)

        queries = {
            "audio": FourierPointEncoding(
                [config.audio_patches], config.audio_num_bands, [config.audio_samples], name="audio_queries", dtype=dtype
            )(inputs["audio_output_points"]),
            "image": FourierPointEncoding(
                [frames, height, width], config.image_num_bands, config.image_max_resolution,
                name="image_queries", dtype=dtype,
            )(inputs["image_output_points"]),
            "label": TrainablePositionEncoding(
                (1,), config.label_query_channels, name="label_query", dtype=dtype
            )(latents),
        }
        query_width = max(q.shape[-1] for q in queries.values()) + config.query_padding
        decoder = CrossAttentionBlock(
            num_heads=config.decoder_num_heads,
            qk_channels=config.decoder_qk_channels,
            v_channels=config.decoder_v_channels,
            widening_factor=config.decoder_widening_factor,
            use_query_residual=False,
            activation=config.activation,
            name="decoder",
            dtype=dtype,
        )
        projection = keras.layers.Dense(config.decoder_channels, name="decoder_projection", dtype=dtype)
        heads = {
            "audio": config.audio_samples_per_patch,
            "image": channels,
            "label": config.num_labels,
        }
        outputs = {}
        # Queries never attend to each other, so each modality is decoded on its own with the
        # shared decoder: the same result as one concatenated query array, without the split.
        for name in MODALITIES:
            padded = PadChannels(query_width - queries[name].shape[-1], name=f"{name}_query_padding", dtype=dtype)(
                queries[name]
            )
            decoded = projection(decoder(padded, latents))
            outputs[name] = keras.layers.Dense(heads[name], name=f"{name}_output", dtype=dtype)(decoded)
        # keys in sorted order, so that every flattening of the outputs (insertion order or
        # sorted) lists them alike: exported artefacts name their outputs by that order
        return inputs, {
            "label_logits": keras.layers.Reshape((config.num_labels,), name="label_logits", dtype=dtype)(outputs["label"]),
            "reconstructed_audio": keras.layers.Reshape((-1,), name="audio_samples", dtype=dtype)(outputs["audio"]),
            "reconstructed_image": outputs["image"],
        }

    @property
    def output_point_limits(self):
        """{input name: number of points it indexes} (`config.output_point_limits`)."""
        return self.config.output_point_limits

    def check_input_values(self, inputs):
        for name, limit in self.output_point_limits.items():
            check_index_range(self, name, inputs[name], limit)

    def _flops_from_shapes(self, shapes):
        c = self.config
        flops, rows = 0, 1  # the label enters as one row
        for name in ("audio", "image"):
            adapter, index_dims = self.get_layer(f"{name}_adapter"), shapes[name][1:-1]
            flops += adapter.flops(index_dims)
            rows += math.prod(adapter.grid_dims(index_dims))
        flops += self.get_layer("encoder").flops(rows)
        decoder, projection = self.get_layer("decoder"), self.get_layer("decoder_projection")
        queries = {"audio": shapes["audio_output_points"][1], "image": shapes["image_output_points"][1], "label": 1}
        for name, count in queries.items():  # each modality through the shared decoder, then its own head
            flops += decoder.flops(count, c.num_latents) + dense_flops(projection, count)
            flops += dense_flops(self.get_layer(f"{name}_output"), count)
        return shapes["image"][0] * flops
