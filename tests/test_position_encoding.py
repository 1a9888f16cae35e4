import math

import numpy as np
import pytest
from conftest import to_numpy

from keras_perceiver.layers import FeatureAdapter, TrainablePositionEncoding, fourier_features, grid_positions
from keras_perceiver.layers.position_encoding import FourierPositionEncoding


def numpy_fourier(index_dims, num_bands, max_resolution, concat_pos=True, sine_only=False):
    """Written from the formula with explicit loops, independent of the package."""
    axes = [np.linspace(-1.0, 1.0, n) for n in index_dims]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(index_dims))
    rows = []
    for pos in grid:
        sines, cosines = [], []
        for axis, res in enumerate(max_resolution):
            for f in np.linspace(1.0, res / 2.0, num_bands):
                sines.append(math.sin(math.pi * pos[axis] * f))
                cosines.append(math.cos(math.pi * pos[axis] * f))
        rows.append((list(pos) if concat_pos else []) + sines + ([] if sine_only else cosines))
    return np.array(rows)


@pytest.mark.parametrize(
    "index_dims,num_bands,max_resolution,concat_pos,sine_only",
    [
        ((7,), 4, (7,), True, False),
        ((5, 6), 3, (5, 6), True, False),
        ((4, 3), 5, (16, 12), False, False),
        ((3, 4, 2), 2, (3, 4, 2), True, True),
    ],
)
def test_fourier_features_match_formula(index_dims, num_bands, max_resolution, concat_pos, sine_only):
    got = to_numpy(fourier_features(grid_positions(index_dims), num_bands, max_resolution, concat_pos, sine_only))
    np.testing.assert_allclose(got, numpy_fourier(index_dims, num_bands, max_resolution, concat_pos, sine_only), atol=2e-5)


def test_image_checkpoint_channel_count():
    adapter = FeatureAdapter(index_dims=(224, 224), num_bands=64)
    assert adapter.output_channels(3) == 3 + 258


def test_variable_length_features_equal_static():
    x = np.random.default_rng(0).normal(size=(2, 9, 2)).astype("float32")
    dynamic = FeatureAdapter(index_dims=(None,), num_bands=4, max_resolution=(9,))
    static = FeatureAdapter(index_dims=(9,), num_bands=4)
    np.testing.assert_allclose(to_numpy(dynamic(x)), to_numpy(static(x)), atol=1e-6)
    assert to_numpy(dynamic(x[:, :5])).shape == (2, 5, 2 + 9)


def test_fourier_features_of_a_known_grid_are_computed_once_at_build():
    layer = FourierPositionEncoding(num_bands=3, max_resolution=(8, 8))
    layer.build((None, 6, 5, 3))
    assert to_numpy(layer._features).shape == (30, 2 * 7)  # held from build on, not recomputed per call
    x = np.zeros((2, 6, 5, 3), "float32")
    np.testing.assert_allclose(to_numpy(layer(x))[1], numpy_fourier((6, 5), 3, (8, 8)), atol=2e-5)
    # another grid than the one built for is computed on the call
    np.testing.assert_allclose(to_numpy(layer(x[:, :4, :4]))[0], numpy_fourier((4, 4), 3, (8, 8)), atol=2e-5)
    dynamic = FourierPositionEncoding(num_bands=3, max_resolution=(8,))
    dynamic.build((None, None, 3))
    assert dynamic._features is None


def test_trainable_truncate_and_interpolate():
    x = np.zeros((2, 1), "float32")
    table = TrainablePositionEncoding((10,), 4, resize="truncate")
    full = to_numpy(table(x))
    assert full.shape == (2, 10, 4)
    np.testing.assert_array_equal(to_numpy(table(x, index_dims=(6,))), full[:, :6])

    grid = TrainablePositionEncoding((4, 4), 3)
    grid.build()
    grid.embeddings.assign(np.ones((16, 3), "float32") * np.arange(3))
    resized = to_numpy(grid(x, index_dims=(8, 6)))
    assert resized.shape == (2, 48, 3)
    np.testing.assert_allclose(resized, np.ones((2, 48, 3)) * np.arange(3), atol=1e-6)
    np.testing.assert_allclose(to_numpy(grid(x, index_dims=(4, 4)))[0], to_numpy(grid.embeddings))


def test_trainable_interpolation_is_linear_in_1d():
    x = np.zeros((1, 1), "float32")
    table = TrainablePositionEncoding((3,), 1)
    table.build()
    table.embeddings.assign(np.array([[0.0], [2.0], [4.0]], "float32"))
    out = to_numpy(table(x, index_dims=(6,)))[0, :, 0]
    # half-pixel centres (torch's interpolate with align_corners=False): source index
    # (i + 0.5) * 3 / 6 - 0.5, clamped to the table
    source = np.clip((np.arange(6) + 0.5) * 3 / 6 - 0.5, 0, 2)
    np.testing.assert_allclose(out, 2.0 * source, atol=1e-5)


def test_adapter_errors_name_the_argument():
    with pytest.raises(ValueError, match="max_resolution"):
        FeatureAdapter(index_dims=(None,), num_bands=4)
    with pytest.raises(ValueError, match="position_encoding.*'sinusoid'"):
        FeatureAdapter(index_dims=(4,), position_encoding="sinusoid")
