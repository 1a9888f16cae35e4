"""Small configurations of each family and random inputs for them.

Used by the main job (`keras-perceiver demo`), the tests and the benchmarks, so all three
exercise the same models.
"""

import numpy as np

from keras_perceiver.layers import FeatureInput, TokenInput
from keras_perceiver.models import (
    InputQueries,
    LearnedQueries,
    Perceiver,
    PerceiverIO,
    PerceiverMultimodalAutoencoder,
    PerceiverResampler,
)

_ENCODER = dict(
    num_latents=16,
    latent_channels=64,
    num_blocks=2,
    num_self_attends_per_block=2,
    num_self_attention_heads=4,
    num_cross_attention_heads=1,
)

SMALL_MODELS = {
    # image classifier with Fourier features and iterative reads (shared weights)
    "perceiver": (
        Perceiver,
        dict(
            _ENCODER,
            input_adapter=FeatureInput(input_channels=3, index_dims=(16, 16), num_bands=8),
            num_cross_attends=2,
            num_classes=10,
            use_input_mask=True,
        ),
    ),
    # byte-level masked language model shape: uneven q/k and v widths
    "perceiver_io": (
        PerceiverIO,
        dict(
            _ENCODER,
            input_adapter=TokenInput(vocab_size=262, channels=48, max_positions=128),
            cross_attention_qk_channels=32,
            cross_attention_v_channels=64,
            self_attention_qk_channels=32,
            output_queries=LearnedQueries(num_queries=128, channels=48),
            decoder_num_heads=2,
            decoder_qk_channels=32,
            decoder_v_channels=48,
            decoder_use_query_residual=False,
            output_channels=262,
            use_input_mask=True,
        ),
    ),
    # optical flow: two frames patched together, every pixel queries its own flow vector
    "perceiver_io_flow": (
        PerceiverIO,
        dict(
            _ENCODER,
            input_adapter=FeatureInput(
                input_channels=27, index_dims=(2, 6, 8), temporal_patch_size=2,
                project_channels=16, num_bands=4, max_resolution=(6, 8),
            ),
            output_queries=InputQueries(),
            output_channels=2,
            output_scale=0.01,
            decoder_use_query_residual=False,
        ),
    ),
    # video + audio + label autoencoder, decoded at chosen output points
    "perceiver_multimodal": (
        PerceiverMultimodalAutoencoder,
        dict(
            _ENCODER,
            image_shape=[2, 8, 8, 3], image_num_bands=4, image_max_resolution=[2, 8, 8],
            audio_samples=32, audio_samples_per_patch=4, audio_num_bands=8,
            num_labels=10, label_query_channels=16, decoder_channels=16,
        ),
    ),
    "perceiver_resampler": (
        PerceiverResampler,
        dict(dim=64, depth=2, num_heads=4, head_channels=16, num_latents=8, num_media_embeds=4, max_num_frames=2),
    ),
    # the Idefics connectors' options in one model: Idefics2's SwiGLU modality projection,
    # RMSNorm and grouped-query attention, Idefics' per-head q/k LayerNorms; (B, V, D) media
    # with a padding mask -> (B, latents, dim)
    "idefics_connector": (
        PerceiverResampler,
        dict(
            dim=48, depth=2, num_heads=4, head_channels=12, num_latents=8, activation="swiglu", norm="rms",
            norm_epsilon=1e-6, num_key_value_heads=2, qk_norm=True, media_dim=40, projection_channels=56,
            media_rank=3, use_media_mask=True,
        ),
    ),
}


def build_small(name, **overrides):
    model_class, config = SMALL_MODELS[name]
    return model_class({**config, **overrides})


def example_inputs(model, batch=2, length=None, seed=0, shapes=None):
    """Random inputs for every named input of `model`.

    Variable axes get `length` (default 24); `shapes` ({input name: full shape}) overrides
    any input's shape (a mask not named follows its data). Values as `random_inputs` makes them.
    """
    given, shapes = shapes or {}, {}
    for name, tensor in model.named_inputs.items():
        dims = [batch] + [d if d is not None else (length or 24) for d in tensor.shape[1:]]
        shapes[name] = dims
    if "media" in shapes and len(shapes["media"]) == 5:
        shapes["media"][1:4] = [2, 2, length or 12]  # T, F, V
    shapes.update({name: list(shape) for name, shape in given.items()})
    for name, dims in shapes.items():
        if name.endswith("_mask") and name not in given:
            data_name = "media" if name == "media_mask" else next(n for n in shapes if not n.endswith("_mask"))
            shapes[name] = shapes[data_name][: len(dims)]
    vocab_size = model.config.input_adapter.vocab_size if "token_ids" in shapes else None
    return random_inputs(shapes, seed=seed, vocab_size=vocab_size, index_limits=getattr(model, "output_point_limits", None))


def random_inputs(shapes, seed=0, vocab_size=None, index_limits=None):
    """Random values for inputs of the given full shapes ({input name: shape}), by name:
    `token_ids` are valid ids (below `vocab_size`), `*_output_points` indices below
    `index_limits[name]`, `*_mask` masks True except for the last quarter of each sequence in
    the last example, anything else float32 normal noise. The one generator of the tests'
    and the bench's inputs."""
    rng = np.random.default_rng(seed)
    result = {}
    for name, dims in shapes.items():
        if name.endswith("_output_points"):
            result[name] = rng.integers(0, index_limits[name], size=dims).astype("int32")
        elif name == "token_ids":
            if vocab_size is None:
                raise ValueError("random_inputs: `vocab_size` is needed for `token_ids`; received None")
            result[name] = rng.integers(0, vocab_size, size=dims).astype("int32")
        elif name.endswith("_mask"):
            mask = np.ones(dims, dtype=bool)
            flat = mask.reshape(dims[0], -1)
            flat[-1, -(flat.shape[1] // 4) :] = False
            result[name] = flat.reshape(dims)
        else:
            result[name] = rng.normal(size=dims).astype("float32")
    return result


def outputs_to_numpy(outputs):
    """A model's outputs as one NumPy array: a dict of outputs (the multimodal autoencoder)
    becomes its arrays flattened per example and concatenated in key order, (batch, -1)."""
    import keras

    if isinstance(outputs, dict):
        parts = [keras.ops.convert_to_numpy(outputs[k]) for k in sorted(outputs)]
        return np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1)
    return np.asarray(keras.ops.convert_to_numpy(outputs))
