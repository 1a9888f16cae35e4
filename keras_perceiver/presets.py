"""The preset registry: `from_preset`, `list_presets`, `save_to_preset`.

A zoo preset is one JSON file in `keras_perceiver.zoo` (`zoo/<name>.json`: class, config,
description, parameter count, provenance, the paper's headline figure, and the weights
file it ships, if any). A preset directory (what `save_to_preset` writes, or a converted
checkpoint) holds `config.json`, `model.weights.h5` and `metadata.json`.
"""

import difflib
import fnmatch
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import keras

from keras_perceiver.models import Perceiver, PerceiverIO, PerceiverMultimodalAutoencoder, PerceiverResampler

MODEL_CLASSES = {
    cls.__name__: cls for cls in (Perceiver, PerceiverIO, PerceiverMultimodalAutoencoder, PerceiverResampler)
}
CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE = "config.json", "model.weights.h5", "metadata.json"
HF_PREFIX = "hf://"


def _zoo_dir():
    return resources.files("keras_perceiver.zoo")


def zoo_entries():
    """{name: entry dict} for every preset file in the zoo."""
    entries = {}
    for item in _zoo_dir().iterdir():
        if item.name.endswith(".json"):
            entry = json.loads(item.read_text())
            entries[entry["name"]] = entry
    return dict(sorted(entries.items()))


def list_presets(pattern=None):
    """Preset names, optionally filtered with shell wildcards (`"*flamingo*"`)."""
    names = list(zoo_entries())
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def download_from_hub(handle):
    """`hf://org/name` -> local directory. The hub client is imported only here."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(
            f"Loading {handle!r} needs the Hugging Face hub client: pip install huggingface_hub"
        ) from error
    return snapshot_download(handle[len(HF_PREFIX) :])


def resolve_preset(name_or_path, downloader=None):
    """-> ("zoo", entry) or ("directory", Path). Raises ValueError naming close matches."""
    name_or_path = os.fspath(name_or_path)
    entries = zoo_entries()
    if name_or_path in entries:
        return "zoo", entries[name_or_path]
    if name_or_path.startswith(HF_PREFIX):
        return "directory", Path((downloader or download_from_hub)(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"preset directory {str(path)!r} has no {CONFIG_FILE}")
        return "directory", path
    close = difflib.get_close_matches(name_or_path, entries, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown preset {name_or_path!r}: not a zoo name, a preset directory or an hf:// handle.{hint} "
        f"Known presets: {', '.join(entries)}"
    )


def _model_class(class_name, expected_class=None):
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"preset class must be one of {sorted(MODEL_CLASSES)}; received {class_name!r}")
    cls = MODEL_CLASSES[class_name]
    if expected_class is not None and not issubclass(cls, expected_class):
        raise ValueError(
            f"{expected_class.__name__}.from_preset: the preset holds a {class_name}; "
            f"use keras_perceiver.from_preset or {class_name}.from_preset"
        )
    return cls


def from_preset(name_or_path, load_weights=True, expected_class=None, **overrides):
    """Build a model from a zoo name, a preset directory or an `hf://org/name` handle.

    `overrides` replace config fields (e.g. `depth=2` for a small variant). A zoo preset
    that ships no weights only builds with `load_weights=False`.
    """
    kind, source = resolve_preset(name_or_path)
    if kind == "zoo":
        cls = _model_class(source["class_name"], expected_class)
        model = cls(source["config"], name=source["name"], **overrides)
        if load_weights:
            if not source.get("weights"):
                raise ValueError(
                    f"Preset {source['name']!r} ships no weights. Convert the original checkpoint with "
                    f"`{source['provenance'].get('convert', 'keras-perceiver convert ...')}` and load the "
                    f"directory it writes, or pass load_weights=False for random weights."
                )
            with resources.as_file(_zoo_dir() / source["weights"]) as weights_path:
                model.load_weights(weights_path)
        return model
    saved = json.loads((source / CONFIG_FILE).read_text())
    cls = _model_class(saved["class_name"], expected_class)
    model = cls(saved["config"], **overrides)
    if load_weights:
        weights_path = source / WEIGHTS_FILE
        if not weights_path.is_file():
            raise ValueError(f"preset directory {str(source)!r} has no {WEIGHTS_FILE}; pass load_weights=False")
        model.load_weights(weights_path)
    return model


def save_to_preset(model, path, overwrite=False, source=None):
    """Write `config.json`, `model.weights.h5` and `metadata.json` into directory `path`.

    Written to a temporary directory first, then moved into place; an existing `path` is
    replaced only with `overwrite=True`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_to_preset: {str(path)!r} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (staging / CONFIG_FILE).write_text(
            json.dumps({"class_name": type(model).__name__, "config": model.get_config()["config"]}, indent=2)
        )
        model.save_weights(staging / WEIGHTS_FILE)
        metadata = {
            "keras_version": keras.version(),
            "keras_perceiver_version": __import__("keras_perceiver").__version__,
            "parameter_count": model.count_params(),
            "source": source or "keras_perceiver",
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def zoo_table():
    """The README's zoo table, generated from the zoo files."""
    lines = [
        "| preset | family | parameters | weights | converts from | paper figure |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in zoo_entries().items():
        weights = "shipped" if entry.get("weights") else "convert"
        lines.append(
            f"| `{name}` | {entry['class_name']} | {entry['parameter_count'] / 1e6:.1f} M | {weights} | "
            f"{entry['provenance'].get('checkpoint', '-')} | {entry.get('paper_figure', '-')} |"
        )
    return "\n".join(lines)
