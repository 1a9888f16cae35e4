from keras_perceiver.models.perceiver import (
    FourierQueries,
    InputQueries,
    LearnedQueries,
    Perceiver,
    PerceiverConfig,
    PerceiverIO,
    PerceiverIOConfig,
)
from keras_perceiver.models.resampler import PerceiverResampler, PerceiverResamplerConfig
from keras_perceiver.models.multimodal import PerceiverMultimodalAutoencoder, PerceiverMultimodalConfig
