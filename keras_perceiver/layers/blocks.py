"""Attention blocks: feed-forward, cross-attention and latent self-attention."""

import keras
from keras import ops

from keras_perceiver.layers.attention import MultiHeadAttention, attention_widths, dense_flops

LAYER_NORM_EPSILON = 1e-5  # what the reference checkpoints actually use


def get_activation(name):
    """GELU is the exact (erf) form, as in the references; `squared_relu` is Primer's."""
    if name == "gelu":
        # The backend's own kernel (one op on PyTorch eager instead of five passes over the
        # widest activation); every export route converts it (TFLite and OpenVINO read TF's Erfc).
        return lambda x: ops.gelu(x, approximate=False)
    if name == "gelu_approximate":
        return lambda x: keras.activations.gelu(x, approximate=True)
    if name == "squared_relu":
        return lambda x: ops.square(ops.relu(x))
    if name == "relu":
        return keras.activations.relu
    raise ValueError(
        "`activation` must be one of 'gelu', 'gelu_approximate', 'squared_relu', 'relu'; "
        f"received {name!r}"
    )


def layer_norm(name, dtype=None):
    return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name, dtype=dtype)


NORMS = ("layer", "rms")


def make_norm(kind, name, dtype=None, epsilon=LAYER_NORM_EPSILON):
    """"layer": LayerNorm (scale and offset); "rms": RMSNorm (scale only, as T5 / Llama /
    Idefics2: x / sqrt(mean(x^2) + eps) * scale)."""
    if kind == "layer":
        return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype)
    if kind == "rms":
        return keras.layers.RMSNormalization(epsilon=epsilon, name=name, dtype=dtype)
    raise ValueError(f"`norm` must be one of {NORMS}; received {kind!r}")


def _swiglu(gate, up):
    return ops.silu(gate) * up


@keras.saving.register_keras_serializable(package="keras_perceiver")
class GatedProjection(keras.layers.Layer):
    """SwiGLU MLP without norm or biases: dense_out(silu(dense_gate(x)) * dense_in(x)), from
    the input width to `output_channels` through `hidden_channels` (Idefics2's modality
    projection)."""

    def __init__(self, hidden_channels, output_channels, **kwargs):
        super().__init__(**kwargs)
        self.hidden_channels = hidden_channels
        self.output_channels = output_channels

    def build(self, input_shape):
        hidden = tuple(input_shape[:-1]) + (self.hidden_channels,)
        self.dense_gate = keras.layers.Dense(self.hidden_channels, use_bias=False, name="dense_gate", dtype=self.dtype_policy)
        self.dense_in = keras.layers.Dense(self.hidden_channels, use_bias=False, name="dense_in", dtype=self.dtype_policy)
        self.dense_out = keras.layers.Dense(self.output_channels, use_bias=False, name="dense_out", dtype=self.dtype_policy)
        self.dense_gate.build(input_shape)
        self.dense_in.build(input_shape)
        self.dense_out.build(hidden)

    def call(self, x):
        return self.dense_out(_swiglu(self.dense_gate(x), self.dense_in(x)))

    def flops(self, rows):
        """FLOPs of the three matrix products for `rows` rows (built layer)."""
        return sum(dense_flops(layer, rows) for layer in (self.dense_gate, self.dense_in, self.dense_out))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_channels,)

    def get_config(self):
        return {**super().get_config(), "hidden_channels": self.hidden_channels, "output_channels": self.output_channels}


@keras.saving.register_keras_serializable(package="keras_perceiver")
class FeedForward(keras.layers.Layer):
    """LN -> Dense(widening * width) -> activation -> Dense(width). Returns the update only.

    `activation="swiglu"`: silu(dense_gate(x)) * dense_in(x) in place of the activation (a
    third, gating Dense). `norm`: "layer" or "rms" (`make_norm`), with `norm_epsilon`.
    """

    def __init__(
        self, widening_factor=1, activation="gelu", use_bias=True, norm="layer", norm_epsilon=LAYER_NORM_EPSILON, **kwargs
    ):
        super().__init__(**kwargs)
        self.widening_factor = widening_factor
        self.activation = activation
        self.use_bias = use_bias
        self.norm_kind = norm
        self.norm_epsilon = norm_epsilon
        self._activation_fn = None if activation == "swiglu" else get_activation(activation)

    def build(self, input_shape):
        width = input_shape[-1]
        self.norm = make_norm(self.norm_kind, "norm", self.dtype_policy, self.norm_epsilon)
        self.dense_in = keras.layers.Dense(
            width * self.widening_factor, use_bias=self.use_bias, name="dense_in", dtype=self.dtype_policy
        )
        if self.activation == "swiglu":
            self.dense_gate = keras.layers.Dense(
                width * self.widening_factor, use_bias=self.use_bias, name="dense_gate", dtype=self.dtype_policy
            )
            self.dense_gate.build(input_shape)
        self.dense_out = keras.layers.Dense(
            width, use_bias=self.use_bias, name="dense_out", dtype=self.dtype_policy
        )
        self.norm.build(input_shape)
        self.dense_in.build(input_shape)
        self.dense_out.build(tuple(input_shape[:-1]) + (width * self.widening_factor,))

    def call(self, x):
        x = self.norm(x)
        if self.activation == "swiglu":
            return self.dense_out(_swiglu(self.dense_gate(x), self.dense_in(x)))
        return self.dense_out(self._activation_fn(self.dense_in(x)))

    def flops(self, rows):
        """FLOPs of the matrix products for `rows` rows (built layer): two, three with SwiGLU."""
        layers = (self.dense_in, self.dense_out) + ((self.dense_gate,) if self.activation == "swiglu" else ())
        return sum(dense_flops(layer, rows) for layer in layers)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "widening_factor": self.widening_factor,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "norm": self.norm_kind,
            "norm_epsilon": self.norm_epsilon,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class CrossAttentionBlock(keras.layers.Layer):
    """Queries attend to a context (Perceiver read / Perceiver IO write).

    `q = LN_q(queries)`, `k, v` from `LN_kv(context)`; q/k width defaults to the context
    width and v width to the q/k width; output width is the query width. Then an optional
    query residual and a residual feed-forward.
    """

    def __init__(
        self,
        num_heads=1,
        qk_channels=None,
        v_channels=None,
        widening_factor=1,
        use_query_residual=True,
        activation="gelu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.qk_channels = qk_channels
        self.v_channels = v_channels
        self.widening_factor = widening_factor
        self.use_query_residual = use_query_residual
        self.activation = activation

    def build(self, queries_shape, context_shape):
        qk, v = attention_widths(context_shape[-1], self.qk_channels, self.v_channels)
        self.query_norm = layer_norm("query_norm", self.dtype_policy)
        self.context_norm = layer_norm("context_norm", self.dtype_policy)
        self.attention = MultiHeadAttention(
            self.num_heads, qk, v, queries_shape[-1], name="attention", dtype=self.dtype_policy
        )
        self.feed_forward = FeedForward(
            self.widening_factor, self.activation, name="feed_forward", dtype=self.dtype_policy
        )
        self.query_norm.build(queries_shape)
        self.context_norm.build(context_shape)
        self.attention.build(queries_shape, context_shape)
        self.feed_forward.build(queries_shape)

    def call(self, queries, context, key_mask=None):
        x = self.attention(self.query_norm(queries), self.context_norm(context), key_mask=key_mask)
        if self.use_query_residual:
            x = x + queries
        return x + self.feed_forward(x)

    def flops(self, num_queries, num_keys):
        """FLOPs of the matrix products of one call (built block), per example."""
        return self.attention.flops(num_queries, num_keys) + self.feed_forward.flops(num_queries)

    def compute_output_shape(self, queries_shape, context_shape):
        return queries_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "qk_channels": self.qk_channels,
            "v_channels": self.v_channels,
            "widening_factor": self.widening_factor,
            "use_query_residual": self.use_query_residual,
            "activation": self.activation,
        }


@keras.saving.register_keras_serializable(package="keras_perceiver")
class SelfAttentionBlock(keras.layers.Layer):
    """`x + Attn(LN(x))`, then `x + FF(x)`; q/k width defaults to the input width."""

    def __init__(
        self, num_heads=8, qk_channels=None, v_channels=None, widening_factor=1, activation="gelu", **kwargs
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.qk_channels = qk_channels
        self.v_channels = v_channels
        self.widening_factor = widening_factor
        self.activation = activation

    def build(self, input_shape):
        qk, v = attention_widths(input_shape[-1], self.qk_channels, self.v_channels)
        self.norm = layer_norm("norm", self.dtype_policy)
        self.attention = MultiHeadAttention(
            self.num_heads, qk, v, input_shape[-1], self_attention=True, name="attention", dtype=self.dtype_policy
        )
        self.feed_forward = FeedForward(
            self.widening_factor, self.activation, name="feed_forward", dtype=self.dtype_policy
        )
        self.norm.build(input_shape)
        self.attention.build(input_shape)
        self.feed_forward.build(input_shape)

    def call(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.feed_forward(x)

    def flops(self, rows):
        """FLOPs of the matrix products of one call (built block) on `rows` rows, per example."""
        return self.attention.flops(rows) + self.feed_forward.flops(rows)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "qk_channels": self.qk_channels,
            "v_channels": self.v_channels,
            "widening_factor": self.widening_factor,
            "activation": self.activation,
        }
