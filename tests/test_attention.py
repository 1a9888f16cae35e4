import keras
import numpy as np
import pytest
from conftest import to_numpy
from numpy_reference import multi_head_attention, softmax_attention

from keras_perceiver.layers import MultiHeadAttention, attention
from keras_perceiver.layers.attention import projections_on_query_side


def _qkv(v_dim, num_keys=11, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    k = rng.normal(size=(2, num_keys, 3, 8)).astype("float32")
    v = rng.normal(size=(2, num_keys, 3, v_dim)).astype("float32")
    return q, k, v


@pytest.mark.parametrize("v_dim", [8, 12], ids=["fused_kernel", "uneven_widths"])
@pytest.mark.parametrize("mask_rank", [None, 2, 3])
def test_attention_matches_numpy(v_dim, mask_rank):
    q, k, v = _qkv(v_dim)
    rng = np.random.default_rng(1)
    mask = None
    if mask_rank == 2:
        mask = rng.random((2, 11)) > 0.3
        expected = softmax_attention(q, k, v, mask[:, None, :])
    elif mask_rank == 3:
        mask = rng.random((2, 5, 11)) > 0.3
        expected = softmax_attention(q, k, v, mask)
    else:
        expected = softmax_attention(q, k, v)
    out = to_numpy(attention(q, k, v, key_mask=mask))
    assert out.shape == (2, 5, 3, v_dim)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("v_dim", [8, 12])
def test_fully_masked_row_is_zero_not_nan(v_dim):
    q, k, v = _qkv(v_dim)
    mask = np.ones((2, 5, 11), bool)
    mask[0, 2] = False  # one query row sees nothing
    mask[1] = False  # a whole example sees nothing
    out = to_numpy(attention(q, k, v, key_mask=mask))
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[0, 0], softmax_attention(q, k, v, mask)[0, 0], atol=1e-5)


@pytest.mark.parametrize("v_dim", [8, 12])
def test_chunked_path_equals_unchunked(v_dim):
    q, k, v = _qkv(v_dim, num_keys=37)
    mask = np.random.default_rng(2).random((2, 37)) > 0.2
    mask[1, :] = False
    mask[1, 30:] = True  # valid keys only in the last chunk
    full = to_numpy(attention(q, k, v, key_mask=mask, score_budget_bytes=None))
    chunked = to_numpy(attention(q, k, v, key_mask=mask, chunk_size=5))
    np.testing.assert_allclose(chunked, full, atol=1e-5)
    # from the budget: 2 x 5 x 3 rows of float32 scores, 1000 bytes -> blocks of 16 keys
    chunked = to_numpy(attention(q, k, v, key_mask=mask, score_budget_bytes=1000))
    np.testing.assert_allclose(chunked, full, atol=1e-5)



@pytest.mark.parametrize("route", ["explicit", "chunked"])
def test_odd_query_key_width_gets_the_same_answer(route):
    """An odd q/k width is padded with a zero channel on the explicit and chunked routes
    (AMX needs an even contraction); the scale stays that of the real width."""
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, 5, 1, 7)).astype("float32"), rng.normal(size=(2, 37, 1, 7)).astype("float32")
    v = rng.normal(size=(2, 37, 1, 6 if route == "explicit" else 7)).astype("float32")
    mask = rng.random((2, 37)) > 0.2
    out = to_numpy(attention(q, k, v, key_mask=mask, chunk_size=5 if route == "chunked" else None))
    np.testing.assert_allclose(out, softmax_attention(q, k, v, mask[:, None, :]), atol=1e-5)

def test_chunked_path_under_jit():
    rng = np.random.default_rng(3)
    query_in = keras.Input((4, 16))
    context_in = keras.Input((50, 16))
    layer = MultiHeadAttention(2, 16, 16, 16, score_budget_bytes=1000)  # blocks of 16 of 50 keys
    model = keras.Model([query_in, context_in], layer(query_in, context_in))
    x = [rng.normal(size=(2, 4, 16)).astype("float32"), rng.normal(size=(2, 50, 16)).astype("float32")]
    eager = to_numpy(model(x))
    layer.score_budget_bytes = None  # same weights, unchunked
    reference = to_numpy(model(x))
    layer.score_budget_bytes = 1000
    model.compile(jit_compile=True)
    compiled = model.predict_on_batch(x)
    np.testing.assert_allclose(eager, reference, atol=1e-5)
    np.testing.assert_allclose(compiled, reference, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.export is PyTorch's (the CoreML route)")
def test_chunked_path_exports_with_a_dynamic_batch():
    """Block sizes must not depend on a symbolic batch: the exported program then runs at
    any batch (a block size computed from a SymInt became sym_min / sym_max nodes that
    OpenVINO's PyTorch frontend cannot convert, and tied the blocks to the batch)."""
    import torch

    q, k, v = _qkv(8, num_keys=37)
    mask = np.random.default_rng(4).random((2, 37)) > 0.2

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return attention(q, k, v, key_mask=mask, score_budget_bytes=1000)

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        Attend(), tuple(torch.from_numpy(a) for a in (q, k, v, mask)),
        dynamic_shapes=tuple({0: batch} for _ in range(4)), strict=False,
    )
    ops_in_graph = {str(node.target) for node in program.graph.nodes}
    assert not any("sym_min" in t or "sym_max" in t for t in ops_in_graph)
    q3, k3, v3 = (np.concatenate([a, a[:1]]) for a in (q, k, v))
    mask3 = np.concatenate([mask, mask[:1]])
    got = program.module()(*(torch.from_numpy(a) for a in (q3, k3, v3, mask3))).detach().numpy()
    np.testing.assert_allclose(got, softmax_attention(q3, k3, v3, mask3[:, None, :]), atol=1e-5)


def test_attention_in_bfloat16_returns_bfloat16_close_to_float32():
    q, k, v = _qkv(8)
    q16, k16, v16 = (keras.ops.cast(t, "bfloat16") for t in (q, k, v))
    out = attention(q16, k16, v16)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    rounded = [to_numpy(keras.ops.cast(t, "float32")) for t in (q16, k16, v16)]
    expected = softmax_attention(*rounded)
    np.testing.assert_allclose(to_numpy(keras.ops.cast(out, "float32")), expected, atol=3e-2)


def test_multi_head_attention_rejects_indivisible_widths():
    with pytest.raises(ValueError, match="qk_channels.*divisible by num_heads=3.*received 16"):
        MultiHeadAttention(3, 16, 15, 8)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("budget", [None, 2000], ids=["whole", "key_blocks"])
def test_projections_on_the_query_side_equal_the_standard_form(heads, budget):
    # few queries, a wide context: the layer moves the key / value projections to the queries
    assert projections_on_query_side(3, heads, 40, 32, 64)
    layer = MultiHeadAttention(heads, 32, 64, 24, score_budget_bytes=budget)
    rng = np.random.default_rng(3)
    query = rng.normal(size=(2, 3, 12)).astype("float32")
    context = rng.normal(size=(2, 50, 40)).astype("float32")
    layer(query, context)
    for w in layer.weights:  # non-zero biases: they travel through the all-ones channel
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.2)
    mask = rng.random((2, 50)) > 0.4
    mask[1] = False  # an example with no key: the attention output is zero, as in the standard form
    got = to_numpy(layer(query, context, key_mask=mask))
    np.testing.assert_allclose(got, multi_head_attention(layer, query, context, mask[:, None, :]), atol=2e-5)
    unmasked = to_numpy(layer(query, context))
    np.testing.assert_allclose(unmasked, multi_head_attention(layer, query, context), atol=2e-5)


def test_projections_stay_on_the_context_side_for_many_queries():
    assert not projections_on_query_side(256, 8, 768, 256, 1280)  # perceiver_io_language's encoder
    assert not projections_on_query_side(None, 1, 40, 32, 64)
