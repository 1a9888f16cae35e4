"""Artefact export and checkpoint import: keras_perceiver.converters.

`export(model_or_preset, target, path)` writes and verifies a CoreML, OpenVINO, TFLite,
ONNX or SavedModel artefact (routes in `artefacts.ROUTES`). Converters take a `keras.Model`
or a checkpoint and never import model internals: weights are matched to variable paths.
"""

from pathlib import Path

from keras_perceiver.converters.artefacts import (
    ROUTES,
    ExportReport,
    ExportVerificationError,
    export,
    export_all,
    format_reports,
    read_metadata,
)

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _is_idefics_checkpoint(source):
    from keras_perceiver.converters.idefics import is_idefics_checkpoint

    return Path(source).is_dir() and is_idefics_checkpoint(source)


def convert_checkpoint(source, out, num_heads=8, overwrite=False):
    """Convert `source` and write a preset directory at `out` (see `save_to_preset`).

    `source`: a flamingo-pytorch / OpenFlamingo state dict file (`.pt`, `.pth`, `.bin`),
    or a transformers Perceiver checkpoint (a `save_pretrained` directory or a hub id,
    which needs the hub to be reachable), or a transformers Idefics2 / Idefics checkpoint
    directory (`save_pretrained` layout), of which only the connector is converted: the
    safetensors index says which shards hold it, and only those are opened.
    """
    from keras_perceiver.presets import is_preset_directory, save_to_preset
    from keras_perceiver.storage import check_target

    # checked before the (long) conversion; save_to_preset checks again before it writes
    protected = [source] if Path(source).exists() else ()
    out = check_target(out, "convert", overwrite, is_preset_directory, sources=protected)
    if str(source).endswith(STATE_DICT_SUFFIXES):
        if not Path(source).is_file():
            raise ValueError(f"convert: `source` {str(source)!r} looks like a state dict file but does not exist")
        import torch

        from keras_perceiver.converters.flamingo import resampler_from_state_dict

        state = torch.load(source, map_location="cpu", weights_only=True)
        model = resampler_from_state_dict(state, num_heads=num_heads)
    elif _is_idefics_checkpoint(source):
        from keras_perceiver.converters.idefics import from_checkpoint_directory

        model = from_checkpoint_directory(source)
    else:
        from keras_perceiver.converters.transformers_perceiver import from_transformers

        model = from_transformers(str(source))
    return save_to_preset(model, out, overwrite=overwrite, source=str(source), protected=protected)
