"""The preset registry's data: one small file per preset (keras_perceiver.zoo)."""
