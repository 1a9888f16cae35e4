import keras
import pytest

from keras_perceiver.benchmarks import bound as gemm_bound


def test_each_recorded_op_is_read_as_its_matrix_products():
    assert gemm_bound.products_of("aten::mm", [(512, 1024), (1024, 3072)]) == [(1, 512, 1024, 3072)]
    assert gemm_bound.products_of("aten::addmm", [(3072,), (512, 1024), (1024, 3072)]) == [(1, 512, 1024, 3072)]
    assert gemm_bound.products_of("aten::bmm", [(8, 256, 32), (8, 32, 2048)]) == [(8, 256, 32, 2048)]
    assert gemm_bound.products_of("aten::baddbmm", [(8, 256, 2048), (8, 256, 32), (8, 32, 2048)]) == [(8, 256, 32, 2048)]
    # the fused kernel: scores (L x E by E x S), then the weighted sum (L x S by S x Ev), per batch x head
    attention = [(2, 8, 64, 32), (2, 8, 320, 32), (2, 8, 320, 48)]
    assert gemm_bound.products_of(gemm_bound.FUSED_ATTENTION, attention) == [(16, 64, 32, 320), (16, 64, 320, 48)]
    with pytest.raises(ValueError, match="`op` must be one of .* received 'aten::conv2d'"):
        gemm_bound.products_of("aten::conv2d", [(1, 3, 8, 8)])


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="starts its own torch process; run once, in the torch pass")
def test_the_profiler_records_every_matrix_product_of_ours_and_the_peers():
    result = gemm_bound.run(["small_flamingo_resampler", "small_perceiver_io_language"], batches=[2], repeats=1, sustained_s=1.0)
    rows = result["rows"]
    assert [(r["preset"], r["implementation"].startswith("ours")) for r in rows] == [
        ("small_flamingo_resampler", True), ("small_flamingo_resampler", False),
        ("small_perceiver_io_language", True), ("small_perceiver_io_language", False),
    ]
    for row in rows:
        if row["implementation"].startswith("ours"):
            # our recorded products add up to the analytic FLOPs: none missed or counted twice (the
            # analytic count of a projection moved to the queries' side includes its bias as one
            # more input column: 0.3% here)
            assert row["recorded_gflop"] == pytest.approx(row["analytic_gflop"], rel=0.01), row
        else:
            # the peers project keys and values on the keys' side: the same products and more
            assert row["recorded_gflop"] >= 0.99 * row["analytic_gflop"], row
        assert row["products"] > 0 and row["forward_ms"] > 0 and 0 < row["products_share_of_forward"] < 1
        assert len(row["by_product"]) <= row["products"]
        assert 0 < row["product_ms_best"] <= min(row["product_ms_torch"], row["product_ms_numpy"])
        # timings are not compared with each other (the machine's load moves them); only what
        # follows from the definitions: the best library's replays bound at least as high as MKL's
        assert row["achieved_fraction"] > 0 and row["bound_fraction_best"] >= row["bound_fraction_torch"] > 0
    table = gemm_bound.table(result)
    assert "| small_flamingo_resampler | 2 | ours (Keras on torch, eager) |" in table
    # the peak's own product run back to back: a rate for each half-second stretch of the second
    sustained = result["sustained_gemm_gflops"]
    assert set(sustained) == {"numpy", "torch"} and all(len(rates) >= 1 and min(rates) > 0 for rates in sustained.values())
    assert "- the same product in numpy, back to back: median " in table
    assert result["sustained_window_s"] == gemm_bound.SUSTAINED_WINDOW_S and f"stretches of {gemm_bound.SUSTAINED_WINDOW_S:g} s" in table
