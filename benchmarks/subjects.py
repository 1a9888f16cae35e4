"""What the bench measures: the bench names (the presets and the small configurations that
exist only here), the inputs of one forward pass of each, our model and its PyTorch original
(the peer) for each, and its exported artefact."""

import numpy as np

BENCH_INPUTS = {  # what one forward pass is fed, per preset (batch given separately)
    "perceiver_vision_fourier": {"image": (224, 224, 3)},
    "perceiver_vision_learned": {"image": (224, 224, 3)},
    "perceiver_vision_conv": {"image": (224, 224, 3)},
    "perceiver_io_language": {"tokens": 2048},
    "flamingo_resampler": {"media": (8, 1, 257)},
    "open_flamingo_resampler": {"media": (8, 1, 257)},
    "perceiver_digits": {"image": (8, 8, 1)},
    "small_perceiver_vision_fourier": {"image": (32, 32, 3)},
    "small_perceiver_io_language": {"tokens": 128},
    "small_flamingo_resampler": {"media": (2, 1, 32)},
}

# Peers' configurations at the zoo's sizes (transformers' ImageNet / masked-LM checkpoints).
_VISION_PEER = dict(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                    num_self_attention_heads=8, num_cross_attention_heads=1, image_size=224, num_labels=1000)
_LANGUAGE_PEER = dict(num_latents=256, d_latents=1280, d_model=768, num_blocks=1, num_self_attends_per_block=26,
                      num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280,
                      vocab_size=262, max_position_embeddings=2048)

# Small configurations, where framework overhead rather than matrix products sets the time.
# They exist only here: ours is converted from the (seeded) peer, so both share
# configuration and weights.
SMALL_PEERS = {
    "small_perceiver_vision_fourier": ("PerceiverForImageClassificationFourier", dict(
        num_latents=64, d_latents=128, num_blocks=2, num_self_attends_per_block=2, num_self_attention_heads=4,
        num_cross_attention_heads=1, image_size=32, num_labels=10)),
    "small_perceiver_io_language": ("PerceiverForMaskedLM", dict(
        num_latents=32, d_latents=128, d_model=64, num_blocks=1, num_self_attends_per_block=2,
        num_self_attention_heads=4, num_cross_attention_heads=4, qk_channels=64, v_channels=128,
        vocab_size=262, max_position_embeddings=128)),
    "small_flamingo_resampler": ("PerceiverResampler", dict(
        dim=128, depth=2, dim_head=32, heads=4, num_latents=16, num_media_embeds=2, ff_mult=4)),
}


def bench_inputs(name, batch, seed=0):
    """Inputs of one forward pass; media width from the preset's config."""
    rng = np.random.default_rng(seed)
    spec = BENCH_INPUTS[name]
    if "image" in spec:
        return {"inputs": rng.normal(size=(batch,) + spec["image"]).astype("float32")}
    if "tokens" in spec:
        return {
            "token_ids": rng.integers(0, 262, size=(batch, spec["tokens"])).astype("int32"),
            "input_mask": np.ones((batch, spec["tokens"]), bool),
        }
    if name in SMALL_PEERS:
        dim = SMALL_PEERS[name][1]["dim"]
    else:
        from keras_perceiver.presets import zoo_entries

        dim = zoo_entries()[name]["config"]["dim"]
    return {"media": rng.normal(size=(batch,) + spec["media"] + (dim,)).astype("float32")}


def peer_model(name):
    """The reference implementation of a bench name, seeded (so a small configuration and
    its conversion share weights), and its inputs builder; None where there is none."""
    import torch

    torch.manual_seed(0)
    if name in SMALL_PEERS:
        class_name, kwargs = SMALL_PEERS[name]
    elif name == "open_flamingo_resampler":  # flamingo_resampler's squared ReLU is not in flamingo-pytorch
        from keras_perceiver.presets import zoo_entries

        c = zoo_entries()[name]["config"]
        class_name, kwargs = "PerceiverResampler", dict(
            dim=c["dim"], depth=c["depth"], dim_head=c["head_channels"], heads=c["num_heads"],
            num_latents=c["num_latents"], num_media_embeds=8, ff_mult=c["ff_mult"],
        )
    elif name == "perceiver_io_language":
        class_name, kwargs = "PerceiverForMaskedLM", _LANGUAGE_PEER
    elif name.startswith("perceiver_vision_"):
        kind = name.rsplit("_", 1)[1]
        class_name = {"fourier": "PerceiverForImageClassificationFourier", "learned": "PerceiverForImageClassificationLearned",
                      "conv": "PerceiverForImageClassificationConvProcessing"}[kind]
        kwargs = _VISION_PEER
    else:
        return None
    if class_name == "PerceiverResampler":
        import flamingo_pytorch

        model = flamingo_pytorch.PerceiverResampler(**kwargs)
        return model.eval(), lambda x: (torch.from_numpy(x["media"][:, :, 0]),)
    import transformers

    model = getattr(transformers, class_name)(transformers.PerceiverConfig(**kwargs)).eval()
    if class_name == "PerceiverForMaskedLM":
        return model, lambda x: (torch.from_numpy(x["token_ids"].astype("int64")), torch.from_numpy(x["input_mask"].astype("int64")))
    return model, lambda x: (torch.from_numpy(x["inputs"].transpose(0, 3, 1, 2).copy()),)


def bench_model(name):
    """Our model for a bench name: a small configuration converted from its seeded peer
    (same weights), else the preset (random weights where it ships none)."""
    import keras_perceiver as kp

    if name in SMALL_PEERS:
        peer, _ = peer_model(name)
        if "resampler" in name:
            from keras_perceiver.converters.flamingo import resampler_from_state_dict

            return resampler_from_state_dict(peer.state_dict(), num_heads=SMALL_PEERS[name][1]["heads"])
        from keras_perceiver.converters.transformers_perceiver import from_transformers

        return from_transformers(peer)
    try:
        return kp.from_preset(name)
    except ValueError:
        return kp.from_preset(name, load_weights=False)


def export_bench_model(name, target, path, inputs, static=False, quantize=None, model=None):
    """Export bench model `name` to `target` at `path`, verified against Keras on the way: a
    preset from its own files, a small configuration from `model` (default: converted anew
    from its seeded peer). `static`: every axis fixed at the shapes of `inputs`. Returns the
    export's report."""
    from keras_perceiver.converters.artefacts import export

    source = name if name not in SMALL_PEERS else model if model is not None else bench_model(name)
    shapes = {n: v.shape for n, v in inputs.items()} if static else None
    return export(source, target, path, input_shapes=shapes, dynamic=not static, quantize=quantize, random_weights=True)

