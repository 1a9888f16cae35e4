import json

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_perceiver import Perceiver, PerceiverIO, PerceiverResampler
from keras_perceiver.examples import SMALL_MODELS, build_small, example_inputs

NAMES = list(SMALL_MODELS)


def _run(model, inputs):
    return to_numpy(model(inputs))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("perceiver", (2, 10)),
        ("perceiver_io", (2, 128, 262)),
        ("perceiver_io_flow", (2, 6, 8, 2)),
        ("perceiver_multimodal", {"reconstructed_audio": (2, 24 * 4), "reconstructed_image": (2, 24, 3), "label_logits": (2, 10)}),
        ("perceiver_resampler", (2, 2, 8, 64)),
    ],
)
def test_output_shapes(name, expected):
    model = build_small(name)
    outputs = model(example_inputs(model))
    if isinstance(expected, dict):
        assert {k: tuple(v.shape) for k, v in outputs.items()} == expected
    else:
        assert tuple(outputs.shape) == expected


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    model = build_small(name)
    config = model.get_config()
    json.dumps(config)  # plain data
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    inputs = example_inputs(model)
    np.testing.assert_array_equal(_run(clone, inputs), _run(model, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_round_trip(name, tmp_path):
    model = build_small(name)
    inputs = example_inputs(model)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    np.testing.assert_array_equal(_run(loaded, inputs), _run(model, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_jit_compiled_matches_eager(name):
    model = build_small(name)
    inputs = example_inputs(model)
    eager = _run(model, inputs)
    model.compile(jit_compile=True)
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(inputs)), eager, atol=1e-5)


def test_same_model_accepts_different_lengths():
    io = build_small("perceiver_io")
    for length in (10, 40):
        out = _run(io, example_inputs(io, length=length))
        assert out.shape == (2, 128, 262)
    resampler = build_small("perceiver_resampler")
    for tokens in (5, 30):
        out = _run(resampler, example_inputs(resampler, length=tokens))
        assert out.shape == (2, 2, 8, 64)
    sequence = build_small(
        "perceiver",
        input_adapter={"type": "features", "input_channels": 3, "index_dims": [None], "max_resolution": [64], "num_bands": 4},
    )
    for length in (7, 50):
        assert _run(sequence, example_inputs(sequence, length=length)).shape == (2, 10)


def test_masked_tokens_have_no_effect():
    model = build_small("perceiver_io")
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 262, size=(2, 30)).astype("int32")
    mask = np.ones((2, 30), bool)
    mask[:, 20:] = False
    out = _run(model, {"token_ids": tokens, "input_mask": mask})
    changed = tokens.copy()
    changed[:, 20:] = rng.integers(0, 262, size=(2, 10))
    np.testing.assert_allclose(_run(model, {"token_ids": changed, "input_mask": mask}), out, atol=1e-6)
    # and equal to not having those tokens at all
    short = {"token_ids": tokens[:, :20], "input_mask": mask[:, :20]}
    np.testing.assert_allclose(_run(model, short), out, atol=1e-5)


def test_masked_pixels_have_no_effect():
    model = build_small("perceiver")
    inputs = example_inputs(model)
    out = _run(model, inputs)
    noisy = dict(inputs, inputs=np.where(inputs["input_mask"][..., None], inputs["inputs"], 100.0))
    np.testing.assert_allclose(_run(model, noisy), out, atol=1e-5)


def test_masked_media_tokens_have_no_effect():
    model = build_small("perceiver_resampler", use_media_mask=True)
    inputs = example_inputs(model, length=10)
    out = _run(model, inputs)
    keep = inputs["media_mask"]
    noisy = dict(inputs, media=np.where(keep[..., None], inputs["media"], -50.0).astype("float32"))
    np.testing.assert_allclose(_run(model, noisy), out, atol=1e-5)


MASKED = [("perceiver_io", {}), ("perceiver", {}), ("perceiver_resampler", {"use_media_mask": True}), ("idefics_connector", {})]


@pytest.mark.parametrize("name,overrides", MASKED, ids=[m[0] for m in MASKED])
def test_a_left_out_mask_means_every_position_is_real(name, overrides):
    model = build_small(name, **overrides)
    mask_name = model.mask_input
    inputs = example_inputs(model)
    data = {k: v for k, v in inputs.items() if k != mask_name}
    full = dict(data, **{mask_name: np.ones_like(inputs[mask_name])})
    expected = _run(model, full)
    np.testing.assert_array_equal(_run(model, data), expected)
    np.testing.assert_allclose(to_numpy(model.predict(data, verbose=0)), expected, atol=1e-5)  # a traced step
    # the default is a real choice: a partial mask gives another answer
    partial = np.ones_like(inputs[mask_name])
    partial[:, 0] = False
    assert np.abs(_run(model, dict(data, **{mask_name: partial})) - expected).max() > 1e-4
    if model.primary_input in ("token_ids", "inputs"):  # a bare tensor is the primary input
        np.testing.assert_array_equal(_run(model, data[model.primary_input]), expected)


def test_a_left_out_mask_for_media_of_rank_3():
    # flamingo-pytorch's (B, V, D) media: the default mask gets the same unit axes as the media
    model = build_small("perceiver_resampler", use_media_mask=True)
    media = np.random.default_rng(3).normal(size=(2, 5, 64)).astype("float32")
    np.testing.assert_array_equal(_run(model, media), _run(model, {"media": media, "media_mask": np.ones((2, 5), bool)}))


def test_fit_without_the_mask_input():
    model = build_small("perceiver_io")
    tokens = example_inputs(model)["token_ids"]
    targets = np.random.default_rng(4).integers(0, 262, size=(2, 128))  # one per learned output query
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit({"token_ids": tokens}, targets, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_iterative_reads_share_weights():
    base = build_small("perceiver", num_cross_attends=1)
    shared = build_small("perceiver", num_cross_attends=2, share_cross_attend_weights=True, num_blocks=3)
    shared_3 = build_small("perceiver", num_cross_attends=3, share_cross_attend_weights=True, num_blocks=3)
    separate = build_small("perceiver", num_cross_attends=3, share_cross_attend_weights=False, num_blocks=3)
    cross = shared.count_params() - base.count_params()
    assert cross > 0
    assert shared_3.count_params() == shared.count_params()  # reads after the first share weights
    assert separate.count_params() == base.count_params() + 2 * cross
    # more blocks reuse the self-attention weights
    assert build_small("perceiver", num_blocks=5).count_params() == shared.count_params()


def test_num_cross_attends_is_bounded_by_num_blocks():
    with pytest.raises(ValueError, match="num_cross_attends.*num_blocks=2.*received 3"):
        build_small("perceiver", num_cross_attends=3)


def test_classes_exported_with_names():
    assert {m.name for m in build_small("perceiver_io").inputs} == {"token_ids", "input_mask"}
    assert [m.name for m in build_small("perceiver_resampler").inputs] == ["media"]
    assert issubclass(Perceiver, keras.Model) and issubclass(PerceiverIO, keras.Model)
    assert issubclass(PerceiverResampler, keras.Model)
