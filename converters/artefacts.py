"""Export a model to an edge artefact and verify it in that artefact's own runtime.

`export(model_or_preset, target, path)` works from any KERAS_BACKEND: each target goes
through the route that converts it best (`ROUTES`, the one route table), run in a
subprocess under the backend that route needs, from a `.keras` file or a preset.

The artefact is written beside `path` (a `keras_perceiver.storage` staging directory) and
renamed into place only once it is verified, with a metadata file `<path>.keras-perceiver.json`
(`metadata_path`): version, target, route, quantization, weights, the report and the SHA-256
of each file. An existing path is replaced only with `overwrite=True` and only when that
metadata says keras_perceiver wrote it; nothing else (a user's file, the current directory,
the preset being exported) is ever removed.
"""

import builtins
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import keras_perceiver
from keras_perceiver import storage
from keras_perceiver.backend_process import run_under_backend
from keras_perceiver.converters import openvino_ir
from keras_perceiver.timing import timed_runs

# target -> (backend the conversion runs under, route, runtime that verifies it)
ROUTES = {
    "saved_model": ("tensorflow", "keras export (tf_saved_model)", "tf.saved_model"),
    "tflite": ("tensorflow", "SavedModel -> TFLiteConverter (builtin ops)", "LiteRT interpreter"),
    "onnx": ("torch", "torch.export -> torch.onnx (dynamo)", "onnxruntime"),
    "openvino": ("tensorflow", "SavedModel -> openvino.convert_model -> Einsum as MatMul, layer norm as MVN", "OpenVINO CPU (f32; bf16 with quantize='bfloat16'; int8 products with quantize='int8')"),
    "coreml": ("torch", "torch.export -> run_decompositions -> coremltools mlprogram", "CoreML (macOS only)"),
}
SUFFIXES = {"saved_model": "", "tflite": ".tflite", "onnx": ".onnx", "openvino": ".xml", "coreml": ".mlpackage"}
# modules each route needs, and the pip extra that brings them
REQUIREMENTS = {
    "saved_model": ["tensorflow"],
    "tflite": ["tensorflow", "ai_edge_litert"],
    "onnx": ["torch", "onnxscript", "onnxruntime"],
    "openvino": ["tensorflow", "openvino"],
    "coreml": ["torch", "coremltools"],
}
# openvino "bfloat16": the same float32 IR, executed with INFERENCE_PRECISION_HINT=bf16 (CPUs
# with AVX512-BF16 or AMX, where it is also OpenVINO's default); verified and timed that way.
# openvino "int8": static post-training quantization with NNCF (activation ranges calibrated on
# `calibration_data`, by default the model's own example inputs), the products in int8 (VNNI /
# AMX), the rest in bf16 where the CPU has it.
QUANTIZE = {"tflite": ("dynamic_int8", "float16"), "onnx": ("dynamic_int8",), "openvino": ("bfloat16", "int8")}
QUANTIZE_REQUIREMENTS = {"int8": ["nncf"]}  # modules a quantization needs beyond its target's
CALIBRATION_EXAMPLES = 8  # default calibration: this many example inputs of the export's shapes
CALIBRATION_LIMIT = 300  # given calibration data: at most this many rows (NNCF's default subset)
CALIBRATION_HELD_OUT = 3  # given calibration data: rows kept out of it to verify the int8 file on
PRIMARY_INPUT = ""  # a `calibration_data` key that stands for the model's primary input, whatever its name
# Bounds on a quantized artefact's max_rel_error (max abs error / max |Keras output|), unless
# the preset's zoo file sets its own under "quantized_error_bounds". Measured values: README.
QUANTIZED_ERROR_BOUNDS = {"float16": 0.005, "bfloat16": 0.05, "dynamic_int8": 0.15, "int8": 0.15}
FLOAT32_TOLERANCE = 1e-4
COREML_MAX_OPEN_SIZE = 8192  # upper bound of a CoreML RangeDim where the model sets none
METADATA_SUFFIX = ".keras-perceiver.json"
WRITER = "keras_perceiver"
# marks the export process' progress lines on its stderr, which the caller passes through
PROGRESS_PREFIX = "keras-perceiver progress: "


class ExportVerificationError(ValueError, RuntimeError):
    """The artefact was written but does not compute what the Keras model computes (an error
    over its bound, another output shape, outputs that cannot be told apart). A ValueError,
    and a RuntimeError as well for callers that caught the RuntimeError this used to be."""


@dataclasses.dataclass
class ExportReport:
    target: str
    route: str
    runtime: str
    path: str
    size_bytes: int
    dynamic: bool
    checked_shapes: list
    max_abs_error: float
    max_rel_error: float  # max abs error / max |Keras output|
    latency_ms: float
    quantize: str = None
    verified: bool = False
    notes: str = ""
    error_bound: float = None  # on max_abs_error (float32) or max_rel_error (quantized)
    weights: str = None  # "preset" (the preset's own), "model" (the model given) or "random"
    runtime_config: dict = None  # what the runtime must be given to compute as verified (OpenVINO)
    metadata_path: str = None  # the `<path>.keras-perceiver.json` written beside the artefact


def quantized_error_bound(model_or_preset, quantize):
    """The bound on max_rel_error for `quantize`: the zoo preset's own, else the default."""
    from keras_perceiver.presets import zoo_entries

    entry = zoo_entries().get(str(model_or_preset)) if isinstance(model_or_preset, str) else None
    return ((entry or {}).get("quantized_error_bounds") or {}).get(quantize, QUANTIZED_ERROR_BOUNDS[quantize])


def quantize_problem(targets, quantize):
    """None when `quantize` applies to every target in `targets`, else the one-line reason
    (naming --quantize, the valid values per target and the value received)."""
    if quantize is None:
        return None
    wrong = [t for t in targets if quantize not in QUANTIZE.get(t, ())]
    if not wrong:
        return None
    valid = "; ".join(f"{t}: {', '.join(QUANTIZE.get(t, ())) or 'none'}" for t in ROUTES)
    return (
        f"export: --quantize (quantize=) {quantize!r} does not apply to {', '.join(wrong)}; valid values per "
        f"target: {valid}; received {quantize!r}"
    )


def weights_problem(model_or_preset, random_weights=False):
    """None when `model_or_preset` brings its weights (a model, a preset that ships weights, an
    hf:// handle: checked once downloaded) or `random_weights` is set; else the reason."""
    from keras_perceiver import presets

    if not isinstance(model_or_preset, (str, os.PathLike)) or random_weights:
        return None
    if os.fspath(model_or_preset).startswith(presets.HF_PREFIX):
        return None  # resolved (downloaded) by the export process, which checks it there
    return _no_weights_message(*presets.resolve_preset(model_or_preset))


def with_original_weights(model_or_preset, random_weights=False):
    """A zoo preset that ships no weights but names a public original checkpoint -> the
    directory of its first-use conversion (fetched and cached now: `presets.cached_original`);
    anything else, or with `random_weights`, as given."""
    from keras_perceiver import presets

    if random_weights or not isinstance(model_or_preset, (str, os.PathLike)):
        return model_or_preset
    if os.fspath(model_or_preset).startswith(presets.HF_PREFIX):
        return model_or_preset
    kind, source = presets.resolve_preset(model_or_preset)
    if kind == "zoo" and not source.get("weights") and source.get("original"):
        return str(presets.cached_original(source))
    return model_or_preset


def _no_weights_message(kind, source):
    """The refusal for a resolved preset without weights, or None when it has them."""
    from keras_perceiver import presets

    if kind == "zoo":
        if source.get("weights"):
            return None
        convert = (source.get("provenance") or {}).get("convert", "keras-perceiver convert ...")
        return (
            f"export: preset {source['name']!r} ships no weights: pass random_weights=True (--random-weights) to "
            f"export it with random weights, or convert the original checkpoint (`{convert}`) and export the "
            "directory it writes"
        )
    if (Path(source) / presets.WEIGHTS_FILE).is_file():
        return None
    return (
        f"export: preset directory {str(source)!r} has no {presets.WEIGHTS_FILE}: pass random_weights=True "
        "(--random-weights) to export it with random weights"
    )


def _check_requirements(target, quantize=None):
    needed = REQUIREMENTS[target] + QUANTIZE_REQUIREMENTS.get(quantize, [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"export to {target!r}{f' ({quantize})' if quantize else ''} needs {missing}: pip install 'keras-perceiver[export]'"
        )


def calibration_problem(calibration_data, quantize):
    """None when `calibration_data` suits `quantize`, else the reason: it is a dict {input
    name: array with a leading example axis} or one such array (for the model's primary
    input), and only quantize="int8" takes it."""
    import numpy as np

    if calibration_data is None:
        return None
    if quantize != "int8":
        return f"export: `calibration_data` applies to quantize='int8' only; received it with quantize={quantize!r}"
    arrays = calibration_data if isinstance(calibration_data, dict) else {None: calibration_data}
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.ndim < 1 or len(value) == 0:
            said = type(value).__name__ if not isinstance(value, np.ndarray) else f"an array of shape {value.shape}"
            return (f"export: `calibration_data`{f'[{name!r}]' if name else ''} must be a NumPy array with at least one "
                    f"example on its first axis; received {said}")
    if len({len(v) for v in arrays.values()}) != 1:
        return f"export: `calibration_data` arrays must hold as many examples each; received {[len(v) for v in arrays.values()]}"
    return None


def metadata_path(path):
    """The metadata file of the artefact at `path`: `<path>.keras-perceiver.json` beside it
    (for OpenVINO beside the .xml)."""
    path = Path(path)
    return path.with_name(path.name + METADATA_SUFFIX)


def _companion_paths(target, path):
    """Every path the artefact at `path` may consist of, the main file last: OpenVINO's
    weights (.bin) come before its .xml, and an ONNX file over 2 GB keeps its weights in
    `<file>.data` (ONNX's external data, which the .onnx names by that file name)."""
    path = Path(path)
    if target == "openvino":
        return [path.with_suffix(".bin"), path]
    if target == "onnx":
        return [path.with_name(path.name + ".data"), path]
    return [path]


def _file_size(path):
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def read_metadata(path):
    """The metadata keras_perceiver wrote for the artefact at `path`, or None when there is
    none, it does not parse, or it was not written by keras_perceiver for this artefact name."""
    try:
        data = json.loads(metadata_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != WRITER or data.get("artefact") != Path(path).name:
        return None
    return data


def _owned(path, artefact):
    """Did keras_perceiver write `path`, one of the files of the artefact at `artefact`?"""
    path, artefact = Path(path), Path(artefact)
    data = read_metadata(artefact)
    if data is None:
        return False
    if path == metadata_path(artefact):
        return True
    if path == artefact:  # as the kind it was written: a user's directory in place of our file is not ours
        return path.is_dir() == (data.get("kind") == "directory")
    return path.name in data.get("files", {}) and path.is_file()  # a companion (OpenVINO's .bin)


def _hashes(staged, final):
    """{file name relative to the artefact's folder: SHA-256} of the staged artefact files
    (`staged[i]` becomes `final[i]`); every file of a directory artefact."""
    found = {}
    for source, dest in zip(staged, final):
        if source.is_dir():
            for file in sorted(p for p in source.rglob("*") if p.is_file()):
                found[f"{dest.name}/{file.relative_to(source).as_posix()}"] = storage.sha256_of(file)
        else:
            found[dest.name] = storage.sha256_of(source)
    return found


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _commit_artefact(staged, final, staged_metadata, final_metadata):
    """Rename the staged files into place, each atomically (`storage.commit`), in order:
    for OpenVINO the weights (.bin) first, then the .xml, then the metadata file.

    The renames are separate: a kill between two of them can leave a new .bin beside the old
    .xml (a mismatched pair), or new files beside the previous metadata file; the SHA-256 the
    metadata records for each file tells such a pair from a whole artefact
    (`storage.sha256_of(file)` against `read_metadata(path)["files"]`)."""
    for source, dest in zip(staged, final):
        storage.commit(source, dest)
    storage.commit(staged_metadata, final_metadata)


def _describe_input(model_or_preset, input_shapes, dynamic):
    if isinstance(model_or_preset, (str, os.PathLike)):
        what = f"preset {os.fspath(model_or_preset)!r}"
    else:
        what = f"model {getattr(model_or_preset, 'name', '?')!r} ({type(model_or_preset).__name__})"
    shapes = f"input shapes {input_shapes}" if input_shapes else "the default example shapes (batch 2, lengths 24)"
    return f"{what} at {shapes}" + ("" if dynamic else ", static")


def _error_class(data):
    """The class a worker's exception comes back as: ExportVerificationError, or the nearest
    builtin exception class in its MRO (Exception itself, too vague, as RuntimeError)."""
    for module, name in data.get("mro", []):
        if name == ExportVerificationError.__name__ and module in ("__main__", __name__):
            return ExportVerificationError
        if module == "builtins":
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception) and cls is not Exception:
                return cls
    return RuntimeError


def _worker_error(done, error_file, context):
    """The exception a failed export process stands for: the worker's own (its type, the
    route and input in `context`, its message; its traceback on `.worker_traceback`), or a
    RuntimeError with the last lines of stderr when it died without writing one."""
    try:
        data = json.loads(Path(error_file).read_text())
    except (OSError, ValueError):
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        error = RuntimeError(
            f"{context}: the export process died without reporting an error (exit code {done.returncode}"
            f"{': killed, most often for lack of memory' if done.returncode == -9 else ''}); "
            f"the last lines it wrote:\n{tail}"
        )
        error.worker_traceback = None
        return error
    cls = _error_class(data)
    cause = data.get("message", "")
    if cause.startswith("export: "):
        cause = cause[len("export: "):]
    if data.get("type") not in (cls.__name__, "AssertionError"):
        cause = f"{data.get('type')}: {cause}"
    try:
        error = cls(f"{context}: {cause}")
    except TypeError:  # a builtin class with other constructor arguments
        error = RuntimeError(f"{context}: {data.get('type')}: {cause}")
    error.worker_traceback = data.get("traceback")
    error.worker_type = data.get("type")
    return error


def export(
    model_or_preset, target, path, input_shapes=None, dynamic=True, quantize=None, verify=True, overwrite=False,
    random_weights=False, progress=True, calibration_data=None,
):
    """Convert `model_or_preset` (a keras_perceiver model, a preset name or directory) to
    `target` at `path`, verify it in its runtime, and return an ExportReport.

    input_shapes: optional {input name: full shape, batch first} of the example inputs the
    artefact is traced and checked with, e.g. {"media": (1, 2, 1, 32, 128)} (default: batch 2,
    variable lengths 24); dynamic: keep the variable axes open in the ONNX and CoreML files
    (False: traced static at those shapes; the SavedModel-based targets always keep them) and
    check a second, different size;
    quantize: None, or one of QUANTIZE[target]; the artefact's error relative to the output
    range must then stay within the preset's documented bound (`quantized_error_bound`);
    calibration_data: for quantize="int8", the inputs whose activation ranges set the int8
    scales: {input name: array, examples first; the key PRIMARY_INPUT ("") stands for the
    primary input} or one array for the primary input (default: CALIBRATION_EXAMPLES random
    example inputs; real data gives tighter ranges);
    overwrite: replace an existing `path` (and its companions: OpenVINO's .bin, the metadata
    file), only when keras_perceiver wrote it (its metadata file says so): a user's file or
    directory, the current directory and the preset being exported are never replaced;
    random_weights: export a preset that ships no weights with random ones (the metadata and
    the report say `weights: "random"`); without it such a preset raises a ValueError;
    progress: print each step (loading, converting, verifying, done in how long with what
    error) to stderr as it happens, on by default as Keras' own `Model.export(verbose=True)`
    and `fit(verbose="auto")` are; False for silence.

    Writes `<path>.keras-perceiver.json` beside the artefact (`read_metadata`). Errors of the
    export process come back as their type (ValueError, ImportError, ...; a failed check as
    ExportVerificationError) naming route, input and cause, the process' traceback on
    `.worker_traceback`; a process that dies without reporting one raises a RuntimeError.
    """
    if target not in ROUTES:
        raise ValueError(f"export: `target` must be one of {list(ROUTES)}; received {target!r}")
    if input_shapes is not None and not (
        isinstance(input_shapes, dict)
        and all(isinstance(shape, (tuple, list)) and all(isinstance(d, int) and d > 0 for d in shape)
                for shape in input_shapes.values())
    ):
        raise ValueError(
            "export: `input_shapes` must be a dict {input name: shape of positive ints}, e.g. "
            f"{{'media': (1, 2, 1, 32, 128)}}; received {input_shapes!r}"
        )
    if quantize is not None and quantize not in QUANTIZE.get(target, ()):
        raise ValueError(
            f"export: `quantize` for {target!r} must be one of {list(QUANTIZE.get(target, ()))} or None; "
            f"received {quantize!r}"
        )
    problem = calibration_problem(calibration_data, quantize)
    if problem:
        raise ValueError(problem)
    _check_requirements(target, quantize)
    model_or_preset = with_original_weights(model_or_preset, random_weights)
    from_path = isinstance(model_or_preset, (str, os.PathLike))
    problem = weights_problem(model_or_preset, random_weights)
    if problem:
        raise ValueError(problem)
    sources = [model_or_preset] if from_path and Path(model_or_preset).expanduser().is_dir() else []
    path = Path(path).expanduser()
    marker = f"{path.name or path}{METADATA_SUFFIX} beside it"
    storage.check_target(path, "export", overwrite, lambda p: _owned(p, path), sources, marker=marker)  # refuses "."
    final = _companion_paths(target, path)
    for written in [*final[:-1], metadata_path(path)]:
        storage.check_target(written, "export", overwrite, lambda p: _owned(p, path), sources, marker=marker)

    backend, route, _ = ROUTES[target]
    context = f"export to {target!r} via {route} [{backend}] of {_describe_input(model_or_preset, input_shapes, dynamic)}"
    started = time.perf_counter()
    if progress:
        print(f"export {target}: starting a {backend} process for {route}...", file=sys.stderr, flush=True)
    staging = storage.new_staging_dir(path)
    try:
        if from_path:
            source = {"preset": os.fspath(model_or_preset)}
        else:
            model_file = staging / "model.keras"
            model_or_preset.save(model_file)
            source = {"keras_file": str(model_file)}
        # an ONNX file is staged under its final name: its external data (over 2 GB) is named
        # after it, and the .onnx refers to that name; the other tools want their suffix
        (staging / "artefact").mkdir()
        calibration = None
        if calibration_data is not None:
            import numpy as np

            calibration = str(staging / "calibration.npz")
            arrays = calibration_data if isinstance(calibration_data, dict) else {PRIMARY_INPUT: calibration_data}
            np.savez(calibration, **arrays)
        out = staging / "artefact" / (path.name if target == "onnx" else "artefact" + SUFFIXES[target])
        job = dict(
            source, target=target, out=str(out), shapes=input_shapes, dynamic=dynamic, quantize=quantize,
            verify=verify, random_weights=bool(random_weights), report=str(staging / "report.json"),
            error=str(staging / "error.json"), work=str(staging / "work"),
            error_bound=quantized_error_bound(model_or_preset, quantize) if quantize else FLOAT32_TOLERANCE,
            progress=bool(progress), calibration=calibration,
        )
        done = run_under_backend(
            "keras_perceiver.converters.artefacts", [json.dumps(job)], backend, capture=True,
            pass_through_prefix=PROGRESS_PREFIX,
        )
        if done.returncode:
            raise _worker_error(done, job["error"], context)
        try:
            written = json.loads(Path(job["report"]).read_text())
        except (OSError, ValueError):
            raise _worker_error(done, job["error"], context) from None
        report = ExportReport(**written["report"])
        report.path, report.metadata_path = str(path), str(metadata_path(path))
        pairs = [(s, f) for s, f in zip(_companion_paths(target, out), final) if s.exists()]
        staged, final = [s for s, _ in pairs], [f for _, f in pairs]
        # a companion the new artefact does not have (an older export's ONNX .data) is removed
        previous = read_metadata(path) or {}
        stale = [f for f in _companion_paths(target, path) if f not in final and f.name in previous.get("files", {})]
        fields = dataclasses.asdict(report)
        for key in ("path", "metadata_path"):
            fields.pop(key)
        metadata = dict(
            written_by=WRITER, keras_perceiver_version=keras_perceiver.__version__, artefact=path.name,
            kind="directory" if out.is_dir() else "file", target=target, route=report.route, quantize=quantize,
            weights=report.weights,
            source=({"preset": os.fspath(model_or_preset)} if from_path else
                    {"model": getattr(model_or_preset, "name", None), "class": type(model_or_preset).__name__}),
            written_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            converter_versions=written.get("versions", {}),
            report=fields, files=_hashes(staged, final),
        )
        if "openvino" in written:
            metadata["openvino"] = written["openvino"]
        staged_metadata = staging / "metadata.json"
        staged_metadata.write_text(json.dumps(_json_safe(metadata), indent=1, allow_nan=False))
        _commit_artefact(staged, final, staged_metadata, metadata_path(path))
        for leftover in stale:
            leftover.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"export {target}: done in {time.perf_counter() - started:.1f} s, {_errors_said(report)}",
              file=sys.stderr, flush=True)
    return report


def _errors_said(report):
    """The report's errors in a few words, for the progress line."""
    if not report.verified:
        return "not verified (verify=False)"
    said = f"max abs error {report.max_abs_error:.1e}"
    if report.quantize:
        said += f", {report.max_rel_error:.1e} of the output range (bound {report.error_bound})"
    return said


# ------------------------------------------------------------------ worker side
def _load(job):
    """-> (model, weights: "model" | "preset" | "random", notes). A preset without weights
    loads only with job["random_weights"] (random ones, said in the notes)."""
    import keras

    import keras_perceiver as kp
    import keras_perceiver.models  # noqa: F401 (registers the classes a .keras file names)
    from keras_perceiver.presets import resolve_preset

    if "keras_file" in job:
        return keras.saving.load_model(job["keras_file"]), "model", ""
    kind, source = resolve_preset(job["preset"])  # downloads an hf:// handle
    problem = _no_weights_message(kind, source)
    if problem is None:
        return kp.from_preset(job["preset"]), "preset", ""
    if not job.get("random_weights"):
        raise ValueError(problem)
    return (kp.from_preset(job["preset"], load_weights=False), "random",
            "random weights (the preset ships none; random_weights=True)")


def _sizes(model, job):
    """Two input sets: the main one (at `input_shapes` when given), and a different batch /
    variable length."""
    from keras_perceiver.examples import example_inputs

    shapes = job["shapes"] or {}
    for name, shape in shapes.items():
        if name not in model.named_inputs:
            raise ValueError(f"export: `input_shapes` names inputs among {list(model.named_inputs)}; received {name!r}")
        declared = tuple(model.named_inputs[name].shape)
        if len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared[1:], shape[1:])):
            raise ValueError(f"export: `input_shapes`[{name!r}] must fit the input's shape {declared}; received {tuple(shape)}")
    first = example_inputs(model, batch=2, length=24, seed=1, shapes=shapes)
    variable = any(d is None for t in model.inputs for d in t.shape[1:])
    second = example_inputs(model, batch=1, length=31, seed=2) if variable else example_inputs(model, batch=3, seed=2)
    return [first, second] if job["dynamic"] else [first]


def _saved_model(model, out):
    model.export(out, format="tf_saved_model", verbose=False)


def _convert(model, job, work, calibration=None):
    target, out = job["target"], job["out"]
    if target == "saved_model":
        _saved_model(model, out)
    elif target == "tflite":
        import tensorflow as tf

        saved = os.path.join(work, "saved_model")
        _saved_model(model, saved)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if job["quantize"] == "dynamic_int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif job["quantize"] == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        Path(out).write_bytes(converter.convert())
    elif target == "onnx":
        _onnx(model, job)
        if job["quantize"] == "dynamic_int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            float_path = os.path.join(work, "float.onnx")
            shutil.move(out, float_path)
            # 7-bit weights: x86 CPUs without VNNI (AVX2 only) multiply u8 x s8 pairs into a
            # saturating int16, which with full-range weights left 0.10-0.24 of the output range
            # as error on the large presets (0.02-0.04 with reduce_range; benchmarks/NOTES.md)
            quantize_dynamic(float_path, out, weight_type=QuantType.QInt8, reduce_range=True)
    elif target == "openvino":
        import openvino as ov

        saved = os.path.join(work, "saved_model")
        _saved_model(model, saved)
        converted = ov.convert_model(saved)
        openvino_ir.rewrite_for_cpu(converted)
        if job["quantize"] == "int8":
            _progress(job, f"calibrating int8 on {len(calibration)} examples...")
            converted = openvino_ir.int8_quantized(converted, calibration)
        openvino_ir.set_precision(converted, openvino_ir.precision_of(job["quantize"]))
        ov.save_model(converted, out, compress_to_fp16=False)
    elif target == "coreml":
        return _coreml(model, job)


def _calibration_sets(model, job):
    """(calibration examples, one each; the input sets the int8 file is verified on, or None
    for the usual `_sizes`). Given data: its rows (at most CALIBRATION_LIMIT), the last
    CALIBRATION_HELD_OUT of them kept out of the calibration to check the file on (random
    example inputs can lie far outside ranges calibrated on pixels in [0, 1]); fewer than
    2 x CALIBRATION_HELD_OUT rows are all calibrated on and checked. Else CALIBRATION_EXAMPLES
    random example inputs at the export's first input shapes, batch 1."""
    import numpy as np

    from keras_perceiver.examples import example_inputs

    if not job.get("calibration"):
        first = _sizes(model, job)[0]
        shapes = {name: (1, *value.shape[1:]) for name, value in first.items()}
        return [example_inputs(model, shapes=shapes, seed=100 + i) for i in range(CALIBRATION_EXAMPLES)], None
    with np.load(job["calibration"]) as stored:
        arrays = {(model.primary_input if name == PRIMARY_INPUT else name): stored[name] for name in stored.files}
    unknown = sorted(set(arrays) - set(model.named_inputs))
    if unknown:
        raise ValueError(f"export: `calibration_data` names inputs among {list(model.named_inputs)}; received {unknown}")
    for name, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):  # float64 data to the input's own dtype
            arrays[name] = value.astype(model.named_inputs[name].dtype)
    count = min(len(next(iter(arrays.values()))), CALIBRATION_LIMIT + CALIBRATION_HELD_OUT)
    try:
        rows = [model.standardize_inputs({n: v[i:i + 1] for n, v in arrays.items()}) for i in range(count)]
    except ValueError as error:
        raise ValueError(f"export: `calibration_data`: {error}") from None
    held_out = CALIBRATION_HELD_OUT if count >= 2 * CALIBRATION_HELD_OUT else 0
    calibration, checked = rows[:count - held_out][:CALIBRATION_LIMIT], rows[count - held_out:] or rows[:2]
    return calibration, [{name: np.concatenate([r[name] for r in checked]) for name in checked[0]}]


def _torch_program(model, job, outputs_as_sorted_tuple=False):
    """(torch.export program, example inputs) of the model called on its inputs in
    `named_inputs` order. Axes the model leaves open (batch, lengths) stay dynamic, marked
    size-oblivious so that 1 is a valid size too. A dict of outputs is returned as a tuple in
    key order where the converter names outputs by position."""
    import torch
    import torch.fx.experimental._config as fx_config

    names = list(model.named_inputs)
    inputs = _sizes(model, dict(job, dynamic=False))[0]

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            outputs = self.model(dict(zip(names, args)))
            if outputs_as_sorted_tuple and isinstance(outputs, dict):
                return tuple(outputs[k] for k in sorted(outputs))
            return outputs

    args = tuple(torch.from_numpy(inputs[n]) for n in names)
    open_axes = tuple(
        {axis: torch.export.Dim.AUTO for axis, size in enumerate(model.named_inputs[n].shape) if size is None}
        for n in names
    )
    with fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(
            Positional().eval(), args, dynamic_shapes=(open_axes,) if job["dynamic"] else None, strict=False
        )
    return program, args


def _onnx(model, job):
    """torch.export -> torch.onnx (dynamo). Against Keras' tf2onnx export this graph has a
    quarter of the nodes (no TensorFlow shape arithmetic around each Dense, LayerNormalization
    as one op): small models ran 1.5x faster in onnxruntime (benchmarks/NOTES.md)."""
    import torch

    program, _ = _torch_program(model, job, outputs_as_sorted_tuple=True)
    onnx_program = torch.onnx.export(
        program, input_names=list(model.named_inputs), output_names=output_keys(model) or ["outputs"],
        dynamo=True, optimize=True, verbose=False,
    )
    onnx_program.save(job["out"])


def _coreml(model, job):
    """Returns the exported program that was converted and whether any axis stayed dynamic.

    Each open axis of the torch.export program becomes a CoreML `RangeDim` from 1 to the bound
    torch.export proved, at most COREML_MAX_OPEN_SIZE (an ML program needs a finite bound).
    """
    import coremltools as ct
    import numpy as np
    import torch
    import torch.fx.experimental._config as fx_config

    names = list(model.named_inputs)
    program, args = _torch_program(model, job)
    # Decomposing retraces: outside the size-oblivious patch it would guard open axes to != 1.
    with fx_config.patch(backed_size_oblivious=True):
        program = program.run_decompositions({})
    upper = {str(symbol): bound.upper for symbol, bound in program.range_constraints.items()}
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    input_types, described = [], []
    for name, user_input, example in zip(names, program.graph_signature.user_inputs, args):
        dims = []
        for size, example_size in zip(placeholders[user_input].meta["val"].shape, example.shape):
            if str(size) in upper:
                try:
                    bound = min(int(upper[str(size)]), COREML_MAX_OPEN_SIZE)
                except (OverflowError, TypeError, AttributeError):  # sympy's infinity: no bound
                    bound = COREML_MAX_OPEN_SIZE
                dims.append(ct.RangeDim(1, bound, default=int(example_size)))
                described.append(f"{name} axis {len(dims) - 1}: 1..{bound}")
            else:
                dims.append(int(size))
        # CoreML has no bool inputs: masks are float (0 / 1) there
        dtype = np.float32 if example.dtype in (torch.float32, torch.bool) else np.int32
        input_types.append(ct.TensorType(name=name, shape=ct.Shape(dims), dtype=dtype))
    mlmodel = ct.convert(
        program,
        inputs=input_types,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32,
    )
    spec = mlmodel.get_spec()
    keys = output_keys(model) or ["outputs"]
    for old, new in zip([o.name for o in spec.description.output], keys):
        ct.utils.rename_feature(spec, old, new)
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir)
    mlmodel.short_description = "keras_perceiver export; " + (
        "dynamic axes: " + ", ".join(described) if described else "static input shapes: " + ", ".join(
            f"{n}{tuple(example.shape)}" for n, example in zip(names, args)
        )
    )
    mlmodel.save(job["out"])
    return program, bool(described)


def artefact_runner(target, path, quantize=None):
    """The artefact of `target` at `path`, loaded in its own runtime (`ROUTES`), as a function
    {input name: NumPy array} -> {output name: NumPy array}: what the export verifies and the
    benchmarks time. An OpenVINO artefact runs in bf16 where `quantize` is "bfloat16"; a
    CoreML one only on macOS (elsewhere a RuntimeError saying so)."""
    import numpy as np

    if target == "saved_model":
        import tensorflow as tf

        fn = tf.saved_model.load(path).signatures["serving_default"]
        return lambda x: {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in x.items()}).items()}
    if target == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        runners = {}  # one interpreter per input shape set (the runner resizes its inputs)

        def run(x):
            key = tuple((k, v.shape) for k, v in sorted(x.items()))
            if key not in runners:
                runners[key] = Interpreter(model_path=path).get_signature_runner()
            return runners[key](**x)

        return run
    if target == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]  # the model's input names
        outputs = [o.name for o in session.get_outputs()]
        return lambda x: dict(zip(outputs, session.run(None, {n: x[n] for n in names})))
    if target == "coreml":
        import platform

        if platform.system() != "Darwin":
            raise RuntimeError(f"coreml: predictions need macOS (the CoreML runtime); this system is {platform.system()}")
        import coremltools as ct

        mlmodel = ct.models.MLModel(path)  # compute units: all (CPU, GPU, Neural Engine), as an app loads it
        # the file's masks are float inputs (CoreML has no bool inputs)
        return lambda x: mlmodel.predict({k: v.astype("float32") if v.dtype == bool else v for k, v in x.items()})
    if target == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": openvino_ir.precision_of(quantize)})
        return lambda x: {
            "|".join(sorted(port.get_names())) or str(i): np.asarray(value)
            for i, (port, value) in enumerate(compiled(x).items())
        }
    raise ValueError(f"artefact_runner: `target` must be one of {list(ROUTES)}; received {target!r}")


def output_keys(model):
    """Sorted names of a model's dict outputs, or None for a single output."""
    return sorted(model.output) if isinstance(model.output, dict) else None


def select_outputs(outputs, keys, target):
    """A runtime's {name: array} -> one array laid out as `outputs_to_numpy` lays out the
    Keras outputs. Several outputs are matched to the Keras names by the name they carry."""
    import numpy as np

    if keys is None:
        if len(outputs) != 1:
            raise ExportVerificationError(f"{target}: expected one output; received {sorted(outputs)}")
        return np.asarray(next(iter(outputs.values())))
    parts = []
    for key in keys:
        found = [name for name in outputs if key in name.replace(":", "/").replace("|", "/").split("/") or name == key]
        if len(found) != 1:
            raise ExportVerificationError(f"{target}: cannot tell output {key!r} among {sorted(outputs)}")
        part = np.asarray(outputs[found[0]])
        parts.append(part.reshape(part.shape[0], -1))
    return np.concatenate(parts, axis=1)


def _progress(job, step):
    """One progress line on stderr, marked for the parent to pass through, when asked for."""
    if job.get("progress"):
        print(f"{PROGRESS_PREFIX}export {job['target']}: {step}", file=sys.stderr, flush=True)


def worker(job):
    import keras
    import numpy as np

    from keras_perceiver.examples import outputs_to_numpy

    _progress(job, "loading the model...")
    model, weights, notes = _load(job)
    model(_sizes(model, job)[0])  # build every layer before converting
    calibration, checks = _calibration_sets(model, job) if job["quantize"] == "int8" else (None, None)
    target = job["target"]
    names = list(model.named_inputs)
    extra = {"versions": _module_versions(target)}
    runtime_config = None
    work = Path(job["work"])  # intermediates (a SavedModel), in the export's staging directory
    work.mkdir(parents=True, exist_ok=True)
    try:
        _progress(job, "converting...")
        converted = _convert(model, job, str(work), calibration)
        size = sum(_file_size(p) for p in _companion_paths(target, job["out"]) if p.exists())
        if target == "openvino":
            condition = openvino_ir.runtime_condition(job["out"], openvino_ir.precision_of(job["quantize"]))
            extra["openvino"], runtime_config = condition, condition["compile_config"]
            if job["quantize"] == "int8":
                notes = (notes + "; " if notes else "") + (
                    f"NNCF static int8 products, calibrated on {len(calibration)} "
                    + ("rows of the given data" if checks else "random example inputs")
                    + (f", verified on {len(next(iter(checks[0].values())))} rows of it" if checks else ""))
            if job["quantize"] in ("bfloat16", "int8"):
                notes = (notes + "; " if notes else "") + (
                    ("the rest" if job["quantize"] == "int8" else "float32 IR") + " run with INFERENCE_PRECISION_HINT=bf16"
                    if condition["verified_precision"] == "bf16"
                    else "this CPU has no bf16: OpenVINO ran it in f32"
                )
            notes = (notes + "; " if notes else "") + condition["condition"]
        checked, abs_err, rel_err, latency = [], 0.0, 0.0, float("nan")
        # What the file is: the torch.export routes (ONNX, CoreML) are traced static unless
        # job["dynamic"]; the SavedModel-based routes always keep the model's open axes.
        dynamic = converted[1] if target == "coreml" else job["dynamic"] if target == "onnx" else True
        if job["verify"]:
            if target == "coreml":
                # Off macOS the CoreML runtime is missing: check the program that was converted.
                import platform

                import torch

                _progress(job, "verifying the converted torch.export program" + (
                    " and in CoreML..." if platform.system() == "Darwin" else " (CoreML predictions need macOS)..."))
                program = converted[0].module()
                sets = []
                for inputs in _sizes(model, dict(job, dynamic=dynamic)):
                    got = program(*[torch.from_numpy(inputs[n]) for n in names])
                    got = outputs_to_numpy(keras.tree.map_structure(lambda t: t.detach().numpy(), got))
                    sets.append((outputs_to_numpy(model(inputs)), got, inputs))
                if platform.system() == "Darwin":
                    run = artefact_runner(target, job["out"])
                    for expected, _, inputs in list(sets):
                        sets.append((expected, select_outputs(run(inputs), output_keys(model), target), inputs))
                    notes = (notes + "; " if notes else "") + "CoreML predictions checked on macOS"
                else:
                    notes = (notes + "; " if notes else "") + (
                        "CoreML predictions need macOS: checked the converted torch.export program"
                    )
            else:
                _progress(job, f"verifying in {ROUTES[target][2]}...")
                run = artefact_runner(target, job["out"], job["quantize"])
                sets = []
                for inputs in checks or _sizes(model, job):
                    expected = outputs_to_numpy(model(inputs))
                    sets.append((expected, select_outputs(run(inputs), output_keys(model), target), inputs))
                latency = 1000 * float(np.median(timed_runs(lambda: run(sets[0][2]), 10)))
            for expected, got, inputs in sets:
                if expected.shape != np.shape(got):
                    raise ExportVerificationError(f"{target}: output shape {np.shape(got)} != Keras {expected.shape}")
                diff = np.abs(expected - got)
                abs_err = max(abs_err, float(diff.max()))
                rel_err = max(rel_err, float(diff.max() / max(np.abs(expected).max(), 1e-12)))
                checked.append({n: list(v.shape) for n, v in inputs.items()})
            if job["quantize"] is None and abs_err > job["error_bound"]:
                raise ExportVerificationError(f"{target}: max abs error {abs_err:.3g} exceeds {job['error_bound']} (float32)")
            if job["quantize"] and rel_err > job["error_bound"]:
                raise ExportVerificationError(
                    f"{target} ({job['quantize']}): error {rel_err:.3g} of the output range exceeds the "
                    f"documented bound {job['error_bound']} (QUANTIZED_ERROR_BOUNDS or the preset's zoo file)"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    backend, route, runtime = ROUTES[target]
    report = ExportReport(
        target=target, route=f"{route} [{backend}]", runtime=runtime, path=job["out"], size_bytes=size,
        dynamic=dynamic, checked_shapes=checked, max_abs_error=abs_err, max_rel_error=rel_err,
        latency_ms=latency, quantize=job["quantize"], verified=bool(job["verify"]), notes=notes,
        error_bound=job["error_bound"], weights=weights, runtime_config=runtime_config,
    )
    Path(job["report"]).write_text(json.dumps(dict(extra, report=dataclasses.asdict(report))))


def _module_versions(target):
    """{distribution: version} of what the route used, for the artefact's metadata."""
    found = {}
    for name in ["keras", *REQUIREMENTS[target]]:
        for distribution in (name, name.replace("_", "-"), f"{name}-cpu"):
            try:
                found[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def _worker_main(job):
    """Run `worker(job)`; an exception is written to job["error"] ({type, mro, message,
    traceback}) for the parent to raise as its type, and the process exits 1."""
    try:
        worker(job)
    except Exception as error:  # every failure goes back to the parent, typed
        mro = [(cls.__module__, cls.__name__) for cls in type(error).__mro__]
        Path(job["error"]).write_text(json.dumps(dict(
            type=type(error).__name__, mro=mro, message=str(error), traceback=traceback.format_exc()[-6000:],
        )))
        sys.exit(1)


def export_all(model_or_preset, targets, directory, quantize=None, overwrite=False, random_weights=False,
               progress=True, calibration_data=None):
    """Export to each target into `directory` (named after the preset). `quantize` must apply
    to every target (ValueError naming the valid values per target otherwise); `progress`:
    each target's steps on stderr, and `calibration_data`, as in `export`. Returns the reports."""
    problem = quantize_problem(targets, quantize) or calibration_problem(calibration_data, quantize)
    if problem:
        raise ValueError(problem)
    name = Path(str(model_or_preset)).name if isinstance(model_or_preset, (str, os.PathLike)) else model_or_preset.name
    model_or_preset = with_original_weights(model_or_preset, random_weights)
    problem = weights_problem(model_or_preset, random_weights)
    if problem:
        raise ValueError(problem)
    reports = []
    for target in targets:
        path = Path(directory) / (name + (f"_{quantize}" if quantize else "") + SUFFIXES[target])
        reports.append(export(model_or_preset, target, path, quantize=quantize, overwrite=overwrite,
                              random_weights=random_weights, progress=progress, calibration_data=calibration_data))
    return reports


def format_reports(reports):
    from keras_perceiver.text_table import text_table

    header = ("target", "route", "size", "dynamic", "max abs err", "max rel err", "latency ms", "notes")
    return text_table(
        header,
        [
            (
                r.target + (f" ({r.quantize})" if r.quantize else ""), r.route, f"{r.size_bytes / 1e6:.2f} MB",
                "yes" if r.dynamic else "static", f"{r.max_abs_error:.1e}", f"{r.max_rel_error:.1e}",
                "-" if r.latency_ms != r.latency_ms else f"{r.latency_ms:.2f}", r.notes or "",
            )
            for r in reports
        ],
    )


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
