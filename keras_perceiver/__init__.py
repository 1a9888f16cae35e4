"""keras_perceiver: the Perceiver family written once in Keras 3."""

from keras_perceiver.version import __version__  # noqa: F401

from keras_perceiver import layers, models
from keras_perceiver.models import (
    Perceiver,
    PerceiverConfig,
    PerceiverIO,
    PerceiverIOConfig,
    PerceiverMultimodalAutoencoder,
    PerceiverMultimodalConfig,
    PerceiverResampler,
    PerceiverResamplerConfig,
)
from keras_perceiver.presets import from_preset, list_presets, save_to_preset
