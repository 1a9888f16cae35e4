import json

import keras
import pytest

from keras_perceiver import cli
from keras_perceiver.benchmarks import profile as onnx_profile
from keras_perceiver.benchmarks.subjects import bench_inputs, bench_model


def test_a_product_node_is_counted_from_its_first_input_and_its_output():
    # (2, 3, 4) x (4, 5): 2 x 3 x 5 outputs of 4 multiply-adds each; the weights' shape is not listed
    assert onnx_profile.product_flops([[2, 3, 4]], [2, 3, 5]) == 2 * 2 * 3 * 5 * 4
    # a transposed first input, (k, m) = (4, 3)
    assert onnx_profile.product_flops([[4, 3], [4, 5]], [3, 5]) == 2 * 3 * 5 * 4
    assert onnx_profile.product_flops([[7]], [5]) == 2 * 5 * 7


def _event(name, ts, dur, op=None, inputs=(), output=None):
    if op is None:
        return {"cat": "Session", "name": name, "ts": ts, "dur": dur}
    args = {"op_name": op, "input_type_shape": [{"float": list(s)} for s in inputs]}
    if output is not None:
        args["output_type_shape"] = [{"float": list(output)}]
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": args}


def test_the_warm_up_run_is_left_out_and_each_timed_run_counts_once():
    events = [
        _event("model_run", 0, 100), _event("mm", 10, 80, "MatMul", [(2, 8)], (2, 4)),  # warm-up
        _event("model_run", 200, 50), _event("mm", 205, 30, "MatMul", [(2, 8)], (2, 4)), _event("ln", 240, 10, "LayerNormalization", [(2, 4)]),
        _event("model_run", 300, 70), _event("mm", 305, 50, "MatMul", [(2, 8)], (2, 4)), _event("ln", 360, 10, "LayerNormalization", [(2, 4)]),
    ]
    nodes, run_us = onnx_profile.node_times(events)
    assert run_us == [50, 70] and len(nodes) == 4
    summary = onnx_profile.summarize(nodes, run_us, peak_gflops=1.0)
    assert summary["call_ms"] == pytest.approx(0.060)  # the mean of 50 and 70 us
    assert [o["op"] for o in summary["ops"]] == ["MatMul", "LayerNormalization"]
    assert summary["ops"][0]["ms"] == pytest.approx(0.040) and summary["kernels_ms"] == pytest.approx(0.050)
    products = summary["products"]
    assert products["share"] == pytest.approx(0.8) and products["gflop"] == pytest.approx(2 * 2 * 4 * 8 / 1e9)
    assert products["gflops"] == pytest.approx(products["gflop"] / 0.040e-3)
    assert summary["rows"][0]["nodes"] == 1
    with pytest.raises(ValueError, match="at least 2 model runs; received 1"):
        onnx_profile.node_times(events[:2])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exports run in their own process; once, in the tensorflow pass")
def test_the_profile_of_an_exported_file_accounts_for_every_matrix_product(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the export extra (onnxruntime)")
    name, batch = "small_perceiver_io_language", 2
    result = onnx_profile.run(name, batch, runs=2, out=tmp_path / "profile.json")
    assert json.loads((tmp_path / "profile.json").read_text())["products"] == result["products"]
    # onnxruntime's product nodes add up to the analytic FLOPs of the forward: none missed or counted twice
    analytic = bench_model(name).flops(bench_inputs(name, batch)) / 1e9
    assert result["products"]["gflop"] == pytest.approx(analytic, rel=1e-6)
    assert sum(o["share"] for o in result["ops"]) == pytest.approx(1.0)
    assert 0 < result["products"]["share"] < 1 and result["products"]["fraction_of_peak"] > 0
    times = [r["ms"] for r in result["rows"]]
    assert times == sorted(times, reverse=True) and result["file"] is None
    text = onnx_profile.table(result, top=3)
    assert "matrix products" in text and text.count("\n") > 6


def test_bench_profile_refuses_conflicting_or_missing_arguments(tmp_path, capsys):
    existing = tmp_path / "profile.json"
    existing.write_text("{}")
    cases = [
        (["bench-profile", "perceiver_digits", "--json", str(existing)], "--json: expected a new path"),
        (["bench-profile", "perceiver_digits", "--onnx", str(existing), "--static"], "--onnx: a given file is profiled as it is"),
        (["bench-profile", "perceiver_digits", "--onnx", str(tmp_path / "none.onnx")], "--onnx: expected an existing ONNX file"),
        (["bench-profile", "no_such_preset"], "preset: expected names among"),
        (["bench-profile", "perceiver_digits,perceiver_io_language"], "preset: expected one name"),
        (["bench-profile", "perceiver_digits", "--runs", "0"], "--runs: expected a positive integer; received 0"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err
    assert existing.read_text() == "{}"
