"""The Idefics2 connector and the Idefics (v1) resampler against transformers' own modules
(random weights, built here), masks, and the sharded checkpoint conversion."""

import json

import numpy as np
import pytest
import torch
from conftest import to_numpy

import keras_perceiver as kp
from keras_perceiver.cli import main as cli_main
from keras_perceiver.converters import idefics as idefics_converter

transformers = pytest.importorskip("transformers", reason="needs the test extra (transformers)")

# (vision width, text width, text intermediate, depth, heads, head width, kv heads, latents):
# uneven widths, grouped-query attention (2 groups of 3 heads; 2 groups of 2) and
# multi-query, all checked against transformers' eager and SDPA attention
IDEFICS2 = [
    (20, 36, 44, 2, 6, 6, 2, 5, "eager"),
    (28, 30, 52, 1, 4, 10, 1, 3, "sdpa"),
]
# (width, depth, heads, head width, latents, q/k norms)
IDEFICS = [(36, 2, 3, 10, 5, True), (28, 1, 4, 6, 3, False)]


def _perturb(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # norms and latents too, so every weight matters
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def idefics2_config(vision, text, intermediate, depth, heads, head_dim, kv_heads, latents, attn="eager"):
    config = transformers.Idefics2Config(
        vision_config={"hidden_size": vision, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
        text_config={
            "model_type": "mistral", "hidden_size": text, "intermediate_size": intermediate, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 64, "rms_norm_eps": 1e-5,
        },
        perceiver_config={
            "hidden_size": text, "resampler_n_latents": latents, "resampler_depth": depth, "resampler_n_heads": heads,
            "resampler_head_dim": head_dim, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
        },
    )
    config._attn_implementation = attn
    config.perceiver_config._attn_implementation = attn
    return config


def idefics2_reference(params, seed=0):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    config = idefics2_config(*params)
    torch.manual_seed(seed)
    return _perturb(Idefics2Connector(config), seed), config


def _media_and_mask(batch, tokens, width, seed=0):
    rng = np.random.default_rng(seed)
    media = rng.normal(size=(batch, tokens, width)).astype("float32")
    mask = np.ones((batch, tokens), bool)
    mask[1, tokens - 3:] = False  # rows padded differently; row 0 complete
    if batch > 2:
        mask[2, 2:] = False
    return media, mask


@pytest.mark.parametrize("params", IDEFICS2, ids=["gqa-eager", "mqa-sdpa"])
def test_idefics2_connector_parity_and_masks(params):
    reference, config = idefics2_reference(params)
    model = idefics_converter.from_state_dict(reference.state_dict(), config)
    c = model.config
    assert (c.norm, c.activation, c.num_key_value_heads, c.media_dim) == ("rms", "swiglu", params[6], params[0])
    media, mask = _media_and_mask(3, 9, params[0])
    with torch.no_grad():
        expected = reference(torch.from_numpy(media), torch.from_numpy(mask).long()).numpy()
    out = to_numpy(model({"media": media, "media_mask": mask}))
    assert out.shape == expected.shape == (3, params[7], params[1])
    assert np.abs(out - expected).max() <= 1e-4

    # masked positions have no effect, whatever they hold (NaN and Inf included)
    changed = media.copy()
    changed[~mask] = np.random.default_rng(5).normal(size=(int((~mask).sum()), params[0])) * 100
    np.testing.assert_array_equal(to_numpy(model({"media": changed, "media_mask": mask})), out)
    changed[~mask] = np.nan
    changed[1, -1] = np.inf
    np.testing.assert_array_equal(to_numpy(model({"media": changed, "media_mask": mask})), out)

    # a fully masked row: the latents attend to the latents alone (they are always keys),
    # which is the output for an image with no tokens; finite, the same for any media values
    empty = mask.copy()
    empty[0] = False
    full_out = to_numpy(model({"media": media, "media_mask": empty}))
    assert np.isfinite(full_out).all()
    np.testing.assert_allclose(full_out[1:], out[1:], atol=1e-6)
    noise = media.copy()
    noise[0] = 1e3
    np.testing.assert_array_equal(to_numpy(model({"media": noise, "media_mask": empty}))[0], full_out[0])
    with torch.no_grad():
        ref_empty = reference(torch.from_numpy(media), torch.from_numpy(empty).long()).numpy()
    assert np.abs(full_out - ref_empty).max() <= 1e-4


def idefics_reference(width, depth, heads, head_dim, latents, qk_norms, seed=0):
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    config = transformers.IdeficsConfig(
        vision_config={"embed_dim": width}, perceiver_config={
            "use_resampler": True, "resampler_depth": depth, "resampler_n_heads": heads,
            "resampler_head_dim": head_dim, "resampler_n_latents": latents, "qk_layer_norms_perceiver": qk_norms,
        },
    )
    torch.manual_seed(seed)
    module = IdeficsPerceiverResampler(config, width, depth, heads, head_dim, latents)
    return _perturb(module, seed), config


@pytest.mark.parametrize("params", IDEFICS, ids=["qk-norms", "plain"])
def test_idefics_resampler_parity(params):
    reference, config = idefics_reference(*params)
    model = idefics_converter.from_state_dict(reference.state_dict(), config)
    assert model.config.qk_norm is params[5] and model.config.activation == "relu"
    media = np.random.default_rng(1).normal(size=(2, 11, params[0])).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(media)).numpy()
    out = to_numpy(model(media))
    assert out.shape == expected.shape == (2, params[4], params[0])
    assert np.abs(out - expected).max() <= 1e-4
    # the whole model's prefix is stripped
    prefixed = {f"model.perceiver_resampler.{k}": v for k, v in reference.state_dict().items()}
    np.testing.assert_array_equal(to_numpy(idefics_converter.from_state_dict(prefixed, config)(media)), out)


def test_incomplete_state_dict_is_refused():
    reference, config = idefics2_reference(IDEFICS2[0])
    state = reference.state_dict()
    state.pop("perceiver_resampler.layers.1.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match="checkpoint does not match the model"):
        idefics_converter.from_state_dict(state, config)
    state = reference.state_dict()
    state["perceiver_resampler.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="checkpoint does not match the model.*q_kernel"):
        idefics_converter.from_state_dict(state, config)


def test_flamingo_defaults_unchanged():
    """The new fields' defaults are Flamingo's: same variables, same graph as before."""
    model = kp.PerceiverResampler(dim=16, depth=1, num_heads=2, head_channels=8, num_latents=3)
    c = model.config
    assert (c.norm, c.norm_epsilon, c.num_key_value_heads, c.qk_norm, c.media_dim, c.projection_channels, c.media_rank) == (
        "layer", 1e-5, None, False, None, None, 5
    )
    assert sorted(w.path.split("/")[-1] for w in model.weights if "block_0/attention" in w.path) == [
        "kv_kernel", "out_kernel", "q_kernel"
    ]
    with pytest.raises(ValueError, match="num_key_value_heads"):
        kp.PerceiverResampler(dim=16, depth=1, num_heads=4, head_channels=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="projection_channels"):
        kp.PerceiverResampler(dim=16, depth=1, num_heads=2, head_channels=8, media_dim=12)


def _write_sharded_checkpoint(directory, state, config):
    """A save_pretrained-style directory: the tensors over four shards (the connector in two
    of them, the "language model" in the other two), an index and config.json."""
    connector = {f"model.connector.{k}": v.contiguous() for k, v in state.items()}
    names = sorted(connector)
    half = len(names) // 2
    language = {
        "model.text_model.embed_tokens.weight": torch.randn(64, 8),
        "model.text_model.layers.0.mlp.up_proj.weight": torch.randn(8, 8),
        "lm_head.weight": torch.randn(64, 8),
    }
    shards = {
        "model-00001-of-00004.safetensors": {"model.text_model.embed_tokens.weight": language["model.text_model.embed_tokens.weight"]},
        "model-00002-of-00004.safetensors": {k: connector[k] for k in names[:half]},
        "model-00003-of-00004.safetensors": {k: connector[k] for k in names[half:]},
        "model-00004-of-00004.safetensors": {k: language[k] for k in ("model.text_model.layers.0.mlp.up_proj.weight", "lm_head.weight")},
    }
    write_shards(directory, shards, config)


def write_shards(directory, shards, config):
    """`shards` ({file name: {tensor name: tensor}}) as safetensors files, their index and
    config.json: the layout `save_pretrained` writes."""
    from safetensors.torch import save_file

    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(directory / shard))
        weight_map.update({k: shard for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(config.to_json_string())


def test_convert_sharded_idefics2_checkpoint_opens_only_connector_shards(tmp_path, monkeypatch, capsys):
    import safetensors

    reference, config = idefics2_reference(IDEFICS2[0], seed=3)
    source = tmp_path / "idefics2-tiny"
    source.mkdir()
    _write_sharded_checkpoint(source, reference.state_dict(), config)

    opened = []
    real = safetensors.safe_open

    def recording(path, *args, **kwargs):
        opened.append(path.rsplit("/", 1)[-1])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording)
    out = tmp_path / "preset"
    assert cli_main(["convert", str(source), str(out)]) == 0  # `keras-perceiver convert`
    assert sorted(opened) == ["model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"]
    read = [line for line in capsys.readouterr().err.splitlines() if line.startswith("convert: reading ")]
    assert [line.split(" from ")[1] for line in read] == [
        "model-00002-of-00004.safetensors (shard 1 of 2)", "model-00003-of-00004.safetensors (shard 2 of 2)",
    ]  # one line per shard opened

    model = kp.from_preset(str(out))
    assert type(model).__name__ == "PerceiverResampler" and model.config.media_rank == 3
    media, mask = _media_and_mask(2, 8, IDEFICS2[0][0], seed=2)
    with torch.no_grad():
        expected = reference(torch.from_numpy(media), torch.from_numpy(mask).long()).numpy()
    assert np.abs(to_numpy(model({"media": media, "media_mask": mask})) - expected).max() <= 1e-4
    assert json.loads((out / "metadata.json").read_text())["source"] == str(source)


def test_presets_keep_the_connectors_conventions():
    """The zoo entries, shrunk: (B, N, vision width) and a padding mask in, (B, 64, text width) out."""
    small = dict(depth=1, head_channels=4, num_latents=64)
    model = kp.from_preset("idefics2_connector", load_weights=False, dim=32, media_dim=12, projection_channels=20, **small)
    assert list(model.named_inputs) == ["media", "media_mask"]
    media, mask = _media_and_mask(2, 7, 12)
    assert to_numpy(model({"media": media, "media_mask": mask})).shape == (2, 64, 32)
    model = kp.from_preset("idefics_resampler", load_weights=False, dim=24, **small)
    assert list(model.named_inputs) == ["media"] and model.config.qk_norm
    assert to_numpy(model(media[:, :, :1].repeat(24, axis=-1))).shape == (2, 64, 24)
