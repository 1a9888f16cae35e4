"""Import a Perceiver Resampler from an OpenFlamingo or flamingo-pytorch state dict."""

import dataclasses

import numpy as np

from keras_perceiver.converters.common import assign_by_path, block_count, to_numpy


def _strip(state_dict):
    """Drop an OpenFlamingo `perceiver.` (or `vision_encoder...perceiver.`) prefix."""
    out = {}
    for key, value in state_dict.items():
        key = key.split("perceiver.", 1)[1] if "perceiver." in key else key
        out[key] = to_numpy(value)
    return out


def resampler_config_from_state_dict(state_dict, num_heads=8, activation="gelu"):
    """Infer dim, depth, head width, latents, ff_mult and embeddings from the tensors.

    The head count is not stored in a state dict: pass `num_heads` (8 in both references).
    """
    sd = _strip(state_dict)
    num_latents, dim = sd["latents"].shape
    depth = block_count(sd, r"layers\.(\d+)\.")
    inner = sd["layers.0.0.to_q.weight"].shape[0]
    if inner % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the attention width {inner}")
    time = sd.get("media_pos_emb", sd.get("media_time_embs"))
    frames = sd.get("frame_embs")
    return dict(
        dim=int(dim),
        depth=depth,
        num_heads=num_heads,
        head_channels=inner // num_heads,
        num_latents=int(num_latents),
        ff_mult=sd["layers.0.1.1.weight"].shape[0] // dim,
        activation=activation,
        use_bias=False,
        num_media_embeds=None if time is None else int(time.shape[0]),
        max_num_frames=None if frames is None else int(frames.shape[0]),
    )


def flamingo_pytorch_kwargs(config, num_media_embeds=None):
    """flamingo-pytorch `PerceiverResampler` keyword arguments for our resampler `config`
    (a dict; missing fields take our defaults): the inverse of
    `resampler_config_from_state_dict`. flamingo-pytorch always adds learned time embeddings:
    where `config` has none, `num_media_embeds` says how many the module gets. ValueError for
    a field flamingo-pytorch cannot express."""
    from keras_perceiver.models.resampler import PerceiverResamplerConfig

    c = dataclasses.asdict(PerceiverResamplerConfig(**config))
    fixed = dict(activation="gelu", use_bias=False, max_num_frames=None, norm="layer", norm_epsilon=1e-5,
                 num_key_value_heads=None, qk_norm=False, media_dim=None, use_media_mask=False)
    unlike = [f"{k}: expected {v!r}, received {c[k]!r}" for k, v in fixed.items() if c[k] != v]
    if unlike:
        raise ValueError(f"flamingo-pytorch's PerceiverResampler cannot express the config ({'; '.join(unlike)})")
    embeds = c["num_media_embeds"] or num_media_embeds
    if not embeds:
        raise ValueError("num_media_embeds: flamingo-pytorch needs its number of time embeddings; received None")
    return dict(dim=c["dim"], depth=c["depth"], dim_head=c["head_channels"], heads=c["num_heads"],
                num_latents=c["num_latents"], num_media_embeds=embeds, ff_mult=c["ff_mult"])


def load_resampler_state_dict(model, state_dict):
    """Copy a flamingo-pytorch / OpenFlamingo resampler state dict into `model` (a
    PerceiverResampler with a matching config). Returns the model."""
    sd = _strip(state_dict)
    values = {"resampler/latents": sd["latents"], "resampler/norm/gamma": sd["norm.weight"], "resampler/norm/beta": sd["norm.bias"]}
    time = sd.get("media_pos_emb", sd.get("media_time_embs"))
    if time is not None:
        values["resampler/media_time_embeddings"] = time.reshape(time.shape[0], -1)
    if "frame_embs" in sd:
        values["resampler/frame_embeddings"] = sd["frame_embs"]
    depth = block_count(sd, r"layers\.(\d+)\.")
    for i in range(depth):
        a, f, ours = f"layers.{i}.0.", f"layers.{i}.1.", f"resampler/block_{i}/"
        values.update(
            {
                ours + "media_norm/gamma": sd[a + "norm_media.weight"],
                ours + "media_norm/beta": sd[a + "norm_media.bias"],
                ours + "latents_norm/gamma": sd[a + "norm_latents.weight"],
                ours + "latents_norm/beta": sd[a + "norm_latents.bias"],
                ours + "attention/q_kernel": sd[a + "to_q.weight"].T,
                ours + "attention/kv_kernel": sd[a + "to_kv.weight"].T,  # k half first, as ours
                ours + "attention/out_kernel": sd[a + "to_out.weight"].T,
                ours + "feed_forward/norm/gamma": sd[f + "0.weight"],
                ours + "feed_forward/norm/beta": sd[f + "0.bias"],
                ours + "feed_forward/dense_in/kernel": sd[f + "1.weight"].T,
                ours + "feed_forward/dense_out/kernel": sd[f + "3.weight"].T,
            }
        )
    return assign_by_path(model, {k: np.asarray(v, "float32") for k, v in values.items()})


def resampler_from_state_dict(state_dict, num_heads=8, **overrides):
    """Build a PerceiverResampler from a state dict (config inferred) and load it."""
    from keras_perceiver.models import PerceiverResampler

    config = resampler_config_from_state_dict(state_dict, num_heads=num_heads)
    config.update(overrides)
    return load_resampler_state_dict(PerceiverResampler(config), state_dict)
