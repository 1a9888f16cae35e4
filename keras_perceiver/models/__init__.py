from keras_perceiver.models.perceiver import Perceiver, PerceiverConfig, PerceiverIO, PerceiverIOConfig
from keras_perceiver.models.resampler import PerceiverResampler, PerceiverResamplerConfig
