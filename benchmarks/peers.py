"""The PyTorch originals timed beside ours: how a peer is named and called, the float32 peer
a paired cell alternates with, and the peers' own cells."""

import json
import statistics
import sys

from keras_perceiver.benchmarks.devices import synchronize, torch_accelerator
from keras_perceiver.benchmarks.subjects import bench_inputs, peer_model
from keras_perceiver.timing import timed

_PAIRED_PEERS = {}  # bench name -> peer_model(name), built once per process for paired timing


def paired_peer_call(name, batch, autocast=None):
    """The float32 peer of `name` on the CPU as a no-argument call on the bench inputs of
    `batch` (what `run_peers` times), or None where there is no peer; with `autocast`
    ("bfloat16"), run under `torch.autocast` in that dtype, as a PyTorch user runs it in bf16."""
    import contextlib

    import torch

    if name not in _PAIRED_PEERS:
        _PAIRED_PEERS[name] = peer_model(name)
    if _PAIRED_PEERS[name] is None:
        return None
    model, to_torch = _PAIRED_PEERS[name]
    forward = peer_call(model, model, to_torch(bench_inputs(name, batch)))

    def call():
        cast = torch.autocast("cpu", dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()
        with torch.no_grad(), cast:
            return forward()

    return call


def paired_peer_name(name):
    """The name (`peer_name`) of the peer `paired_peer_call` built for bench name `name`."""
    return peer_name(_PAIRED_PEERS[name][0])


def peer_name(model):
    """A peer as the tables name it: its package and class, e.g. "transformers.PerceiverForMaskedLM"."""
    return type(model).__module__.split(".")[0] + "." + type(model).__name__


def peer_call(fn, model, args):
    """A no-argument call of the peer `model` (through `fn`: the model or its compiled form) on
    the tensors its arguments builder made (`subjects.build_peer`): transformers' Perceiver
    heads take them by keyword ((token ids, mask) for the language model, (pixels,) for the
    image models); the resamplers and Idefics2's connector in order ((media,), or
    Idefics2Connector's (image_hidden_states, attention_mask))."""
    if type(model).__name__ == "PerceiverForMultimodalAutoencoding":  # (inputs, output points), dicts
        return lambda: fn(inputs=args[0], subsampled_output_points=args[1])
    if type(model).__name__.startswith("PerceiverFor"):
        if len(args) == 2:
            return lambda: fn(inputs=args[0], attention_mask=args[1])
        return lambda: fn(inputs=args[0])
    return lambda: fn(*args)


def _moved(value, device, dtype):
    """A peer's argument on `device`, floating tensors in `dtype`; dicts (the multimodal
    autoencoder's) entry by entry."""
    if isinstance(value, dict):
        return {k: _moved(v, device, dtype) for k, v in value.items()}
    if value is None:
        return None
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def run_peers(presets, batches, repeats, compiled=False, dtypes=("float32",), peaks=None, accelerated=False):
    """The PyTorch originals, per preset x dtype x batch, on the GPU when `accelerated`
    (inputs moved there first, each call timed to completion)."""
    import torch

    device = torch_accelerator() if accelerated else "cpu"
    cells = []
    for name in presets:
        # the peer a paired cell already built (seeded: the same weights) is taken and released
        found = _PAIRED_PEERS.pop(name, None) or peer_model(name)
        if found is None:
            continue
        model, to_torch = found
        for dtype in dtypes:
            model = model.to(device=device, dtype=getattr(torch, dtype))
            fn = model if not compiled else torch.compile(model)
            for batch in batches:
                args = [_moved(a, device, getattr(torch, dtype)) for a in to_torch(bench_inputs(name, batch))]
                forward = peer_call(fn, model, args)
                call = (lambda: (forward(), synchronize(device))) if accelerated else forward  # noqa: E731
                with torch.no_grad():
                    compile_s = timed(call)
                    times = [timed(call) for _ in range(repeats)]
                median = statistics.median(times)
                mode = ("torch.compile" if compiled else "eager") + ("" if dtype == "float32" else f" {dtype}")
                cells.append(dict(preset=name, peer=peer_name(model),
                                  mode=mode, dtype=dtype, batch=batch, median_ms=1000 * median,
                                  spread_ms=1000 * (max(times) - min(times)), compile_s=compile_s if compiled else 0.0,
                                  peak_gflops=(peaks or {}).get(dtype)))
                print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
        del model
    return cells

