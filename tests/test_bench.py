import json
import time
from pathlib import Path

import numpy as np

import keras
import pytest

import keras_perceiver as kp
from keras_perceiver.benchmarks import cells, devices, peers, run, subjects
from keras_perceiver.benchmarks.cells import run_artefacts
from keras_perceiver.benchmarks.report import fastest_routes, headline, report, summary as summary_table
from keras_perceiver.examples import build_small, example_inputs


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's cost analysis is read through JAX")
@pytest.mark.parametrize("name", ["perceiver", "perceiver_io", "perceiver_resampler"])
def test_analytic_flops_match_xla_cost_analysis(name):
    import jax

    model = build_small(name)
    inputs = example_inputs(model, length=40)
    if name == "perceiver_resampler":
        inputs["media"] = inputs["media"][:, :, :1]  # F = 1
    ours = model.flops(inputs)
    state = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
    fn = jax.jit(lambda t, n, x: model.stateless_call(t, n, x)[0])
    analysis = fn.lower(*state, inputs).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    xla = analysis["flops"]
    # XLA also counts element-wise work (norms, softmax, GELU); matrix products dominate
    assert 0.75 * xla <= ours <= 1.02 * xla, (ours, xla)


def test_bench_run_and_report(tmp_path):
    out = tmp_path / "bench.json"
    backend = keras.backend.backend()
    # one run for both precisions: each run starts a backend process, the expensive part;
    # float32 runs first whatever the order asked (bfloat16's error is measured against it)
    results = run.run(["perceiver_digits"], [backend], batches=[2], repeats=2, modes=["eager"], out=out, peers=False,
                        dtypes=["bfloat16", "float32"])
    run_ = results["runs"][0]
    cell, bf16 = run_["cells"]
    assert cell["backend"] == backend and cell["median_ms"] > 0 and cell["gflop"] > 0
    assert 0 < cell["fraction_of_peak"] < 2
    assert run_["gemm_peak_gflops"] > 1
    # the peak is the highest of the samples taken at the run's start and this process's start and end
    assert len(run_["gemm_peak_samples_gflops"]) == 3
    assert run_["gemm_peak_gflops"] == max(max(sample.values()) for sample in run_["gemm_peak_samples_gflops"])
    assert cell["fraction_of_peak"] == pytest.approx(cell["achieved_gflops"] / run_["gemm_peak_gflops"])
    assert json.loads(out.read_text())["runs"][0]["cells"] == run_["cells"]
    table = report([out, out], markdown_out=tmp_path / "m.md", plot_out=tmp_path / "m.png")
    assert table.count("perceiver_digits") == 4  # two files merged, two cells each
    assert (tmp_path / "m.png").stat().st_size > 0

    # the bfloat16 cell: the same weights in Keras' "bfloat16" policy, its error against the float32 output
    assert (cell["mode"], cell["dtype"]) == ("eager", "float32")
    assert (bf16["mode"], bf16["dtype"]) == ("eager bfloat16", "bfloat16")
    # bfloat16 keeps 8 bits of mantissa: an error, but a small one
    assert 0 < bf16["max_rel_error"] < 0.05
    assert cell["peak_gflops"] == run_["gemm_peak_gflops"]
    # a CPU without bfloat16 units computes bfloat16 fastest through float32: the higher peak counts
    assert bf16["peak_gflops"] == run_["bfloat16_gemm_peak_gflops"] == max(run_["torch_cpu_bfloat16_matmul_gflops"], run_["gemm_peak_gflops"])
    assert f"(peak {bf16['peak_gflops']:.0f} bf16)" in table


def test_preset_flops_are_in_the_expected_range():
    model = kp.from_preset("perceiver_digits")
    x = subjects.bench_inputs("perceiver_digits", 1)
    assert 1e6 < model.flops(x) < 1e8


@pytest.mark.parametrize("name", sorted(subjects.SMALL_PEERS))
def test_small_bench_configurations_share_the_peers_weights(name):
    """The small configurations are ours converted from the seeded peer: same function."""
    import torch

    from keras_perceiver.examples import outputs_to_numpy

    peer, to_torch = subjects.peer_model(name)
    ours = subjects.bench_model(name)
    x = subjects.bench_inputs(name, 2)
    args = to_torch(x)
    with torch.no_grad():
        if len(args) == 2:
            expected = peer(inputs=args[0], attention_mask=args[1]).logits
        elif "resampler" in name:
            expected = peer(*args)
        else:
            expected = peer(inputs=args[0]).logits
    got = outputs_to_numpy(ours(x))
    expected = expected.numpy().reshape(got.shape)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def _stated(original, config):
    """`config` restricted to the fields `original` states (nested dicts likewise), as JSON."""
    kept = {k: _stated(v, config[k]) if isinstance(v, dict) else config[k] for k, v in original.items()}
    return json.loads(json.dumps(kept))


_TRANSFORMERS_PERCEIVER_PEERS = sorted(n for n, e in subjects.bench_entries().items()
                                       if e["bench"].get("peer", "").startswith("transformers.PerceiverFor"))


def test_the_bench_names_are_the_zoo_entries_with_a_bench_entry_and_the_small_configurations():
    from keras_perceiver.presets import zoo_entries

    with_bench = [n for n, e in zoo_entries().items() if "bench" in e]
    assert subjects.bench_names() == with_bench + list(subjects.SMALL_PEERS)
    assert {"idefics2_connector", "idefics_resampler", "perceiver_digits"} <= set(with_bench)
    assert list(subjects.BENCH_INPUTS) == subjects.bench_names()
    # the media's width and the vocabulary come from the config: nothing typed twice
    x = subjects.bench_inputs("idefics2_connector", 2)
    assert (x["media"].shape, x["media_mask"].shape) == ((2, 1225, 1152), (2, 1225))
    assert subjects.bench_inputs("open_flamingo_resampler", 1)["media"].shape == (1, 8, 1, 257, 1024)
    tokens = subjects.bench_inputs("perceiver_io_language", 1)["token_ids"]
    assert tokens.dtype == np.int32 and tokens.shape == (1, 2048) and 200 < tokens.max() < 262


@pytest.mark.parametrize("name", _TRANSFORMERS_PERCEIVER_PEERS)
def test_transformers_peer_configs_round_trip(name):
    """ours -> transformers -> ours gives back every field our config states: the peer is the
    preset's model. Configs only: the head is built on the meta device, without weights."""
    import torch
    import transformers

    from keras_perceiver.converters.transformers_perceiver import config_from_transformers, transformers_config

    entry = subjects.bench_entries()[name]
    class_name = entry["bench"]["peer"].rsplit(".", 1)[1]
    with torch.device("meta"):
        head = getattr(transformers, class_name)(transformers_config(entry["config"], class_name))
    ours, back = config_from_transformers(head)
    assert ours == entry["class_name"]
    assert _stated(entry["config"], back) == json.loads(json.dumps(entry["config"]))


@pytest.mark.parametrize("name", ["idefics2_connector", "idefics_resampler"])
def test_idefics_configs_round_trip_through_transformers(name):
    import dataclasses

    import transformers

    from keras_perceiver.converters import idefics
    from keras_perceiver.models.resampler import PerceiverResamplerConfig

    config = subjects.bench_entries()[name]["config"]
    to_hf, to_ours, hf_class = {
        "idefics2_connector": (idefics.idefics2_transformers_config, idefics.idefics2_connector_config, transformers.Idefics2Config),
        "idefics_resampler": (idefics.idefics_transformers_config, idefics.idefics_resampler_config, transformers.IdeficsConfig),
    }[name]
    hf = to_hf(config)
    # through transformers' own config class, as the bench's peer is built
    back = to_ours(hf_class(**{k: v for k, v in hf.items() if k != "model_type"}))
    assert _stated(config, dataclasses.asdict(PerceiverResamplerConfig(**back))) == config
    with pytest.raises(ValueError, match="cannot express .*activation: expected 'relu', received 'gelu'"):
        idefics.idefics_transformers_config({**subjects.bench_entries()["idefics_resampler"]["config"], "activation": "gelu"})


def test_the_inverse_translations_refuse_what_their_peer_cannot_express():
    from keras_perceiver.converters.flamingo import flamingo_pytorch_kwargs
    from keras_perceiver.converters.transformers_perceiver import transformers_config

    language = subjects.bench_entries()["perceiver_io_language"]["config"]
    with pytest.raises(ValueError, match="one `qk_channels` for self- and cross-attention: expected cross_attention_qk_channels=256; received 128"):
        transformers_config({**language, "cross_attention_qk_channels": 128}, "PerceiverForMaskedLM")
    # flamingo_resampler has no peer: flamingo-pytorch's feed-forward is GELU only
    flamingo = subjects.bench_entries()["flamingo_resampler"]
    assert "peer" not in flamingo["bench"]
    with pytest.raises(ValueError, match="activation: expected 'gelu', received 'squared_relu'"):
        flamingo_pytorch_kwargs(flamingo["config"], num_media_embeds=8)
    open_flamingo = subjects.bench_entries()["open_flamingo_resampler"]["config"]
    assert flamingo_pytorch_kwargs(open_flamingo, num_media_embeds=8) == dict(
        dim=1024, depth=6, dim_head=64, heads=8, num_latents=64, num_media_embeds=8, ff_mult=4)


@pytest.mark.parametrize("name", ["idefics2_connector", "idefics_resampler"])
def test_connector_peers_compute_our_function_on_bench_inputs(name):
    """The connectors' peers as the bench builds them (the preset's config, shrunk) and calls
    them (`peer_call`), against ours converted from them (`from_state_dict`): the same
    function, so the bench's timings pair like with like."""
    import torch

    from keras_perceiver.examples import random_inputs

    entry = subjects.bench_entries()[name]
    small = dict(dim=32, depth=2, num_heads=4, head_channels=8, num_latents=8)
    if name == "idefics2_connector":
        small.update(media_dim=24, projection_channels=40, num_key_value_heads=2)
    config, peer_path = {**entry["config"], **small}, entry["bench"]["peer"]
    torch.manual_seed(0)
    peer, to_torch = subjects.build_peer(peer_path, config, entry["bench"]["inputs"])
    with torch.no_grad():
        for p in peer.parameters():  # norms and latents too (Idefics2's latents start as ones)
            p.add_(0.1 * torch.randn_like(p))
    ours = subjects.convert_peer(peer_path, config, peer)
    assert peers.peer_name(peer) == "transformers." + peer_path.rsplit(".", 1)[1]
    x = random_inputs(subjects.bench_input_shapes(config, {n: [9] for n in entry["bench"]["inputs"]}, 2), seed=3)
    assert ("media_mask" in x) == (name == "idefics2_connector") and (name != "idefics2_connector" or not x["media_mask"].all())
    with torch.no_grad():
        expected = peers.peer_call(peer, peer, to_torch(x))().numpy()
    got = keras.ops.convert_to_numpy(ours(x))
    assert got.shape == expected.shape == (2, 8, 32)
    assert np.abs(got - expected).max() <= 1e-4


def test_report_refuses_a_file_that_is_not_a_bench_result(tmp_path):
    other = tmp_path / "scaling.json"
    other.write_text(json.dumps([{"length": 1000}]))
    with pytest.raises(ValueError, match="expected result files of `keras-perceiver bench`; received .*scaling.json"):
        report([other])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exports run in their own process; once, in the tensorflow pass")
def test_bfloat16_artefacts_are_measured_against_the_bfloat16_peak(tmp_path):
    pytest.importorskip("openvino", reason="needs the export extra (openvino)")
    out = tmp_path / "bench.json"
    results = run.run(["perceiver_digits"], ["tensorflow"], batches=[2], repeats=2, modes=[], out=out, peers=False,
                        targets=["openvino", "openvino:bfloat16", "onnx:static"])
    run_ = results["runs"][0]
    float32, bf16, static = run_["cells"]
    assert (float32["mode"], bf16["mode"], static["mode"]) == ("openvino", "openvino bfloat16", "onnx static")
    assert static["batch"] == 2 and static["max_rel_error"] < 1e-5 and static["peak_gflops"] == run_["gemm_peak_gflops"]
    # the highest of the samples (the run's start, this process's start and end), as for model cells
    assert float32["peak_gflops"] == run_["gemm_peak_gflops"] == max(max(s.values()) for s in run_["gemm_peak_samples_gflops"])
    # a CPU without bfloat16 units computes bfloat16 fastest through float32: the higher peak counts
    assert bf16["peak_gflops"] == run_["bfloat16_gemm_peak_gflops"] >= run_["gemm_peak_gflops"]
    assert float32["max_rel_error"] < 1e-5 and bf16["max_rel_error"] <= 0.05
    table = report([out])
    assert f"(peak {bf16['peak_gflops']:.0f} bf16)" in table


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exports run in their own process; once, in the tensorflow pass")
def test_an_export_that_fails_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="needs the export extra (onnxruntime)")
    from keras_perceiver.converters import artefacts

    monkeypatch.setattr(artefacts, "quantized_error_bound", lambda model_or_preset, quantize: 1e-9)
    cells, failures = run_artefacts(["perceiver_digits"], ["onnx:dynamic_int8", "onnx:static"], [1, 2], 1,
                                          {"float32": 100.0, "bfloat16": 100.0})
    assert [(c["mode"], c["batch"]) for c in cells] == [("onnx static", 1), ("onnx static", 2)]
    (failure,) = failures
    assert failure["mode"] == "onnx dynamic_int8" and failure["batches"] == [1, 2]
    assert "exceeds the documented bound 1e-09" in failure["error"]
    path = _result_file(tmp_path / "r.json", cells, [])
    data = json.loads(path.read_text())
    data["runs"][0]["failed_cells"] = failures
    path.write_text(json.dumps(data))
    assert "- cpu x2: perceiver_digits onnx dynamic_int8, batch 1, 2: " in report([path])


def test_bench_refuses_an_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"`dtypes` must be one or more of 'float32', 'bfloat16'; received \['float16'\]"):
        run.run(["perceiver_digits"], ["jax"], out=tmp_path / "b.json", dtypes=["float16"])


def _result_file(path, cells, peers, accelerators=()):
    run_ = {"device": {"cpu": "cpu", "threads": 2, "accelerators": list(accelerators)}, "gemm_peak_gflops": 100.0,
            "cells": cells, "peers": peers}
    path.write_text(json.dumps({"runs": [run_]}))
    return path


def _synthetic_cell(mode, ms, **extra):
    return dict(preset="p", backend="jax", mode=mode, batch=1, median_ms=ms, spread_ms=0.0, compile_s=0.0, peak_rss_mb=1.0,
                gflop=1.0, achieved_gflops=1000 / ms, fraction_of_peak=10 / ms, peak_gflops=100.0, **extra)


def test_report_compares_a_peer_with_our_best_cell_of_its_precision(tmp_path):
    cells = [_synthetic_cell("compiled", 20.0), _synthetic_cell("compiled bfloat16", 5.0, max_rel_error=0.01)]
    peers = [dict(preset="p", batch=1, peer="ref", mode="eager", median_ms=30.0),
             dict(preset="p", batch=1, peer="ref", mode="eager bfloat16", median_ms=10.0, peak_gflops=1000.0)]
    path = _result_file(tmp_path / "r.json", cells, peers, accelerators=["GPU X"])
    table = report([path])
    rows = [line for line in table.split("Every cell:")[1].splitlines() if "| ref |" in line]
    # float32 peer: our float32 cell (30 / 20), and our bfloat16 cell in the reduced-precision columns (30 / 5)
    assert "| jax compiled | 20.0 | 1.50x | compiled bfloat16 | 5.0 | 6.00x | 1.0e-02 |" in rows[0]
    assert rows[0].startswith("| cpu x2 + GPU X |")
    # bfloat16 peer: our bfloat16 cell (10 / 5), its % of peak against its own (bfloat16) peak
    assert "| 10.0 | 10% | jax compiled bfloat16 | 5.0 | 2.00x | - | - | - | - |" in rows[1]


def test_no_accelerator_peaks_without_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a CUDA or Apple (MPS) GPU; the check is for one without")
    assert devices.torch_accelerator() is None
    assert devices.accelerator_gemm_peaks() == {}


def test_bench_refuses_bfloat16_on_a_gpu_without_a_bfloat16_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "accelerator_gemm_peaks", lambda: {"float32": 1000.0})  # e.g. MPS before macOS 14
    monkeypatch.setattr(run, "torch_accelerator", lambda: "mps")
    with pytest.raises(ValueError, match=r"`dtypes` \['bfloat16'\] cannot be multiplied on this GPU \(mps\)"):
        run.run(["perceiver_digits"], ["jax"], out=tmp_path / "b.json", dtypes=["float32", "bfloat16"])
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the JAX-measured peak runs in the JAX process")
def test_jax_measures_both_peaks_of_a_device_it_holds():
    import jax

    # on a TPU it is the TPU; the CPU here takes the same path
    peaks = devices.jax_gemm_peaks(jax.devices("cpu")[0], size=256, repeats=3)
    assert sorted(peaks) == ["bfloat16", "float32"]
    assert all(0 < rate < 1e7 for rate in peaks.values()), peaks


def test_device_description_names_the_apple_chip_on_macos(monkeypatch):
    calls = []

    def sysctl(command, **kwargs):
        calls.append(command)
        return devices.subprocess.CompletedProcess(command, 0, stdout="Apple M2 Pro\n", stderr="")

    monkeypatch.setattr(devices.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(devices.platform, "processor", lambda: "arm")
    monkeypatch.setattr(devices.subprocess, "run", sysctl)
    assert devices.device_description()["cpu"] == "Apple M2 Pro"
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]


def test_coreml_is_a_bench_target_on_macos_only(monkeypatch):
    import platform

    here = cells.artefact_options()
    assert ("coreml" in here) == (platform.system() == "Darwin")
    assert here["onnx"] == ["dynamic_int8", "static"] and here["openvino"] == ["bfloat16", "int8"]
    monkeypatch.setattr(cells.platform, "system", lambda: "Darwin")
    assert cells.artefact_options()["coreml"] == ["static"]


def test_coreml_predictions_off_macos_say_they_need_it():
    import platform

    from keras_perceiver.converters.artefacts import artefact_runner

    if platform.system() == "Darwin":
        pytest.skip("checks the error raised off macOS; on macOS CoreML predicts")
    with pytest.raises(RuntimeError, match=r"coreml: predictions need macOS \(the CoreML runtime\); this system is "):
        artefact_runner("coreml", "model.mlpackage")


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="exports run in their own process; once, in the torch pass")
def test_coreml_cells_on_macos(tmp_path):
    import platform

    if platform.system() != "Darwin":
        pytest.skip("CoreML predictions need macOS (the CoreML runtime)")
    pytest.importorskip("coremltools", reason="needs the export extra (coremltools)")
    cells, failures = run_artefacts(["perceiver_digits"], ["coreml", "coreml:static"], [1, 2], 2,
                                          {"float32": 100.0, "bfloat16": 100.0}, gpu_peak=1000.0)
    assert failures == []
    assert [(c["mode"], c["batch"]) for c in cells] == [("coreml", 1), ("coreml", 2), ("coreml static", 1), ("coreml static", 2)]
    for cell in cells:
        # CoreML may schedule on the GPU: the higher of the two float32 peaks
        assert cell["median_ms"] > 0 and cell["max_rel_error"] < 1e-3 and cell["peak_gflops"] == 1000.0


def test_a_higher_peak_sampled_later_re_measures_the_cells_against_it():
    cpu_peaks = {"float32": 100.0, "bfloat16": 100.0}  # no bfloat16 units: bfloat16 through float32
    float32 = dict(achieved_gflops=80.0, fraction_of_peak=0.8, peak_gflops=100.0)
    peer = dict(peak_gflops=100.0)  # peers carry the peak only; the report computes their fraction
    on_gpu = dict(achieved_gflops=500.0, fraction_of_peak=0.5, peak_gflops=1000.0)
    raised = run._raised_peaks([float32, peer, on_gpu], cpu_peaks, 125.0)
    assert raised == {"float32": 125.0, "bfloat16": 125.0}
    assert float32["fraction_of_peak"] == pytest.approx(0.64) and float32["peak_gflops"] == 125.0
    assert peer == {"peak_gflops": 125.0}
    assert on_gpu["fraction_of_peak"] == 0.5 and on_gpu["peak_gflops"] == 1000.0
    # a lower sample changes nothing; a bfloat16 unit faster than the new float32 peak keeps its peak
    assert run._raised_peaks([float32], raised, 90.0) == raised and float32["fraction_of_peak"] == pytest.approx(0.64)
    assert run._raised_peaks([], {"float32": 100.0, "bfloat16": 400.0}, 125.0) == {"float32": 125.0, "bfloat16": 400.0}


def test_alternated_runs_time_both_calls_in_turns():
    order = []
    ours, peer = (lambda: order.append("ours")), (lambda: order.append("peer"))
    # calls longer than the block: one call a side per round, after a warm-up and a timed call each
    times, other_times = cells.alternated_runs([ours, peer], 3, block_s=0.0)
    assert order == ["ours"] * 2 + ["peer"] * 2 + ["ours", "peer"] * 3
    assert len(times) == len(other_times) == 3

    def sleeper(label, seconds):
        def call():
            order.append(label)
            time.sleep(seconds)
        return call

    order.clear()
    # short calls: each round runs a block of about block_s back to back, after an untimed call
    times, other_times = cells.alternated_runs([sleeper("ours", 0.01), sleeper("peer", 0.02)], 2, block_s=0.1)
    rounds = order[4:]
    ours_block, peer_block = rounds.index("peer"), len(rounds) // 2 - rounds.index("peer")
    assert rounds == (["ours"] * ours_block + ["peer"] * peer_block) * 2
    assert ours_block > peer_block > 2  # the shorter call runs more often; each block starts with an untimed call
    # per-call means, not the blocks' totals (each at least the call's time x its block's length)
    assert all(0.01 <= t < 0.01 * ours_block for t in times) and all(0.02 <= t < 0.02 * peer_block for t in other_times)


def test_paired_cells_carry_the_peer_timed_in_the_same_rounds(tmp_path):
    peaks = {"float32": 100.0}
    (cell,) = cells.run_cells(["small_flamingo_resampler"], [1], 2, ["eager"], peaks, paired=True)
    assert cell["paired_peer"] == "flamingo_pytorch.PerceiverResampler"
    assert cell["paired_peer_ms"] > 0 and cell["paired_peer_spread_ms"] >= 0
    # the peer cells that follow take the peer the pairing built instead of building it again
    model = peers._PAIRED_PEERS["small_flamingo_resampler"][0]
    (peer_cell,) = peers.run_peers(["small_flamingo_resampler"], [1], 1)
    assert "small_flamingo_resampler" not in peers._PAIRED_PEERS and peer_cell["peer"] == peers.peer_name(model)
    (digits,) = cells.run_cells(["perceiver_digits"], [1], 2, ["eager"], peaks, paired=True)
    assert "paired_peer_ms" not in digits  # no peer to pair with
    path = _result_file(tmp_path / "r.json", [cell, digits], [])
    table = report([path]).split("Every cell:")[1]
    rows = [line for line in table.splitlines() if "flamingo_pytorch.PerceiverResampler" in line]
    ratio = cell["paired_peer_ms"] / cell["median_ms"]
    assert rows == [f"| cpu x2 | small_flamingo_resampler | 1 | {keras.backend.backend()} eager "
                    f"| {cell['median_ms']:.1f} | {cell['spread_ms']:.1f} | flamingo_pytorch.PerceiverResampler "
                    f"| {cell['paired_peer_ms']:.1f} | {cell['paired_peer_spread_ms']:.1f} | {ratio:.2f}x |"]


def _summary_rows(*runs):
    results = [{"runs": [dict(device={"cpu": "cpu", "threads": 2, "accelerators": []}, gemm_peak_gflops=100.0,
                              cells=cells, peers=peers) for cells, peers in runs]}]
    return summary_table(results).splitlines()[2:]


def test_summary_keeps_per_precision_the_route_with_the_best_median_ratio_and_its_range():
    peer = dict(preset="p", batch=1, peer="ref", mode="eager", median_ms=30.0)
    slow_peer = dict(peer, median_ms=60.0)
    cells = [_synthetic_cell("compiled", 20.0), _synthetic_cell("eager", 25.0),
             _synthetic_cell("onnx dynamic_int8", 10.0, max_rel_error=0.02)]
    # a second run: the compiled cell paired with the peer in alternation; an eager cell with no peer in its run
    paired = _synthetic_cell("compiled", 15.0, paired_peer="ref", paired_peer_ms=45.0, paired_peer_spread_ms=1.0)
    rows = _summary_rows((cells, [slow_peer, peer]), ([paired, _synthetic_cell("eager", 10.0)], []))
    float32, int8 = rows
    # compiled: 30 / 20 (the fastest peer of its run) and 45 / 15 in the rounds, median 2.25; eager: 30 / 25 in its
    # run and 30 / 10 against a peer of another run on the same machine, median 1.85: compiled is kept
    assert float32 == ("| cpu x2 | p | 1 | float32 | jax compiled | 2 | 17.5 | 50-67% | ref | 1.50-3.00x "
                       "| in alternation, same run | - | - |")
    # int8 against the float32 peer; no % of a peak (none is measured in int8)
    assert int8 == "| cpu x2 | p | 1 | int8 | jax onnx dynamic_int8 | 1 | 10.0 | - | ref | 3.00x | same run | - | 2.0e-02 |"
    # a cell with no peer on its machine has no ratio and no row
    assert _summary_rows(([_synthetic_cell("compiled", 20.0)], [])) == []
    # a reduced-precision cell timed against the peer's bfloat16 autocast too says by how much
    bf16 = _synthetic_cell("openvino bfloat16", 10.0, max_rel_error=0.01, paired_peer="ref", paired_peer_ms=40.0,
                           paired_peer_spread_ms=1.0, paired_peer_autocast_ms=16.0)
    (row,) = _summary_rows(([bf16], []))
    assert row.endswith("| ref | 4.00x | in alternation | 1.60x | 1.0e-02 |")


def test_the_bench_recommends_the_fastest_route_per_precision():
    cells = [_synthetic_cell("compiled", 20.0), _synthetic_cell("eager", 25.0),
             _synthetic_cell("openvino int8", 6.0, max_rel_error=0.013), _synthetic_cell("openvino bfloat16", 8.0, max_rel_error=0.006),
             _synthetic_cell("onnx dynamic_int8", 9.0, max_rel_error=0.02)]
    results = [{"runs": [dict(device={"cpu": "cpu", "threads": 2, "accelerators": []}, gemm_peak_gflops=100.0,
                              cells=cells, peers=[])]}]
    assert fastest_routes(results).splitlines() == [
        "cpu x2: p batch 1, float32: use jax compiled (20.0 ms)",
        "cpu x2: p batch 1, bfloat16: use jax openvino bfloat16 (8.00 ms, error 6.0e-03 of the output range)",
        "cpu x2: p batch 1, int8: use jax openvino int8 (6.00 ms, error 1.3e-02 of the output range)",
    ]


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_the_committed_matrix_and_the_readme_summary_are_generated_from_the_committed_results():
    """No row is typed by hand: matrix.md is `bench-report` of the files it names, benchmarks/README.md
    carries its summary table and the README its headline rows, as generated."""
    matrix = (RESULTS / "matrix.md").read_text()
    names = matrix.splitlines()[0].removeprefix("Merged from: ").split(", ")
    assert matrix == report([RESULTS / name for name in names]) + "\n"
    results = [json.loads((RESULTS / name).read_text()) for name in names]
    assert summary_table(results) in (RESULTS.parent / "README.md").read_text()
    rows = headline(results)
    assert rows in (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert set(rows.splitlines()[2:]) <= set(summary_table(results).splitlines())
    assert all("| 1 |" in row and "small_" not in row for row in rows.splitlines()[2:])


def test_the_multimodal_peer_computes_our_function_on_bench_inputs():
    """The multimodal autoencoder's peer as the bench builds and calls it (dicts of inputs and
    output points), small, against ours converted from it: the same three outputs."""
    import torch

    from keras_perceiver.examples import random_inputs
    from keras_perceiver.presets import model_classes

    entry = subjects.bench_entries()["perceiver_io_multimodal"]
    small = dict(num_latents=8, latent_channels=32, num_self_attends_per_block=1, num_self_attention_heads=2,
                 image_shape=[2, 8, 8, 3], image_max_resolution=[2, 8, 8], audio_samples=64, num_labels=5,
                 label_query_channels=16, decoder_channels=16)
    config, peer_path = {**entry["config"], **small}, entry["bench"]["peer"]
    torch.manual_seed(0)
    peer, to_torch = subjects.build_peer(peer_path, config, entry["bench"]["inputs"])
    ours = subjects.convert_peer(peer_path, config, peer)
    limits = model_classes()["PerceiverMultimodalAutoencoder"].config_class(**config).output_point_limits
    shapes = {"image": [1, 2, 8, 8, 3], "audio": [1, 64, 1], "image_output_points": [1, 16], "audio_output_points": [1, 2]}
    x = random_inputs(shapes, seed=1, index_limits=limits)
    with torch.no_grad():
        expected = peers.peer_call(peer, peer, to_torch(x))().logits
    got = ours(x)
    for theirs, mine in (("image", "reconstructed_image"), ("audio", "reconstructed_audio"), ("label", "label_logits")):
        assert np.abs(expected[theirs].numpy() - keras.ops.convert_to_numpy(got[mine])).max() <= 1e-4
    assert subjects.bench_inputs("perceiver_io_multimodal", 1)["image_output_points"].max() < 16 * 224 * 224
