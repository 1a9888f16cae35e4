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

from keras_perceiver.converters.common import STATE_DICT_SUFFIXES


def _is_idefics_checkpoint(source):
    from keras_perceiver.converters.idefics import is_idefics_checkpoint

    return Path(source).is_dir() and is_idefics_checkpoint(source)


def model_from_checkpoint(source, num_heads=8):
    """The keras_perceiver model of a checkpoint: a flamingo-pytorch / OpenFlamingo state
    dict file (`.pt`, `.pth`, `.bin`), a transformers Perceiver `save_pretrained` directory,
    or a transformers Idefics2 / Idefics directory, of which only the connector is read (the
    safetensors index says which shards hold it; only those are opened)."""
    if str(source).endswith(STATE_DICT_SUFFIXES):
        if not Path(source).is_file():
            raise ValueError(f"convert: `source` {str(source)!r} looks like a state dict file but does not exist")
        import torch

        from keras_perceiver.converters.flamingo import resampler_from_state_dict

        state = torch.load(source, map_location="cpu", weights_only=True)
        return resampler_from_state_dict(state, num_heads=num_heads)
    if _is_idefics_checkpoint(source):
        from keras_perceiver.converters.idefics import from_checkpoint_directory

        return from_checkpoint_directory(source)
    from keras_perceiver.converters.transformers_perceiver import from_transformers

    return from_transformers(str(source))


def model_from_hub(repo, num_heads=8, revision="main", filename=None, progress=None):
    """`model_from_checkpoint` of a hub repository (`org/name`), fetching only what the
    converter reads (see `converters.hub`); nothing is left behind but the local cache's own."""
    import tempfile

    from keras_perceiver.converters.hub import fetch_checkpoint

    with tempfile.TemporaryDirectory(prefix="keras-perceiver-fetch-") as into:
        return model_from_checkpoint(fetch_checkpoint(repo, into, revision, filename, progress), num_heads=num_heads)


def convert_checkpoint(source, out, num_heads=8, overwrite=False):
    """Convert `source` and write a preset directory at `out` (see `save_to_preset`).

    `source`: what `model_from_checkpoint` reads, or a hub id (`org/name`, or
    `org/name/checkpoint.pt` for a state dict file) fetched with `model_from_hub`.
    """
    from keras_perceiver.converters.hub import is_hub_id
    from keras_perceiver.presets import is_preset_directory, save_to_preset
    from keras_perceiver.storage import check_target

    # checked before the (long) conversion; save_to_preset checks again before it writes
    protected = [source] if Path(source).exists() else ()
    out = check_target(out, "convert", overwrite, is_preset_directory, sources=protected)
    if is_hub_id(source):
        parts = str(source).split("/")
        repo, filename = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
        from keras_perceiver.converters.hub import CheckpointFetchError

        try:
            model = model_from_hub(repo, num_heads=num_heads, filename=filename, progress=_stderr)
        except CheckpointFetchError as error:
            raise CheckpointFetchError(
                f"convert: {error}. Nothing was written; without the hub, copy the checkpoint here and pass its directory or file"
            ) from None
        source = f"hf://{source}"
    else:
        model = model_from_checkpoint(source, num_heads=num_heads)
    return save_to_preset(model, out, overwrite=overwrite, source=str(source), protected=protected)


def _stderr(line):
    import sys

    print(f"convert: {line}", file=sys.stderr, flush=True)
