"""Analytic FLOPs of one forward pass, 2 x the multiply-adds of its matrix products, from the
model's config and its inputs' shapes: what every cell's GFLOP/s and fraction of the GEMM peak
are computed from. Counts the Perceiver, Perceiver IO and resampler models."""

import numpy as np


def _attention_flops(queries, keys, q_in, kv_in, qk, v, out, self_attention=False, heads=1):
    from keras_perceiver.layers.attention import projections_on_query_side

    if not self_attention and projections_on_query_side(queries, heads, kv_in, qk, v):
        # what MultiHeadAttention computes then: the context is never projected
        width = kv_in + 1
        return 2 * (queries * q_in * qk + queries * width * (qk + v) + 2 * heads * queries * keys * width + queries * v * out)
    projections = queries * q_in * qk + keys * kv_in * (qk + v) if not self_attention else queries * q_in * (2 * qk + v)
    return 2 * (projections + queries * keys * (qk + v) + queries * v * out)


def forward_flops(model, inputs):
    """Multiply-adds x 2 of the matrix products of one forward pass (softmax, norms and
    element-wise work left out: under 1% at these sizes)."""
    from keras_perceiver.layers.adapters import conv_stem_dims
    from keras_perceiver.models import PerceiverResampler

    c = model.config
    batch = next(iter(inputs.values())).shape[0]
    if isinstance(model, PerceiverResampler):
        b, t, f, v = inputs["media"].shape[:4]
        keys = f * v + c.num_latents
        inner = c.num_heads * c.head_channels
        per_layer = _attention_flops(c.num_latents, keys, c.dim, c.dim, inner, inner, c.dim, heads=c.num_heads) + (
            4 * c.num_latents * c.dim * c.ff_mult * c.dim
        )
        return b * t * c.depth * per_layer
    adapter = model.get_layer("input_adapter")
    data = inputs.get("inputs", inputs.get("token_ids"))
    length = int(np.prod(data.shape[1:-1])) if "inputs" in inputs else data.shape[1]
    channels = adapter.output_channels(data.shape[-1] if "inputs" in inputs else None)
    if getattr(adapter, "conv_stem_channels", None):
        convolved, pooled = conv_stem_dims(data.shape[1:-1])
        flops = 2 * int(np.prod(convolved)) * 49 * data.shape[-1] * adapter.conv_stem_channels
        length = int(np.prod(pooled))
    else:
        flops = 2 * length * data.shape[-1] * (getattr(adapter, "project_channels", None) or 0)
    n, d = c.num_latents, c.latent_channels
    qk = c.cross_attention_qk_channels or channels
    v = c.cross_attention_v_channels or qk
    flops += c.num_cross_attends * (_attention_flops(n, length, d, channels, qk, v, d, heads=c.num_cross_attention_heads) + 4 * n * d * d * c.cross_attention_widening_factor)
    sqk = c.self_attention_qk_channels or d
    sv = c.self_attention_v_channels or sqk
    per_self = _attention_flops(n, n, d, d, sqk, sv, d, self_attention=True) + 4 * n * d * d * c.self_attention_widening_factor
    flops += c.num_blocks * c.num_self_attends_per_block * per_self
    if hasattr(c, "output_queries"):
        spec = c.output_queries
        queries = spec.get("num_queries") or int(np.prod(spec["index_dims"]))
        width = model.get_layer("decoder").input[0].shape[-1]
        dqk = c.decoder_qk_channels or d
        dv = c.decoder_v_channels or dqk
        flops += _attention_flops(queries, n, width, d, dqk, dv, width, heads=c.decoder_num_heads) + 4 * queries * width * width * c.decoder_widening_factor
        if c.output_channels:
            flops += 2 * queries * width * c.output_channels
            width = c.output_channels
        if c.tie_output_to_input_embedding:
            flops += 2 * queries * width * c.input_adapter["vocab_size"]
    else:
        if c.pooling == "query":
            dqk = c.decoder_qk_channels or d
            flops += _attention_flops(1, n, d, d, dqk, c.decoder_v_channels or dqk, d, heads=c.decoder_num_heads) + 4 * d * d
        flops += 2 * d * c.num_classes
    return batch * flops

