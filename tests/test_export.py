"""Export every family to every target and verify each artefact in its runtime.

The conversion itself runs under the backend its route needs; what the caller's backend
changes is the `.keras` file handed over. So each backend's run exports some families to every
target (every family in one of the three passes) and the whole family x target matrix from
this backend is the slow-marked test.
"""

import json
import re
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_perceiver
from keras_perceiver import presets, storage
from keras_perceiver.converters import ROUTES, export, export_all
from keras_perceiver.converters import artefacts, openvino_ir
from keras_perceiver.converters.artefacts import ExportVerificationError, metadata_path, read_metadata
from keras_perceiver.examples import SMALL_MODELS, build_small

FAMILIES_FOR_BACKEND = {
    "jax": ["perceiver"],  # the slowest pass (eager JAX) gets one family
    "tensorflow": ["perceiver_io", "perceiver_multimodal", "idefics_connector"],
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


def _check(report, target, path, weights="model"):
    assert report.verified and report.target == target
    assert report.path == str(path) and path.exists()
    assert report.size_bytes > 0
    assert report.max_abs_error <= 1e-4
    assert report.dynamic  # CoreML too: open axes become RangeDims
    assert len(report.checked_shapes) == 2 and report.checked_shapes[0] != report.checked_shapes[1]
    _check_metadata(report, target, path, weights)
    if target == "openvino":
        _check_openvino_condition(report, path)


def _check_metadata(report, target, path, weights):
    """The metadata file beside the artefact: who wrote it, what it is, and a SHA-256 per file
    that matches what is on disk; no staging left behind."""
    metadata = read_metadata(path)
    assert report.metadata_path == str(metadata_path(path)) and metadata is not None
    assert metadata["keras_perceiver_version"] == keras_perceiver.__version__
    assert (metadata["target"], metadata["route"], metadata["quantize"]) == (target, report.route, report.quantize)
    assert metadata["weights"] == report.weights == weights
    assert metadata["report"]["checked_shapes"] == report.checked_shapes
    assert metadata["report"]["max_abs_error"] == report.max_abs_error
    expected = {path.name} | ({path.with_suffix(".bin").name} if target == "openvino" else set())
    assert {name.split("/")[0] for name in metadata["files"]} == expected
    for name, digest in metadata["files"].items():
        assert storage.sha256_of(path.parent / name) == digest
    assert not [p for p in path.parent.iterdir() if storage.STAGING_TAG in p.name]


def _check_openvino_condition(report, path):
    """What the report says OpenVINO must be given holds: with it the IR runs in the precision
    it was verified in; and what a default compile_model runs here is what the metadata and the
    notes say."""
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    precision = "bf16" if report.quantize == "bfloat16" else "f32"
    assert report.runtime_config == {"INFERENCE_PRECISION_HINT": precision}
    model = ov.Core().read_model(str(path))
    assert model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == precision
    condition = read_metadata(path)["openvino"]
    given = ov.Core().compile_model(str(path), "CPU", report.runtime_config).get_property("INFERENCE_PRECISION_HINT")
    assert given.to_string() == condition["verified_precision"]
    default = ov.Core().compile_model(str(path), "CPU").get_property("INFERENCE_PRECISION_HINT").to_string()
    assert condition["default_compile_precision"] == default
    assert condition["condition"] in report.notes
    if default != condition["verified_precision"]:  # e.g. f32 verified, bf16 by default (AVX512-BF16 / AMX CPUs)
        assert f"compile with {report.runtime_config}" in report.notes and condition["rt_info_honoured"] is False


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
    from keras_perceiver.converters.artefacts import artefact_runner
    from keras_perceiver.zoo.train_digits import digits_split

    _, _, x_test, y_test = digits_split()
    run = artefact_runner(target, str(path), quantize)
    logits = np.concatenate([next(iter(run({"inputs": x_test[i : i + batch]}).values())) for i in range(0, len(x_test), batch)])
    return (logits.argmax(-1) == y_test).mean()


@once
def test_quantized_tflite_stays_within_the_presets_bound(tmp_path):
    path = tmp_path / "digits.tflite"
    report = export("perceiver_digits", "tflite", path, quantize="dynamic_int8")
    assert report.quantize == "dynamic_int8" and read_metadata(path)["quantize"] == "dynamic_int8"
    assert report.error_bound == presets.zoo_entries()["perceiver_digits"]["quantized_error_bounds"]["dynamic_int8"]
    assert 0 < report.max_rel_error <= report.error_bound  # int8 weights change the logits a little
    assert report.weights == read_metadata(path)["weights"] == "preset"
    # the accuracy cost, measured in LiteRT on the held-out split
    assert _digits_accuracy("tflite", path, batch=50) >= 0.97
    int8_size = path.stat().st_size
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export("perceiver_digits", "tflite", path)
    # an artefact keras_perceiver wrote (its metadata says so) is replaced with overwrite=True
    report = export("perceiver_digits", "tflite", path, overwrite=True)
    assert path.stat().st_size == report.size_bytes and int8_size < 0.6 * report.size_bytes
    _check_metadata(report, "tflite", path, "preset")
    assert read_metadata(path)["quantize"] is None


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
def test_openvino_bfloat16_runs_in_bf16_within_the_bound(tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    path = tmp_path / "digits_bf16.xml"
    commits, commit = [], storage.commit
    monkeypatch.setattr(storage, "commit", lambda staged, target: commits.append(target) or commit(staged, target))
    report = export("perceiver_digits", "openvino", path, quantize="bfloat16")
    # the pair is renamed into place weights first, then the .xml, then the metadata file
    assert commits == [path.with_suffix(".bin"), path, metadata_path(path)]
    assert report.quantize == "bfloat16" and report.max_rel_error <= report.error_bound
    _check_metadata(report, "openvino", path, "preset")
    _check_openvino_condition(report, path)
    assert "Einsum" not in [op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops()]
    assert _digits_accuracy("openvino", path, "bfloat16") >= 0.97
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert "INFERENCE_PRECISION_HINT=bf16" in report.notes
        assert report.max_rel_error > 1e-5  # bf16 arithmetic shows (float32 OpenVINO: about 1e-7)
    else:
        assert "OpenVINO ran it in f32" in report.notes


@once
def test_openvino_int8_calibrated_on_digits_keeps_the_digits_accuracy(tmp_path):
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    pytest.importorskip("nncf", reason="needs the export extra (nncf)")
    from keras_perceiver.zoo.train_digits import digits_split

    x_train = digits_split()[0]
    path = tmp_path / "digits_int8.xml"
    report = export("perceiver_digits", "openvino", path, quantize="int8", calibration_data=x_train[:128])
    assert report.quantize == "int8" and 0 < report.max_rel_error <= report.error_bound
    assert "rows of the given data, verified on 3 rows of it" in report.notes  # held out of the calibration
    # products really in int8: NNCF's FakeQuantize nodes sit in the IR
    assert "FakeQuantize" in [op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops()]
    assert _digits_accuracy("openvino", path, "int8") >= 0.97


@once
def test_openvino_int8_calibrates_on_example_inputs_by_default(tmp_path):
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    pytest.importorskip("nncf", reason="needs the export extra (nncf)")
    model = build_small("perceiver_resampler")
    report = export(model, "openvino", tmp_path / "r.xml", quantize="int8")
    assert f"calibrated on {artefacts.CALIBRATION_EXAMPLES} random example inputs" in report.notes
    assert 1e-4 < report.max_rel_error <= artefacts.QUANTIZED_ERROR_BOUNDS["int8"]  # int8 shows, within the bound
    # products with a weight in int8; attention's products of two activations left in floating point
    export(model, "openvino", tmp_path / "float.xml")
    between_activations = openvino_ir.products_of_activations(ov.Core().read_model(str(tmp_path / "float.xml")))
    ir = ov.Core().read_model(str(tmp_path / "r.xml"))
    quantized = {op.get_friendly_name(): any(v.get_node().get_type_name() == "FakeQuantize" for v in op.input_values())
                 for op in ir.get_ordered_ops() if op.get_type_name() == "MatMul"}
    assert between_activations and not any(quantized[name] for name in between_activations)
    assert any(quantized.values())


def test_export_cli_reads_calibration_data_from_an_npz(tmp_path, monkeypatch, capsys):
    from keras_perceiver import converters
    from keras_perceiver.cli import main

    given = {}
    monkeypatch.setattr(converters, "export_all", lambda *a, **k: given.update(k) or [])
    monkeypatch.setattr(converters, "format_reports", lambda reports: "")
    images = np.random.default_rng(0).random((5, 8, 8, 1), dtype="float32")
    np.savez(tmp_path / "x.npz", x=images)
    np.savez(tmp_path / "named.npz", inputs=images, mask=np.ones((5, 64), bool))
    base = ["export", "perceiver_digits", "--to", "openvino", "--quantize", "int8", "--out", str(tmp_path / "out")]
    assert main([*base, "--calibration-data", str(tmp_path / "x.npz")]) == 0
    np.testing.assert_array_equal(given["calibration_data"], images)  # x: the model's main input
    assert main([*base, "--calibration-data", str(tmp_path / "named.npz")]) == 0
    assert sorted(given["calibration_data"]) == ["inputs", "mask"]
    np.save(tmp_path / "x.npy", images)  # one array, not an .npz
    with pytest.raises(SystemExit) as stop:
        main([*base, "--calibration-data", str(tmp_path / "x.npy")])
    assert stop.value.code == 2 and "received the array file" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(SystemExit) as stop:
        main([*base, "--calibration-data", str(tmp_path / "bad.npz")])
    assert stop.value.code == 2 and "--calibration-data: expected an .npz file of input arrays" in capsys.readouterr().err


@once
def test_calibration_data_is_checked_before_anything_runs(tmp_path):
    pytest.importorskip("nncf", reason="needs the export extra (nncf)")
    images = np.zeros((4, 8, 8, 1), "float32")
    with pytest.raises(ValueError, match=r"`calibration_data` applies to quantize='int8' only; received it with quantize='bfloat16'"):
        export("perceiver_digits", "openvino", tmp_path / "a.xml", quantize="bfloat16", calibration_data=images)
    with pytest.raises(ValueError, match=r"`calibration_data` must be a NumPy array .* received list"):
        export("perceiver_digits", "openvino", tmp_path / "a.xml", quantize="int8", calibration_data=[1, 2])
    with pytest.raises(ValueError, match=r"as many examples each; received \[4, 3\]"):
        export("perceiver_digits", "openvino", tmp_path / "a.xml", quantize="int8",
               calibration_data={"inputs": images, "mask": np.ones((3, 64), bool)})
    with pytest.raises(ValueError, match=r"`calibration_data`: Perceiver: input 'inputs' must have shape"):
        export("perceiver_digits", "openvino", tmp_path / "a.xml", quantize="int8", calibration_data=images[:, :4])
    assert not list(tmp_path.iterdir())  # nothing written


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

    from keras_perceiver.converters.openvino_ir import einsums_as_matmuls

    lhs, rhs = opset.parameter(lhs_shape, np.float32), opset.parameter(rhs_shape, np.float32)
    model = ov.Model([opset.einsum([lhs, rhs], equation)], [lhs, rhs])
    assert einsums_as_matmuls(model) == int(rewritten)
    assert ("Einsum" in [op.get_type_name() for op in model.get_ordered_ops()]) != rewritten
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=lhs_shape).astype("float32"), rng.normal(size=rhs_shape).astype("float32")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(next(iter(compiled([x, y]).values())), np.einsum(equation, x, y), atol=1e-5)



@pytest.mark.parametrize("heads, rewritten", [(1, True), (3, False)])
def test_openvino_key_transposes_move_into_the_matmul(heads, rewritten):
    """Keys (B, Tk, H, D) -> (B, H, D, Tk): with one head the swap goes into the MatMul
    (transpose_b) and what stays moves no data; with several it stays a Transpose."""
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    import openvino.opset13 as opset

    from keras_perceiver.converters.openvino_ir import transposes_into_matmuls

    query, key = opset.parameter([-1, heads, 5, 7], np.float32), opset.parameter([-1, 9, heads, 7], np.float32)
    keys_last = opset.transpose(key, opset.constant(np.array([0, 2, 3, 1])))
    model = ov.Model([opset.matmul(query, keys_last, False, False)], [query, key])
    assert transposes_into_matmuls(model) == int(rewritten)
    matmul = next(op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul")
    assert matmul.get_attributes()["transpose_b"] == rewritten
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, heads, 5, 7)).astype("float32"), rng.normal(size=(2, 9, heads, 7)).astype("float32")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(next(iter(compiled([q, k]).values())), q @ k.transpose(0, 2, 3, 1), atol=1e-5)


@once
def test_openvino_layer_norms_are_one_mvn_kernel_each(tmp_path):
    """Keras' TensorFlow layer norm reaches OpenVINO as moments and four full-size products;
    the export rewrites every one as MVN x gamma + beta (the export's check holds the values)."""
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    model = build_small("perceiver")
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.LayerNormalization):  # not the zero / one initial values
            layer.beta.assign(np.linspace(-1, 1, layer.beta.shape[0]))
            layer.gamma.assign(np.linspace(0.5, 2, layer.gamma.shape[0]))
    report = export(model, "openvino", tmp_path / "p.xml")
    kinds = [op.get_type_name() for op in ov.Core().read_model(str(tmp_path / "p.xml")).get_ordered_ops()]
    assert "MVN" in kinds and "SquaredDifference" not in kinds
    assert report.max_abs_error < 1e-4

@once
def test_onnx_graph_is_the_torch_export_graph(tmp_path):
    """The ONNX route's graph: LayerNorm as one op, attention without Einsum, and none of the
    per-Dense shape arithmetic (`ReduceProd` of tf.tensordot) that tf2onnx wrote."""
    import collections

    onnx = pytest.importorskip("onnx", reason="needs the export extra (onnx)")
    keras.utils.set_random_seed(0)
    # from a preset directory that holds no weights: exported only with random_weights=True, and said so
    preset = tmp_path / "small_io"
    presets.save_to_preset(build_small("perceiver_io"), preset)
    (preset / presets.WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match=r"has no model.weights.h5: pass random_weights=True \(--random-weights\)"):
        export(str(preset), "onnx", tmp_path / "model.onnx")
    report = export(str(preset), "onnx", tmp_path / "model.onnx", random_weights=True)
    assert report.weights == read_metadata(tmp_path / "model.onnx")["weights"] == "random"
    assert "random weights" in report.notes and report.max_abs_error <= 1e-4
    assert read_metadata(tmp_path / "model.onnx")["source"] == {"preset": str(preset)}
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
    # an error of the export process comes back as its type, naming route, input and cause
    with pytest.raises(ValueError) as caught:
        export(model, "onnx", tmp_path / "wrong.onnx", input_shapes={"media": (1, 2, 12, 64)}, dynamic=False)
    message = str(caught.value)
    assert type(caught.value) is ValueError and len(message.splitlines()) == 1
    assert message.startswith(
        f"export to 'onnx' via torch.export -> torch.onnx (dynamo) [torch] of model '{model.name}' "
        "(PerceiverResampler) at input shapes {'media': (1, 2, 12, 64)}, static: "
    )
    assert message.endswith("`input_shapes`['media'] must fit the input's shape (None, None, None, None, 64); received (1, 2, 12, 64)")
    assert "Traceback" in caught.value.worker_traceback and "_sizes" in caught.value.worker_traceback
    assert not (tmp_path / "wrong.onnx").exists() and not [p for p in tmp_path.iterdir() if storage.STAGING_TAG in p.name]


def _forge_artefact(path, content=b"an earlier export"):
    """A file with metadata saying keras_perceiver wrote it (as an earlier export leaves one)."""
    path.write_bytes(content)
    metadata_path(path).write_text(json.dumps(
        {"written_by": "keras_perceiver", "artefact": path.name, "kind": "file", "files": {path.name: "0" * 64}}
    ))
    return metadata_path(path).read_bytes()


@once
def test_quantized_error_over_the_bound_fails_the_export(tmp_path, monkeypatch):
    monkeypatch.setitem(artefacts.QUANTIZED_ERROR_BOUNDS, "dynamic_int8", 1e-9)
    path = tmp_path / "model.onnx"
    metadata = _forge_artefact(path)
    model = build_small("perceiver")
    with pytest.raises(ExportVerificationError, match="exceeds the documented bound 1e-09") as caught:
        export(model, "onnx", path, quantize="dynamic_int8", overwrite=True)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)  # what callers catch
    assert str(caught.value).startswith(
        f"export to 'onnx' via torch.export -> torch.onnx (dynamo) [torch] of model '{model.name}' (Perceiver) at the "
        "default example shapes (batch 2, lengths 24): onnx (dynamic_int8): error "
    )
    # the failed export left the earlier artefact and its metadata as they were, and no staging
    assert path.read_bytes() == b"an earlier export" and metadata_path(path).read_bytes() == metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.keras-perceiver.json"]


def _no_export_process(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the export process was started; the refusal must come before it")

    monkeypatch.setattr(artefacts, "run_under_backend", refuse)


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def test_overwrite_never_replaces_what_keras_perceiver_did_not_write(tmp_path, monkeypatch):
    _no_export_process(monkeypatch)
    model = build_small("perceiver")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "model.onnx").write_bytes(b"my onnx file")
    (mine / "model.bin").write_bytes(b"my weights")
    (mine / "other.onnx").write_bytes(b"mine too")
    metadata_path(mine / "other.onnx").write_text("{not json")  # metadata that does not parse
    (mine / "renamed.onnx").write_bytes(b"mine as well")  # metadata written for another name
    metadata_path(mine / "renamed.onnx").write_text(json.dumps({"written_by": "keras_perceiver", "artefact": "x.onnx"}))
    (mine / "saved").mkdir()  # a directory where metadata says a file was written
    metadata_path(mine / "saved").write_text(json.dumps({"written_by": "keras_perceiver", "artefact": "saved", "kind": "file"}))
    before = _tree(tmp_path)
    refused = [
        ("onnx", mine / "model.onnx", "not written by keras_perceiver"),
        ("onnx", mine / "other.onnx", "not written by keras_perceiver"),
        ("onnx", mine / "renamed.onnx", "not written by keras_perceiver"),
        ("saved_model", mine / "saved", "not written by keras_perceiver"),
        ("saved_model", mine, "not written by keras_perceiver"),
        ("openvino", mine / "model.xml", r"'.*model.bin' exists and was not written by keras_perceiver"),
    ]
    for target, path, pattern in refused:
        with pytest.raises(ValueError, match=pattern):
            export(model, target, path, overwrite=True)
    with pytest.raises(FileExistsError, match=r"model.bin' exists; pass overwrite=True"):
        export(model, "openvino", mine / "model.xml")
    # the current directory, its parents, and a directory that holds the preset being exported
    monkeypatch.chdir(mine)
    for path in (".", "", "..", str(mine)):
        with pytest.raises(ValueError, match="is the current directory or one of its parents"):
            export(model, "saved_model", path, overwrite=True)
    with pytest.raises(ValueError, match="is the current directory or one of its parents"):
        export(model, "onnx", ".", overwrite=True)
    preset = mine / "presets" / "p"
    preset.mkdir(parents=True)
    (preset / presets.CONFIG_FILE).write_text("{}")
    for path in (preset, mine / "presets"):
        with pytest.raises(ValueError, match="is or holds the source"):
            export(str(preset), "saved_model", path, overwrite=True, random_weights=True)
    (preset / presets.CONFIG_FILE).unlink()
    preset.rmdir()
    preset.parent.rmdir()
    assert _tree(tmp_path) == before  # byte for byte


def test_a_preset_without_weights_needs_random_weights(tmp_path, monkeypatch, capsys):
    from keras_perceiver.cli import main

    _no_export_process(monkeypatch)
    for call in (
        lambda: export("flamingo_resampler", "onnx", tmp_path / "m.onnx"),
        lambda: export_all("flamingo_resampler", ["onnx", "tflite"], tmp_path),
    ):
        with pytest.raises(ValueError, match=r"preset 'flamingo_resampler' ships no weights: pass "
                                             r"random_weights=True \(--random-weights\)"):
            call()
    assert main(["export", "flamingo_resampler", "--to", "onnx", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'flamingo_resampler' ships no weights" in err
    assert "--random-weights" in err
    assert list(tmp_path.iterdir()) == []


def test_a_quantization_that_does_not_apply_is_refused(tmp_path, monkeypatch, capsys):
    from keras_perceiver.cli import main

    _no_export_process(monkeypatch)
    valid = ("valid values per target: saved_model: none; tflite: dynamic_int8, float16; onnx: dynamic_int8; "
             "openvino: bfloat16, int8; coreml: none")
    with pytest.raises(ValueError, match=rf"--quantize \(quantize=\) 'dynamic_int8' does not apply to saved_model, "
                                         rf"coreml; {valid}; received 'dynamic_int8'"):
        export_all(build_small("perceiver"), ["saved_model", "onnx", "coreml"], tmp_path, quantize="dynamic_int8")
    assert main(["export", "perceiver_digits", "--to", "onnx", "--quantize", "int4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"--quantize (quantize=) 'int4' does not apply to onnx; {valid}; received 'int4'" in err
    with pytest.raises(SystemExit) as stop:  # an unknown target: argparse's exit 2, as before
        main(["export", "perceiver_digits", "--to", "onnx,tensorrt", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "received tensorrt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "worker_error, raised",
    [
        ({"type": "ValueError", "mro": [["builtins", "ValueError"]]}, ValueError),
        ({"type": "ModuleNotFoundError", "mro": [["builtins", "ModuleNotFoundError"], ["builtins", "ImportError"]]},
         ModuleNotFoundError),
        ({"type": "FileExistsError", "mro": [["builtins", "FileExistsError"], ["builtins", "OSError"]]}, FileExistsError),
        ({"type": "ExportVerificationError", "mro": [["__main__", "ExportVerificationError"], ["builtins", "ValueError"]]},
         ExportVerificationError),
        ({"type": "UserError", "mro": [["torch._dynamo.exc", "UserError"], ["builtins", "Exception"]]}, RuntimeError),
        (None, RuntimeError),  # died without writing one (a segfault)
    ],
)
def test_the_export_process_errors_come_back_typed(tmp_path, monkeypatch, worker_error, raised):
    def fake_run(module, arguments, backend, **kwargs):
        job = json.loads(arguments[-1])
        if worker_error is not None:
            message = "the cause\nin two lines"
            Path(job["error"]).write_text(json.dumps(dict(worker_error, message=message, traceback="Traceback: ...")))
        return subprocess.CompletedProcess([module, *arguments], 1 if worker_error else -11, "",
                                           "early output\nFatal Python error: Segmentation fault")

    monkeypatch.setattr(artefacts, "run_under_backend", fake_run)
    with pytest.raises(raised) as caught:
        export("perceiver_digits", "onnx", tmp_path / "m.onnx")
    message = str(caught.value)
    assert type(caught.value) is raised
    assert message.startswith("export to 'onnx' via torch.export -> torch.onnx (dynamo) [torch] of preset 'perceiver_digits'")
    if worker_error is None:
        assert "died without reporting an error (exit code -11)" in message and message.endswith("Segmentation fault")
    else:
        cause = "UserError: the cause" if worker_error["type"] == "UserError" else ": the cause"
        assert cause in message and caught.value.worker_traceback == "Traceback: ..."
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone


def test_openvino_precision_is_stored_in_the_ir_and_its_effect_found_out(tmp_path):
    """The IR carries INFERENCE_PRECISION_HINT in its rt_info `runtime_options`; whether a
    default compile_model applies it is read back from the compiled model and recorded as
    found (OpenVINO 2026.4's CPU plugin does not: on a CPU with AVX512-BF16 or AMX a default
    compile of a float32 IR runs bf16)."""
    ov = pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    import openvino.opset13 as opset

    core = ov.Core()
    cpu_default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    bf16_units = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for precision in ("f32", "bf16"):
        x = opset.parameter([2, 8], np.float32)
        model = ov.Model([opset.matmul(x, opset.constant(np.ones((8, 4), np.float32)), False, False)], [x])
        openvino_ir.set_precision(model, precision)
        xml = tmp_path / f"{precision}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        assert core.read_model(str(xml)).get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == precision
        read_back = ov.Core().compile_model(str(xml), "CPU").get_property("INFERENCE_PRECISION_HINT").to_string()
        condition = openvino_ir.runtime_condition(xml, precision)
        verified = precision if precision == "f32" or bf16_units else "f32"
        assert condition["default_compile_precision"] == read_back and condition["verified_precision"] == verified
        assert condition["compile_config"] == {"INFERENCE_PRECISION_HINT": precision}
        if verified != cpu_default:  # the option asked for differs from the CPU's default: the read-back tells
            assert condition["rt_info_honoured"] is (read_back == verified)
        else:
            assert condition["rt_info_honoured"] is None
        if read_back != verified:
            assert f"compile with {{'INFERENCE_PRECISION_HINT': '{precision}'}}" in condition["condition"]
            assert "ignores the IR's runtime_options" in condition["condition"]


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
    with pytest.raises(ValueError, match=r"`quantize` for 'openvino' must be one of \['bfloat16', 'int8'\] or None; received 'dynamic_int8'"):
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
    for name in ("perceiver_digits.onnx", "perceiver_digits.tflite"):
        metadata = read_metadata(tmp_path / name)
        assert metadata["weights"] == "preset" and metadata["source"] == {"preset": "perceiver_digits"}
        assert storage.sha256_of(tmp_path / name) == metadata["files"][name]
    assert np.isfinite([float(line.split("|")[4]) for line in table.splitlines()[2:]]).all()


@once
def test_export_cli_prints_each_step_of_a_target_to_stderr(tmp_path, capsys):
    from keras_perceiver.cli import main

    assert main(["export", "perceiver_digits", "--to", "onnx", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    steps = [line for line in captured.err.splitlines() if line.startswith("export onnx: ")]
    assert steps[:-1] == [
        "export onnx: starting a torch process for torch.export -> torch.onnx (dynamo)...",
        "export onnx: loading the model...",  # these three come from the export process
        "export onnx: converting...",
        "export onnx: verifying in onnxruntime...",
    ]
    done = re.fullmatch(r"export onnx: done in (\d+\.\d) s, max abs error (\S+)", steps[-1])
    assert done and float(done[1]) > 0 and 0 <= float(done[2]) <= 1e-4
    assert artefacts.PROGRESS_PREFIX not in captured.err  # passed through without the process' marker
    assert "export onnx" not in captured.out  # stdout is the table's


def test_export_progress_false_prints_nothing(tmp_path, monkeypatch, capsys):
    asked = []

    def fake_run(module, arguments, backend, **kwargs):  # the export process, failing at once
        asked.append(json.loads(arguments[-1])["progress"])
        return subprocess.CompletedProcess([module, *arguments], -11, "", "Fatal Python error: Segmentation fault")

    monkeypatch.setattr(artefacts, "run_under_backend", fake_run)
    for progress in (False, True):
        with pytest.raises(RuntimeError):
            export("perceiver_digits", "onnx", tmp_path / "m.onnx", progress=progress)
        assert ("export onnx: starting a torch process" in capsys.readouterr().err) is progress
    assert asked == [False, True]  # the export process is told too


@pytest.mark.slow
@pytest.mark.parametrize("target", list(ROUTES))
@pytest.mark.parametrize("preset", [p for p in presets.list_presets() if p != "perceiver_digits"])
def test_export_real_size_presets(preset, target, tmp_path):
    """The zoo at the originals' sizes (random weights where the preset ships none)."""
    path = tmp_path / f"{preset}_{target}"
    report = export(preset, target, path, random_weights=True)
    _check(report, target, path, weights="random")
    assert "random weights" in report.notes


@once
def test_an_onnx_file_with_external_data_is_committed_whole(tmp_path, monkeypatch):
    """Over 2 GB, torch.onnx keeps the weights in `<file>.data`, which the .onnx names: the
    pair is staged under the final name and committed together, both hashed; a later export
    without external data removes the earlier `.data`. (The worker is faked: a 2 GB model
    does not fit the CI machine; idefics2_connector at its real size was run by hand.)"""
    import subprocess

    def fake_worker(with_data):
        def run(module, arguments, backend, **kwargs):
            job = json.loads(arguments[0])
            out = Path(job["out"])
            out.write_bytes(b"onnx graph naming " + (out.name + ".data").encode())
            if with_data:
                out.with_name(out.name + ".data").write_bytes(b"weights" * 1000)
            report = dict(target="onnx", route="fake [torch]", runtime="onnxruntime", path=str(out), size_bytes=1,
                          dynamic=True, checked_shapes=[[1], [2]], max_abs_error=0.0, max_rel_error=0.0,
                          latency_ms=1.0, verified=True, weights="model")
            Path(job["report"]).write_text(json.dumps({"report": report}))
            return subprocess.CompletedProcess([], 0, "", "")
        return run

    model = build_small("perceiver")
    path = tmp_path / "big.onnx"
    monkeypatch.setattr(artefacts, "run_under_backend", fake_worker(True))
    export(model, "onnx", path, progress=False)
    data = tmp_path / "big.onnx.data"
    assert path.read_bytes() == b"onnx graph naming big.onnx.data" and data.read_bytes() == b"weights" * 1000
    files = read_metadata(path)["files"]
    assert files == {"big.onnx": storage.sha256_of(path), "big.onnx.data": storage.sha256_of(data)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "big.onnx.keras-perceiver.json"]

    monkeypatch.setattr(artefacts, "run_under_backend", fake_worker(False))
    export(model, "onnx", path, overwrite=True, progress=False)
    assert not data.exists() and list(read_metadata(path)["files"]) == ["big.onnx"]
