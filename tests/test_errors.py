import numpy as np
import pytest

from keras_perceiver import PerceiverConfig
from keras_perceiver.examples import build_small, example_inputs


def test_wrong_feature_size_names_input_expected_and_received():
    model = build_small("perceiver")
    inputs = example_inputs(model)
    inputs["inputs"] = inputs["inputs"][..., :2]
    with pytest.raises(ValueError, match=r"'inputs' must have shape \(batch, 16, 16, 3\); received \(2, 16, 16, 2\)"):
        model(inputs)


def test_wrong_rank():
    model = build_small("perceiver_io")
    with pytest.raises(ValueError, match=r"'token_ids' must have shape \(batch, None\); received \(2, 4, 5\)"):
        model({"token_ids": np.zeros((2, 4, 5), "int32"), "input_mask": np.ones((2, 4), bool)})
    resampler = build_small("perceiver_resampler")
    with pytest.raises(ValueError, match=r"'media' must have rank 3.*received shape \(2, 64\)"):
        resampler(np.zeros((2, 64), "float32"))
    with pytest.raises(ValueError, match=r"'media' must have shape \(batch, None, None, None, 64\); received \(2, 1, 1, 5, 32\)"):
        resampler(np.zeros((2, 5, 32), "float32"))


def test_mask_that_does_not_match():
    model = build_small("perceiver_io")
    inputs = example_inputs(model, length=10)
    inputs["input_mask"] = inputs["input_mask"][:, :7]
    with pytest.raises(ValueError, match=r"'input_mask' must have shape \(2, 10\) to match 'token_ids'; received \(2, 7\)"):
        model(inputs)
    resampler = build_small("perceiver_resampler", use_media_mask=True)
    inputs = example_inputs(resampler)
    inputs["media_mask"] = inputs["media_mask"][..., :3]
    with pytest.raises(ValueError, match=r"'media_mask' must have shape \(2, 2, 2, 12\) to match 'media'; received \(2, 2, 2, 3\)"):
        resampler(inputs)


def test_missing_and_extra_inputs():
    model = build_small("perceiver_io")
    with pytest.raises(ValueError, match=r"expected inputs \['input_mask', 'token_ids'\]; received \['token_ids'\]"):
        model({"token_ids": np.zeros((2, 4), "int32")})


def test_too_many_tokens():
    model = build_small("perceiver_io")
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
    model = build_small("perceiver_multimodal")
    inputs = example_inputs(model)
    inputs["image_output_points"][0, 0] = 2 * 8 * 8
    with pytest.raises(ValueError, match=r"'image_output_points' holds indices in \[0, 128\); received values from \d+ to 128"):
        model(inputs)
