"""The one attention function of the package and the projection layer around it."""

import math

import keras
from keras import ops

# When the float32 (batch, heads, queries, keys) scores would exceed this many bytes, keys
# are processed in blocks that fit it (online softmax): memory stays bounded whatever the
# input length, and the unrolled graph has about scores / budget blocks.
SCORE_BUDGET_BYTES = 64 * 2**20


def _expand_mask(key_mask):
    """(B, Tk) or (B, Tq, Tk) -> boolean (B, 1, Tq or 1, Tk), broadcastable over heads."""
    key_mask = ops.cast(key_mask, "bool")
    if len(key_mask.shape) == 2:
        return ops.expand_dims(key_mask, (1, 2))
    if len(key_mask.shape) == 3:
        return ops.expand_dims(key_mask, 1)
    raise ValueError(
        "attention: `key_mask` must have shape (batch, keys) or (batch, queries, keys); "
        f"received shape {tuple(key_mask.shape)}"
    )


def zero_masked(x, keep):
    """`x` where `keep` is True, else 0; `keep` (boolean) covers x's leading axes and broadcasts
    over the rest. A selection, not `x * keep`: NaN * 0 is NaN, so a NaN or Inf at a masked
    position would survive a product."""
    keep = ops.cast(keep, "bool")
    if len(keep.shape) < len(x.shape):
        keep = ops.expand_dims(keep, tuple(range(len(keep.shape), len(x.shape))))
    return ops.where(keep, x, ops.zeros((), dtype=x.dtype))


def _used_keys(key_mask):
    """(B, Tk) or (B, Tq, Tk) mask -> (B, Tk): whether any query may attend to each key."""
    key_mask = ops.cast(key_mask, "bool")
    return key_mask if len(key_mask.shape) == 2 else ops.any(key_mask, axis=1)


def _mask_bias(mask):
    """Boolean mask -> float32 0 / -1e30 of the same (B, 1, Tq|1, Tk) shape, added to the logits
    (None -> None).

    Adding a bias broadcast over heads and queries costs less than selecting over the whole
    (B, H, Tq, Tk) scores: onnxruntime's Where took 16.5 ms on the language model's
    cross-attention scores (benchmarks/NOTES.md). logits - 1e30 rounds to exactly -1e30, so
    the result equals the selection. Float32 whatever floatx is: -1e30 overflows float16."""
    return None if mask is None else (ops.cast(mask, "float32") - 1.0) * 1e30


def _heads_first(x):
    """(B, T, H, D) -> (B, H, T, D)."""
    return ops.transpose(x, (0, 2, 1, 3))


def _even_width(x):
    """`x` with a zero channel appended when its last axis is odd, else `x`: an odd
    contraction width keeps a bfloat16 product off AMX (OpenVINO ran the Fourier model's
    512 x 261 x 50,176 logits on AVX-512 at a third of the AMX rate). The zero adds exactly
    0 to every logit."""
    if x.shape[-1] % 2 == 0:
        return x
    return ops.pad(x, [(0, 0)] * (len(x.shape) - 1) + [(0, 1)])


# Attention's products are written as transposes + batched matmul rather than einsum: XLA on
# CPU ran the einsum form 1.3-2.4x slower at the language model's shapes (JAX jit), and the
# exported graphs get MatMul nodes (onnxruntime's Einsum: small language model 1.93 vs 1.36 ms).
def _explicit_attention(query, key, value, bias, scale):
    """Reference maths, used when q/k and v widths differ (fused kernels need them equal)."""
    if keras.backend.standardize_dtype(query.dtype) == "float16":
        # scaled before the product: unscaled float16 logits overflow at 65504
        query, scale = query * ops.cast(scale, query.dtype), 1.0
    logits = ops.matmul(_heads_first(query), ops.transpose(key, (0, 2, 3, 1)))  # (B, H, Tq, Tk)
    logits = ops.cast(logits, "float32") * scale
    if bias is not None:
        logits = logits + bias
    probs = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
    return _heads_first(ops.matmul(probs, _heads_first(value)))


def _chunked_attention(query, key, value, bias, scale, chunk_size):
    """Online softmax over key blocks: never holds more than (B, H, Tq, chunk) scores.

    Equal to the unchunked result up to float32 rounding (running max and running sum).
    """
    num_keys = key.shape[1]
    q = _heads_first(ops.cast(query, "float32") * scale)
    running_max = None
    for start in range(0, num_keys, chunk_size):
        stop = start + chunk_size  # slicing clamps the last block (no min(): a symbolic size stays symbolic)
        k = ops.transpose(ops.cast(key[:, start:stop], "float32"), (0, 2, 3, 1))  # (B, H, D, chunk)
        v = _heads_first(ops.cast(value[:, start:stop], "float32"))
        logits = ops.matmul(q, k)
        if bias is not None:
            logits = logits + bias[:, :, :, start:stop]
        block_max = ops.max(logits, axis=-1, keepdims=True)
        if running_max is None:
            new_max = block_max
            probs = ops.exp(logits - new_max)
            total = ops.sum(probs, axis=-1, keepdims=True)
            acc = ops.matmul(probs, v)
        else:
            new_max = ops.maximum(running_max, block_max)
            correction = ops.exp(running_max - new_max)
            probs = ops.exp(logits - new_max)
            total = total * correction + ops.sum(probs, axis=-1, keepdims=True)
            acc = acc * correction + ops.matmul(probs, v)
        running_max = new_max
    out = acc / total
    return ops.cast(_heads_first(out), value.dtype)


def _half_on_jax(x):
    """float16 on JAX: its fused attention asks for float32 logits from a float16 product
    (preferred_element_type), which XLA on CPU refuses to compile (jax 0.10); the explicit
    form computes the same thing with a float16 product."""
    return keras.config.backend() == "jax" and keras.backend.standardize_dtype(x.dtype) == "float16"


def _heads_of(x, query):
    """One key / value head shared by every query head, broadcast to them explicitly for the
    fused kernel: torch.compile's attention fusion failed on the implicit broadcast with
    dynamic shapes (a view on PyTorch; the ONNX export keeps one Expand per cross-attention)."""
    heads = query.shape[2]
    if x.shape[2] == heads:
        return x
    shape = ops.shape(x)
    return ops.broadcast_to(x, (shape[0], shape[1], heads, x.shape[-1]))


def _grouped_heads(x, query):
    """Grouped-query attention: `x` with G key / value heads (1 < G < heads) repeated to the
    query heads, query head h reading key head h // (heads / G), as transformers' repeat_kv.
    One head (the shared-head broadcast above) and full heads pass through unchanged."""
    heads, groups = query.shape[2], x.shape[2]
    if groups in (1, heads):
        return x
    if heads % groups:
        raise ValueError(f"attention: {groups} key / value heads do not divide {heads} query heads")
    shape = ops.shape(x)
    x = ops.broadcast_to(ops.expand_dims(x, 3), (shape[0], shape[1], groups, heads // groups, x.shape[-1]))
    return ops.reshape(x, (shape[0], shape[1], heads, x.shape[-1]))


def _chunk_size(query, num_keys, score_budget_bytes):
    """Keys per block so that one block's scores fit the budget; None = no chunking."""
    if not score_budget_bytes or num_keys is None:
        return None
    # unknown or symbolic sizes (None, a torch.export SymInt) count as 1: the block size stays a
    # plain int, so the unrolled graph does not depend on the batch
    rows = math.prod(d if isinstance(d, int) else 1 for d in query.shape[:3])
    if rows * num_keys * 4 <= score_budget_bytes:
        return None
    return max(16, score_budget_bytes // (4 * rows))


def attention(
    query, key, value, key_mask=None, score_budget_bytes=SCORE_BUDGET_BYTES, chunk_size=None, scale=None
):
    """Scaled dot-product attention over heads, the only one the package uses.

    Args:
        query: (batch, queries, heads, qk_dim).
        key: (batch, keys, heads or 1 or G, qk_dim); one key head is shared by every query head,
            G heads (dividing heads) are shared by groups of heads (grouped-query attention).
        value: (batch, keys, same heads as key, v_dim); v_dim may differ from qk_dim.
        key_mask: optional boolean, (batch, keys) or (batch, queries, keys); True = attend.
            A query row whose keys are all masked returns zeros, never NaN. Keys and values
            masked for every query are zeroed first, so what they hold (NaN and Inf included)
            never reaches the output; with a (batch, queries, keys) mask, a key that some query
            attends to is kept, and a NaN in it reaches the other queries too (0 x NaN).
        score_budget_bytes: the most float32 scores to hold at once; above it keys are
            processed in blocks with an online softmax (None: never). `chunk_size` forces
            blocks of that many keys.
        scale: the logits' factor; default 1 / sqrt(qk_dim).

    Returns (batch, queries, heads, v_dim) in the dtype of `value`. Softmax runs in
    float32 for half-precision inputs on every backend.
    """
    scale = scale or 1.0 / math.sqrt(query.shape[-1])
    mask = None
    row_has_key = None
    if key_mask is not None:
        mask = _expand_mask(key_mask)
        used = _used_keys(key_mask)
        same = value is key
        key = zero_masked(key, used)
        value = key if same else zero_masked(value, used)
        # Unmask fully masked rows for the computation (no NaN anywhere, gradients
        # included), then zero their output.
        row_has_key = ops.any(mask, axis=-1, keepdims=True)  # (B, 1, Tq|1, 1)
        mask = ops.logical_or(mask, ops.logical_not(row_has_key))

    key, value = _grouped_heads(key, query), _grouped_heads(value, query)
    num_keys = key.shape[1]
    chunk_size = chunk_size or _chunk_size(query, num_keys, score_budget_bytes)
    chunked = bool(chunk_size) and num_keys is not None and num_keys > chunk_size
    if not chunked and query.shape[-1] == value.shape[-1] and not _half_on_jax(query):
        key, value = _heads_of(key, query), _heads_of(value, query)
        out = ops.dot_product_attention(query, key, value, mask=mask, scale=scale)
    else:
        query, key = _even_width(query), _even_width(key)
        if chunked:
            out = _chunked_attention(query, key, value, _mask_bias(mask), scale, chunk_size)
        else:
            out = _explicit_attention(query, key, value, _mask_bias(mask), scale)

    if row_has_key is not None:
        keep = ops.transpose(row_has_key, (0, 2, 1, 3))  # (B, Tq|1, 1, 1)
        out = ops.where(keep, out, ops.zeros_like(out))
    return out


def _per_head_matmul(x, kernels):
    """(B, T, H, a) x (H, a, b) -> (B, T, H, b), as a matmul with equal batch axes (H):
    TensorFlow's oneDNN batch matmul broadcasting a rank-3 operand against a rank-4 one gave
    wrong values and segfaulted (TF 2.21). The rows are merged before the transpose, not after:
    onnxscript's optimizer (0.7.2, run by torch.onnx.export) drops a Reshape -> MatMul ->
    Reshape chain whenever the shapes broadcast, which re-pairs the kernels with the batch axis
    when a static B * T equals H (a static ONNX export of the resampler was wrong by 0.1)."""
    shape = ops.shape(x)
    heads, width = kernels.shape[0], kernels.shape[-1]
    rows = ops.transpose(ops.reshape(x, (-1, heads, x.shape[-1])), (1, 0, 2))  # (H, B * T, a)
    out = ops.transpose(ops.matmul(rows, kernels), (1, 0, 2))  # (B * T, H, b)
    return ops.reshape(out, (shape[0], shape[1], heads, width))


def attention_widths(input_channels, qk_channels=None, v_channels=None):
    """(q/k width, v width) of a Perceiver attention over inputs `input_channels` wide (the
    context of a cross-attention, the input of a self-attention): q/k default to that width
    and v to the q/k width, as the references. The one place of that rule."""
    qk = qk_channels or input_channels
    return qk, v_channels or qk


def matmul_flops(rows, fan_in, fan_out):
    """FLOPs of a (rows, fan_in) x (fan_in, fan_out) product: 2 x its multiply-adds."""
    return 2 * rows * fan_in * fan_out


def dense_flops(layer, rows):
    """FLOPs of a built `keras.layers.Dense` applied to `rows` rows (its bias left out)."""
    fan_in, fan_out = layer.kernel.shape
    return matmul_flops(rows, fan_in, fan_out)


def projections_on_query_side(num_queries, num_heads, context_channels, qk_channels, v_channels):
    """Whether cross-attention costs fewer multiply-adds with the key and value projections
    moved to the queries' side (`MultiHeadAttention._attend_to_context`). Per context
    element that costs 2 x heads x queries x (channels + 1) instead of
    (channels + queries) x (qk + v): fewer with few queries and wide contexts (the small
    Fourier classifier: 34 k instead of 170 k); both grow linearly in the context length.
    Chosen only below half: its products have fewer rows (one per query, not one per context
    element), and between half and equal (the large Fourier classifier and resampler) the
    moved form was not measured."""
    if num_queries is None or context_channels is None:
        return False
    moved = 2 * num_heads * num_queries * (context_channels + 1)
    return 2 * moved < (context_channels + num_queries) * (qk_channels + v_channels)


@keras.saving.register_keras_serializable(package="keras_perceiver")
class MultiHeadAttention(keras.layers.Layer):
    """Projections around `attention`: queries from one input, keys/values from another.

    Keys and values come from one fused projection (k half first); with
    `self_attention=True` queries, keys and values come from one fused projection.
    `num_key_value_heads` (dividing num_heads; default num_heads) gives grouped-query
    attention: keys and values get that many heads, each shared by a group of query heads.
    `qk_norm=True` applies a LayerNorm over each head's channels to queries and keys (one
    pair of norms shared by the heads, as Idefics' `qk_layer_norms_perceiver`).
    """

    def __init__(
        self,
        num_heads,
        qk_channels,
        v_channels,
        output_channels,
        use_bias=True,
        self_attention=False,
        score_budget_bytes=SCORE_BUDGET_BYTES,
        num_key_value_heads=None,
        qk_norm=False,
        qk_norm_epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_key_value_heads is not None and (num_key_value_heads < 1 or num_heads % num_key_value_heads):
            raise ValueError(
                f"MultiHeadAttention: `num_key_value_heads` must divide num_heads={num_heads}; "
                f"received {num_key_value_heads}"
            )
        if self_attention and num_key_value_heads not in (None, num_heads):
            raise ValueError("MultiHeadAttention: `num_key_value_heads` needs self_attention=False")
        for arg, value in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if value % num_heads:
                raise ValueError(
                    f"MultiHeadAttention: `{arg}` must be divisible by num_heads={num_heads}; "
                    f"received {value}"
                )
        self.num_heads = num_heads
        self.qk_channels = qk_channels
        self.v_channels = v_channels
        self.output_channels = output_channels
        self.use_bias = use_bias
        self.self_attention = self_attention
        self.score_budget_bytes = score_budget_bytes
        self.num_key_value_heads = num_key_value_heads
        self.qk_norm = qk_norm
        self.qk_norm_epsilon = qk_norm_epsilon

    @property
    def _kv_heads(self):
        return self.num_key_value_heads or self.num_heads

    @property
    def _kv_widths(self):
        """(key width, value width) of the cross-attention's key / value projection: one
        head's widths times the key / value heads."""
        return (
            self.qk_channels // self.num_heads * self._kv_heads,
            self.v_channels // self.num_heads * self._kv_heads,
        )

    def _moves_projections(self, num_queries, context_channels):
        """Whether `call` takes `_attend_to_context`: it needs one key projection per query
        head and no norm between the projections."""
        plain = not self.qk_norm and self._kv_heads == self.num_heads
        return plain and not self.self_attention and projections_on_query_side(
            num_queries, self.num_heads, context_channels, self.qk_channels, self.v_channels
        )

    def _projection(self, name, fan_in, fan_out):
        kernel = self.add_weight(
            name=f"{name}_kernel",
            shape=(fan_in, fan_out),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )
        bias = None
        if self.use_bias:
            bias = self.add_weight(name=f"{name}_bias", shape=(fan_out,), initializer="zeros")
        return kernel, bias

    def build(self, query_shape, context_shape=None):
        qk, v = self.qk_channels, self.v_channels
        if self.self_attention:
            self.qkv = self._projection("qkv", query_shape[-1], 2 * qk + v)
        else:
            self.q = self._projection("q", query_shape[-1], qk)
            self.kv = self._projection("kv", context_shape[-1], sum(self._kv_widths))
        self.out = self._projection("out", v, self.output_channels)
        if self.qk_norm:
            head = (None, None, None, qk // self.num_heads)
            self.q_norm = keras.layers.LayerNormalization(epsilon=self.qk_norm_epsilon, name="q_norm", dtype=self.dtype_policy)
            self.k_norm = keras.layers.LayerNormalization(epsilon=self.qk_norm_epsilon, name="k_norm", dtype=self.dtype_policy)
            self.q_norm.build(head)
            self.k_norm.build(head)

    @staticmethod
    def _apply(x, projection):
        kernel, bias = projection
        y = ops.matmul(x, kernel)
        return y if bias is None else y + bias

    def _split_heads(self, x, heads=None):
        shape = ops.shape(x)
        heads = heads or self.num_heads
        return ops.reshape(x, (shape[0], shape[1], heads, x.shape[-1] // heads))

    def call(self, query, context=None, key_mask=None):
        if context is not None and self._moves_projections(query.shape[1], context.shape[-1]):
            return self._apply(self._attend_to_context(query, context, key_mask), self.out)
        qk = self.qk_channels
        # Rank-3 slices, not `x[..., a:b]` (no TFLite builtin) nor ops.split (its torch
        # lowering makes sizes data-dependent for torch.export).
        if self.self_attention:
            qkv = self._apply(query, self.qkv)
            q, k, v = qkv[:, :, :qk], qkv[:, :, qk : 2 * qk], qkv[:, :, 2 * qk :]
        else:
            q = self._apply(query, self.q)
            kv = self._apply(context, self.kv)
            kv_qk = self._kv_widths[0]
            k, v = kv[:, :, :kv_qk], kv[:, :, kv_qk:]
        q, k, v = self._split_heads(q), self._split_heads(k, self._kv_heads), self._split_heads(v, self._kv_heads)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(
            q,
            k,
            v,
            key_mask=key_mask,
            score_budget_bytes=self.score_budget_bytes,
        )
        out = ops.reshape(out, (ops.shape(out)[0], -1, self.v_channels))
        return self._apply(out, self.out)

    def _attend_to_context(self, query, context, key_mask):
        """Cross-attention with the key and value projections moved to the queries' side:
        logits_h = (q_h Wk_h^T) x^T and out_h = (p_h x) Wv_h, so the context is never projected.
        An all-ones context channel carries the key and value biases exactly (a row with no
        key still gives zeros). Returns (batch, queries, v_channels)."""
        kernel, bias = self.kv
        heads, qk, v = self.num_heads, self.qk_channels, self.v_channels
        if bias is not None:
            kernel = ops.concatenate([kernel, ops.expand_dims(bias, 0)], axis=0)
            context = ops.concatenate([context, ops.ones_like(context[:, :, :1])], axis=-1)
        width = kernel.shape[0]
        key_kernel = ops.transpose(ops.reshape(kernel[:, :qk], (width, heads, qk // heads)), (1, 2, 0))
        value_kernel = ops.transpose(ops.reshape(kernel[:, qk:], (width, heads, v // heads)), (1, 0, 2))
        q_context = _per_head_matmul(self._split_heads(self._apply(query, self.q)), key_kernel)
        x = ops.expand_dims(context, 2)  # (B, M, 1, width): one key head shared by all heads
        out = attention(
            q_context, x, x, key_mask=key_mask, score_budget_bytes=self.score_budget_bytes,
            scale=1.0 / math.sqrt(qk // heads),
        )
        out = _per_head_matmul(out, value_kernel)  # (B, N, H, v / H)
        return ops.reshape(out, (ops.shape(out)[0], -1, v))

    def flops(self, num_queries, num_keys=None):
        """FLOPs of the matrix products of one call (built layer), per example: `num_queries`
        query rows attending to `num_keys` context rows (self-attention: to the queries).
        Counts what `call` computes, the moved projections included; grouped-query attention
        projects fewer keys and values but scores every query head."""
        qk, v, heads = self.qk_channels, self.v_channels, self.num_heads
        output = matmul_flops(num_queries, v, self.output_channels)
        if self.self_attention:
            num_keys = num_queries
            projections = matmul_flops(num_queries, self.qkv[0].shape[0], 2 * qk + v)
        else:
            query_channels, context_channels = self.q[0].shape[0], self.kv[0].shape[0]
            if self._moves_projections(num_queries, context_channels):
                width = context_channels + (1 if self.use_bias else 0)  # the all-ones bias channel
                return (
                    matmul_flops(num_queries, query_channels, qk)
                    + matmul_flops(num_queries, width, qk + v)  # q_h Wk_h^T and (p_h x) Wv_h
                    + 2 * matmul_flops(heads * num_queries, width, num_keys)  # logits and p_h x
                    + output
                )
            projections = matmul_flops(num_queries, query_channels, qk) + matmul_flops(
                num_keys, context_channels, sum(self._kv_widths)
            )
        return projections + matmul_flops(num_queries, num_keys, qk + v) + output

    def compute_output_shape(self, query_shape, context_shape=None):
        return tuple(query_shape[:-1]) + (self.output_channels,)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "qk_channels": self.qk_channels,
            "v_channels": self.v_channels,
            "output_channels": self.output_channels,
            "use_bias": self.use_bias,
            "self_attention": self.self_attention,
            "score_budget_bytes": self.score_budget_bytes,
            "num_key_value_heads": self.num_key_value_heads,
            "qk_norm": self.qk_norm,
            "qk_norm_epsilon": self.qk_norm_epsilon,
        }
