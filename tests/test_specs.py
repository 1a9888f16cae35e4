"""Typed input-adapter and output-query specs, and their dict form in configs and files."""

import json

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_perceiver.examples import SMALL_MODELS, build_small, example_inputs
from keras_perceiver.layers import FeatureInput, TokenInput
from keras_perceiver.models import (
    FourierQueries,
    InputQueries,
    LearnedQueries,
    Perceiver,
    PerceiverConfig,
    PerceiverIO,
    PerceiverIOConfig,
)
from keras_perceiver.models.base import config_dict, make_config
from keras_perceiver.presets import from_preset, model_classes, save_to_preset, zoo_entries

READ_WRITE_MODELS = [name for name, (cls, _) in SMALL_MODELS.items() if cls in (Perceiver, PerceiverIO)]
ZOO_READ_WRITE = [name for name, entry in zoo_entries().items() if entry["class_name"] in ("Perceiver", "PerceiverIO")]


def _as_dicts(config):
    """A SMALL_MODELS config with its typed specs in dict form."""
    return {key: value.to_dict() if hasattr(value, "to_dict") else value for key, value in config.items()}


@pytest.mark.parametrize("name", READ_WRITE_MODELS)
def test_typed_and_dict_specs_build_the_same_model(name):
    model_class, typed = SMALL_MODELS[name]
    assert isinstance(typed["input_adapter"], (FeatureInput, TokenInput))
    dicts = _as_dicts(typed)
    assert isinstance(dicts["input_adapter"], dict)
    keras.utils.set_random_seed(7)
    from_typed = model_class(typed)
    keras.utils.set_random_seed(7)
    from_dicts = model_class(dicts)
    assert from_typed.config == from_dicts.config
    assert from_typed.count_params() == from_dicts.count_params()
    assert [w.shape for w in from_typed.weights] == [w.shape for w in from_dicts.weights]
    inputs = example_inputs(from_typed, seed=3)
    np.testing.assert_array_equal(to_numpy(from_typed(inputs)), to_numpy(from_dicts(inputs)))
    assert json.dumps(from_typed.get_config()["config"]) == json.dumps(from_dicts.get_config()["config"])


def test_dict_form_is_read_into_typed_specs():
    config = PerceiverIOConfig(
        input_adapter={"type": "features", "input_channels": 3, "index_dims": [4, 5], "num_bands": 2},
        output_queries={"type": "fourier", "index_dims": [4, 5], "num_bands": 3, "sine_only": True},
    )
    assert config.input_adapter == FeatureInput(input_channels=3, index_dims=(4, 5), num_bands=2)
    assert config.input_adapter.index_dims == (4, 5)
    assert config.output_queries == FourierQueries(index_dims=(4, 5), num_bands=3, sine_only=True)
    assert PerceiverIOConfig(output_queries={"type": "inputs"}).output_queries == InputQueries()
    assert PerceiverIOConfig().output_queries == LearnedQueries(num_queries=1, channels=1280)


def test_to_dict_keeps_the_keys_read_and_writes_defaults_only_when_given():
    read = {"type": "features", "input_channels": 1, "index_dims": [8, 8], "position_encoding": "fourier", "num_bands": 4}
    assert PerceiverConfig(input_adapter=read).input_adapter.to_dict() == read
    assert list(PerceiverConfig(input_adapter=read).input_adapter.to_dict()) == list(read)  # order too
    typed = FeatureInput(input_channels=1, index_dims=(8, 8), position_encoding="fourier", num_bands=4)
    assert typed.to_dict() == {"type": "features", "input_channels": 1, "index_dims": [8, 8], "num_bands": 4}
    assert InputQueries().to_dict() == {"type": "inputs"}


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("input_adapter", {"type": "pixels"}, r"input_adapter `type` must be one of \['features', 'tokens'\]; received 'pixels'"),
        ("input_adapter", {"vocab_size": 3}, r"input_adapter `type` must be one of \['features', 'tokens'\]; received None"),
        (
            "input_adapter",
            {"type": "tokens", "vocab_size": 8, "channels": 4, "max_positions": 4, "vocab": 8},
            r"input_adapter of type 'tokens': unknown key\(s\) \['vocab'\]; valid keys: \['type', 'vocab_size', 'channels', 'max_positions'\]",
        ),
        ("input_adapter", {"type": "tokens", "vocab_size": 8, "channels": 4}, r"needs the key\(s\) \['max_positions'\]"),
        ("input_adapter", {"type": "tokens", "vocab_size": 8, "channels": 0, "max_positions": 4}, r"TokenInput: `channels` must be an int >= 1; received 0"),
        (
            "input_adapter",
            {"type": "features", "input_channels": 3, "index_dims": [4], "combine": "sum"},
            r"FeatureInput: `combine` must be one of \['concat', 'add'\]; received 'sum'",
        ),
        (
            "input_adapter",
            {"type": "features", "input_channels": 3, "index_dims": [0]},
            r"FeatureInput: `index_dims` must be a non-empty list of ints >= 1 or None; received \[0\]",
        ),
        ("input_adapter", LearnedQueries(2, 3), r"`input_adapter` must be a FeatureInput or TokenInput, or a dict"),
        ("output_queries", {"type": "grid"}, r"output_queries `type` must be one of \['fourier', 'inputs', 'learned'\]; received 'grid'"),
        ("output_queries", {"type": "inputs", "channels": 3}, r"output_queries of type 'inputs': unknown key\(s\) \['channels'\]; valid keys: \['type'\]"),
        ("output_queries", {"type": "learned", "num_queries": 2.5, "channels": 3}, r"LearnedQueries: `num_queries` must be an int >= 1; received 2.5"),
        (
            "output_queries",
            {"type": "fourier", "index_dims": [4], "num_bands": 2, "max_resolution": 4},
            r"FourierQueries: `max_resolution` must be a non-empty list of ints >= 1 or None; received 4",
        ),
    ],
)
def test_bad_specs_name_what_is_wrong(field, value, message):
    with pytest.raises(ValueError, match=message):
        PerceiverIOConfig(**{field: value})


def test_typed_specs_check_their_fields():
    with pytest.raises(ValueError, match=r"FeatureInput: `position_encoding` must be one of \['fourier', 'trainable', None\]; received 'learned'"):
        FeatureInput(input_channels=3, index_dims=(4,), position_encoding="learned")
    with pytest.raises(ValueError, match=r"FeatureInput: `concat_pos` must be True or False; received 'yes'"):
        FeatureInput(input_channels=3, index_dims=(4,), concat_pos="yes")
    with pytest.raises(ValueError, match=r"TokenInput: `vocab_size` must be an int >= 1; received True"):
        TokenInput(vocab_size=True, channels=4, max_positions=4)
    with pytest.raises(ValueError, match=r"FourierQueries: `index_dims` must be a non-empty list of ints >= 1; received \[None\]"):
        FourierQueries(index_dims=[None], num_bands=2)


@pytest.mark.parametrize("name", ZOO_READ_WRITE)
def test_zoo_configs_round_trip_exactly(name):
    entry = zoo_entries()[name]
    config_class = model_classes()[entry["class_name"]].config_class
    config = make_config(config_class, entry["config"])
    written = config_dict(config)
    for field in ("input_adapter", "output_queries"):
        if field in entry["config"]:
            assert json.dumps(written[field]) == json.dumps(entry["config"][field])
    rebuilt = make_config(config_class, written)
    assert rebuilt == config
    assert json.dumps(config_dict(rebuilt)) == json.dumps(written)


def test_zoo_preset_saves_the_same_config(tmp_path):
    entry = zoo_entries()["perceiver_digits"]
    model = from_preset("perceiver_digits", load_weights=False)
    assert json.dumps(model.get_config()["config"]["input_adapter"]) == json.dumps(entry["config"]["input_adapter"])
    save_to_preset(model, tmp_path / "digits")
    saved = json.loads((tmp_path / "digits" / "config.json").read_text())
    assert saved["config"] == model.get_config()["config"]
    assert from_preset(str(tmp_path / "digits"), load_weights=False).config == model.config


def test_model_from_typed_config_round_trips_through_keras_file(tmp_path):
    model = build_small("perceiver_io")
    path = tmp_path / "io.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.config.input_adapter, TokenInput)
    assert loaded.config == model.config
    assert loaded.get_config()["config"]["output_queries"] == {"type": "learned", "num_queries": 128, "channels": 48}
