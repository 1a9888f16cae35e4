"""What every model of the zoo shares: one config object, named inputs, input checks."""

import contextlib
import dataclasses
import math
import sys

import keras
import numpy as np


def config_dict(config):
    """A config dataclass as plain data (`dataclasses.asdict`), its typed specs (such as
    `input_adapter`) in their dict form `{"type": ..., field: value, ...}`."""
    values = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if hasattr(value, "to_dict"):
            values[field.name] = value.to_dict()
    return values


def make_config(config_class, config=None, overrides=None):
    """A `config_class` from None, a dict or an instance, with keyword overrides applied."""
    if config is None:
        values = {}
    elif isinstance(config, dict):
        values = dict(config)
    elif isinstance(config, config_class):
        values = config_dict(config)
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

    Inputs are checked before they reach a backend: names, ranks, sizes (no axis of size 0)
    and masks against their data (`check_inputs`), and values where they matter, such as
    token ids in range (`check_input_values`). Shapes are checked on every call, traced ones
    included: whatever sizes a trace knows (under `jit`, `tf.function`, an export). Values are
    checked only where they are concrete: NumPy arrays and eager tensors given to `__call__`,
    and array x (NumPy, eager tensors, dicts of them) given to `predict`, `evaluate`, `fit`
    (x and validation x) and the `*_on_batch` methods, checked whole before the first step.
    What can not be checked: values inside a compiled function (`jit_compile=True`,
    `jax.jit`, `tf.function`, `torch.compile`), values in batches that a `tf.data.Dataset`, a
    `PyDataset` or a generator feeds to `fit` / `predict` where the step is traced (JAX;
    TensorFlow unless `run_eagerly`), and anything in an exported artefact (SavedModel,
    TFLite, ONNX, CoreML, OpenVINO), whose open sizes are not checked either. There an
    out-of-range id is not refused and the runtime decides what it reads (JAX reads -1 as
    the last row and gives NaN past the table); ids at masked positions are safe, since they
    become 0 before the embedding.
    """

    config_class = None
    # Name of the input a bare (non-dict) tensor is fed to.
    primary_input = None
    # Name of the optional boolean mask over `primary_input` (True = real position): a call
    # that leaves it out means every position is real, as in transformers' models.
    mask_input = None

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
        config = {"name": self.name, "trainable": self.trainable, "config": config_dict(self.config)}
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

    @classmethod
    def get_layout_map(cls, device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
        """A `keras.distribution.LayoutMap` sharding this model over `device_mesh`, for
        `keras.distribution.ModelParallel` (see `keras_perceiver.distribution`)."""
        from keras_perceiver.distribution import layout_map

        return layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name)

    # ------------------------------------------------------------------ FLOPs
    def flops(self, inputs):
        """Analytic FLOPs (int) of one forward pass on `inputs`: 2 x the multiply-adds of its
        matrix products (projections, attention's scores and weighted sums, feed-forwards,
        convolutions), from the built layers and the inputs' shapes; element-wise work (norms,
        softmax, activations) is left out. `inputs`: a dict of arrays or of shapes (batch
        first), or one array or shape for `primary_input`; checked as a call checks them.
        Each layer counts its own products (the layers' `flops` methods)."""
        shapes = shapes_of(inputs, self.primary_input)
        self.check_inputs({name: keras.KerasTensor(shape) for name, shape in shapes.items()})
        return int(self._flops_from_shapes(shapes))

    def _flops_from_shapes(self, shapes):
        """`flops` from {input name: shape, a tuple of ints}; each family implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not count its FLOPs")

    @property
    def named_inputs(self):
        """{input name: symbolic input}, in the order the model was built with (the order
        exported artefacts take their inputs in)."""
        return dict(self._inputs_struct)  # the one read of Keras' private input structure

    # ----------------------------------------------------------------- input checks
    def standardize_inputs(self, inputs):
        """Dict of named inputs (a bare tensor goes to `primary_input`), validated: shapes
        always, values where they are concrete (see the class docstring)."""
        inputs = self.check_inputs(inputs)
        self.check_input_values(inputs)
        return inputs

    def check_inputs(self, inputs):
        """Names and shapes (not values): safe inside a traced call. Returns the dict."""
        if not isinstance(inputs, dict):
            inputs = {self.primary_input: inputs}
        inputs = self.with_default_mask(inputs)
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

    def with_default_mask(self, inputs):
        """`inputs` (a dict) with `mask_input` added, all True, where the model has one and the
        call left it out: shaped like `primary_input` less its feature axis, if it has one
        (NumPy for NumPy data, else a backend tensor, traced ones included)."""
        expected = self.named_inputs
        name = self.mask_input
        if name not in expected or name in inputs or self.primary_input not in inputs:
            return inputs
        data = inputs[self.primary_input]
        has_features = len(expected[self.primary_input].shape) > len(expected[name].shape)
        positions = data[..., 0] if has_features else data
        ones_like = np.ones_like if isinstance(data, np.ndarray) else keras.ops.ones_like
        return {**inputs, name: ones_like(positions, dtype="bool")}

    def _check_shape(self, name, shape, expected):
        if rank_of(shape) is None:  # unknown rank (a generalised TensorFlow trace): nothing to check
            return
        shape, expected = tuple(shape), tuple(expected)
        ok = len(shape) == len(expected) and all(
            e is None or _known(s) is None or _known(s) == int(e) for s, e in zip(shape, expected)
        )
        if not ok:
            raise ValueError(
                f"{type(self).__name__}: input '{name}' must have shape {_show(expected)}; "
                f"received {_show(shape)}"
            )
        self._check_not_empty(name, shape)

    def _check_not_empty(self, name, shape):
        for axis, size in enumerate(shape):
            if _known(size) == 0:
                raise ValueError(
                    f"{type(self).__name__}: input '{name}' axis {axis} must be at least 1; "
                    f"received shape {tuple(_known(s) if _known(s) is not None else s for s in shape)}"
                )

    def check_input_relations(self, inputs):
        """Checks across inputs (e.g. a mask matching its input), from shapes only; subclasses extend."""

    def check_input_values(self, inputs):
        """Checks of values (e.g. ids in range), skipped where they are not concrete
        (`concrete_values`); subclasses extend."""

    def call(self, inputs, training=None, mask=None):
        # Keras' own paths reach `call` without `__call__` (fit's symbolic build, and the JAX
        # trainer's stateless_call in every fit / predict step): shapes are checked here too.
        inputs = self.check_inputs(inputs)
        return super().call(inputs, training=training, mask=mask)

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(self.standardize_inputs(inputs), *args, **kwargs)

    # ------------------------------------------- the trainer's entry points, checked
    def _check_data(self, x):
        """x validated up front when it is array data (NumPy, eager tensors, a dict of them),
        and given as `standardize_inputs` returns it (one rank per input: TensorFlow's retracing
        would otherwise generalise two ranks to an unknown one); a dataset or generator is
        returned as it is, and checked batch by batch (shapes when traced)."""
        if isinstance(x, dict) and all(hasattr(v, "shape") for v in x.values()) or concrete_values(x) is not None:
            return self.standardize_inputs(x)
        return x

    def fit(self, x=None, y=None, *args, **kwargs):
        x = self._check_data(x)
        validation = kwargs.get("validation_data")
        if isinstance(validation, (tuple, list)) and validation:
            kwargs["validation_data"] = (self._check_data(validation[0]),) + tuple(validation[1:])
        with _variables_kept_on_error(self):
            return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        x = self._check_data(x)
        with _variables_kept_on_error(self):
            return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        x = self._check_data(x)
        with _variables_kept_on_error(self):
            return super().predict(x, *args, **kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        x = self._check_data(x)
        return super().train_on_batch(x, y, *args, **kwargs)

    def test_on_batch(self, x, y=None, *args, **kwargs):
        x = self._check_data(x)
        return super().test_on_batch(x, y, *args, **kwargs)

    def predict_on_batch(self, x):
        x = self._check_data(x)
        return super().predict_on_batch(x)


@contextlib.contextmanager
def _variables_kept_on_error(model):
    """Keras' JAX trainer detaches the variables' values while fit / evaluate / predict run
    (they travel as the step's state) and reattaches them at the end; an error inside the loop
    (a batch refused when its step is traced) left every variable empty and the model unusable
    (Keras 3.15: 'NoneType' object is not callable on the next call). On an error, reattach
    the last state a step returned, and the values from before the loop to the rest."""
    if keras.config.backend() != "jax":
        yield
        return
    variables = list(model.trainable_variables) + list(model.non_trainable_variables) + list(model.metrics_variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    unique = {id(v): v for v in variables}.values()
    before = [(v, v.value) for v in unique]
    try:
        yield
    except BaseException:
        try:
            if getattr(model, "_jax_state", None):
                model.jax_state_sync()
            for v, value in before:
                if getattr(v, "_value", 0) is None:  # detached (private: no public test for it)
                    v.assign(value)
            model._jax_state = None
        except Exception:  # pragma: no cover - keep the original error
            pass
        raise


def concrete_values(x):
    """`x` as a NumPy-readable array when its values exist now (a NumPy array, an eager JAX,
    TensorFlow or PyTorch tensor), else None (symbolic, traced, fake or exported tensors,
    datasets). Looks at the tensor's type only: imports no backend."""
    if isinstance(x, np.ndarray):
        return x
    root = type(x).__module__.split(".")[0]
    if root in ("jax", "jaxlib"):
        jax = sys.modules["jax"]
        return None if isinstance(x, jax.core.Tracer) else x
    if root == "tensorflow":
        tf = sys.modules["tensorflow"]
        return x if isinstance(x, tf.Tensor) and not tf.is_symbolic_tensor(x) and tf.executing_eagerly() else None
    if root == "torch":
        torch = sys.modules["torch"]
        # FakeTensor / FunctionalTensor (torch.export) are subclasses; dynamo traces real ones
        if type(x) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling():
            return x
    return None


def check_index_range(model, name, values, limit, what="indices", limit_name=None):
    """Raise a ValueError unless every entry of `values` (input `name`) lies in [0, limit).
    Skipped where the values are not concrete (`concrete_values`); empty inputs pass here (the
    shape checks refuse them)."""
    values = concrete_values(values)
    if values is None or math.prod(values.shape) == 0:
        return
    if isinstance(values, np.ndarray):
        low, high = int(values.min()), int(values.max())
    else:  # two scalars leave the device, not the array
        low = int(keras.ops.convert_to_numpy(keras.ops.min(values)))
        high = int(keras.ops.convert_to_numpy(keras.ops.max(values)))
    if low < 0 or high >= limit:
        bound = f"[0, {limit_name}) = [0, {limit})" if limit_name else f"[0, {limit})"
        raise ValueError(
            f"{type(model).__name__}: input '{name}' holds {what} in {bound}; "
            f"received values from {low} to {high}"
        )


def check_mask_matches(model, mask_name, mask_shape, input_name, expected):
    """Raise unless `mask_shape` equals `expected` (the shape of `input_name` it masks)."""
    if rank_of(mask_shape) is None or rank_of(expected) is None:
        return
    expected = tuple(expected)
    if len(mask_shape) != len(expected) or any(
        _known(m) is not None and _known(e) is not None and _known(m) != _known(e) for m, e in zip(mask_shape, expected)
    ):
        raise ValueError(
            f"{type(model).__name__}: input '{mask_name}' must have shape {_show(expected)} to match "
            f"'{input_name}'; received {_show(tuple(mask_shape))}"
        )


def shapes_of(inputs, primary_input):
    """{input name: shape as a tuple of ints} from a dict of arrays or shapes, or one array or
    shape (for `primary_input`). Raises a ValueError for a shape with unknown sizes."""
    if not isinstance(inputs, dict):
        inputs = {primary_input: inputs}
    shapes = {}
    for name, value in inputs.items():
        shape = tuple(value.shape) if hasattr(value, "shape") else tuple(value) if isinstance(value, (tuple, list)) else None
        if shape is None or any(_known(size) is None for size in shape):
            raise ValueError(
                f"flops: input '{name}' must be an array or a shape of known sizes (batch first); "
                f"received {shape if shape is not None else type(value).__name__}"
            )
        shapes[name] = tuple(int(size) for size in shape)
    return shapes


def rank_of(shape):
    """len(shape), or None for a shape of unknown rank (TensorFlow's TensorShape(None))."""
    try:
        return len(shape)
    except ValueError:
        return None


def _known(size):
    """A size as an int when it is a number now; None when unknown or symbolic (a torch.export
    SymInt: comparing it would pin the exported program to this one size)."""
    return int(size) if isinstance(size, (int, np.integer)) else None


def _show(shape):
    return "(" + ", ".join("batch" if i == 0 and d is None else str(d) for i, d in enumerate(shape)) + ")"
