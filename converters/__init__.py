"""Artefact export and checkpoint import (keras_perceiver.converters).

Converters take a `keras.Model` (or a preset name) and never import model internals.
"""
