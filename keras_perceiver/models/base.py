"""What every model of the zoo shares: one config object, named inputs, input checks."""

import dataclasses

import keras
import numpy as np


def make_config(config_class, config=None, overrides=None):
    """A `config_class` from None, a dict or an instance, with keyword overrides applied."""
    if config is None:
        values = {}
    elif isinstance(config, dict):
        values = dict(config)
    elif isinstance(config, config_class):
        values = dataclasses.asdict(config)
    else:
        raise ValueError(
            f"`config` must be a {config_class.__name__}, a dict or None; received {type(config).__name__}"
        )
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_class.__name__}: unknown argument(s) {unknown}; expected some of {sorted(known)}")
    config = config_class(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config


class ConfiguredModel(keras.Model):
    """A functional `keras.Model` built from one config dataclass.

    Subclasses set `config_class` and implement `build_graph(config, dtype) -> (inputs,
    outputs)` where `inputs` is a dict of named `keras.Input`s. The config is serialised
    once (`get_config()["config"]`) and `.keras` files rebuild the model from it.
    """

    config_class = None
    # Name of the input a bare (non-dict) tensor is fed to.
    primary_input = None

    def __init__(self, config=None, name=None, dtype=None, **overrides):
        config = make_config(self.config_class, config, overrides)
        inputs, outputs = self.build_graph(config, dtype)
        super().__init__(inputs=inputs, outputs=outputs, name=name)
        self.config = config
        self._dtype_arg = dtype

    @classmethod
    def build_graph(cls, config, dtype):
        raise NotImplementedError

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable, "config": dataclasses.asdict(self.config)}
        if self._dtype_arg is not None:
            config["dtype"] = keras.dtype_policies.serialize(keras.dtype_policies.get(self._dtype_arg))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        trainable = config.pop("trainable", True)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        model = cls(**config)
        model.trainable = trainable
        return model

    @classmethod
    def from_preset(cls, name_or_path, load_weights=True, **overrides):
        """`keras_perceiver.from_preset`, checking that the preset holds this class."""
        from keras_perceiver.presets import from_preset

        return from_preset(name_or_path, load_weights=load_weights, expected_class=cls, **overrides)

    def save_to_preset(self, path, overwrite=False):
        """Write a preset directory (`config.json`, `model.weights.h5`, `metadata.json`)."""
        from keras_perceiver.presets import save_to_preset

        return save_to_preset(self, path, overwrite=overwrite)

    @property
    def named_inputs(self):
        """{input name: symbolic input}, in the order the model was built with (the order
        exported artefacts take their inputs in)."""
        return dict(self._inputs_struct)  # the one read of Keras' private input structure

    # ----------------------------------------------------------------- input checks
    def standardize_inputs(self, inputs):
        """Dict of named inputs (a bare tensor goes to `primary_input`), validated."""
        if not isinstance(inputs, dict):
            inputs = {self.primary_input: inputs}
        expected = self.named_inputs
        missing = sorted(set(expected) - set(inputs))
        extra = sorted(set(inputs) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{type(self).__name__}: expected inputs {sorted(expected)}; received {sorted(inputs)}"
            )
        for name, reference in expected.items():
            self._check_shape(name, inputs[name].shape, reference.shape)
        self.check_input_relations(inputs)
        return inputs

    def _check_shape(self, name, shape, expected):
        shape, expected = tuple(shape), tuple(expected)
        ok = len(shape) == len(expected) and all(
            e is None or _known(s) is None or _known(s) == int(e) for s, e in zip(shape, expected)
        )
        if not ok:
            raise ValueError(
                f"{type(self).__name__}: input '{name}' must have shape {_show(expected)}; "
                f"received {_show(shape)}"
            )

    def check_input_relations(self, inputs):
        """Checks across inputs (e.g. a mask matching its input); subclasses extend."""

    def call(self, inputs, training=None, mask=None):
        # Keras' own build paths (fit's symbolic build) reach `call` without `__call__`.
        if not isinstance(inputs, dict):
            inputs = {self.primary_input: inputs}
        return super().call(inputs, training=training, mask=mask)

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(self.standardize_inputs(inputs), *args, **kwargs)


def check_mask_matches(model, mask_name, mask_shape, input_name, expected):
    """Raise unless `mask_shape` equals `expected` (the shape of `input_name` it masks)."""
    expected = tuple(expected)
    if len(mask_shape) != len(expected) or any(
        _known(m) is not None and _known(e) is not None and _known(m) != _known(e) for m, e in zip(mask_shape, expected)
    ):
        raise ValueError(
            f"{type(model).__name__}: input '{mask_name}' must have shape {_show(expected)} to match "
            f"'{input_name}'; received {_show(tuple(mask_shape))}"
        )


def _known(size):
    """A size as an int when it is a number now; None when unknown or symbolic (a torch.export
    SymInt: comparing it would pin the exported program to this one size)."""
    return int(size) if isinstance(size, (int, np.integer)) else None


def _show(shape):
    return "(" + ", ".join("batch" if i == 0 and d is None else str(d) for i, d in enumerate(shape)) + ")"
