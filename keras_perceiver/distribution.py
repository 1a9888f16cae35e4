"""Data and model parallelism through Keras' distribution API (`keras.distribution`).

`layout_map(mesh)` is what every model's `get_layout_map` returns: the attention and MLP
kernels split over the model axis (column-wise into a block, row-wise out of it, so each
block needs one reduction), embeddings split over their feature axis, and everything else
(latents, norms, biases of row-split kernels, position encodings) replicated. Keras'
distribution API runs on JAX only today (GSPMD underneath); `distribution_for` refuses the
other backends with an error instead of running on one device.
"""

import keras

# variable path pattern -> layout; the first that matches a variable's path wins
_LAYOUTS = (
    (r".*attention/(q|kv|qkv)_kernel", (None, "model")),
    (r".*attention/(q|kv|qkv)_bias", ("model",)),
    (r".*attention/out_kernel", ("model", None)),
    (r".*(dense_in|dense_gate)/kernel", (None, "model")),
    (r".*dense_in/bias", ("model",)),
    (r".*dense_out/kernel", ("model", None)),
    (r".*embedding/embeddings", (None, "model")),
)


def layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
    """A `keras.distribution.LayoutMap` over `device_mesh` for any keras_perceiver model
    (KerasHub's `get_layout_map` signature). `data_parallel_dim_name` is accepted for that
    signature: weights are never split over the batch axis."""
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            f"get_layout_map: `device_mesh` must be a keras.distribution.DeviceMesh; received {type(device_mesh).__name__}"
        )
    if model_parallel_dim_name not in device_mesh.axis_names:
        raise ValueError(
            f"get_layout_map: `model_parallel_dim_name` must be one of the mesh's axis names "
            f"{list(device_mesh.axis_names)}; received {model_parallel_dim_name!r}"
        )
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in _LAYOUTS:
        layouts[pattern] = tuple(model_parallel_dim_name if a == "model" else a for a in axes)
    return layouts


def visible_devices():
    """The devices this backend would train on, as Keras names them ("cpu:0", "gpu:1", ...):
    Keras' own list, except on PyTorch, where Keras 3.15 has none (`list_devices` fails)."""
    if keras.backend.backend() != "torch":
        return keras.distribution.list_devices()
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu:0"]


def distribution_for(model_class, model_parallel=1, devices=None):
    """The distribution `finetune` uses: None on one device; `DataParallel` over every
    device; with `model_parallel` N > 1, `ModelParallel` on a (devices / N, N) mesh laid out
    by `model_class.get_layout_map`. Raises ValueError where Keras cannot distribute (any
    backend but JAX) or the device count does not split by N."""
    if not isinstance(model_parallel, int) or isinstance(model_parallel, bool) or model_parallel < 1:
        raise ValueError(f"model_parallel: expected a positive integer; received {model_parallel!r}")
    devices = devices or visible_devices()
    if len(devices) == 1 and model_parallel == 1:
        return None
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"distributed training needs KERAS_BACKEND=jax (Keras' distribution API runs on JAX only); "
            f"received backend {backend!r} with {len(devices)} devices and model_parallel={model_parallel}. "
            "Run on one device (CUDA_VISIBLE_DEVICES=0) or under JAX"
        )
    if len(devices) % model_parallel:
        raise ValueError(
            f"model_parallel: expected a divisor of the device count {len(devices)}; received {model_parallel}"
        )
    if model_parallel == 1:
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh(
        shape=(len(devices) // model_parallel, model_parallel), axis_names=("batch", "model"), devices=devices
    )
    return keras.distribution.ModelParallel(layout_map=model_class.get_layout_map(mesh), batch_dim_name="batch")
