"""Export every family to every target and verify each artefact in its runtime.

The conversion itself runs under the backend its route needs; what the caller's backend
changes is the `.keras` file handed over. So each backend's run exports some families to every
target (every family in one of the three passes) and the whole family x target matrix from
this backend is the slow-marked test.
"""

import keras
import numpy as np
import pytest

from keras_perceiver import presets
from keras_perceiver.converters import ROUTES, export
from keras_perceiver.examples import SMALL_MODELS, build_small

FAMILIES_FOR_BACKEND = {
    "jax": ["perceiver"],  # the slowest pass (eager JAX) gets one family
    "tensorflow": ["perceiver_io", "perceiver_multimodal"],
    "torch": ["perceiver_resampler", "perceiver_io_flow"],
}
# Tests of the export API that do not depend on the caller's backend (the conversion runs in
# its own process) run once, in the tensorflow pass, to keep CI short.
once = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent export API check; runs once, in the KERAS_BACKEND=tensorflow pass",
)


def _check_coreml_spec(model, path):
    """The artefact itself (readable off macOS): names, iOS 17 program, open axes as ranges."""
    ct = pytest.importorskip("coremltools", reason="needs the export extra (coremltools)")
    spec = ct.utils.load_spec(str(path))
    assert spec.specificationVersion >= 8  # iOS 17
    assert [i.name for i in spec.description.input] == list(model.named_inputs)
    outputs = sorted(model.output) if isinstance(model.output, dict) else ["outputs"]
    assert [o.name for o in spec.description.output] == outputs
    for feature, tensor in zip(spec.description.input, model.named_inputs.values()):
        ranges = feature.type.multiArrayType.shapeRange.sizeRanges
        assert len(ranges) == len(tensor.shape)
        for size_range, size in zip(ranges, tensor.shape):
            if size is None:
                assert size_range.lowerBound == 1 and size_range.upperBound > 1
            else:
                assert size_range.lowerBound == size_range.upperBound == size


def _check(report, target, path):
    assert report.verified and report.target == target
    assert report.path == str(path) and path.exists()
    assert report.size_bytes > 0
    assert report.max_abs_error <= 1e-4
    assert report.dynamic  # CoreML too: open axes become RangeDims
    assert len(report.checked_shapes) == 2 and report.checked_shapes[0] != report.checked_shapes[1]


def _export_and_check(name, target, tmp_path):
    keras.utils.set_random_seed(0)
    model = build_small(name)
    path = tmp_path / f"{name}_{target}"
    _check(export(model, target, path), target, path)
    if target == "coreml":
        _check_coreml_spec(model, path)


def test_every_family_is_exported_in_one_pass():
    assert sorted(sum(FAMILIES_FOR_BACKEND.values(), [])) == sorted(SMALL_MODELS)


@pytest.mark.parametrize("target", list(ROUTES))
@pytest.mark.parametrize("name", FAMILIES_FOR_BACKEND[keras.backend.backend()])
def test_export_this_backends_families(name, target, tmp_path):
    _export_and_check(name, target, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("target", list(ROUTES))
@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_export_every_family(name, target, tmp_path):
    _export_and_check(name, target, tmp_path)


def _digits_accuracy(target, path, quantize=None, batch=450):
    """Held-out accuracy of a perceiver_digits artefact in its runtime, `batch` images a call."""
    from keras_perceiver.converters.artefacts import _runner
    from keras_perceiver.zoo.train_digits import digits_split

    _, _, x_test, y_test = digits_split()
    run = _runner(target, str(path), quantize)
    logits = np.concatenate([next(iter(run({"inputs": x_test[i : i + batch]}).values())) for i in range(0, len(x_test), batch)])
    return (logits.argmax(-1) == y_test).mean()


@once
def test_quantized_tflite_stays_within_the_presets_bound(tmp_path):
    report = export("perceiver_digits", "tflite", tmp_path / "digits_int8.tflite", quantize="dynamic_int8")
    assert report.quantize == "dynamic_int8"
    assert report.error_bound == presets.zoo_entries()["perceiver_digits"]["quantized_error_bounds"]["dynamic_int8"]
    assert 0 < report.max_rel_error <= report.error_bound  # int8 weights change the logits a little
    full = (tmp_path / "digits_int8.tflite").stat().st_size
    assert full < 0.6 * export("perceiver_digits", "tflite", tmp_path / "digits.tflite").size_bytes
    # the accuracy cost, measured in LiteRT on the held-out split
    assert _digits_accuracy("tflite", tmp_path / "digits_int8.tflite", batch=50) >= 0.97


@once
def test_quantized_onnx_keeps_7_bit_weights_and_the_digits_accuracy(tmp_path):
    onnx = pytest.importorskip("onnx", reason="needs the export extra (onnx)")
    from onnx import numpy_helper

    path = tmp_path / "digits_int8.onnx"
    report = export("perceiver_digits", "onnx", path, quantize="dynamic_int8")
    assert 0 < report.max_rel_error <= report.error_bound
    # 7-bit weights (reduce_range): full-range int8 weights saturate the u8 x s8 products of
    # x86 CPUs without VNNI (0.10-0.24 of the output range on the large presets)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    weights = [w for w in weights if w.dtype == np.int8 and w.size > 1]
    assert weights and all(-64 <= w.min() and w.max() <= 64 for w in weights)
    assert _digits_accuracy("onnx", path) >= 0.97


@once
def test_openvino_bfloat16_runs_in_bf16_within_the_bound(tmp_path):
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    path = tmp_path / "digits_bf16.xml"
    report = export("perceiver_digits", "openvino", path, quantize="bfloat16")
    assert report.quantize == "bfloat16" and report.max_rel_error <= report.error_bound
    assert "Einsum" not in [op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops()]
    assert _digits_accuracy("openvino", path, "bfloat16") >= 0.97
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert "INFERENCE_PRECISION_HINT=bf16" in report.notes
        assert report.max_rel_error > 1e-5  # bf16 arithmetic shows (float32 OpenVINO: about 1e-7)
    else:
        assert "OpenVINO ran it in f32" in report.notes


@pytest.mark.parametrize(
    "equation, lhs_shape, rhs_shape, rewritten",
    [
        ("BTNH,BSNH->BNTS", (2, 5, 3, 4), (2, 7, 3, 4), True),  # attention scores (Keras' TensorFlow graph)
        ("BNTS,BSNH->BTNH", (2, 3, 5, 7), (2, 7, 3, 4), True),  # probabilities x values
        ("bij,bjk->bik", (2, 3, 4), (2, 4, 5), True),
        ("ii,ij->ij", (3, 3), (3, 3), False),  # a diagonal: left to OpenVINO
    ],
)
def test_openvino_einsums_become_matmuls(equation, lhs_shape, rhs_shape, rewritten):
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    import openvino.opset13 as opset

    from keras_perceiver.converters.artefacts import _einsums_as_matmuls

    lhs, rhs = opset.parameter(lhs_shape, np.float32), opset.parameter(rhs_shape, np.float32)
    model = ov.Model([opset.einsum([lhs, rhs], equation)], [lhs, rhs])
    assert _einsums_as_matmuls(model) == int(rewritten)
    assert ("Einsum" in [op.get_type_name() for op in model.get_ordered_ops()]) != rewritten
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=lhs_shape).astype("float32"), rng.normal(size=rhs_shape).astype("float32")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(next(iter(compiled([x, y]).values())), np.einsum(equation, x, y), atol=1e-5)


@once
def test_onnx_graph_is_the_torch_export_graph(tmp_path):
    """The ONNX route's graph: LayerNorm as one op, attention without Einsum, and none of the
    per-Dense shape arithmetic (`ReduceProd` of tf.tensordot) that tf2onnx wrote."""
    import collections

    onnx = pytest.importorskip("onnx", reason="needs the export extra (onnx)")
    keras.utils.set_random_seed(0)
    export(build_small("perceiver_io"), "onnx", tmp_path / "model.onnx")
    ops = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    assert ops["LayerNormalization"] > 0 and ops["MatMul"] > 0
    assert not {"Einsum", "ReduceProd", "GlobalAveragePool"} & set(ops), ops


@once
def test_static_onnx_export_at_given_shapes(tmp_path):
    """`input_shapes` + dynamic=False: every axis of the file fixed at the given shapes. Static
    shapes let onnxscript's optimizer drop Reshape -> MatMul -> Reshape chains; with batch x
    media items equal to the heads one such drop re-paired the per-head products (error 0.1;
    the export's check in onnxruntime raised)."""
    onnx = pytest.importorskip("onnx", reason="needs the export extra (onnx)")
    keras.utils.set_random_seed(0)
    model = build_small("perceiver_resampler")
    shape = (1, model.get_layer("resampler").config.num_heads, 1, 12, 64)  # batch x media items = heads
    report = export(model, "onnx", tmp_path / "static.onnx", input_shapes={"media": shape}, dynamic=False)
    assert report.verified and not report.dynamic and report.max_abs_error <= 1e-4
    assert report.checked_shapes == [{"media": list(shape)}]
    (media,) = onnx.load(str(tmp_path / "static.onnx")).graph.input
    assert tuple(d.dim_value for d in media.type.tensor_type.shape.dim) == shape
    with pytest.raises(RuntimeError, match=r"`input_shapes`\['media'\] must fit the input's shape \(None, None, None, None, 64\); received \(1, 2, 12, 64\)"):
        export(model, "onnx", tmp_path / "wrong.onnx", input_shapes={"media": (1, 2, 12, 64)}, dynamic=False)


@once
def test_quantized_error_over_the_bound_fails_the_export(tmp_path, monkeypatch):
    from keras_perceiver.converters import artefacts

    monkeypatch.setitem(artefacts.QUANTIZED_ERROR_BOUNDS, "dynamic_int8", 1e-9)
    with pytest.raises(RuntimeError, match="exceeds the documented bound 1e-09"):
        export(build_small("perceiver"), "onnx", tmp_path / "model.onnx", quantize="dynamic_int8")


def test_existing_path_is_not_overwritten(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(build_small("perceiver"), "onnx", path)
    assert path.read_bytes() == b"mine"


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match=r"`input_shapes` must be a dict \{input name: shape of positive ints\}.*received \{'media': \(1, 0\)\}"):
        export(build_small("perceiver"), "onnx", "x.onnx", input_shapes={"media": (1, 0)})
    with pytest.raises(ValueError, match=r"`target` must be one of .*received 'tensorrt'"):
        export(build_small("perceiver"), "tensorrt", "x")
    with pytest.raises(ValueError, match=r"`quantize` for 'openvino' must be one of \['bfloat16'\] or None; received 'dynamic_int8'"):
        export(build_small("perceiver"), "openvino", "x.xml", quantize="dynamic_int8")
    with pytest.raises(ValueError, match=r"`quantize` for 'coreml' must be one of \[\] or None; received 'float16'"):
        export(build_small("perceiver"), "coreml", "x.mlpackage", quantize="float16")


def test_missing_runtime_names_the_extra(monkeypatch):
    import importlib.util

    from keras_perceiver.converters import artefacts

    real = importlib.util.find_spec
    monkeypatch.setattr(artefacts.importlib.util, "find_spec", lambda n: None if n == "openvino" else real(n))
    with pytest.raises(ImportError, match=r"\['openvino'\].*pip install 'keras-perceiver\[export\]'"):
        export(build_small("perceiver"), "openvino", "x.xml")


@once
def test_export_cli_prints_the_table(tmp_path, capsys):
    from keras_perceiver.cli import main

    assert main(["export", "perceiver_digits", "--to", "onnx,tflite", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("target") and "latency ms" in table
    assert "onnxruntime" not in table  # the route column names converters, the runtime is implied
    assert (tmp_path / "perceiver_digits.onnx").exists() and (tmp_path / "perceiver_digits.tflite").exists()
    assert np.isfinite([float(line.split("|")[4]) for line in table.splitlines()[2:]]).all()


@pytest.mark.slow
@pytest.mark.parametrize("target", list(ROUTES))
@pytest.mark.parametrize("preset", [p for p in presets.list_presets() if p != "perceiver_digits"])
def test_export_real_size_presets(preset, target, tmp_path):
    """The zoo at the originals' sizes (random weights where the preset ships none)."""
    path = tmp_path / f"{preset}_{target}"
    report = export(preset, target, path)
    _check(report, target, path)
    assert "random weights" in report.notes
