import numpy as np
import pytest
from conftest import to_numpy, weight
from numpy_reference import gelu, interpolate_rows, resampler, squared_relu

from keras_perceiver.examples import build_small
from keras_perceiver.layers import Resampler, ResamplerConfig, interpolate_embeddings


def _media(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("activation", ["gelu", "squared_relu"])
@pytest.mark.parametrize("embeddings", [False, True])
def test_resampler_matches_numpy(activation, embeddings):
    config = ResamplerConfig(
        dim=32, depth=2, num_heads=2, head_channels=8, num_latents=5, activation=activation,
        num_media_embeds=2 if embeddings else None, max_num_frames=2 if embeddings else None,
    )
    layer = Resampler(config)
    media = _media((2, 3, 4, 6, 32))  # T=3 > 2 time embeds, F=4 > 2 frames: interpolated
    out = to_numpy(layer(media))
    expected = resampler(layer, media, activation=gelu if activation == "gelu" else squared_relu)
    assert out.shape == (2, 3, 5, 32)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_resampler_mask_matches_numpy():
    layer = Resampler(ResamplerConfig(dim=16, depth=2, num_heads=2, head_channels=8, num_latents=3))
    media = _media((2, 2, 1, 7, 16))
    mask = np.random.default_rng(1).random((2, 2, 1, 7)) > 0.4
    mask[0, 0] = False  # an item with no real token: latents attend only to themselves
    np.testing.assert_allclose(to_numpy(layer(media, media_mask=mask)), resampler(layer, media, mask), atol=1e-4)


def test_resampler_ranks_agree():
    layer = Resampler(ResamplerConfig(dim=16, depth=1, num_heads=2, head_channels=8, num_latents=3))
    media = _media((2, 7, 16))
    out3 = to_numpy(layer(media))
    out4 = to_numpy(layer(media[:, None]))
    out5 = to_numpy(layer(media[:, None, None]))
    assert out3.shape == out4.shape == out5.shape == (2, 1, 3, 16)
    np.testing.assert_allclose(out3, out5, atol=1e-6)
    np.testing.assert_allclose(out4, out5, atol=1e-6)


def test_model_accepts_every_rank():
    model = build_small("perceiver_resampler")
    assert to_numpy(model(_media((2, 9, 64)))).shape == (2, 1, 8, 64)
    assert to_numpy(model(_media((2, 3, 9, 64)))).shape == (2, 3, 8, 64)
    assert to_numpy(model(_media((2, 3, 5, 9, 64)))).shape == (2, 3, 8, 64)


def test_interpolate_embeddings():
    rows = np.random.default_rng(0).normal(size=(4, 2)).astype("float32")
    np.testing.assert_array_equal(to_numpy(interpolate_embeddings(rows, 3)), rows[:3])  # the rows, exactly
    np.testing.assert_array_equal(to_numpy(interpolate_embeddings(rows, 4)), rows)
    table = np.arange(8, dtype="float32").reshape(4, 2)
    stretched = to_numpy(interpolate_embeddings(table, 7))
    np.testing.assert_allclose(stretched, interpolate_rows(table.astype("float64"), 7), atol=1e-6)
    np.testing.assert_allclose(stretched[[0, -1]], table[[0, -1]])  # end points kept


def test_no_biases_in_resampler():
    layer = Resampler(ResamplerConfig(dim=16, depth=1, num_heads=2, head_channels=8, num_latents=3))
    layer(_media((1, 4, 16)))
    names = [w.path for w in layer.weights]
    assert not [n for n in names if "bias" in n and "norm" not in n]
    block = layer.blocks[0]
    assert weight(block.attention.q[0]).shape == (16, 16)
    assert weight(block.attention.kv[0]).shape == (16, 32)  # fused k, v
