"""Perceiver (classifier) and Perceiver IO (queried decoder) as functional models."""

import dataclasses
import math
from typing import Optional, Union

import keras
from keras import ops

from keras_perceiver.layers.adapters import (
    FeatureInput,
    GridMask,
    TiedEmbeddingLogits,
    TokenInput,
    TypedSpec,
    ZeroMasked,
    build_input_adapter,
    check_bool,
    check_int,
    dims_tuple,
    input_spec,
    spec_from,
)
from keras_perceiver.layers.attention import dense_flops
from keras_perceiver.layers.blocks import CrossAttentionBlock
from keras_perceiver.layers.encoder import EncoderConfig, PerceiverEncoder
from keras_perceiver.layers.position_encoding import FourierPositionEncoding, TrainablePositionEncoding
from keras_perceiver.models.base import ConfiguredModel, check_index_range, check_mask_matches


def _default_input_adapter():
    return {"type": "features", "input_channels": 3, "index_dims": [224, 224], "num_bands": 64}


@dataclasses.dataclass
class _ReadWriteConfig(EncoderConfig):
    """Fields shared by Perceiver and Perceiver IO: the input adapter and the decoder.

    `input_adapter`: a `FeatureInput` (arrays, default 224 x 224 x 3 with 64 Fourier bands)
    or a `TokenInput` (token ids), or its dict form (`{"type": "features" | "tokens", field:
    value, ...}`), read into the typed spec; `get_config()` writes the dict form.
    """

    input_adapter: Union[FeatureInput, TokenInput, dict] = dataclasses.field(default_factory=_default_input_adapter)
    use_input_mask: bool = False
    decoder_num_heads: int = 1
    decoder_qk_channels: Optional[int] = None
    decoder_v_channels: Optional[int] = None
    decoder_widening_factor: int = 1
    decoder_use_query_residual: bool = True

    def __post_init__(self):
        self.input_adapter = input_spec(self.input_adapter)


def _encode(config, dtype):
    """Named inputs -> adapter -> encoder. Returns (inputs dict, adapted inputs, latents, adapter)."""
    spec = config.input_adapter
    if isinstance(spec, TokenInput):
        inputs = {"token_ids": keras.Input((None,), dtype="int32", name="token_ids")}
        mask_shape = (None,)
    else:
        shape = spec.index_dims + (spec.input_channels,)
        inputs = {"inputs": keras.Input(shape, name="inputs")}
        mask_shape = shape[:-1]
    if config.use_input_mask:
        inputs["input_mask"] = keras.Input(mask_shape, dtype="bool", name="input_mask")
    adapter = build_input_adapter(spec, dtype=dtype)
    data = next(iter(inputs.values()))
    mask = None
    if config.use_input_mask:
        data = ZeroMasked(name="zero_masked_inputs", dtype=dtype)(data, inputs["input_mask"])
        if isinstance(spec, FeatureInput) and (spec.patches or spec.conv_stem_channels):
            mask = GridMask(
                spec.patch_size, spec.temporal_patch_size, conv_stem=not spec.patches, name="grid_mask"
            )(inputs["input_mask"])
        else:
            mask = keras.layers.Reshape((-1,), name="flatten_mask")(inputs["input_mask"])
    x = adapter(data)
    latents = PerceiverEncoder(config.encoder_config(), name="encoder", dtype=dtype)(x, input_mask=mask)
    return inputs, x, latents, adapter


def _decode(config, queries, latents, dtype):
    return CrossAttentionBlock(
        num_heads=config.decoder_num_heads,
        qk_channels=config.decoder_qk_channels,
        v_channels=config.decoder_v_channels,
        widening_factor=config.decoder_widening_factor,
        use_query_residual=config.decoder_use_query_residual,
        activation=config.activation,
        name="decoder",
        dtype=dtype,
    )(queries, latents)


class _ReadWriteModel(ConfiguredModel):
    mask_input = "input_mask"

    def check_input_relations(self, inputs):
        if "input_mask" in inputs:
            data = "token_ids" if "token_ids" in inputs else "inputs"
            expected = inputs[data].shape if data == "token_ids" else inputs[data].shape[:-1]
            check_mask_matches(self, "input_mask", inputs["input_mask"].shape, data, expected)
        spec = self.config.input_adapter
        if "token_ids" in inputs and inputs["token_ids"].shape[1] is not None:
            if inputs["token_ids"].shape[1] > spec.max_positions:
                raise ValueError(
                    f"{type(self).__name__}: input 'token_ids' may have at most max_positions="
                    f"{spec.max_positions} tokens; received shape {tuple(inputs['token_ids'].shape)}"
                )

    def check_input_values(self, inputs):
        if "token_ids" in inputs:
            vocab = self.config.input_adapter.vocab_size
            check_index_range(self, "token_ids", inputs["token_ids"], vocab, "token ids", "vocab_size")

    @property
    def primary_input(self):
        return "token_ids" if isinstance(self.config.input_adapter, TokenInput) else "inputs"

    def _read_flops(self, shapes):
        """(FLOPs per example of the input adapter and the encoder, adapted input rows)."""
        if "token_ids" in shapes:  # tokens: an embedding lookup, no product
            rows, flops = shapes["token_ids"][1], 0
        else:
            adapter, index_dims = self.get_layer("input_adapter"), shapes["inputs"][1:-1]
            rows, flops = math.prod(adapter.grid_dims(index_dims)), adapter.flops(index_dims)
        return flops + self.get_layer("encoder").flops(rows), rows


@dataclasses.dataclass
class PerceiverConfig(_ReadWriteConfig):
    """`input_adapter`: a `FeatureInput` or `TokenInput` (`keras_perceiver.layers`), or its
    dict form; see `_ReadWriteConfig`."""

    num_classes: int = 1000
    # "mean": average the latents (the Perceiver paper); "query": one learned query
    # cross-attends the latents (the transformers classification decoder).
    pooling: str = "mean"

    def validate(self):
        super().validate()
        if self.pooling not in ("mean", "query"):
            raise ValueError(f"`pooling` must be 'mean' or 'query'; received {self.pooling!r}")


@keras.saving.register_keras_serializable(package="keras_perceiver")
class Perceiver(_ReadWriteModel):
    """Perceiver classifier: inputs -> latents -> pooled -> logits (batch, num_classes)."""

    config_class = PerceiverConfig

    @classmethod
    def build_graph(cls, config, dtype):
        inputs, _, latents, _ = _encode(config, dtype)
        if config.pooling == "mean":
            pooled = ops.mean(latents, axis=1)
        else:
            query = TrainablePositionEncoding((1,), config.latent_channels, name="decoder_query", dtype=dtype)(latents)
            pooled = _decode(config, query, latents, dtype)[:, 0]
        logits = keras.layers.Dense(config.num_classes, name="logits", dtype=dtype)(pooled)
        return inputs, logits

    def _flops_from_shapes(self, shapes):
        flops, _ = self._read_flops(shapes)
        if self.config.pooling == "query":
            flops += self.get_layer("decoder").flops(1, self.config.num_latents)
        flops += dense_flops(self.get_layer("logits"), 1)
        return shapes[self.primary_input][0] * flops


@dataclasses.dataclass(frozen=True)
class LearnedQueries(TypedSpec):
    """Learned output queries: output (batch, num_queries, channels). Dict form
    `{"type": "learned", ...}`. Both fields are required ints >= 1.

    num_queries: the number of queries (outputs).
    channels: the width of each query.
    """

    kind = "learned"
    num_queries: int
    channels: int

    def __post_init__(self):
        check_int(self, "num_queries", self.num_queries)
        check_int(self, "channels", self.channels)


@dataclasses.dataclass(frozen=True)
class FourierQueries(TypedSpec):
    """Fourier features of an output grid as queries, one per output element: output
    (batch, *index_dims, channels). Dict form `{"type": "fourier", ...}`. Lists are kept as tuples.

    index_dims (required): the output grid, a list of ints >= 1.
    num_bands (required): frequency bands per axis, an int >= 1.
    max_resolution (None): the resolution the bands span (default: index_dims).
    concat_pos (True): the features include the positions themselves.
    sine_only (False): sines only (no cosines).
    """

    kind = "fourier"
    index_dims: tuple
    num_bands: int
    max_resolution: Optional[tuple] = None
    concat_pos: bool = True
    sine_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "index_dims", dims_tuple(self, "index_dims", self.index_dims))
        check_int(self, "num_bands", self.num_bands)
        object.__setattr__(
            self, "max_resolution", dims_tuple(self, "max_resolution", self.max_resolution, optional=True)
        )
        check_bool(self, "concat_pos", self.concat_pos)
        check_bool(self, "sine_only", self.sine_only)


@dataclasses.dataclass(frozen=True)
class InputQueries(TypedSpec):
    """The adapted inputs themselves are the queries (dense prediction on the input grid, e.g.
    optical flow); needs a `FeatureInput`. Dict form `{"type": "inputs"}`; no fields."""

    kind = "inputs"


QUERY_SPECS = (LearnedQueries, FourierQueries, InputQueries)


def _default_output_queries():
    return {"type": "learned", "num_queries": 1, "channels": 1280}


@dataclasses.dataclass
class PerceiverIOConfig(_ReadWriteConfig):
    """`output_queries`: `LearnedQueries` (default: 1 query of 1280 channels), `FourierQueries`
    or `InputQueries`, or its dict form (`{"type": "learned" | "fourier" | "inputs", field:
    value, ...}`), read into the typed spec; `get_config()` writes the dict form. See
    `_ReadWriteConfig` for `input_adapter`."""

    output_queries: Union[LearnedQueries, FourierQueries, InputQueries, dict] = dataclasses.field(
        default_factory=_default_output_queries
    )
    output_channels: Optional[int] = None  # a final projection of the decoded queries
    output_scale: float = 1.0  # multiplies the outputs (the flow model predicts flow / 100)
    # Token logits through the input embedding plus a bias (the masked language model).
    tie_output_to_input_embedding: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.output_queries = spec_from("output_queries", self.output_queries, QUERY_SPECS)

    def validate(self):
        super().validate()
        if self.tie_output_to_input_embedding and (
            not isinstance(self.input_adapter, TokenInput) or self.output_channels
        ):
            raise ValueError(
                "`tie_output_to_input_embedding` needs a 'tokens' input_adapter and no output_channels; "
                f"received input_adapter type {self.input_adapter.kind!r}, output_channels={self.output_channels}"
            )
        if isinstance(self.output_queries, InputQueries) and not isinstance(self.input_adapter, FeatureInput):
            raise ValueError(
                "output_queries of type 'inputs' need a 'features' input_adapter; "
                f"received input_adapter type {self.input_adapter.kind!r}"
            )


@keras.saving.register_keras_serializable(package="keras_perceiver")
class PerceiverIO(_ReadWriteModel):
    """Perceiver IO: inputs -> latents -> output queries cross-attend -> outputs.

    Output: (batch, num_queries, channels), or (batch, *index_dims, channels) for Fourier
    queries over an output grid and for input queries over the adapted input grid.
    """

    config_class = PerceiverIOConfig

    @classmethod
    def build_graph(cls, config, dtype):
        inputs, adapted, latents, adapter = _encode(config, dtype)
        spec = config.output_queries
        if isinstance(spec, InputQueries):
            queries, index_dims = adapted, tuple(adapter.grid_dims())
            if None in index_dims:
                index_dims = (None,)
        elif isinstance(spec, LearnedQueries):
            index_dims = (spec.num_queries,)
            queries = TrainablePositionEncoding(index_dims, spec.channels, name="output_queries", dtype=dtype)(
                latents
            )
        else:
            index_dims = spec.index_dims
            queries = FourierPositionEncoding(
                spec.num_bands,
                spec.max_resolution or index_dims,
                spec.concat_pos,
                spec.sine_only,
                index_dims=index_dims,
                name="output_queries",
                dtype=dtype,
            )(latents)
        outputs = _decode(config, queries, latents, dtype)
        if config.output_channels:
            outputs = keras.layers.Dense(config.output_channels, name="output_projection", dtype=dtype)(outputs)
        if config.output_scale != 1.0:
            # a layer, not `outputs * scale`: the functional op traces to aten.multiply, which
            # coremltools does not convert
            outputs = keras.layers.Rescaling(config.output_scale, name="output_scale", dtype=dtype)(outputs)
        if config.tie_output_to_input_embedding:
            outputs = TiedEmbeddingLogits(adapter.embedding, name="token_logits", dtype=dtype)(outputs)
        if len(index_dims) > 1:
            outputs = keras.layers.Reshape(index_dims + (outputs.shape[-1],), name="output_grid", dtype=dtype)(outputs)
        return inputs, outputs

    def _flops_from_shapes(self, shapes):
        c = self.config
        flops, rows = self._read_flops(shapes)
        spec = c.output_queries
        if isinstance(spec, InputQueries):  # the adapted inputs query their own outputs
            queries = rows
        elif isinstance(spec, LearnedQueries):
            queries = spec.num_queries
        else:
            queries = math.prod(spec.index_dims)
        flops += self.get_layer("decoder").flops(queries, c.num_latents)
        if c.output_channels:
            flops += dense_flops(self.get_layer("output_projection"), queries)
        if c.tie_output_to_input_embedding:
            flops += self.get_layer("token_logits").flops(queries)
        return shapes[self.primary_input][0] * flops
