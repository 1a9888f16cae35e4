"""Export a model to an edge artefact and verify it in that artefact's own runtime.

`export(model_or_preset, target, path)` works from any KERAS_BACKEND: each target goes
through the route that converts it best (`ROUTES`, the one route table), run in a
subprocess under the backend that route needs, from a `.keras` file or a preset.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from keras_perceiver.bench import timed_runs

# target -> (backend the conversion runs under, route, runtime that verifies it)
ROUTES = {
    "saved_model": ("tensorflow", "keras export (tf_saved_model)", "tf.saved_model"),
    "tflite": ("tensorflow", "SavedModel -> TFLiteConverter (builtin ops)", "LiteRT interpreter"),
    "onnx": ("torch", "torch.export -> torch.onnx (dynamo)", "onnxruntime"),
    "openvino": ("tensorflow", "SavedModel -> openvino.convert_model -> Einsum as MatMul", "OpenVINO CPU (f32; bf16 with quantize='bfloat16')"),
    "coreml": ("torch", "torch.export -> run_decompositions -> coremltools mlprogram", "CoreML (macOS only)"),
}
TARGETS = tuple(ROUTES)
SUFFIXES = {"saved_model": "", "tflite": ".tflite", "onnx": ".onnx", "openvino": ".xml", "coreml": ".mlpackage"}
# modules each route needs, and the pip extra that brings them
REQUIREMENTS = {
    "saved_model": ["tensorflow"],
    "tflite": ["tensorflow", "ai_edge_litert"],
    "onnx": ["torch", "onnxscript", "onnxruntime"],
    "openvino": ["tensorflow", "openvino"],
    "coreml": ["torch", "coremltools"],
}
# openvino "bfloat16": the same float32 IR, executed with INFERENCE_PRECISION_HINT=bf16 (AMX /
# AVX512-BF16 CPUs, where it is also OpenVINO's default); verified and timed that way.
QUANTIZE = {"tflite": ("dynamic_int8", "float16"), "onnx": ("dynamic_int8",), "openvino": ("bfloat16",)}
# Bounds on a quantized artefact's max_rel_error (max abs error / max |Keras output|), unless
# the preset's zoo file sets its own under "quantized_error_bounds". Measured values: README.
QUANTIZED_ERROR_BOUNDS = {"float16": 0.005, "bfloat16": 0.05, "dynamic_int8": 0.15}
FLOAT32_TOLERANCE = 1e-4
COREML_MAX_OPEN_SIZE = 8192  # upper bound of a CoreML RangeDim where the model sets none


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


def quantized_error_bound(model_or_preset, quantize):
    """The bound on max_rel_error for `quantize`: the zoo preset's own, else the default."""
    from keras_perceiver.presets import zoo_entries

    entry = zoo_entries().get(str(model_or_preset)) if isinstance(model_or_preset, str) else None
    return ((entry or {}).get("quantized_error_bounds") or {}).get(quantize, QUANTIZED_ERROR_BOUNDS[quantize])


def _check_requirements(target):
    missing = [m for m in REQUIREMENTS[target] if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"export to {target!r} needs {missing}: pip install 'keras-perceiver[export]'"
        )


def export(
    model_or_preset, target, path, input_shapes=None, dynamic=True, quantize=None, verify=True, overwrite=False
):
    """Convert `model_or_preset` (a keras_perceiver model, a preset name or directory) to
    `target` at `path`, verify it in its runtime, and return an ExportReport.

    input_shapes: optional {input name: full shape, batch first} of the example inputs the
    artefact is traced and checked with, e.g. {"media": (1, 2, 1, 32, 128)} (default: batch 2,
    variable lengths 24); dynamic: keep the variable axes open in the ONNX and CoreML files
    (False: traced static at those shapes; the SavedModel-based targets always keep them) and
    check a second, different size;
    quantize: None, or one of QUANTIZE[target]; the artefact's error relative to the output
    range must then stay within the preset's documented bound (`quantized_error_bound`). An existing `path` is replaced only with `overwrite=True`.
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
    _check_requirements(target)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"export: {str(path)!r} exists; pass overwrite=True to replace it")
    backend, _, _ = ROUTES[target]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if isinstance(model_or_preset, (str, os.PathLike)):
            source = {"preset": str(model_or_preset)}
        else:
            model_file = work / "model.keras"
            model_or_preset.save(model_file)
            source = {"keras_file": str(model_file)}
        job = dict(
            source, target=target, out=str(work / ("artefact" + SUFFIXES[target])), shapes=input_shapes,
            dynamic=dynamic, quantize=quantize, verify=verify, report=str(work / "report.json"),
            error_bound=quantized_error_bound(model_or_preset, quantize) if quantize else FLOAT32_TOLERANCE,
        )
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run(
            [sys.executable, "-m", "keras_perceiver.converters.artefacts", json.dumps(job)],
            env=env, capture_output=True, text=True,
        )
        if done.returncode:
            raise RuntimeError(f"export to {target} failed under {backend}:\n{done.stderr[-4000:]}")
        report = ExportReport(**json.loads(Path(job["report"]).read_text()))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.move(job["out"], path)
        if target == "openvino":  # the weights file travels with the .xml
            shutil.move(str(Path(job["out"]).with_suffix(".bin")), path.with_suffix(".bin"))
        report.path = str(path)
    return report


# ------------------------------------------------------------------ worker side
def _load(job):
    import keras

    import keras_perceiver as kp

    if "keras_file" in job:
        return keras.saving.load_model(job["keras_file"]), ""
    try:
        return kp.from_preset(job["preset"]), ""
    except ValueError as error:
        if "ships no weights" not in str(error):
            raise
        return kp.from_preset(job["preset"], load_weights=False), "random weights (the preset ships none)"


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


def _convert(model, job, work):
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
        _einsums_as_matmuls(converted)
        ov.save_model(converted, out, compress_to_fp16=False)
    elif target == "coreml":
        return _coreml(model, job)


def _einsums_as_matmuls(model):
    """Rewrite the IR's two-operand Einsums (attention's products, as the TensorFlow graph
    writes them) as Transpose + batched MatMul; returns how many.

    OpenVINO's CPU plugin decomposes an Einsum with a dynamic batch into copies (a reference
    Broadcast kernel) around its MatMul: on the 224 x 224 Fourier model 15-20% of the time
    (benchmarks/NOTES.md). Only equations with one contracted and one free index per side,
    the shape of attention's products, are rewritten."""
    import numpy as np
    import openvino.opset13 as opset

    def arrange(value, have, want):
        order = [have.index(c) for c in want]
        if order == sorted(order):
            return value
        return opset.transpose(value, opset.constant(np.array(order, np.int64))).output(0)

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Einsum" or len(op.inputs()) != 2:
            continue
        lhs, rhs, out = op.get_attributes()["equation"].replace("->", ",").split(",")
        batch = [c for c in out if c in lhs and c in rhs]
        contracted = [c for c in lhs if c in rhs and c not in out]
        free_lhs = [c for c in lhs if c not in rhs]
        free_rhs = [c for c in rhs if c not in lhs]
        shaped_like_a_product = (len(contracted), len(free_lhs), len(free_rhs)) == (1, 1, 1) and sorted(out) == sorted(
            batch + free_lhs + free_rhs
        ) and sorted(lhs + rhs) == sorted(2 * batch + 2 * contracted + free_lhs + free_rhs)
        if not shaped_like_a_product:
            continue
        product = opset.matmul(
            arrange(op.input_value(0), lhs, batch + free_lhs + contracted),
            arrange(op.input_value(1), rhs, batch + contracted + free_rhs),
            False, False,
        ).output(0)
        op.output(0).replace(arrange(product, batch + free_lhs + free_rhs, list(out)))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


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


def _runner(target, out, quantize=None):
    """-> function(inputs dict) -> {output name: NumPy array}, in the artefact's runtime
    (an OpenVINO artefact in bf16 where `quantize` is "bfloat16"; CoreML's on macOS only)."""
    import numpy as np

    if target == "saved_model":
        import tensorflow as tf

        fn = tf.saved_model.load(out).signatures["serving_default"]
        return lambda x: {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in x.items()}).items()}
    if target == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        runners = {}  # one interpreter per input shape set (the runner resizes its inputs)

        def run(x):
            key = tuple((k, v.shape) for k, v in sorted(x.items()))
            if key not in runners:
                runners[key] = Interpreter(model_path=out).get_signature_runner()
            return runners[key](**x)

        return run
    if target == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]  # the model's input names
        outputs = [o.name for o in session.get_outputs()]
        return lambda x: dict(zip(outputs, session.run(None, {n: x[n] for n in names})))
    if target == "coreml":
        import platform

        if platform.system() != "Darwin":
            raise RuntimeError(f"coreml: predictions need macOS (the CoreML runtime); this system is {platform.system()}")
        import coremltools as ct

        mlmodel = ct.models.MLModel(out)  # compute units: all (CPU, GPU, Neural Engine), as an app loads it
        # the file's masks are float inputs (CoreML has no bool inputs)
        return lambda x: mlmodel.predict({k: v.astype("float32") if v.dtype == bool else v for k, v in x.items()})
    if target == "openvino":
        import openvino as ov

        precision = "bf16" if quantize == "bfloat16" else "f32"
        compiled = ov.Core().compile_model(out, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        return lambda x: {
            "|".join(sorted(port.get_names())) or str(i): np.asarray(value)
            for i, (port, value) in enumerate(compiled(x).items())
        }
    raise ValueError(target)


def output_keys(model):
    """Sorted names of a model's dict outputs, or None for a single output."""
    return sorted(model.output) if isinstance(model.output, dict) else None


def select_outputs(outputs, keys, target):
    """A runtime's {name: array} -> one array laid out as `outputs_to_numpy` lays out the
    Keras outputs. Several outputs are matched to the Keras names by the name they carry."""
    import numpy as np

    if keys is None:
        if len(outputs) != 1:
            raise AssertionError(f"{target}: expected one output; received {sorted(outputs)}")
        return np.asarray(next(iter(outputs.values())))
    parts = []
    for key in keys:
        found = [name for name in outputs if key in name.replace(":", "/").replace("|", "/").split("/") or name == key]
        if len(found) != 1:
            raise AssertionError(f"{target}: cannot tell output {key!r} among {sorted(outputs)}")
        part = np.asarray(outputs[found[0]])
        parts.append(part.reshape(part.shape[0], -1))
    return np.concatenate(parts, axis=1)


def worker(job):
    import keras
    import numpy as np

    from keras_perceiver.examples import outputs_to_numpy

    model, notes = _load(job)
    model(_sizes(model, job)[0])  # build every layer before converting
    target = job["target"]
    names = list(model.named_inputs)
    with tempfile.TemporaryDirectory() as work:
        converted = _convert(model, job, work)
        size = sum(f.stat().st_size for f in Path(job["out"]).rglob("*")) if Path(job["out"]).is_dir() else Path(job["out"]).stat().st_size
        if target == "openvino":
            size += Path(job["out"]).with_suffix(".bin").stat().st_size
            if job["quantize"] == "bfloat16":
                import openvino as ov

                bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
                notes = (notes + "; " if notes else "") + (
                    "float32 IR run with INFERENCE_PRECISION_HINT=bf16" if bf16
                    else "this CPU has no bf16: OpenVINO ran it in f32"
                )
        checked, abs_err, rel_err, latency = [], 0.0, 0.0, float("nan")
        # What the file is: the torch.export routes (ONNX, CoreML) are traced static unless
        # job["dynamic"]; the SavedModel-based routes always keep the model's open axes.
        dynamic = converted[1] if target == "coreml" else job["dynamic"] if target == "onnx" else True
        if job["verify"]:
            if target == "coreml":
                # Off macOS the CoreML runtime is missing: check the program that was converted.
                import platform

                import torch

                program = converted[0].module()
                sets = []
                for inputs in _sizes(model, dict(job, dynamic=dynamic)):
                    got = program(*[torch.from_numpy(inputs[n]) for n in names])
                    got = outputs_to_numpy(keras.tree.map_structure(lambda t: t.detach().numpy(), got))
                    sets.append((outputs_to_numpy(model(inputs)), got, inputs))
                if platform.system() == "Darwin":
                    run = _runner(target, job["out"])
                    for expected, _, inputs in list(sets):
                        sets.append((expected, select_outputs(run(inputs), output_keys(model), target), inputs))
                    notes = (notes + "; " if notes else "") + "CoreML predictions checked on macOS"
                else:
                    notes = (notes + "; " if notes else "") + (
                        "CoreML predictions need macOS: checked the converted torch.export program"
                    )
            else:
                run = _runner(target, job["out"], job["quantize"])
                sets = []
                for inputs in _sizes(model, job):
                    expected = outputs_to_numpy(model(inputs))
                    sets.append((expected, select_outputs(run(inputs), output_keys(model), target), inputs))
                latency = 1000 * float(np.median(timed_runs(lambda: run(sets[0][2]), 10)))
            for expected, got, inputs in sets:
                if expected.shape != np.shape(got):
                    raise AssertionError(f"{target}: output shape {np.shape(got)} != Keras {expected.shape}")
                diff = np.abs(expected - got)
                abs_err = max(abs_err, float(diff.max()))
                rel_err = max(rel_err, float(diff.max() / max(np.abs(expected).max(), 1e-12)))
                checked.append({n: list(v.shape) for n, v in inputs.items()})
            if job["quantize"] is None and abs_err > job["error_bound"]:
                raise AssertionError(f"{target}: max abs error {abs_err:.3g} exceeds {job['error_bound']} (float32)")
            if job["quantize"] and rel_err > job["error_bound"]:
                raise AssertionError(
                    f"{target} ({job['quantize']}): error {rel_err:.3g} of the output range exceeds the "
                    f"documented bound {job['error_bound']} (QUANTIZED_ERROR_BOUNDS or the preset's zoo file)"
                )
    backend, route, runtime = ROUTES[target]
    report = ExportReport(
        target=target, route=f"{route} [{backend}]", runtime=runtime, path=job["out"], size_bytes=size,
        dynamic=dynamic, checked_shapes=checked, max_abs_error=abs_err, max_rel_error=rel_err,
        latency_ms=latency, quantize=job["quantize"], verified=bool(job["verify"]), notes=notes,
        error_bound=job["error_bound"],
    )
    Path(job["report"]).write_text(json.dumps(dataclasses.asdict(report)))


def export_all(model_or_preset, targets, directory, quantize=None, overwrite=False):
    """Export to each target into `directory` (named after the preset); quantize applies
    where the target supports it. Returns the reports."""
    name = Path(str(model_or_preset)).name if isinstance(model_or_preset, (str, os.PathLike)) else model_or_preset.name
    reports = []
    for target in targets:
        q = quantize if quantize in QUANTIZE.get(target, ()) else None
        path = Path(directory) / (name + (f"_{q}" if q else "") + SUFFIXES[target])
        reports.append(export(model_or_preset, target, path, quantize=q, overwrite=overwrite))
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
    worker(json.loads(sys.argv[1]))
