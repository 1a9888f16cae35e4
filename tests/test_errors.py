import numpy as np
import pytest
from keras.ops import convert_to_tensor

from keras_perceiver import PerceiverConfig
from keras_perceiver.examples import build_small, example_inputs

from conftest import small_model as _model


def test_wrong_feature_size_names_input_expected_and_received():
    model = _model("perceiver")
    inputs = example_inputs(model)
    inputs["inputs"] = inputs["inputs"][..., :2]
    with pytest.raises(ValueError, match=r"'inputs' must have shape \(batch, 16, 16, 3\); received \(2, 16, 16, 2\)"):
        model(inputs)


def test_wrong_rank():
    model = _model("perceiver_io")
    with pytest.raises(ValueError, match=r"'token_ids' must have shape \(batch, None\); received \(2, 4, 5\)"):
        model({"token_ids": np.zeros((2, 4, 5), "int32"), "input_mask": np.ones((2, 4), bool)})
    resampler = _model("perceiver_resampler")
    with pytest.raises(ValueError, match=r"'media' must have rank 3.*received shape \(2, 64\)"):
        resampler(np.zeros((2, 64), "float32"))
    with pytest.raises(ValueError, match=r"'media' must have shape \(batch, None, None, None, 64\); received \(2, 1, 1, 5, 32\)"):
        resampler(np.zeros((2, 5, 32), "float32"))


def test_mask_that_does_not_match():
    model = _model("perceiver_io")
    inputs = example_inputs(model, length=10)
    inputs["input_mask"] = inputs["input_mask"][:, :7]
    with pytest.raises(ValueError, match=r"'input_mask' must have shape \(2, 10\) to match 'token_ids'; received \(2, 7\)"):
        model(inputs)
    resampler = _model("perceiver_resampler", use_media_mask=True)
    inputs = example_inputs(resampler)
    inputs["media_mask"] = inputs["media_mask"][..., :3]
    with pytest.raises(ValueError, match=r"'media_mask' must have shape \(2, 2, 2, 12\) to match 'media'; received \(2, 2, 2, 3\)"):
        resampler(inputs)


def test_missing_and_extra_inputs():
    model = _model("perceiver_io")
    with pytest.raises(ValueError, match=r"expected inputs \['input_mask', 'token_ids'\]; received \['input_mask'\]"):
        model({"input_mask": np.ones((2, 4), bool)})  # the mask is optional, the tokens are not


def test_too_many_tokens():
    model = _model("perceiver_io")
    inputs = example_inputs(model, length=129)
    with pytest.raises(ValueError, match="max_positions=128"):
        model(inputs)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['num_latent'\]"):
        build_small("perceiver", num_latent=3)
    with pytest.raises(ValueError, match="pooling.*'max'"):
        build_small("perceiver", pooling="max")
    with pytest.raises(ValueError, match="activation.*'swish'"):
        build_small("perceiver", activation="swish")
    with pytest.raises(ValueError, match="input_channels"):
        PerceiverConfig(input_adapter={"type": "features", "index_dims": [4]}).validate()


def test_flow_and_multimodal_configs_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"output_queries of type 'inputs' need a 'features' input_adapter; received input_adapter type 'tokens'"):
        build_small("perceiver_io", output_queries={"type": "inputs"}, output_channels=None)
    adapter = {"type": "features", "input_channels": 3, "index_dims": [2, 7, 8], "patch_size": 2}
    with pytest.raises(ValueError, match=r"index_dims \(2, 7, 8\) must be static multiples of the patch sizes \(1, 2, 2\); axis 1 is 7"):
        build_small("perceiver_io_flow", input_adapter=adapter)
    with pytest.raises(ValueError, match=r"`audio_samples` must be a multiple of audio_samples_per_patch=4; received 30"):
        build_small("perceiver_multimodal", audio_samples=30)


def test_output_points_out_of_range():
    model = _model("perceiver_multimodal")
    inputs = example_inputs(model)
    inputs["image_output_points"][0, 0] = 2 * 8 * 8
    with pytest.raises(ValueError, match=r"'image_output_points' holds indices in \[0, 128\); received values from \d+ to 128"):
        model(inputs)


# ------------------------------------------------------------- zero-sized axes and values

@pytest.mark.parametrize(
    "name,data,shape,axis",
    [
        ("perceiver_resampler", "media", (0, 2, 2, 3, 64), 0),  # no example
        ("perceiver_resampler", "media", (2, 0, 2, 3, 64), 1),  # no media item
        ("perceiver_resampler", "media", (2, 2, 0, 3, 64), 2),  # no frame
        ("perceiver_resampler", "media", (2, 2, 2, 0, 64), 3),  # no media token
        ("perceiver_resampler", "media", (2, 0, 64), 1),  # rank 3: the shape as given
        ("perceiver_io", "token_ids", (2, 0), 1),  # no token
        ("perceiver_io", "token_ids", (0, 5), 0),
        ("perceiver", "inputs", (0, 16, 16, 3), 0),
    ],
)
def test_zero_sized_axis_names_input_axis_and_shape(name, data, shape, axis):
    model = _model(name)
    inputs = {data: np.zeros(shape, "int32" if data == "token_ids" else "float32")}
    if "input_mask" in model.named_inputs:
        inputs["input_mask"] = np.ones(shape[:2] if data == "token_ids" else shape[:-1], bool)
    pattern = rf"'{data}' axis {axis} must be at least 1; received shape \({', '.join(map(str, shape))}\)"
    with pytest.raises(ValueError, match=pattern):
        model(inputs)
    with pytest.raises(ValueError, match=pattern):
        model.predict(inputs, verbose=0)


def test_zero_output_points():
    model = _model("perceiver_multimodal")
    inputs = example_inputs(model)
    inputs["audio_output_points"] = inputs["audio_output_points"][:, :0]
    with pytest.raises(ValueError, match=r"'audio_output_points' axis 1 must be at least 1; received shape \(2, 0\)"):
        model(inputs)


def _with_token(value):
    inputs = example_inputs(_model("perceiver_io"))
    inputs["token_ids"][1, 3] = value
    return inputs


@pytest.mark.parametrize("value", [-1, 262, 10**6])
def test_token_ids_out_of_range(value):
    model = _model("perceiver_io")
    inputs = _with_token(value)
    low, high = inputs["token_ids"].min(), inputs["token_ids"].max()
    pattern = rf"'token_ids' holds token ids in \[0, vocab_size\) = \[0, 262\); received values from {low} to {high}"
    with pytest.raises(ValueError, match=pattern):
        model(inputs)
    eager = {k: convert_to_tensor(v) for k, v in inputs.items()}  # eager tensors are concrete too
    with pytest.raises(ValueError, match=pattern):
        model(eager)


def test_value_checks_run_through_keras_loops():
    """The JAX trainer calls `stateless_call`, not `__call__`: the loops check array x up front."""
    model = _model("perceiver_io")
    model.compile(optimizer="sgd", loss="mse")
    bad, target = _with_token(-1), np.zeros((2, 128, 262), "float32")
    pattern = r"'token_ids' holds token ids in \[0, vocab_size\) = \[0, 262\); received values from -1"
    for run in (
        lambda: model.predict(bad, verbose=0),
        lambda: model.predict_on_batch(bad),
        lambda: model.evaluate(bad, target, verbose=0),
        lambda: model.test_on_batch(bad, target),
        lambda: model.train_on_batch(bad, target),
        lambda: model.fit(bad, target, verbose=0),
        lambda: model.fit(_with_token(0), target, validation_data=(bad, target), verbose=0, epochs=0),
    ):
        with pytest.raises(ValueError, match=pattern):
            run()
    multimodal = _model("perceiver_multimodal")
    inputs = example_inputs(multimodal)
    inputs["audio_output_points"][0, 0] = 8
    with pytest.raises(ValueError, match=r"'audio_output_points' holds indices in \[0, 8\); received values from \d+ to 8"):
        multimodal.predict(inputs, verbose=0)


def test_a_refused_input_leaves_the_model_usable():
    """A bad shape through predict, fit and evaluate raises our ValueError, arrays checked up
    front and generator batches where the step is traced; the model then predicts as before
    (on JAX an error inside the loop used to leave every variable detached: Keras 3.15)."""
    model = _model("perceiver")
    good = example_inputs(model)
    expected = model.predict(good, verbose=0)
    bad = dict(good, inputs=good["inputs"][..., :2])
    target = np.zeros((2, 10), "float32")
    model.compile(optimizer="sgd", loss="mse")
    pattern = r"'inputs' must have shape \(batch, 16, 16, 3\); received \((2|batch), 16, 16, 2\)"
    for run in (
        lambda: model.predict(bad, verbose=0),
        lambda: model.predict((batch for batch in [(bad,)]), verbose=0),
        lambda: model.fit((batch for batch in [(bad, target)]), verbose=0, shuffle=False),
        lambda: model.evaluate((batch for batch in [(bad, target)]), verbose=0),
    ):
        with pytest.raises(ValueError, match=pattern):
            run()
    np.testing.assert_array_equal(model.predict(good, verbose=0), expected)


def test_predict_takes_the_ranks_call_takes():
    model = _model("perceiver_resampler")
    media = np.random.default_rng(0).normal(size=(2, 9, 64)).astype("float32")
    np.testing.assert_allclose(model.predict(media, verbose=0), model.predict(media[:, None, None], verbose=0), atol=1e-6)
