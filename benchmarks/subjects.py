"""What the bench measures: the bench names (the presets whose zoo file has a "bench" entry,
and the small configurations that exist only here), the inputs of one forward pass of each,
our model and its PyTorch original (the peer) for each, and its exported artefact.

A "bench" entry: {"inputs": {input name: shape without the batch axis}, "peer": the import path
of the peer's class (none: no peer)}. The width of `media` (its last axis) and the vocabulary
of `token_ids` come from the config. The peer is built from the same config through its
family's translation (kept with the converter), so the two cannot drift apart.
"""

import importlib

import numpy as np

from keras_perceiver.examples import random_inputs

# Small configurations, where framework overhead rather than matrix products sets the time,
# written as zoo entries. They exist only here: ours is converted from the (seeded) peer, so
# both share configuration and weights.
SMALL_PEERS = {
    "small_perceiver_vision_fourier": {
        "class_name": "Perceiver",
        "config": dict(
            num_latents=64, latent_channels=128, num_blocks=2, num_self_attends_per_block=2, num_self_attention_heads=4,
            num_cross_attention_heads=1, num_classes=10, pooling="query",
            # transformers' Fourier head fixes 64 bands at 224 x 224 whatever the image size
            input_adapter={"type": "features", "input_channels": 3, "index_dims": [32, 32], "num_bands": 64,
                           "max_resolution": [224, 224]},
        ),
        "bench": {"inputs": {"inputs": [32, 32, 3]}, "peer": "transformers.PerceiverForImageClassificationFourier"},
    },
    "small_perceiver_io_language": {
        "class_name": "PerceiverIO",
        "config": dict(
            num_latents=32, latent_channels=128, num_blocks=1, num_self_attends_per_block=2, num_self_attention_heads=4,
            num_cross_attention_heads=4, self_attention_qk_channels=64, self_attention_v_channels=128,
            cross_attention_qk_channels=64, cross_attention_v_channels=128, use_input_mask=True,
            input_adapter={"type": "tokens", "vocab_size": 262, "channels": 64, "max_positions": 128},
            # transformers' masked-LM head fixes its decoder: 8 heads, q/k 256, v d_model
            output_queries={"type": "learned", "num_queries": 128, "channels": 64}, decoder_num_heads=8,
            decoder_qk_channels=256, decoder_v_channels=64, decoder_use_query_residual=False,
            tie_output_to_input_embedding=True,
        ),
        "bench": {"inputs": {"token_ids": [128], "input_mask": [128]}, "peer": "transformers.PerceiverForMaskedLM"},
    },
    "small_flamingo_resampler": {
        "class_name": "PerceiverResampler",
        "config": dict(dim=128, depth=2, num_heads=4, head_channels=32, num_latents=16, num_media_embeds=2, ff_mult=4,
                       activation="gelu", use_bias=False),
        "bench": {"inputs": {"media": [2, 1, 32]}, "peer": "flamingo_pytorch.PerceiverResampler"},
    },
}


def bench_entries():
    """{bench name: zoo-style entry} of every preset whose zoo file has a "bench" entry, then
    the small configurations."""
    from keras_perceiver.presets import zoo_entries

    return {**{name: e for name, e in zoo_entries().items() if "bench" in e}, **SMALL_PEERS}


def bench_names():
    """The names the bench accepts (`--presets`)."""
    return list(bench_entries())


BENCH_INPUTS = {name: entry["bench"]["inputs"] for name, entry in bench_entries().items()}  # read by cli.py


def bench_input_shapes(config, inputs, batch):
    """{input name: full shape} of a "bench" entry's `inputs` at `batch`: the media's width
    (its last axis) is the config's `media_dim`, else its `dim`."""
    width = config.get("media_dim") or config.get("dim")
    return {name: [batch, *shape, *([width] if name == "media" else [])] for name, shape in inputs.items()}


def bench_inputs(name, batch, seed=0):
    """Inputs of one forward pass of bench name `name` at `batch` (`random_inputs`)."""
    entry = bench_entries()[name]
    config = entry["config"]
    shapes = bench_input_shapes(config, entry["bench"]["inputs"], batch)
    from keras_perceiver import models

    limits = getattr(getattr(models, entry["class_name"]).config_class(**config), "output_point_limits", None)
    return random_inputs(shapes, seed=seed, vocab_size=config.get("input_adapter", {}).get("vocab_size"), index_limits=limits)


def build_peer(peer, config, inputs):
    """The module `peer` (its class's import path) for our `config`, in eval mode, through its
    family's translation, and its arguments builder: our inputs (NumPy) -> its tensors, in the
    order it takes them. `inputs`: the bench entry's shapes (flamingo-pytorch's time
    embeddings are as many as the media's frames where ours has none)."""
    import torch

    module_name, class_name = peer.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    if class_name == "PerceiverResampler":  # flamingo-pytorch: media (B, T, V, D), F = 1 dropped
        from keras_perceiver.converters.flamingo import flamingo_pytorch_kwargs

        model = cls(**flamingo_pytorch_kwargs(config, num_media_embeds=inputs["media"][0]))
        return model.eval(), lambda x: (torch.from_numpy(x["media"][:, :, 0]),)
    if class_name in ("Idefics2Connector", "IdeficsPerceiverResampler"):
        import transformers

        from keras_perceiver.converters import idefics

        if class_name == "Idefics2Connector":
            hf = idefics.idefics2_transformers_config(config)
            model = cls(transformers.Idefics2Config(**{k: v for k, v in hf.items() if k != "model_type"}))
            return model.eval(), lambda x: (torch.from_numpy(x["media"]), torch.from_numpy(x["media_mask"].astype("int64")))
        hf = transformers.IdeficsConfig(**{k: v for k, v in idefics.idefics_transformers_config(config).items() if k != "model_type"})
        p = hf.perceiver_config
        model = cls(hf, hf.vision_config.embed_dim, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim, p.resampler_n_latents)
        return model.eval(), lambda x: (torch.from_numpy(x["media"]),)
    from keras_perceiver.converters.transformers_perceiver import transformers_config

    model = cls(transformers_config(config, class_name)).eval()
    if class_name == "PerceiverForMultimodalAutoencoding":
        # one chunk of output points, the same for every example (transformers takes them 1-D);
        # the label is masked at inference, so its one-hot input is zeros
        def multimodal(x):
            video = torch.from_numpy(np.moveaxis(x["image"], -1, -3).copy())
            label = torch.zeros(video.shape[0], config["num_labels"])
            points = {"image": torch.from_numpy(x["image_output_points"][0].astype("int64")),
                      "audio": torch.from_numpy(x["audio_output_points"][0].astype("int64")), "label": None}
            return ({"image": video, "audio": torch.from_numpy(x["audio"]), "label": label}, points)

        return model, multimodal
    if class_name == "PerceiverForMaskedLM":
        return model, lambda x: (torch.from_numpy(x["token_ids"].astype("int64")), torch.from_numpy(x["input_mask"].astype("int64")))
    # channels-last images (B, H, W, C) and videos (B, T, H, W, C) -> transformers' channels-first
    return model, lambda x: (torch.from_numpy(np.moveaxis(x["inputs"], -1, -3).copy()),)


def convert_peer(peer, config, model):
    """Ours from the built module `model` (`peer`, for our `config`) by the family's converter:
    the same configuration and weights."""
    class_name = peer.rsplit(".", 1)[1]
    state_dict = model.state_dict()
    if class_name == "PerceiverResampler":
        from keras_perceiver.converters.flamingo import resampler_from_state_dict

        return resampler_from_state_dict(state_dict, num_heads=config["num_heads"])
    if class_name in ("Idefics2Connector", "IdeficsPerceiverResampler"):
        from keras_perceiver.converters import idefics

        to_hf = idefics.idefics2_transformers_config if class_name == "Idefics2Connector" else idefics.idefics_transformers_config
        return idefics.from_state_dict(state_dict, to_hf(config))
    from keras_perceiver.converters.transformers_perceiver import from_transformers

    return from_transformers(model)


def peer_model(name):
    """The reference implementation of a bench name, seeded (so a small configuration and
    its conversion share weights), and its inputs builder (`build_peer`); None where there
    is none."""
    import torch

    entry = bench_entries()[name]
    if "peer" not in entry["bench"]:
        return None
    torch.manual_seed(0)
    return build_peer(entry["bench"]["peer"], entry["config"], entry["bench"]["inputs"])


def bench_model(name):
    """Our model for a bench name: a small configuration converted from its seeded peer
    (same weights), else the preset (random weights where it ships none: the bench times,
    it does not fetch checkpoints)."""
    import keras_perceiver as kp

    entry = bench_entries()[name]
    if name in SMALL_PEERS:
        peer, _ = peer_model(name)
        return convert_peer(entry["bench"]["peer"], entry["config"], peer)
    return kp.from_preset(name, load_weights=bool(entry.get("weights")))


def export_bench_model(name, target, path, inputs, static=False, quantize=None, model=None):
    """Export bench model `name` to `target` at `path`, verified against Keras on the way: a
    preset from its own files, a small configuration from `model` (default: converted anew
    from its seeded peer). `static`: every axis fixed at the shapes of `inputs`. Returns the
    export's report."""
    from keras_perceiver.converters.artefacts import export

    source = name if name not in SMALL_PEERS else model if model is not None else bench_model(name)
    shapes = {n: v.shape for n, v in inputs.items()} if static else None
    return export(source, target, path, input_shapes=shapes, dynamic=not static, quantize=quantize, random_weights=True)

