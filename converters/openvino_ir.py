"""The OpenVINO IR passes of the export: rewrites that keep the CPU plugin on its fast
kernels, NNCF's static int8 quantization, and the inference precision a file is run in.
Called by `artefacts` in its export subprocess; everything here imports openvino lazily."""


def rewrite_for_cpu(model):
    """Apply the IR rewrites in order; returns {rewrite: how many}. Each computes the same
    function (float32 results agree to rounding, about 1e-6) and leaves a graph it does not
    recognise as it is."""
    return {
        "einsums_as_matmuls": einsums_as_matmuls(model),
        "transposes_into_matmuls": transposes_into_matmuls(model),
        "layer_norms_as_mvn": layer_norms_as_mvn(model),
    }


def int8_quantized(converted, samples):
    """The OpenVINO model with NNCF's static post-training int8 quantization of `samples`
    (transformer preset: products with a weight quantized, softmax, norms and products of two
    activations left in floating point)."""
    import nncf
    import numpy as np

    ports = [port.get_any_name() for port in converted.inputs]
    missing = sorted(set(ports) - set(samples[0]))
    if missing:
        raise ValueError(f"export: the OpenVINO model's inputs {missing} are not among the calibration inputs {sorted(samples[0])}")
    # no SmoothQuant: it made perceiver_digits' file wrong past the ~64th example of a batch.
    # 7-bit weights in every layer (overflow fix): CPUs without VNNI (AVX2 only) multiply u8 x s8
    # pairs into a saturating int16, which left 0.27-0.32 of the output range as error on the
    # language and Fourier models (0.11 with the fix; AMD EPYC); the file then runs on any x86
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
        overflow_fix=nncf.OverflowFix.ENABLE)
    dataset = nncf.Dataset(samples, lambda sample: {name: np.asarray(sample[name]) for name in ports})
    # products of two activations (attention's scores and weighted sums) stay in bf16: on the
    # Fourier model's 512 x 50,176 cross-attention their quantize / re-layout steps cost more
    # than the int8 products saved (784 ms against 370 ms without them; bf16 446 ms)
    between_activations = nncf.IgnoredScope(names=products_of_activations(converted), validate=False)
    return nncf.quantize(converted, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
                         advanced_parameters=advanced, ignored_scope=between_activations)


def products_of_activations(model):
    """Names of the IR's MatMuls with no constant operand (weights reach a MatMul through
    Convert / Reshape / Transpose of a Constant)."""

    def weight(output):
        while output.get_node().get_type_name() in ("Convert", "Reshape", "Transpose"):
            output = output.get_node().input_value(0)
        return constant_data(output) is not None

    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "MatMul" and not any(weight(value) for value in op.input_values())]


def constant_data(output):
    """The values of an IR output that is a Constant, else None."""
    node = output.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def precision_of(quantize):
    """The CPU inference precision an OpenVINO artefact is verified in: "bf16" for
    quantize="bfloat16", and for the non-int8 part of an "int8" file; else "f32"."""
    return "bf16" if quantize in ("bfloat16", "int8") else "f32"


def set_precision(model, precision):
    """Store INFERENCE_PRECISION_HINT=`precision` in the IR's `runtime_options` rt_info, where
    OpenVINO looks for runtime properties a model carries. Whether compile_model applies this
    one depends on the OpenVINO version (`runtime_condition` finds out): the CPU plugin
    of OpenVINO 2026.4 reads only KV-cache and dynamic-quantization options from there."""
    model.set_rt_info(precision, ["runtime_options", "INFERENCE_PRECISION_HINT"])


def runtime_condition(xml, precision):
    """What an OpenVINO CPU must be given to compute the IR at `xml` in `precision` ("f32" or
    "bf16"), and what a default `ov.Core().compile_model(xml, "CPU")` does on this machine.

    Returns a dict: `compile_config` (the property to pass), `verified_precision` (bf16 only
    where the CPU has bf16 units), `cpu_default_precision`, `default_compile_precision` (read
    back from the compiled model), `rt_info_honoured` (True / False; None where this CPU's
    default is already the precision asked for, so a default compile cannot tell),
    `openvino_version` and `condition`, one sentence for the report's notes."""
    import openvino as ov

    core = ov.Core()
    bf16_units = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    verified = precision if precision == "f32" or bf16_units else "f32"
    cpu_default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    default_run = core.compile_model(str(xml), "CPU").get_property("INFERENCE_PRECISION_HINT").to_string()
    honoured = None if cpu_default == verified else default_run == verified
    config = {"INFERENCE_PRECISION_HINT": precision}
    version = ov.__version__.split("-")[0]
    if honoured:
        condition = (f"OpenVINO: a default compile_model(xml, 'CPU') runs {verified}, as verified (OpenVINO "
                     f"{version} applies the IR's runtime_options INFERENCE_PRECISION_HINT={precision})")
    elif default_run != verified:
        condition = (f"OpenVINO: compile with {config} for the verified {verified} results; a default "
                     f"compile_model(xml, 'CPU') runs {default_run} on this CPU (OpenVINO {version} ignores the "
                     f"IR's runtime_options INFERENCE_PRECISION_HINT)")
    else:
        condition = (f"OpenVINO: compile with {config} for the verified {verified} results; this CPU runs "
                     f"{default_run} by default, CPUs with AVX512-BF16 or AMX default to bf16")
    return dict(
        compile_config=config, verified_precision=verified, cpu_default_precision=cpu_default,
        default_compile_precision=default_run, rt_info_honoured=honoured, ir_runtime_options=dict(config),
        openvino_version=ov.__version__, condition=condition,
    )


def einsums_as_matmuls(model):
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


def transposes_into_matmuls(model):
    """Move the last-two-axes swap of a Transpose feeding a MatMul's second operand into the
    MatMul (transpose_b) where what stays of the Transpose only moves axes of size 1 (a
    reshape); returns how many. Attention's keys, (B, Tk, H, D) -> (B, H, D, Tk), stayed a
    copy of every key for one head (14-21 ms of the 224 x 224 Fourier model's 50,176 keys),
    the TensorFlow graph having fused the two transposes into one before the conversion."""
    import numpy as np
    import openvino.opset13 as opset

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_attributes()["transpose_b"]:
            continue
        source = op.input_value(1).get_node()
        if source.get_type_name() != "Transpose" or constant_data(source.input_value(1)) is None:
            continue
        perm = [int(a) for a in constant_data(source.input_value(1))]
        shape = source.input_value(0).get_partial_shape()
        if len(perm) < 2 or shape.rank.is_dynamic:
            continue
        kept = perm[:-2] + [perm[-1], perm[-2]]
        sized = [a for a in kept if not (shape[a].is_static and shape[a].get_length() == 1)]
        if sized != sorted(sized):  # what stays would still move data
            continue
        keys = opset.transpose(source.input_value(0), opset.constant(np.array(kept, np.int64))).output(0)
        product = opset.matmul(op.input_value(0), keys, op.get_attributes()["transpose_a"], True)
        op.output(0).replace(product.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def layer_norms_as_mvn(model):
    """Rewrite Keras' TensorFlow layer norm, x * inv + (-mean * inv + beta) with
    inv = rsqrt(var + eps) * gamma, as OpenVINO's MVN kernel times gamma plus beta; returns
    how many. That form makes inv and -mean * inv full-size tensors (one per row and
    channel): four elementwise passes over every normed activation besides the moments,
    which the CPU plugin kept as separate kernels."""
    import numpy as np
    import openvino.opset13 as opset

    def kind(output):
        return output.get_node().get_type_name()

    def other(node, output):
        """The input of binary `node` that is not `output` (None if neither is)."""
        a, b = node.input_value(0), node.input_value(1)
        return b if a == output else a if b == output else None

    count = 0
    for power in model.get_ordered_ops():
        if power.get_type_name() != "Power" or not np.allclose(constant_data(power.input_value(1)), -0.5):
            continue
        add_eps = power.input_value(0)
        if kind(add_eps) != "Add":
            continue
        variance, eps = add_eps.get_node().input_value(0), constant_data(add_eps.get_node().input_value(1))
        if kind(variance) != "ReduceMean" or eps is None or eps.size != 1:
            continue
        squared = variance.get_node().input_value(0)
        if kind(squared) != "SquaredDifference" or kind(squared.get_node().input_value(1)) != "ReduceMean":
            continue
        x, mean = squared.get_node().input_value(0), squared.get_node().input_value(1)
        axes = constant_data(mean.get_node().input_value(1))
        if mean.get_node().input_value(0) != x or axes is None or not np.array_equal(axes, constant_data(variance.get_node().input_value(1))):
            continue
        inv, gamma = power.output(0), None
        users = [t.get_node() for t in inv.get_target_inputs()]
        if len(users) == 1 and users[0].get_type_name() == "Multiply" and constant_data(other(users[0], inv)) is not None:
            gamma, inv = other(users[0], inv), users[0].output(0)
        scaled = shifted = None  # x * inv; -mean * inv
        for user in (t.get_node() for t in inv.get_target_inputs()):
            if user.get_type_name() != "Multiply":
                break
            factor = other(user, inv)
            if factor == x:
                scaled = user.output(0)
            elif kind(factor) == "Multiply" and factor.get_node().input_value(0) == mean and np.allclose(constant_data(factor.get_node().input_value(1)), -1):
                shifted = user.output(0)
        if scaled is None or shifted is None:
            continue
        beta, ends = None, [t.get_node() for t in shifted.get_target_inputs()]
        if len(ends) == 1 and ends[0].get_type_name() == "Add" and constant_data(other(ends[0], shifted)) is not None:
            beta, shifted = other(ends[0], shifted), ends[0].output(0)
        final = [t.get_node() for t in shifted.get_target_inputs()]
        if len(final) != 1 or final[0].get_type_name() != "Add" or other(final[0], shifted) != scaled:
            continue
        y = opset.mvn(x, opset.constant(np.asarray(axes, np.int64)), True, float(eps.ravel()[0]), "inside_sqrt").output(0)
        if gamma is not None:
            y = opset.multiply(y, gamma).output(0)
        if beta is not None:
            y = opset.add(y, beta).output(0)
        final[0].output(0).replace(y)
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count
