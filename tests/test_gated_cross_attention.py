import numpy as np
import pytest
from conftest import to_numpy
from numpy_reference import feed_forward, layer_norm, multi_head_attention

from keras_perceiver.layers import GatedCrossAttentionBlock


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(2, 7, 16)).astype("float32")
    media = rng.normal(size=(2, 3, 4, 12)).astype("float32")
    locations = np.zeros((2, 7), bool)
    locations[0, [1, 4]] = True  # tokens 0 sees no media; 1-3 media 1; 4-6 media 2
    locations[1, [0, 2, 5]] = True
    return text, media, locations


def test_gates_start_closed():
    text, media, locations = _inputs()
    block = GatedCrossAttentionBlock(num_heads=2, head_channels=8)
    np.testing.assert_array_equal(to_numpy(block(text, media, locations)), text)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_gated_block_matches_numpy(only_immediate):
    text, media, locations = _inputs()
    block = GatedCrossAttentionBlock(num_heads=2, head_channels=8, only_immediate=only_immediate)
    block(text, media, locations)
    block.attention_gate.assign(0.7)
    block.feed_forward_gate.assign(-0.3)
    out = to_numpy(block(text, media, locations))

    text_time = np.cumsum(locations, axis=-1)
    media_time = np.repeat(np.arange(1, 4), 4)
    if only_immediate:
        mask = text_time[:, :, None] == media_time[None, None, :]
    else:
        mask = text_time[:, :, None] >= media_time[None, None, :]
    attended = multi_head_attention(
        block.attention, layer_norm(text.astype("float64"), block.norm), media.reshape(2, 12, 12).astype("float64"), mask
    )
    x = text + np.tanh(0.7) * attended
    expected = x + np.tanh(-0.3) * feed_forward(block.feed_forward, x)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    # a token before any media gets nothing from the attention
    assert not mask[0, 0].any()
