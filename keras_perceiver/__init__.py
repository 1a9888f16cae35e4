"""keras_perceiver: the Perceiver family written once in Keras 3.

The names below are imported on first use (`kp.from_preset`, `from keras_perceiver import
layers`), so that `import keras_perceiver` alone, which every entry point does (the
`keras-perceiver` command, `python -m keras_perceiver`), imports neither Keras nor a backend.
A `.keras` file of these models loads once their classes are registered: after any use of
`keras_perceiver.models` (or a name from it).
"""

import importlib

from keras_perceiver.version import __version__

# public name -> the module that defines it (a name equal to its module's last part is the module)
_LAZY = {
    "layers": "keras_perceiver.layers",
    "models": "keras_perceiver.models",
    "Perceiver": "keras_perceiver.models",
    "PerceiverConfig": "keras_perceiver.models",
    "PerceiverIO": "keras_perceiver.models",
    "PerceiverIOConfig": "keras_perceiver.models",
    "PerceiverMultimodalAutoencoder": "keras_perceiver.models",
    "PerceiverMultimodalConfig": "keras_perceiver.models",
    "PerceiverResampler": "keras_perceiver.models",
    "PerceiverResamplerConfig": "keras_perceiver.models",
    "from_preset": "keras_perceiver.presets",
    "list_presets": "keras_perceiver.presets",
    "save_to_preset": "keras_perceiver.presets",
    "finetune": "keras_perceiver.finetuning",  # not `.finetune`: importing it would rebind the name to the module
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'keras_perceiver' has no attribute {name!r}")
    importlib.import_module("keras_perceiver.models")  # registers the model classes presets and .keras files name
    module = importlib.import_module(_LAZY[name])
    value = module if _LAZY[name].endswith("." + name) else getattr(module, name)
    globals()[name] = value  # later reads skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
