"""Masked-out positions never reach an output: whatever they hold (NaN, Inf, any value) gives
exactly the output of zeros there, in the models (zeroed where data enters) and in
`attention` itself (keys and values masked for every query are zeroed). Property tests
(hypothesis) draw small configurations, shapes and masks."""

import functools

import keras
import numpy as np
import pytest
from conftest import to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy_reference import softmax_attention

from keras_perceiver import Perceiver, PerceiverIO, PerceiverResampler
from keras_perceiver.examples import build_small, example_inputs
from keras_perceiver.layers import GridMask, MultiHeadAttention, attention

# the autouse fixture only seeds and resets the dtype policy: sharing it across examples is fine
PROPERTY = settings(
    max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
STRANGE = [np.nan, np.inf, -np.inf, 3e38]


_CONV_STEM = {"type": "features", "input_channels": 3, "index_dims": [16, 16], "num_bands": 4, "conv_stem_channels": 8}

MASKED_MODELS = {
    "perceiver": (lambda: build_small("perceiver"), "inputs", "input_mask"),
    # a conv stem mixes neighbouring pixels: only zeroing before it keeps a NaN out
    "perceiver_conv_stem": (lambda: build_small("perceiver", input_adapter=_CONV_STEM), "inputs", "input_mask"),
    # Perceiver IO over patches (two frames per patch), decoding at every patch
    "perceiver_io": (lambda: build_small("perceiver_io_flow", use_input_mask=True), "inputs", "input_mask"),
    "perceiver_resampler": (lambda: build_small("perceiver_resampler", use_media_mask=True), "media", "media_mask"),
    # a modality projection before the resampler: zeroing on entry comes first
    "idefics_connector": (lambda: build_small("idefics_connector"), "media", "media_mask"),
}


def _predict(model, inputs):
    """Through `predict_on_batch`: the compiled step (on JAX a new model's eager first call,
    one compilation per op, took 5x longer than one compilation of the whole step)."""
    return to_numpy(model.predict_on_batch(inputs))


def _fill_masked(x, keep, value):
    return np.where(keep[..., None], x, np.float32(value)).astype("float32")


@pytest.mark.parametrize("name", list(MASKED_MODELS))
def test_nan_and_inf_at_masked_positions_give_the_output_of_zeros(name):
    make, data, mask = MASKED_MODELS[name]
    model = make()
    inputs = example_inputs(model, length=10)
    inputs[mask][0, ..., :3] = False  # masked positions in both examples
    expected = _predict(model, dict(inputs, **{data: _fill_masked(inputs[data], inputs[mask], 0.0)}))
    assert np.isfinite(expected).all()
    for value in STRANGE:
        out = _predict(model, dict(inputs, **{data: _fill_masked(inputs[data], inputs[mask], value)}))
        np.testing.assert_array_equal(out, expected, err_msg=f"{value} at masked positions")


def test_nan_at_masked_positions_reaches_no_gradient():
    """One training step with NaN at masked positions leaves every weight finite (the zeroing
    happens before the first product, so no 0 x NaN enters a weight's gradient)."""
    for model, data, mask, target in (
        (build_small("perceiver", num_blocks=1, num_cross_attends=1, num_self_attends_per_block=1),
         "inputs", "input_mask", (2, 10)),
        (build_small("perceiver_resampler", use_media_mask=True, depth=1), "media", "media_mask", (2, 2, 8, 64)),
    ):
        inputs = example_inputs(model, length=6)
        inputs[data] = _fill_masked(inputs[data], inputs[mask], np.nan)
        target = np.zeros(target, "float32")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        loss = model.train_on_batch(inputs, target)
        assert np.isfinite(loss), type(model).__name__
        assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights), type(model).__name__


@pytest.mark.parametrize(
    "dims,kwargs", [((2, 6, 8), dict(temporal_patch_size=2)), ((6, 8), dict(patch_size=2)), ((16, 16), dict(conv_stem=True))]
)
def test_grid_mask_keeps_what_reads_a_real_position(dims, kwargs):
    mask = np.random.default_rng(3).random((2,) + dims) > 0.7
    got = to_numpy(GridMask(**kwargs)(mask))
    if kwargs.get("conv_stem"):  # every output of the stem's two windows, by hand
        padded = np.pad(mask, [(0, 0), (3, 3), (3, 3)])
        conv = np.array([[padded[:, 2 * i : 2 * i + 7, 2 * j : 2 * j + 7].any(axis=(1, 2)) for j in range(8)] for i in range(8)])
        pooled = [[conv[2 * i : 2 * i + 3, 2 * j : 2 * j + 3].any(axis=(0, 1)) for j in range(3)] for i in range(3)]
        expected = np.array(pooled).reshape(9, 2).T
    elif "temporal_patch_size" in kwargs:
        expected = mask.any(axis=1).reshape(2, -1)
    else:
        expected = mask.reshape(2, 3, 2, 4, 2).any(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_array_equal(got, expected)


@functools.lru_cache(maxsize=None)
def _compiled_attention(chunk_size):
    import jax

    return jax.jit(functools.partial(attention, chunk_size=chunk_size))


def _attend(q, k, v, mask, chunk_size=None):
    """`attention`, under jax.jit on JAX: eager JAX compiles each op per shape (3-5x slower
    here than one compilation); test_attention.py covers the eager path."""
    if keras.backend.backend() == "jax":
        return to_numpy(_compiled_attention(chunk_size)(q, k, v, mask))
    return to_numpy(attention(q, k, v, mask, chunk_size=chunk_size))


def _qkv(batch, queries, keys, heads, kv_heads, qk_dim, v_dim, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, queries, heads, qk_dim)).astype("float32")
    k = rng.normal(size=(batch, keys, kv_heads, qk_dim)).astype("float32")
    v = rng.normal(size=(batch, keys, kv_heads, v_dim)).astype("float32")
    return q, k, v


def _poison(x, masked_keys, value):
    """x (B, Tk, H, D) with `value` at the keys where `masked_keys` (B, Tk) is True."""
    return np.where(masked_keys[:, :, None, None], np.float32(value), x).astype("float32")


@pytest.mark.parametrize("v_dim", [8, 12], ids=["fused_kernel", "uneven_widths"])
@pytest.mark.parametrize("mask_rank", [2, 3])
@pytest.mark.parametrize("chunk_size", [None, 4], ids=["whole", "key_blocks"])
def test_attention_never_reads_masked_keys(v_dim, mask_rank, chunk_size):
    q, k, v = _qkv(2, 5, 11, 3, 3, 8, v_dim)
    rng = np.random.default_rng(1)
    keys = rng.random((2, 11)) > 0.4
    keys[1] = False  # an example with no key: zeros, never NaN
    mask = keys if mask_rank == 2 else keys[:, None, :] & (rng.random((2, 5, 11)) > 0.3)
    masked_for_all = ~(mask if mask_rank == 2 else mask.any(axis=1))
    zeros_out = _attend(q, _poison(k, masked_for_all, 0), _poison(v, masked_for_all, 0), mask, chunk_size)
    assert np.isfinite(zeros_out).all()
    np.testing.assert_array_equal(zeros_out[1], 0.0)
    reference = softmax_attention(q, k, v, mask if mask_rank == 3 else mask[:, None, :])
    np.testing.assert_allclose(zeros_out, reference, atol=1e-5)
    for value in STRANGE:
        out = _attend(q, _poison(k, masked_for_all, value), _poison(v, masked_for_all, value), mask, chunk_size)
        np.testing.assert_array_equal(out, zeros_out, err_msg=f"{value} at masked keys")


@pytest.mark.parametrize("num_queries", [3, 40], ids=["projections_on_query_side", "standard"])
def test_multi_head_attention_never_reads_masked_context(num_queries):
    rng = np.random.default_rng(2)
    query_in, context_in = keras.Input((num_queries, 12)), keras.Input((30, 24))
    keep_in = keras.Input((30,), dtype="bool")
    layer = MultiHeadAttention(2, 16, 16, 12)
    model = keras.Model([query_in, context_in, keep_in], layer(query_in, context_in, key_mask=keep_in))
    query = rng.normal(size=(2, num_queries, 12)).astype("float32")
    context = rng.normal(size=(2, 30, 24)).astype("float32")
    keep = rng.random((2, 30)) > 0.5
    clean = _predict(model, [query, np.where(keep[..., None], context, 0).astype("float32"), keep])
    for value in STRANGE:
        poisoned = np.where(keep[..., None], context, np.float32(value)).astype("float32")
        np.testing.assert_array_equal(_predict(model, [query, poisoned, keep]), clean)


# ---------------------------------------------------------------------------- properties
# Sizes come from short lists: JAX compiles each op per shape, and repeated sizes reuse that.
def _mask(draw, shape):
    size = int(np.prod(shape))
    return np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size))).reshape(shape)


@st.composite
def _attention_case(draw):
    batch, queries, keys = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 4])), draw(st.sampled_from([3, 9]))
    heads = draw(st.sampled_from([1, 2]))
    kv_heads = draw(st.sampled_from([1, heads]))
    v_dim = draw(st.sampled_from([4, 6]))  # 4 = qk width: the fused kernel; 6: the explicit form
    mask_rank = draw(st.sampled_from([2, 3]))
    mask = _mask(draw, (batch, keys) if mask_rank == 2 else (batch, queries, keys))
    chunk_size = draw(st.sampled_from([None, 2, 4]))
    fill = draw(st.sampled_from(["random", "nan", "inf"]))
    seed = draw(st.integers(0, 2**16))
    return (batch, queries, keys, heads, kv_heads, 4, v_dim), mask, chunk_size, fill, seed


def _fill(rng, kind, shape):
    if kind == "nan":
        return np.full(shape, np.nan, "float32")
    if kind == "inf":
        return np.where(rng.random(shape) > 0.5, np.inf, -np.inf).astype("float32")
    return (rng.normal(size=shape) * 100).astype("float32")


@PROPERTY
@given(_attention_case())
def test_property_attention_ignores_what_masked_keys_hold(case):
    sizes, mask, chunk_size, fill, seed = case
    q, k, v = _qkv(*sizes, seed=seed)
    masked_for_all = ~(mask if mask.ndim == 2 else mask.any(axis=1))
    rng = np.random.default_rng(seed)
    spot = masked_for_all[:, :, None, None]
    k2 = np.where(spot, _fill(rng, fill, k.shape), k)
    v2 = np.where(spot, _fill(rng, fill, v.shape), v)
    # clean and changed in one batch (examples never interact): one call per example
    both = _attend(*(np.concatenate(pair) for pair in ((q, q), (k, k2), (v, v2), (mask, mask))), chunk_size)
    assert np.isfinite(both).all()
    np.testing.assert_allclose(both[len(q):], both[: len(q)], rtol=1e-5, atol=1e-5)


_CLASSES = {"perceiver": Perceiver, "perceiver_io": PerceiverIO, "perceiver_resampler": PerceiverResampler}


@st.composite
def _model_case(draw):
    family = draw(st.sampled_from(list(_CLASSES)))
    heads = draw(st.sampled_from([1, 2]))
    width = heads * draw(st.sampled_from([4, 8]))
    latents = draw(st.sampled_from([1, 3]))
    batch, length = draw(st.sampled_from([1, 2])), draw(st.sampled_from([2, 7]))
    seed = draw(st.integers(0, 2**16))
    fill = draw(st.sampled_from(["random", "nan", "inf"]))
    if family == "perceiver_resampler":
        config = dict(dim=width, depth=1, num_heads=heads, head_channels=4, num_latents=latents, use_media_mask=True)
        shape = (batch, draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), length)
    else:
        config = dict(
            num_latents=latents, latent_channels=width, num_blocks=1, num_self_attends_per_block=1,
            num_self_attention_heads=heads, num_cross_attention_heads=draw(st.sampled_from([1, heads])),
            input_adapter={"type": "features", "input_channels": 3, "index_dims": [None], "num_bands": 2,
                           "max_resolution": [16]},
            use_input_mask=True,
        )
        if family == "perceiver_io":
            config.update(output_queries={"type": "learned", "num_queries": draw(st.sampled_from([1, 3])), "channels": width},
                          decoder_num_heads=heads, output_channels=3)
        else:
            config.update(num_classes=3)
        shape = (batch, length)
    return family, config, _mask(draw, shape), fill, seed


@settings(PROPERTY, max_examples=10)
@given(_model_case())
def test_property_models_ignore_what_masked_positions_hold(case):
    family, config, keep, fill, seed = case
    model = _CLASSES[family](config)
    rng = np.random.default_rng(seed)
    data, mask = ("media", "media_mask") if family == "perceiver_resampler" else ("inputs", "input_mask")
    channels = model.named_inputs[data].shape[-1]
    x = rng.normal(size=keep.shape + (channels,)).astype("float32")
    changed = np.where(keep[..., None], x, _fill(rng, fill, x.shape))
    # clean and changed in one batch (examples never interact): one compilation per example
    both = _predict(model, {data: np.concatenate([x, changed]), mask: np.concatenate([keep, keep])})
    assert np.isfinite(both).all()
    np.testing.assert_allclose(both[len(x):], both[: len(x)], rtol=1e-5, atol=1e-5)
