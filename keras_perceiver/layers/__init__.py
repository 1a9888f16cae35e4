"""Backend-agnostic building blocks (keras.ops only)."""

from keras_perceiver.layers.adapters import (
    FeatureAdapter,
    FeatureInput,
    GridMask,
    TokenAdapter,
    TokenInput,
    ZeroMasked,
    build_input_adapter,
)
from keras_perceiver.layers.attention import MultiHeadAttention, attention, zero_masked
from keras_perceiver.layers.blocks import CrossAttentionBlock, FeedForward, SelfAttentionBlock
from keras_perceiver.layers.encoder import EncoderConfig, PerceiverEncoder
from keras_perceiver.layers.gated_cross_attention import GatedCrossAttentionBlock
from keras_perceiver.layers.position_encoding import (
    FourierPointEncoding,
    FourierPositionEncoding,
    TrainablePositionEncoding,
    fourier_features,
    grid_positions,
)
from keras_perceiver.layers.resampler import Resampler, ResamplerBlock, ResamplerConfig, interpolate_embeddings
