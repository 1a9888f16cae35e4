"""Independent NumPy (float64) implementations used as test oracles."""

import math

import numpy as np

from conftest import weight

_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, norm_layer, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight(norm_layer.gamma) + weight(norm_layer.beta)


def softmax_attention(q, k, v, mask=None):
    """q (B, Tq, H, D), k (B, Tk, H, D), v (B, Tk, H, Dv); mask broadcastable to (B, Tq, Tk)."""
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        mask = np.broadcast_to(mask, (q.shape[0], q.shape[1], k.shape[1]))[:, None]
        logits = np.where(mask, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(logits - row_max)
    total = e.sum(-1, keepdims=True)
    probs = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def _project(x, projection):
    kernel, bias = projection
    y = x @ weight(kernel)
    return y if bias is None else y + weight(bias)


def multi_head_attention(layer, query, context, mask=None):
    """Our MultiHeadAttention layer's maths from its weights (non-self-attention form)."""
    qk, heads = layer.qk_channels, layer.num_heads
    q = _project(query, layer.q)
    kv = _project(context, layer.kv)
    k, v = kv[..., :qk], kv[..., qk:]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1)  # noqa: E731
    out = softmax_attention(split(q), split(k), split(v), mask)
    return _project(out.reshape(out.shape[0], out.shape[1], -1), layer.out)


def feed_forward(layer, x, activation=gelu):
    h = layer_norm(x, layer.norm)
    h = activation(_dense(h, layer.dense_in))
    return _dense(h, layer.dense_out)


def _dense(x, dense):
    y = x @ weight(dense.kernel)
    return y + weight(dense.bias) if dense.use_bias else y


def interpolate_rows(table, length):
    rows = table.shape[0]
    if length <= rows:
        return table[:length]
    pos = np.arange(length) * (rows - 1) / (length - 1)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, rows - 1)
    w = (pos - low)[:, None]
    return table[low] * (1 - w) + table[high] * w


def squared_relu(x):
    return np.square(np.maximum(x, 0.0))


def resampler(layer, media, media_mask=None, activation=gelu):
    """flamingo-pytorch's forward, written from REFERENCE.md. media (B, T, F, V, D)."""
    media = media.astype("float64")
    b, t, f, v, d = media.shape
    if layer.frame_embeddings is not None:
        media = media + interpolate_rows(weight(layer.frame_embeddings), f)[None, None, :, None]
    x = media.reshape(b, t, f * v, d)
    if layer.media_time_embeddings is not None:
        x = x + interpolate_rows(weight(layer.media_time_embeddings), t)[None, :, None]
    x = x.reshape(b * t, f * v, d)
    latents = np.broadcast_to(weight(layer.latents), (b * t,) + tuple(layer.latents.shape)).copy()
    mask = None
    if media_mask is not None:
        mask = np.concatenate(
            [media_mask.reshape(b * t, f * v), np.ones((b * t, latents.shape[1]), bool)], axis=1
        )[:, None, :]
    for block in layer.blocks:
        normed = layer_norm(latents, block.latents_norm)
        context = np.concatenate([layer_norm(x, block.media_norm), normed], axis=1)
        latents = latents + multi_head_attention(block.attention, normed, context, mask)
        latents = latents + feed_forward(block.feed_forward, latents, activation)
    latents = layer_norm(latents, layer.norm)
    return latents.reshape(b, t, latents.shape[1], d)
