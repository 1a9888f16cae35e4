"""Import the Idefics2 connector and the Idefics (v1) perceiver resampler from transformers.

Both become a `PerceiverResampler` with media_rank=3 (media (B, V, D) -> (B, latents, dim)):

- Idefics2 (`Idefics2Connector`): the SwiGLU modality projection (vision width -> text width),
  then RMSNorm blocks with grouped-query attention and SwiGLU feed-forwards; a padding mask.
- Idefics (`IdeficsPerceiverResampler`): LayerNorm blocks with optional per-head q/k
  LayerNorms and ReLU feed-forwards without biases; no mask in the reference.

A state dict may carry the whole model's prefix (`model.connector.`, `model.perceiver_resampler.`):
it is stripped. Weights are matched to variable paths, all or nothing (`assign_by_path`).
`from_checkpoint_directory` reads a `save_pretrained` directory and opens only the safetensors
shards that hold connector tensors.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from keras_perceiver.converters.common import assign_by_path, block_count, to_numpy

IDEFICS2_PREFIX = "connector."
IDEFICS_PREFIX = "perceiver_resampler."


def _strip(state_dict, prefix):
    """Keys holding `prefix` (anywhere: `model.connector.`), with everything up to it removed."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) or f".{prefix}" in key:
            out[key[key.index(prefix) + len(prefix):]] = to_numpy(value)
    return out


def _as_dict(config):
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _sub(config, name):
    value = config.get(name) or {}
    return _as_dict(value)


def family_of(hf_config):
    """"idefics2" or "idefics" from a transformers config (dict or object)."""
    model_type = _as_dict(hf_config).get("model_type")
    if model_type in ("idefics2", "idefics"):
        return model_type
    raise ValueError(f"expected an Idefics2 or Idefics config (model_type); received {model_type!r}")


# (our field, sub-config, transformers field, transformers' default): each family's table,
# read by both directions; *_FIXED: what the family itself fixes
IDEFICS2_FIELDS = (
    ("dim", "text_config", "hidden_size", 4096),
    ("depth", "perceiver_config", "resampler_depth", 3),
    ("num_heads", "perceiver_config", "resampler_n_heads", 16),
    ("head_channels", "perceiver_config", "resampler_head_dim", 96),
    ("num_latents", "perceiver_config", "resampler_n_latents", 64),
    ("norm_epsilon", "perceiver_config", "rms_norm_eps", 1e-6),
    ("num_key_value_heads", "perceiver_config", "num_key_value_heads", 4),
    ("media_dim", "vision_config", "hidden_size", 1152),
    ("projection_channels", "text_config", "intermediate_size", 14336),
)
IDEFICS2_FIXED = dict(ff_mult=4, activation="swiglu", use_bias=False, norm="rms", media_rank=3, use_media_mask=True)
IDEFICS_FIELDS = (
    ("dim", "vision_config", "embed_dim", 768),
    ("depth", "perceiver_config", "resampler_depth", 6),
    ("num_heads", "perceiver_config", "resampler_n_heads", 16),
    ("head_channels", "perceiver_config", "resampler_head_dim", 96),
    ("num_latents", "perceiver_config", "resampler_n_latents", 64),
    ("qk_norm", "perceiver_config", "qk_layer_norms_perceiver", False),
)
IDEFICS_FIXED = dict(ff_mult=4, activation="relu", use_bias=False, media_rank=3, use_media_mask=False)


def _from_table(sections, fields, fixed):
    """Our config from transformers' sub-configs ({name: dict}) through a family's table."""
    config = {ours: type(default)(sections[section].get(theirs, default)) for ours, section, theirs, default in fields}
    return {**config, **fixed}


def idefics2_connector_config(hf_config):
    """PerceiverResampler config dict of an Idefics2Config's connector."""
    c = _as_dict(hf_config)
    vision, text, perceiver = _sub(c, "vision_config"), _sub(c, "text_config"), _sub(c, "perceiver_config")
    if perceiver.get("hidden_act", "silu") != "silu" or text.get("hidden_act", "silu") != "silu":
        raise ValueError("Idefics2 connector: only the SiLU-gated (SwiGLU) MLPs are supported")
    text = {"hidden_size": perceiver.get("hidden_size", 4096), **text}  # the resampler's width where text has none
    sections = {"vision_config": vision, "text_config": text, "perceiver_config": perceiver}
    return _from_table(sections, IDEFICS2_FIELDS, IDEFICS2_FIXED)


def idefics_resampler_config(hf_config):
    """PerceiverResampler config dict of an IdeficsConfig's perceiver resampler."""
    c = _as_dict(hf_config)
    vision, perceiver = _sub(c, "vision_config"), _sub(c, "perceiver_config")
    vision = {"embed_dim": vision.get("hidden_size", 768), **vision}
    return _from_table({"vision_config": vision, "perceiver_config": perceiver}, IDEFICS_FIELDS, IDEFICS_FIXED)


def _to_table(config, model_type, fields, fixed, sections, to_ours):
    """The transformers config dict (`model_type` and its sub-configs, starting from
    `sections`) of our `config` through a family's table; `to_ours` (that family's
    `*_config`) reads it back, and any field that does not survive the round trip is one
    the family cannot express: ValueError naming it."""
    from keras_perceiver.models.resampler import PerceiverResamplerConfig

    ours = dataclasses.asdict(PerceiverResamplerConfig(**config))
    for field, section, theirs, _ in fields:
        sections[section][theirs] = ours[field]
    hf_config = {"model_type": model_type, **sections}
    back = dataclasses.asdict(PerceiverResamplerConfig(**to_ours(hf_config)))
    lost = [f"{k}: expected {back[k]!r}, received {v!r}" for k, v in ours.items() if back[k] != v]
    if lost:
        raise ValueError(f"{model_type}: the config holds fields transformers' {model_type} cannot express ({'; '.join(lost)})")
    return hf_config


def idefics2_transformers_config(config):
    """The Idefics2Config dict (vision, text and perceiver sub-configs; give it to
    transformers.Idefics2Config or to `from_state_dict`) whose connector is our `config`:
    the inverse of `idefics2_connector_config`."""
    from keras_perceiver.models.resampler import PerceiverResamplerConfig

    config = dataclasses.asdict(PerceiverResamplerConfig(**config))
    config["num_key_value_heads"] = config["num_key_value_heads"] or config["num_heads"]  # ours: None is one per head
    sections = {"vision_config": {}, "text_config": {"model_type": "mistral", "hidden_act": "silu"},
                "perceiver_config": {"hidden_act": "silu", "hidden_size": config["dim"]}}
    return _to_table(config, "idefics2", IDEFICS2_FIELDS, IDEFICS2_FIXED, sections, idefics2_connector_config)


def idefics_transformers_config(config):
    """The IdeficsConfig dict (vision and perceiver sub-configs) whose perceiver resampler is
    our `config`: the inverse of `idefics_resampler_config`."""
    sections = {"vision_config": {}, "perceiver_config": {"use_resampler": True}}
    return _to_table(config, "idefics", IDEFICS_FIELDS, IDEFICS_FIXED, sections, idefics_resampler_config)


def idefics2_values(state_dict):
    """{variable path: array} from an Idefics2Connector state dict."""
    sd = _strip(state_dict, IDEFICS2_PREFIX) if any(IDEFICS2_PREFIX in k for k in state_dict) else {
        k: to_numpy(v) for k, v in state_dict.items()
    }
    mp, pr = "modality_projection.", "perceiver_resampler."
    values = {
        "resampler/projection/dense_gate/kernel": sd[mp + "gate_proj.weight"].T,
        "resampler/projection/dense_in/kernel": sd[mp + "up_proj.weight"].T,
        "resampler/projection/dense_out/kernel": sd[mp + "down_proj.weight"].T,
        "resampler/latents": sd[pr + "latents"],
        "resampler/norm/scale": sd[pr + "norm.weight"],
    }
    for i in range(block_count(sd, r"perceiver_resampler\.layers\.(\d+)\.")):
        a, ours = f"{pr}layers.{i}.", f"resampler/block_{i}/"
        values.update(
            {
                ours + "media_norm/scale": sd[a + "input_context_norm.weight"],
                ours + "latents_norm/scale": sd[a + "input_latents_norm.weight"],
                ours + "attention/q_kernel": sd[a + "self_attn.q_proj.weight"].T,
                # ours: one fused projection, all key heads first, then all value heads
                ours + "attention/kv_kernel": np.concatenate(
                    [sd[a + "self_attn.k_proj.weight"].T, sd[a + "self_attn.v_proj.weight"].T], axis=1
                ),
                ours + "attention/out_kernel": sd[a + "self_attn.o_proj.weight"].T,
                ours + "feed_forward/norm/scale": sd[a + "post_attention_layernorm.weight"],
                ours + "feed_forward/dense_gate/kernel": sd[a + "mlp.gate_proj.weight"].T,
                ours + "feed_forward/dense_in/kernel": sd[a + "mlp.up_proj.weight"].T,
                ours + "feed_forward/dense_out/kernel": sd[a + "mlp.down_proj.weight"].T,
            }
        )
    return values


def idefics_values(state_dict):
    """{variable path: array} from an IdeficsPerceiverResampler state dict."""
    sd = _strip(state_dict, IDEFICS_PREFIX) if any(IDEFICS_PREFIX in k for k in state_dict) else {
        k: to_numpy(v) for k, v in state_dict.items()
    }
    values = {
        "resampler/latents": sd["latents"],
        "resampler/norm/gamma": sd["layer_norm.weight"],
        "resampler/norm/beta": sd["layer_norm.bias"],
    }
    for i in range(block_count(sd, r"blocks\.(\d+)\.")):
        a, f, ours = f"blocks.{i}.0.", f"blocks.{i}.1.", f"resampler/block_{i}/"
        values.update(
            {
                ours + "media_norm/gamma": sd[a + "context_layer_norm.weight"],
                ours + "media_norm/beta": sd[a + "context_layer_norm.bias"],
                ours + "latents_norm/gamma": sd[a + "latents_layer_norm.weight"],
                ours + "latents_norm/beta": sd[a + "latents_layer_norm.bias"],
                ours + "attention/q_kernel": sd[a + "q_proj.weight"].T,
                ours + "attention/kv_kernel": np.concatenate([sd[a + "k_proj.weight"].T, sd[a + "v_proj.weight"].T], axis=1),
                ours + "attention/out_kernel": sd[a + "output_proj.weight"].T,
                ours + "feed_forward/norm/gamma": sd[f + "ln.weight"],
                ours + "feed_forward/norm/beta": sd[f + "ln.bias"],
                ours + "feed_forward/dense_in/kernel": sd[f + "fc.weight"].T,
                ours + "feed_forward/dense_out/kernel": sd[f + "c_proj.weight"].T,
            }
        )
        if a + "q_layer_norm.weight" in sd:
            for name in ("q", "k"):
                values[ours + f"attention/{name}_norm/gamma"] = sd[a + f"{name}_layer_norm.weight"]
                values[ours + f"attention/{name}_norm/beta"] = sd[a + f"{name}_layer_norm.bias"]
    return values


def load_state_dict(model, state_dict, family):
    """Copy an Idefics2 connector ("idefics2") or Idefics resampler ("idefics") state dict
    into `model` (a PerceiverResampler with the matching config). Returns the model."""
    try:
        values = idefics2_values(state_dict) if family == "idefics2" else idefics_values(state_dict)
    except KeyError as error:
        raise ValueError(f"checkpoint does not match the model: missing tensor {error}") from None
    return assign_by_path(model, {k: np.asarray(v, "float32") for k, v in values.items()})


def from_state_dict(state_dict, hf_config):
    """Build the PerceiverResampler for `hf_config` (an Idefics2 / Idefics config, dict or
    object) and load `state_dict` (the connector's, the resampler's or the whole model's)."""
    from keras_perceiver.models import PerceiverResampler

    family = family_of(hf_config)
    config = idefics2_connector_config(hf_config) if family == "idefics2" else idefics_resampler_config(hf_config)
    return load_state_dict(PerceiverResampler(config), state_dict, family)


def is_connector_key(key, family):
    """Whether checkpoint tensor `key` belongs to the connector of `family` ("idefics2"/"idefics")."""
    prefix = IDEFICS2_PREFIX if family == "idefics2" else IDEFICS_PREFIX
    return key.startswith(prefix) or f".{prefix}" in key


def connector_shards(weight_map, family):
    """{shard file: [connector tensor names]} from a safetensors index's weight map."""
    shards = {}
    for key, shard in weight_map.items():
        if is_connector_key(key, family):
            shards.setdefault(shard, []).append(key)
    return shards


def read_connector_tensors(directory, family, safe_open=None, progress=True):
    """{name: array} of the connector tensors in a `save_pretrained` directory, reading
    `model.safetensors.index.json` and opening only the shards that hold them (a single
    `model.safetensors` without index is opened whole, reading only connector tensors).
    progress: one line on stderr per shard opened (large shards take a while to read)."""
    if safe_open is None:
        from safetensors import safe_open
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = connector_shards(json.loads(index.read_text())["weight_map"], family)
    elif (directory / "model.safetensors").is_file():
        shards = {"model.safetensors": None}
    else:
        raise ValueError(f"convert: {str(directory)!r} holds neither model.safetensors.index.json nor model.safetensors")
    if not shards:
        raise ValueError(f"convert: the safetensors index in {str(directory)!r} names no {family} connector tensors")
    tensors = {}
    for number, (shard, keys) in enumerate(sorted(shards.items()), 1):
        if progress:
            what = f"{len(keys)} connector tensors" if keys is not None else "its connector tensors"
            print(f"convert: reading {what} from {shard} (shard {number} of {len(shards)})", file=sys.stderr, flush=True)
        # torch, not NumPy: NumPy has no bfloat16, the dtype many checkpoints are stored in
        with safe_open(str(directory / shard), framework="pt") as f:
            for key in keys if keys is not None else [k for k in f.keys() if is_connector_key(k, family)]:
                tensors[key] = to_numpy(f.get_tensor(key))
    return tensors


def from_checkpoint_directory(directory, safe_open=None, progress=True):
    """A transformers Idefics2 / Idefics `save_pretrained` directory -> its connector as a
    PerceiverResampler; the language model's shards are never opened. progress: a line on
    stderr per shard opened."""
    config = json.loads((Path(directory) / "config.json").read_text())
    family = family_of(config)
    return from_state_dict(read_connector_tensors(directory, family, safe_open=safe_open, progress=progress), config)


def is_idefics_checkpoint(directory):
    """Whether `directory` is a transformers Idefics2 / Idefics checkpoint directory."""
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") in ("idefics2", "idefics")
    except (OSError, ValueError, AttributeError):
        return False
