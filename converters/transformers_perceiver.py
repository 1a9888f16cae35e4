"""Import transformers Perceiver checkpoints (a model instance or a `save_pretrained` dir).

Supported heads: PerceiverForMaskedLM, PerceiverForImageClassificationLearned,
PerceiverForImageClassificationFourier, PerceiverForImageClassificationConvProcessing,
PerceiverForOpticalFlow, PerceiverForMultimodalAutoencoding. Images and videos are
channels-last here ((B, H, W, C), (B, T, H, W, C)), where transformers takes (B, C, H, W) and
(B, T, C, H, W).
"""

import dataclasses

import numpy as np

from keras_perceiver.converters.common import assign_by_path, linear, to_numpy

SUPPORTED = (
    "PerceiverForMaskedLM",
    "PerceiverForImageClassificationLearned",
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForOpticalFlow",
    "PerceiverForMultimodalAutoencoding",
)
IMAGE_CLASSIFIERS = SUPPORTED[1:4]


# (our field, transformers' PerceiverConfig field): the encoder's fields, read both ways
ENCODER_FIELDS = (
    ("num_latents", "num_latents"),
    ("latent_channels", "d_latents"),
    ("num_blocks", "num_blocks"),
    ("num_self_attends_per_block", "num_self_attends_per_block"),
    ("num_self_attention_heads", "num_self_attention_heads"),
    ("num_cross_attention_heads", "num_cross_attention_heads"),
    ("self_attention_qk_channels", "qk_channels"),
    ("self_attention_v_channels", "v_channels"),
    ("cross_attention_qk_channels", "qk_channels"),
    ("cross_attention_v_channels", "v_channels"),
    ("self_attention_widening_factor", "self_attention_widening_factor"),
    ("cross_attention_widening_factor", "cross_attention_widening_factor"),
    ("use_query_residual", "use_query_residual"),
)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_approximate", "relu": "relu"}  # transformers' -> ours
OUR_CLASSES = {  # the keras_perceiver class each supported head converts to
    "PerceiverForMaskedLM": "PerceiverIO",
    **{name: "Perceiver" for name in IMAGE_CLASSIFIERS},
    "PerceiverForOpticalFlow": "PerceiverIO",
    "PerceiverForMultimodalAutoencoding": "PerceiverMultimodalAutoencoder",
}


def _encoder_config(hf):
    config = {ours: getattr(hf, theirs) for ours, theirs in ENCODER_FIELDS}
    config["activation"] = ACTIVATIONS[hf.hidden_act]
    return config


def transformers_config(config, class_name):
    """The transformers PerceiverConfig whose `class_name` head (`SUPPORTED` but the multimodal
    autoencoder) is the model of our `config` (a dict; missing fields take our defaults): the
    inverse of `config_from_transformers`. What the head fixes itself (its decoder, its
    position encodings) is not in its config, so a round trip through both is the check that
    the head matches `config`. ValueError for a field transformers cannot express."""
    import transformers

    from keras_perceiver import models

    if class_name not in OUR_CLASSES:
        raise ValueError(f"class_name must be one of {SUPPORTED}; received {class_name!r}")
    typed = getattr(models, OUR_CLASSES[class_name]).config_class(**config)
    if class_name == "PerceiverForMultimodalAutoencoding":
        return _multimodal_transformers_config(typed)
    adapter = typed.input_adapter
    config = dataclasses.asdict(typed)
    kwargs = {}
    for ours, theirs in ENCODER_FIELDS:
        if kwargs.get(theirs, config[ours]) != config[ours]:
            raise ValueError(
                f"transformers has one `{theirs}` for self- and cross-attention: expected {ours}={kwargs[theirs]!r}; "
                f"received {config[ours]!r}"
            )
        kwargs[theirs] = config[ours]
    activations = {ours: theirs for theirs, ours in ACTIVATIONS.items()}
    if config["activation"] not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)} for transformers; received {config['activation']!r}")
    kwargs["hidden_act"] = activations[config["activation"]]
    if class_name == "PerceiverForMaskedLM":
        kwargs.update(vocab_size=adapter.vocab_size, d_model=adapter.channels, max_position_embeddings=adapter.max_positions)
    elif class_name == "PerceiverForOpticalFlow":
        kwargs.update(train_size=list(adapter.index_dims[1:]))
    else:
        height, width = adapter.index_dims
        if height != width:
            raise ValueError(f"input_adapter index_dims must be square for {class_name} (image_size); received {[height, width]}")
        kwargs.update(image_size=height, num_labels=config["num_classes"])
    return transformers.PerceiverConfig(**kwargs)


def config_from_transformers(hf_model):
    """-> (keras_perceiver class name, config dict) for a supported transformers model."""
    kind = type(hf_model).__name__
    hf = hf_model.config
    config = _encoder_config(hf)
    if kind == "PerceiverForMaskedLM":
        decoder = hf_model.perceiver.decoder
        attention = decoder.decoding_cross_attention.attention.self
        config.update(
            input_adapter={
                "type": "tokens",
                "vocab_size": hf.vocab_size,
                "channels": hf.d_model,
                "max_positions": hf.max_position_embeddings,
            },
            output_queries={"type": "learned", "num_queries": hf.max_position_embeddings, "channels": hf.d_model},
            decoder_num_heads=attention.num_heads,
            decoder_qk_channels=attention.qk_channels,
            decoder_v_channels=attention.v_channels,
            decoder_use_query_residual=decoder.decoding_cross_attention.attention.use_query_residual,
            tie_output_to_input_embedding=True,
            use_input_mask=True,
        )
        return "PerceiverIO", config
    if kind in IMAGE_CLASSIFIERS:
        prep = hf_model.perceiver.input_preprocessor
        size = hf.image_size
        if kind.endswith("Learned"):
            adapter = {
                "type": "features",
                "input_channels": prep.in_channels,
                "index_dims": [size, size],
                "project_channels": prep.out_channels,
                "position_encoding": "trainable",
                "position_channels": prep.position_embeddings.output_size(),
                "position_projection_channels": prep.project_pos_dim if prep.project_pos_dim > 0 else None,
            }
        else:
            pe = prep.position_embeddings
            adapter = {
                "type": "features",
                "input_channels": prep.in_channels,
                "index_dims": [size, size],
                "conv_stem_channels": prep.out_channels if prep.prep_type == "conv" else None,
                "position_encoding": "fourier",
                "num_bands": pe.num_bands,
                "max_resolution": list(pe.max_resolution),
                "concat_pos": pe.concat_pos,
                "sine_only": pe.sine_only,
            }
        decoder = hf_model.perceiver.decoder.decoder
        attention = decoder.decoding_cross_attention.attention.self
        config.update(
            input_adapter=adapter,
            num_classes=hf.num_labels,
            pooling="query",
            decoder_num_heads=attention.num_heads,
            decoder_qk_channels=attention.qk_channels,
            decoder_v_channels=attention.v_channels,
            decoder_use_query_residual=decoder.decoding_cross_attention.attention.use_query_residual,
        )
        return "Perceiver", config
    if kind == "PerceiverForOpticalFlow":
        prep = hf_model.perceiver.input_preprocessor
        pe = prep.position_embeddings
        frames = prep.temporal_downsample
        decoder = hf_model.perceiver.decoder
        attention = decoder.decoder.decoding_cross_attention.attention
        config.update(
            input_adapter={
                "type": "features",
                "input_channels": prep.conv_after_patches.in_features // (frames * prep.spatial_downsample**2),
                "index_dims": [frames, *hf.train_size],
                "patch_size": prep.spatial_downsample,
                "temporal_patch_size": frames,
                "project_channels": prep.out_channels,
                "position_encoding": "fourier",
                "num_bands": pe.num_bands,
                "max_resolution": list(pe.max_resolution),
                "concat_pos": pe.concat_pos,
                "sine_only": pe.sine_only,
            },
            output_queries={"type": "inputs"},
            output_channels=decoder.output_num_channels,
            output_scale=1.0 / decoder.rescale_factor,
            decoder_num_heads=attention.self.num_heads,
            decoder_qk_channels=attention.self.qk_channels,
            decoder_v_channels=attention.self.v_channels,
            decoder_use_query_residual=attention.use_query_residual,
        )
        return "PerceiverIO", config
    if kind == "PerceiverForMultimodalAutoencoding":
        return "PerceiverMultimodalAutoencoder", _multimodal_config(hf_model, config)
    raise ValueError(f"transformers model class must be one of {SUPPORTED}; received {kind}")


def _multimodal_config(hf_model, config):
    hf = hf_model.config
    prep = hf_model.perceiver.input_preprocessor
    audio, image = prep.modalities["audio"], prep.modalities["image"]
    attention = hf_model.perceiver.decoder.decoder.decoding_cross_attention.attention.self
    image_pe = image.position_embeddings
    config.update(
        image_shape=[hf.num_frames, hf.output_shape[2], hf.output_shape[3], image.in_channels],
        image_patch_size=image.spatial_downsample,
        image_num_bands=image_pe.num_bands,
        image_max_resolution=list(image_pe.max_resolution),
        audio_samples=hf.num_frames * hf.audio_samples_per_frame,
        audio_samples_per_patch=audio.samples_per_patch,
        audio_num_bands=audio.position_embeddings.num_bands,
        num_labels=hf.num_labels,
        input_padding=prep.min_padding_size,
        query_padding=hf_model.perceiver.decoder.min_padding_size,
        label_query_channels=hf._label_trainable_num_channels,
        decoder_channels=hf.output_num_channels,
        decoder_num_heads=attention.num_heads,
        decoder_qk_channels=attention.qk_channels,
        decoder_v_channels=attention.v_channels,
    )
    return config


# what transformers' multimodal autoencoder fixes in its code rather than its config
MULTIMODAL_FIXED = dict(image_patch_size=4, image_num_bands=32, audio_num_bands=192, input_padding=4, query_padding=2,
                        decoder_num_heads=1, decoder_widening_factor=1)


def _multimodal_transformers_config(typed):
    """The inverse of `_multimodal_config`, for `transformers_config`."""
    import transformers

    config = dataclasses.asdict(typed)
    fixed = {k: (v, config[k]) for k, v in MULTIMODAL_FIXED.items() if config[k] != v}
    frames, height, width, channels = config["image_shape"]
    resolution = config["image_max_resolution"]
    if resolution[0] != frames or resolution[1] != resolution[2]:
        fixed["image_max_resolution"] = ([frames, resolution[1], resolution[1]], resolution)
    if fixed:
        raise ValueError(
            "PerceiverForMultimodalAutoencoding fixes these in its code: "
            + "; ".join(f"expected {k}={want!r}, received {got!r}" for k, (want, got) in fixed.items())
        )
    kwargs = {theirs: config[ours] for ours, theirs in ENCODER_FIELDS}
    kwargs.update(
        hidden_act={ours: theirs for theirs, ours in ACTIVATIONS.items()}[config["activation"]],
        num_frames=frames, audio_samples_per_frame=config["audio_samples"] // frames,
        samples_per_patch=config["audio_samples_per_patch"], image_size=resolution[1],
        output_shape=[1, frames, height, width], output_num_channels=config["decoder_channels"],
        num_labels=config["num_labels"], _label_trainable_num_channels=config["label_query_channels"],
    )
    return transformers.PerceiverConfig(**kwargs)


def _multimodal_weights(sd):
    prep, dec, post = "perceiver.input_preprocessor.", "perceiver.decoder.", "perceiver.output_postprocessor.modalities."
    values = {"label_mask_token/embeddings": to_numpy(sd[prep + "mask.label"])}
    for name in ("audio", "image", "label"):
        if name != "label":
            values[f"{name}_input_padding/padding"] = to_numpy(sd[prep + f"padding.{name}"])[0]
        values[f"{name}_query_padding/padding"] = to_numpy(sd[dec + f"padding.{name}"])[0]
        kernel, bias = linear(sd[post + f"{name}.classifier.weight"], sd[post + f"{name}.classifier.bias"])
        values.update({f"{name}_output/kernel": kernel, f"{name}_output/bias": bias})
    projection, projection_bias = linear(sd[dec + "decoder.final_layer.weight"], sd[dec + "decoder.final_layer.bias"])
    values.update(
        {
            "label_query/embeddings": to_numpy(sd[dec + "modalities.label.decoder.output_position_encodings.position_embeddings"]),
            "decoder_projection/kernel": projection,
            "decoder_projection/bias": projection_bias,
        }
    )
    values.update(_layer(sd, dec + "decoder.decoding_cross_attention.", "decoder/", cross=True))
    return values


def _layer(sd, prefix, ours, cross):
    """A transformers PerceiverLayer -> our Cross/SelfAttentionBlock variable paths."""
    a = prefix + "attention.self."
    q, qb = linear(sd[a + "query.weight"], sd[a + "query.bias"])
    k, kb = linear(sd[a + "key.weight"], sd[a + "key.bias"])
    v, vb = linear(sd[a + "value.weight"], sd[a + "value.bias"])
    out, outb = linear(sd[prefix + "attention.output.dense.weight"], sd[prefix + "attention.output.dense.bias"])
    d_in, d_inb = linear(sd[prefix + "mlp.dense1.weight"], sd[prefix + "mlp.dense1.bias"])
    d_out, d_outb = linear(sd[prefix + "mlp.dense2.weight"], sd[prefix + "mlp.dense2.bias"])

    values = {
        ours + "attention/out_kernel": out,
        ours + "attention/out_bias": outb,
        ours + "feed_forward/norm/gamma": to_numpy(sd[prefix + "layernorm.weight"]),
        ours + "feed_forward/norm/beta": to_numpy(sd[prefix + "layernorm.bias"]),
        ours + "feed_forward/dense_in/kernel": d_in,
        ours + "feed_forward/dense_in/bias": d_inb,
        ours + "feed_forward/dense_out/kernel": d_out,
        ours + "feed_forward/dense_out/bias": d_outb,
    }
    if cross:
        values.update(
            {
                ours + "query_norm/gamma": to_numpy(sd[a + "layernorm1.weight"]),
                ours + "query_norm/beta": to_numpy(sd[a + "layernorm1.bias"]),
                ours + "context_norm/gamma": to_numpy(sd[a + "layernorm2.weight"]),
                ours + "context_norm/beta": to_numpy(sd[a + "layernorm2.bias"]),
                ours + "attention/q_kernel": q,
                ours + "attention/q_bias": qb,
                ours + "attention/kv_kernel": np.concatenate([k, v], axis=1),
                ours + "attention/kv_bias": np.concatenate([kb, vb]),
            }
        )
    else:
        values.update(
            {
                ours + "norm/gamma": to_numpy(sd[a + "layernorm1.weight"]),
                ours + "norm/beta": to_numpy(sd[a + "layernorm1.bias"]),
                ours + "attention/qkv_kernel": np.concatenate([q, k, v], axis=1),
                ours + "attention/qkv_bias": np.concatenate([qb, kb, vb]),
            }
        )
    return values


def weights_from_transformers(hf_model, config):
    """{our variable path: array} for a supported transformers model."""
    kind = type(hf_model).__name__
    sd = hf_model.state_dict()
    values = {"encoder/latents": to_numpy(sd["perceiver.embeddings.latents"])}
    values.update(_layer(sd, "perceiver.encoder.cross_attention.", "encoder/cross_attend/", cross=True))
    for i in range(config["num_self_attends_per_block"]):
        values.update(_layer(sd, f"perceiver.encoder.self_attends.{i}.", f"encoder/self_attend_{i}/", cross=False))
    if kind == "PerceiverForMaskedLM":
        prep, dec = "perceiver.input_preprocessor.", "perceiver.decoder."
        values.update(
            {
                "input_adapter/embedding/embeddings": to_numpy(sd[prep + "embeddings.weight"]),
                "input_adapter/positions/embeddings": to_numpy(sd[prep + "position_embeddings.weight"]),
                "output_queries/embeddings": to_numpy(sd[dec + "output_position_encodings.position_embeddings"]),
                "token_logits/bias": to_numpy(sd["embedding_decoder.bias"]),
            }
        )
        values.update(_layer(sd, dec + "decoding_cross_attention.", "decoder/", cross=True))
        return values
    if kind == "PerceiverForOpticalFlow":
        prep, dec = "perceiver.input_preprocessor.", "perceiver.decoder.decoder."
        projection, projection_bias = linear(sd[prep + "conv_after_patches.weight"], sd[prep + "conv_after_patches.bias"])
        output, output_bias = linear(sd[dec + "final_layer.weight"], sd[dec + "final_layer.bias"])
        values.update(
            {
                "input_adapter/projection/kernel": projection,
                "input_adapter/projection/bias": projection_bias,
                "output_projection/kernel": output,
                "output_projection/bias": output_bias,
            }
        )
        values.update(_layer(sd, dec + "decoding_cross_attention.", "decoder/", cross=True))
        return values
    if kind == "PerceiverForMultimodalAutoencoding":
        values.update(_multimodal_weights(sd))
        return values
    prep, dec = "perceiver.input_preprocessor.", "perceiver.decoder.decoder."
    if kind.endswith("Learned"):
        conv = to_numpy(sd[prep + "convnet_1x1.weight"])  # (out, in, 1, 1)
        values.update(
            {
                "input_adapter/projection/kernel": conv[:, :, 0, 0].T,
                "input_adapter/projection/bias": to_numpy(sd[prep + "convnet_1x1.bias"]),
                "input_adapter/trainable/embeddings": to_numpy(sd[prep + "position_embeddings.position_embeddings"]),
            }
        )
        if prep + "positions_projection.weight" in sd:
            kernel, bias = linear(sd[prep + "positions_projection.weight"], sd[prep + "positions_projection.bias"])
            values.update({"input_adapter/position_projection/kernel": kernel, "input_adapter/position_projection/bias": bias})
    if kind.endswith("ConvProcessing"):
        stem = prep + "convnet."
        values.update(
            {
                "input_adapter/stem_conv/kernel": to_numpy(sd[stem + "conv.weight"]).transpose(2, 3, 1, 0),
                "input_adapter/stem_norm/gamma": to_numpy(sd[stem + "batchnorm.weight"]),
                "input_adapter/stem_norm/beta": to_numpy(sd[stem + "batchnorm.bias"]),
                "input_adapter/stem_norm/moving_mean": to_numpy(sd[stem + "batchnorm.running_mean"]),
                "input_adapter/stem_norm/moving_variance": to_numpy(sd[stem + "batchnorm.running_var"]),
            }
        )
    logits, logits_bias = linear(sd[dec + "final_layer.weight"], sd[dec + "final_layer.bias"])
    values.update(
        {
            "decoder_query/embeddings": to_numpy(sd[dec + "output_position_encodings.position_embeddings"]),
            "logits/kernel": logits,
            "logits/bias": logits_bias,
        }
    )
    values.update(_layer(sd, dec + "decoding_cross_attention.", "decoder/", cross=True))
    return values


def load_transformers_model(model_or_path):
    """A transformers model instance, or a directory written by `save_pretrained`."""
    if not isinstance(model_or_path, (str, bytes)) and not hasattr(model_or_path, "__fspath__"):
        return model_or_path
    try:
        import transformers
    except ImportError as error:
        raise ImportError("Converting transformers checkpoints needs: pip install 'keras-perceiver[convert]'") from error
    config = transformers.AutoConfig.from_pretrained(model_or_path)
    architecture = (config.architectures or [None])[0]
    if architecture not in SUPPORTED:
        raise ValueError(f"checkpoint architecture must be one of {SUPPORTED}; received {architecture}")
    return getattr(transformers, architecture).from_pretrained(model_or_path).eval()


def from_transformers(model_or_path):
    """Convert a transformers Perceiver model (instance or directory) to a keras_perceiver model."""
    from keras_perceiver import models

    hf_model = load_transformers_model(model_or_path)
    class_name, config = config_from_transformers(hf_model)
    model = getattr(models, class_name)(config)
    return assign_by_path(model, weights_from_transformers(hf_model, config))
