"""The preset registry: `from_preset`, `list_presets`, `save_to_preset`.

A zoo preset is one JSON file in `keras_perceiver.zoo` (`zoo/<name>.json`: class, config,
description, parameter count, provenance, the paper's headline figure, and the weights
file it ships, if any). A preset directory (what `save_to_preset` writes, or a converted
checkpoint) holds `config.json`, `model.weights.h5` and `metadata.json`.
"""

import dataclasses
import difflib
import fnmatch
import json
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

import keras

from keras_perceiver.storage import check_target, commit, new_staging_dir, restore_aside, sha256_of
from keras_perceiver.version import __version__

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


def _is_zoo_style_name(text):
    return "/" not in text and os.sep not in text and not text.startswith((".", "~"))


def resolve_preset(name_or_path, downloader=None):
    """-> ("zoo", entry) or ("directory", Path). Raises ValueError naming close matches.

    The rule: a bare name (no path separator, not starting with "." or "~") is a zoo name; a
    zoo name that is also a directory here is ambiguous and raises (write "./name" for the
    directory). Anything else is a path, or an `hf://` handle.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"preset: expected a zoo name, a preset directory or an hf:// handle (str or path); "
            f"received {type(name_or_path).__name__} {name_or_path!r}"
        )
    name_or_path = os.fspath(name_or_path)
    entries = zoo_entries()
    if name_or_path in entries:
        if Path(name_or_path).exists():
            raise ValueError(
                f"preset {name_or_path!r} is both a zoo preset and a path in the current directory; "
                f"expected an unambiguous name: './{name_or_path}' for the directory, or run elsewhere for the zoo preset"
            )
        return "zoo", entries[name_or_path]
    if name_or_path.startswith(HF_PREFIX):
        return "directory", Path((downloader or download_from_hub)(name_or_path))
    path = Path(name_or_path).expanduser()
    restore_aside(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"preset directory {str(path)!r} has no {CONFIG_FILE}; expected a directory save_to_preset wrote")
        return "directory", path
    if path.exists():
        raise ValueError(
            f"preset: expected a zoo name, a preset directory or an hf:// handle; received the file {name_or_path!r}"
        )
    close = difflib.get_close_matches(name_or_path, entries, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown preset {name_or_path!r}: not a zoo name, a preset directory or an hf:// handle.{hint} "
        f"Known presets: {', '.join(entries)}"
    )


def model_classes():
    """{class name: class} of the models a preset may hold, read from Keras' serialization
    registry (each model registers itself under the package "keras_perceiver"), so this
    module imports no model (they register when `keras_perceiver.models` is imported, which
    `keras_perceiver.<any name>` does). Only these classes are ever built from a preset's files."""
    prefix = "keras_perceiver>"
    classes = {
        name[len(prefix):]: obj
        for name, obj in keras.saving.get_custom_objects().items()
        if name.startswith(prefix) and isinstance(obj, type) and issubclass(obj, keras.Model)
        and getattr(obj, "config_class", None) is not None
    }
    if not classes:
        raise ImportError(
            "no keras_perceiver model class is registered: use keras_perceiver.from_preset (or import "
            "keras_perceiver.models) before keras_perceiver.presets' functions"
        )
    return classes


def preset_class(name_or_path):
    """The model class a preset holds (a zoo name or a preset directory), without building it."""
    kind, source = resolve_preset(name_or_path)
    if kind == "zoo":
        return _model_class(source["class_name"])
    return _model_class(_read_json(source / CONFIG_FILE, required=("class_name",))["class_name"])


def _model_class(class_name, expected_class=None):
    classes = model_classes()
    if class_name not in classes:
        raise ValueError(f"preset class must be one of {sorted(classes)}; received {class_name!r}")
    cls = classes[class_name]
    if expected_class is not None and not issubclass(cls, expected_class):
        raise ValueError(
            f"{expected_class.__name__}.from_preset: the preset holds a {class_name}; "
            f"use keras_perceiver.from_preset or {class_name}.from_preset"
        )
    return cls


def _read_json(path, required=()):
    """A preset's JSON file as a dict, with the keys it must hold; ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"preset file {str(path)!r} is not readable JSON ({error}); re-save or re-convert the preset") from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"preset file {str(path)!r} must hold the keys {list(required)}; missing {missing}")
    return data


def _refuse_structural_overrides(name, cls, stored_config, overrides):
    """Overrides that change a config field would load trained weights into another
    architecture (or change what they mean): refused unless load_weights=False."""
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls.config_class)
    }
    stored = {**defaults, **stored_config}
    changed = sorted(key for key, value in overrides.items() if key in stored and stored[key] != value)
    if changed:
        raise ValueError(
            f"from_preset({name!r}): the override(s) {changed} change the architecture the preset's weights were "
            f"trained for (structural: every config field); pass load_weights=False for a new model with random "
            f"weights. Overrides that keep the weights: dtype, name"
        )


def _load_weights(model, weights_path, expected_sha256, where):
    """Load `weights_path` into `model` after checking its SHA-256 against the preset's record."""
    if expected_sha256 is not None:
        found = sha256_of(weights_path)
        if found != expected_sha256:
            raise ValueError(
                f"weights file {str(where)!r} is corrupt or truncated: its SHA-256 {found[:12]}... differs from "
                f"{expected_sha256[:12]}... recorded in {METADATA_FILE}; re-save, re-convert or re-download the preset"
            )
    try:
        model.load_weights(weights_path)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"weights file {str(where)!r} could not be loaded into {type(model).__name__} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); re-save or re-convert the preset"
        ) from None


def cache_dir():
    """Where presets converted on first use are kept: `$KERAS_PERCEIVER_CACHE`, else
    `$XDG_CACHE_HOME/keras_perceiver` (default `~/.cache/keras_perceiver`)."""
    if os.environ.get("KERAS_PERCEIVER_CACHE"):
        return Path(os.environ["KERAS_PERCEIVER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "keras_perceiver"


def _config_differences(expected, received):
    """'field: expected X, received Y' for each field of `expected` that `received` holds
    differently (compared as JSON, so tuples and lists are alike)."""
    expected, received = json.loads(json.dumps(expected)), json.loads(json.dumps(received))
    return [
        f"{key}: expected {value!r}, received {received.get(key)!r}"
        for key, value in expected.items()
        if received.get(key) != value
    ]


def _say(line):
    print(f"keras_perceiver: {line}", file=sys.stderr, flush=True)


def cached_original(entry):
    """The preset directory of zoo `entry`'s original checkpoint, converted on first use.

    The first call fetches just the tensors the converter reads from the hub (or takes them
    from the local Hugging Face cache), converts them, checks the result against the entry's
    config and writes it into `cache_dir()` with `save_to_preset` (atomic, checksummed).
    Later calls only read the cache; a cached preset whose config no longer matches the entry
    is converted again."""
    original = entry["original"]
    target = cache_dir() / "presets" / entry["name"]
    restore_aside(target)
    source = f"hf://{original['hub']}@{original.get('revision', 'main')}"
    if is_preset_directory(target) and (target / WEIGHTS_FILE).is_file():
        same_source = _read_json(target / METADATA_FILE).get("source") == source
        if same_source and not _config_differences(entry["config"], _read_json(target / CONFIG_FILE).get("config", {})):
            return target
    from keras_perceiver.converters import model_from_hub
    from keras_perceiver.converters.hub import CheckpointFetchError

    repo = original["hub"]
    _say(f"{entry['name']}: converting its original checkpoint hf://{repo} on first use into {target}")
    try:
        model = model_from_hub(
            repo, num_heads=entry["config"].get("num_heads", 8), revision=original.get("revision", "main"),
            filename=original.get("file"), progress=_say,
        )
    except CheckpointFetchError as error:
        raise CheckpointFetchError(
            f"Preset {entry['name']!r} ships no weights and its original checkpoint could not be fetched: {error}. "
            f"Nothing was written. Without the hub: convert a local copy with "
            f"`{entry['provenance'].get('convert', 'keras-perceiver convert ...')}` and load that directory, "
            f"or pass load_weights=False for random weights."
        ) from None
    differences = _config_differences(entry["config"], model.get_config()["config"])
    if differences:
        raise ValueError(
            f"Preset {entry['name']!r}: hf://{repo} converts to a model unlike the preset ({'; '.join(differences)}); "
            "nothing was cached"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_to_preset(model, target, overwrite=True, source=source)


def from_preset(name_or_path, load_weights=True, expected_class=None, **overrides):
    """Build a model from a zoo name, a preset directory or an `hf://org/name` handle.

    `overrides` replace config fields (e.g. `depth=2` for a small variant) and need
    `load_weights=False` when they change a field: trained weights only fit the architecture
    they were trained for. `dtype` and `name` may always be given. A zoo preset whose
    original checkpoint is public loads it on first use (see `cached_original`; later loads
    are offline); one with no public weights only builds with `load_weights=False`. Weights
    are checked against the SHA-256 their preset records before they load.
    """
    kind, source = resolve_preset(name_or_path)
    name = None
    if kind == "zoo":
        entry = source
        cls = _model_class(entry["class_name"], expected_class)
        config, name, weights, sha256 = entry["config"], entry["name"], entry.get("weights"), entry.get("weights_sha256")
        if load_weights and not weights:
            if not entry.get("original"):
                raise ValueError(
                    f"Preset {entry['name']!r} ships no weights and has no public checkpoint. Convert a checkpoint with "
                    f"`{entry['provenance'].get('convert', 'keras-perceiver convert ...')}` and load the "
                    f"directory it writes, or pass load_weights=False for random weights."
                )
            kind, source = "directory", cached_original(entry)
    if kind == "directory":
        saved = _read_json(source / CONFIG_FILE, required=("class_name", "config"))
        cls = _model_class(saved["class_name"], expected_class)
        config, weights = saved["config"], source / WEIGHTS_FILE
        metadata = _read_json(source / METADATA_FILE) if (source / METADATA_FILE).is_file() else {}
        sha256 = (metadata.get("sha256") or {}).get(WEIGHTS_FILE)
        if load_weights and not weights.is_file():
            raise ValueError(f"preset directory {str(source)!r} has no {WEIGHTS_FILE}; pass load_weights=False")
    name = overrides.pop("name", name)
    if load_weights:
        _refuse_structural_overrides(str(name_or_path), cls, config, {k: v for k, v in overrides.items() if k != "dtype"})
    model = cls(config, name=name, **overrides)
    if load_weights:
        if kind == "zoo":
            with resources.as_file(_zoo_dir() / weights) as weights_path:
                _load_weights(model, weights_path, sha256, weights_path)
        else:
            _load_weights(model, weights, sha256, weights)
    return model


def is_preset_directory(path):
    """Whether `path` is a preset directory this project wrote (its metadata.json is ours)."""
    metadata = Path(path) / METADATA_FILE
    try:
        return Path(path).is_dir() and "keras_perceiver_version" in json.loads(metadata.read_text())
    except (OSError, ValueError, TypeError):
        return False


def save_to_preset(model, path, overwrite=False, source=None, protected=()):
    """Write `config.json`, `model.weights.h5` and `metadata.json` into directory `path`.

    The files are written into a staging directory beside `path`, flushed and swapped into
    place (`keras_perceiver.storage.commit`): a kill at any instant leaves the old preset or
    the new one. An existing `path` is replaced only with `overwrite=True`, and only when it
    is a preset this project wrote; never the current directory or one of its parents, nor a
    directory holding `protected` paths (a checkpoint being converted).
    """
    if type(model) not in model_classes().values():
        raise TypeError(
            f"save_to_preset: `model` must be one of the keras_perceiver models {sorted(model_classes())}; "
            f"received {type(model).__name__} (save other Keras models with model.save)"
        )
    path = check_target(path, "save_to_preset", overwrite, is_preset_directory, sources=protected)
    staging = new_staging_dir(path)
    try:
        (staging / CONFIG_FILE).write_text(
            json.dumps({"class_name": type(model).__name__, "config": model.get_config()["config"]}, indent=2)
        )
        model.save_weights(staging / WEIGHTS_FILE)
        metadata = {
            "keras_version": keras.version(),
            "keras_perceiver_version": __version__,
            "parameter_count": model.count_params(),
            "source": source or "keras_perceiver",
            "sha256": {WEIGHTS_FILE: sha256_of(staging / WEIGHTS_FILE)},
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        commit(staging, path)
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
        weights = "shipped" if entry.get("weights") else "hub, on first use" if entry.get("original") else "convert"
        lines.append(
            f"| `{name}` | {entry['class_name']} | {entry['parameter_count'] / 1e6:.1f} M | {weights} | "
            f"{entry['provenance'].get('checkpoint', '-')} | {entry.get('paper_figure', '-')} |"
        )
    return "\n".join(lines)
