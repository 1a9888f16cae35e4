"""Mixed precision: every small family under "mixed_bfloat16" and "mixed_float16", built with
the same seed as a float32 model and given its weights, predicts (`model.predict`) finite
outputs within a tolerance of the float32 ones, relative to the float32 outputs' range
(max - min).

Measured largest error / range (seed 0, CPU; JAX 0.10, TensorFlow 2.21, PyTorch 2.13):

| family               | bfloat16 jax / tf / torch | float16 jax / tf / torch | tolerance bf16 / f16 |
|----------------------|---------------------------|--------------------------|----------------------|
| perceiver            | 0.0023 / 0.0037 / 0.0035  | 0.0003 / 0.0006 / 0.0006 | 0.03 / 0.005         |
| perceiver_io         | 0.0047 / 0.0070 / 0.0099  | 0.0006 / 0.0008 / 0.0010 | 0.03 / 0.005         |
| perceiver_io_flow    | 0.021  / 0.18   / 0.0090  | 0.0029 / 0.019  / 0.0017 | 0.5  / 0.06          |
| perceiver_multimodal | 0.0069 / 0.0061 / 0.0093  | 0.0007 / 0.0010 / 0.0014 | 0.03 / 0.005         |
| perceiver_resampler  | 0.0038 / 0.0039 / 0.0054  | 0.0005 / 0.0005 / 0.0005 | 0.03 / 0.005         |
| idefics_connector    | 0.0027 / 0.0044 / 0.0043  | 0.0005 / 0.0004 / 0.0006 | 0.03 / 0.005         |

The tolerances leave a margin of about 3x (bfloat16 keeps 8 bits of mantissa, float16 11).
The flow model's outputs are a near-cancelling projection of its decoder's activations
(random weights, no query residual): on TensorFlow's seed their range is 0.05 of the
activations' spread, so the absolute error, which follows the activations (about 2e-4 on
every backend), is large against the range; its tolerance says so instead of loosening the
others.
"""

import keras
import numpy as np
import pytest

from keras_perceiver.examples import SMALL_MODELS, build_small, example_inputs, outputs_to_numpy

TOLERANCE = {"mixed_bfloat16": 0.03, "mixed_float16": 0.005}
FLOW_TOLERANCE = {"mixed_bfloat16": 0.5, "mixed_float16": 0.06}
# they compute their statistics in float32 whatever the policy (keras.ops.*_normalization)
NORMS = (keras.layers.LayerNormalization, keras.layers.RMSNormalization)


def _float32(outputs):
    return outputs_to_numpy(keras.tree.map_structure(lambda a: np.asarray(a, "float32"), outputs))


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_mixed_precision_predicts_close_to_float32(name):
    keras.utils.set_random_seed(0)
    reference = build_small(name)
    inputs = example_inputs(reference)
    expected = _float32(reference.predict(inputs, verbose=0))
    spread = float(expected.max() - expected.min())
    errors = {}
    for policy in TOLERANCE:
        keras.config.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = build_small(name)
            model.set_weights(reference.get_weights())
            outputs = _float32(model.predict(inputs, verbose=0))
        finally:
            keras.config.set_dtype_policy("float32")
        compute = keras.dtype_policies.get(policy).compute_dtype
        assert all(keras.backend.standardize_dtype(t.dtype) == compute for t in keras.tree.flatten(model.outputs))
        assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in model.weights)
        norms = [layer for layer in model._flatten_layers() if isinstance(layer, NORMS)]
        assert norms and all(n.dtype_policy.name == policy for n in norms)
        assert np.isfinite(outputs).all(), policy
        errors[policy] = float(np.abs(outputs - expected).max()) / spread
    tolerance = FLOW_TOLERANCE if name == "perceiver_io_flow" else TOLERANCE
    assert all(errors[p] <= tolerance[p] for p in errors), f"error / range {errors}; tolerance {tolerance}"
