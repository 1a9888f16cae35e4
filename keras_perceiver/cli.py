"""`keras-perceiver` (also `python -m keras_perceiver`).

`build_parser` declares every command and `main` runs the one asked for through its handler
(`_demo`, `_export`, ...). Building the parser imports neither Keras nor a backend, so that
`--help` answers at once: each handler imports what its command needs.
"""

import argparse
import os
import sys

# plain constants (artefacts.py imports no Keras at module level): the choices of --to / --quantize
from keras_perceiver.converters.artefacts import QUANTIZE, ROUTES

BACKENDS = ("jax", "tensorflow", "torch")
BENCH_MODES = ("eager", "compiled")
HIDDEN_COMMANDS = ("demo-worker",)  # run by `demo` in its subprocesses, not by a user


def _backends(value):
    if value == "all":
        return list(BACKENDS)
    names = [b.strip() for b in value.split(",") if b.strip()]
    for name in names:
        if name not in BACKENDS:
            raise argparse.ArgumentTypeError(
                f"--backends: expected 'all' or a comma-separated subset of jax,tensorflow,torch; received {name!r}"
            )
    return names


def _batches(value):
    try:
        sizes = [int(b) for b in value.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch: expected comma-separated positive integers, e.g. 1,8; received {value!r}")
    return sizes


def _bench_presets(parser, value, flag="--presets"):
    """The comma-separated bench names in `value`, each a preset or a bench-only small
    configuration that the bench has inputs for."""
    from keras_perceiver.benchmarks.subjects import BENCH_INPUTS, SMALL_PEERS
    from keras_perceiver.presets import list_presets

    presets = [p for p in value.split(",") if p]
    unknown = [p for p in presets if p not in BENCH_INPUTS or (p not in list_presets() and p not in SMALL_PEERS)]
    if unknown or not presets:
        parser.error(f"{flag}: expected names among {','.join(BENCH_INPUTS)}; received {value!r}")
    return presets


def _refuse_existing(parser, args, **paths):
    """Result files are overwritten only when asked (--overwrite): each named output must be new."""
    for flag, path in paths.items():
        if path and os.path.exists(path) and not args.overwrite:
            parser.error(f"--{flag}: expected a new path, or --overwrite to replace it; received existing {path}")


class _Parser(argparse.ArgumentParser):
    """argparse with one line for a bad argument (no usage block); `--help` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where there is one to read (not None, False or
    '') and the help does not state it already."""

    def _get_help_string(self, action):
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_QUANTIZE_CHOICES = "; ".join(f"{target}: {', '.join(options)}" for target, options in QUANTIZE.items())


# ------------------------------------------------------------------------ the parser
def build_parser():
    """The `keras-perceiver` parser: one subcommand each, its handler in `handler`."""
    parser = _Parser(
        prog="keras-perceiver",
        description="The Perceiver family in Keras 3 (JAX, TensorFlow, PyTorch): a demo, the preset zoo, "
        "checkpoint conversion, verified artefact export and the benchmarks. `python -m keras_perceiver` is the same command.",
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, title="commands")

    def command(name, handler, help=None):
        # argparse lists only the commands added with a help
        listed = {} if name in HIDDEN_COMMANDS else {"help": help}
        sub = commands.add_parser(name, description=(help or "").replace("%%", "%"), formatter_class=_HelpFormatter, **listed)
        sub.set_defaults(handler=handler)
        return sub

    demo = command("demo", _demo, "build each family small, run eager and compiled, compare across backends")
    demo.add_argument(
        "--backends", type=_backends, default=None,
        help="'all' or a comma-separated subset of jax,tensorflow,torch (default: the current KERAS_BACKEND); "
        "the first is the reference",
    )
    demo.add_argument("--repeats", type=int, default=10, help="timed calls per cell (median reported)")
    demo.add_argument("--models", default=None, help="comma-separated small models (default: every family)")
    demo.add_argument(
        "--export-to", default="saved_model,tflite,onnx,openvino,coreml",
        help=f"targets among {','.join(ROUTES)} the demo preset (perceiver_digits) is exported to and verified in ('' for none)",
    )

    zoo = command("zoo", _zoo, "list the presets (pattern with wildcards), or print the README table")
    zoo.add_argument("pattern", nargs="?", default=None, help="preset names to list, e.g. 'perceiver_io*' (default: all)")
    zoo.add_argument("--markdown", action="store_true", help="print the README zoo table")

    convert = command(
        "convert", _convert,
        "convert a checkpoint into a preset directory: a transformers Perceiver (hub id or "
        "save_pretrained directory), a transformers Idefics / Idefics2 connector (save_pretrained directory) "
        "or a flamingo-pytorch / OpenFlamingo resampler state dict (.pt/.pth/.bin/.ckpt)",
    )
    convert.add_argument("source", help="the checkpoint: a hub id, a save_pretrained directory or a state dict file")
    convert.add_argument("out", help="the preset directory to write")
    convert.add_argument("--num-heads", type=int, default=8, help="resampler heads (not stored in a state dict)")
    convert.add_argument("--overwrite", action="store_true", help="replace a preset directory keras_perceiver wrote")

    export = command("export", _export, "export a preset (name or directory) and verify each artefact")
    export.add_argument("preset", help="a zoo preset name (see `keras-perceiver zoo`) or a preset directory")
    export.add_argument("--to", default="coreml,openvino,tflite,onnx",
                        help=f"comma-separated targets among {','.join(ROUTES)}")
    export.add_argument("--out", required=True, help="directory for the artefacts")
    export.add_argument("--quantize", default=None,
                        help=f"quantize every --to target (each must take it): {_QUANTIZE_CHOICES} (default: float32, none)")
    export.add_argument("--calibration-data", default=None, metavar="NPZ",
                        help="for --quantize int8: an .npz of inputs (arrays named as the model's inputs, or x for its "
                        "main one; examples first) whose ranges set the int8 scales (default: random example inputs)")
    export.add_argument("--random-weights", action="store_true",
                        help="export a preset that ships no weights with random ones (its metadata file says so)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace artefacts keras_perceiver wrote (their .keras-perceiver.json says so); never other files")

    finetune = command(
        "finetune", _finetune,
        "fine-tune a preset on an .npz (x, y), an image folder or a text file; write the best as a preset",
    )
    finetune.add_argument("preset", help="a zoo preset name (see `keras-perceiver zoo`) or a preset directory")
    finetune.add_argument("--data", required=True,
                          help="by family: a Perceiver classifier takes an .npz holding x (N, ...input shape) and integer "
                          "labels y, or an image folder (one sub-folder per class); a Perceiver IO language model "
                          "(perceiver_io_language) a UTF-8 text file (masked-byte modelling: 15%% of each window's bytes "
                          "masked, loss and accuracy at those positions); a resampler or connector (flamingo_resampler, "
                          "idefics_resampler, idefics2_connector, ...) an .npz holding media features x, an optional "
                          "boolean mask and integer labels y, with --num-classes (a class head on the pooled latents)")
    finetune.add_argument("--out", required=True,
                          help="the preset directory to write (a killed run resumes from .<out>.kp-backup beside it when re-run)")
    finetune.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    finetune.add_argument("--batch-size", type=int, default=32, help="examples per step")
    finetune.add_argument("--learning-rate", type=float, default=1e-3,
                          help="AdamW's peak rate (linear warm-up over 10%% of the steps, then cosine decay)")
    finetune.add_argument("--num-classes", type=int, default=None,
                          help="a new class count: a fresh head, every other weight from the preset (default: the preset's); "
                          "required for a resampler or connector preset without a head")
    finetune.add_argument("--freeze", default=None, choices=["head"],
                          help="head: train only the head, everything else frozen (default: train everything)")
    finetune.add_argument("--dtype", default=None, choices=["float32", "mixed_bfloat16", "mixed_float16"],
                          help="the dtype policy to train in (default: float32)")
    finetune.add_argument("--validation-split", type=float, default=0.0,
                          help="fraction of the data held out to pick the best epoch by validation loss (default: 0, none held out)")
    finetune.add_argument("--seed", type=int, default=0, help="seed of the weights' init, the shuffles, the split and the masked bytes")
    finetune.add_argument("--model-parallel", type=int, default=1,
                          help="devices each model is split over (JAX only; 1: data parallel over every device)")
    finetune.add_argument("--from-scratch", action="store_true",
                          help="train the preset's config from freshly initialised weights (none of the preset's)")
    finetune.add_argument("--backup-every-steps", type=int, default=20,
                          help="steps between backups of the training state (what a killed run resumes from)")
    finetune.add_argument("--overwrite", action="store_true", help="replace a preset directory keras_perceiver wrote")

    bench = command("bench", _bench, "latency / compile time / memory / %% of GEMM peak per preset x backend x mode")
    bench.add_argument("--presets", default="perceiver_digits", help="comma-separated preset or bench configuration names")
    bench.add_argument("--backends", type=_backends, default="all",
                       help="'all' or a comma-separated subset of jax,tensorflow,torch")
    bench.add_argument("--modes", default="eager,compiled",
                       help=f"comma-separated modes among {','.join(BENCH_MODES)}; '' for none (artefacts only)")
    bench.add_argument(
        "--targets", default="",
        help=f"exported artefacts to time too, target[:quantize or static] with targets among {','.join(ROUTES)}, "
        "e.g. onnx,onnx:static,onnx:dynamic_int8,openvino:bfloat16,tflite "
        "(onnx:static: one file per batch size, every axis fixed); default: none",
    )
    bench.add_argument("--no-peers", action="store_true", help="skip the PyTorch originals")
    bench.add_argument("--paired", action="store_true",
                       help="also time each CPU cell in alternation with its float32 peer, in one process (twice the time)")
    bench.add_argument("--batch", type=_batches, default="1", help="comma-separated batch sizes, e.g. 1,8")
    bench.add_argument("--repeats", type=int, default=5, help="timed calls per cell")
    bench.add_argument("--dtypes", default="float32",
                       help="precisions of ours and the peers: float32 and / or bfloat16, comma-separated")
    bench.add_argument("--out", default="bench.json", help="the result file (JSON)")
    bench.add_argument("--overwrite", action="store_true", help="replace existing result files")

    bench_report = command(
        "bench-report", _bench_report,
        "merge bench JSON files into a Markdown matrix (opening with our best route per preset against the originals) and a PNG",
    )
    bench_report.add_argument("files", nargs="+", help="result files of `keras-perceiver bench`")
    bench_report.add_argument("--markdown", default=None, help="write the Markdown here too")
    bench_report.add_argument("--plot", default=None, help="write the plot (PNG) here")
    bench_report.add_argument("--overwrite", action="store_true", help="replace existing result files")

    bound = command(
        "bench-bound", _bench_bound,
        "the best %% of GEMM peak a preset's matrix products allow (PyTorch profiler; ours and the peer)",
    )
    bound.add_argument("--presets", default="perceiver_digits", help="comma-separated preset or bench configuration names")
    bound.add_argument("--batch", type=_batches, default="1", help="comma-separated batch sizes, e.g. 1,4")
    bound.add_argument("--repeats", type=int, default=5, help="profiled calls per preset and batch size")
    bound.add_argument("--json", default=None, help="write the rows here too")
    bound.add_argument("--overwrite", action="store_true", help="replace existing result files")

    profile = command(
        "bench-profile", _bench_profile,
        "where an ONNX artefact's time goes, by node type, and its products' %% of GEMM peak (onnxruntime)",
    )
    profile.add_argument("preset", help="a preset or bench configuration (its bench inputs are used)")
    profile.add_argument("--onnx", default=None, help="profile this file instead of exporting the preset")
    profile.add_argument("--batch", type=int, default=1, help="batch size of the profiled inputs")
    profile.add_argument("--static", action="store_true", help="export with every axis fixed at the bench inputs' shapes")
    profile.add_argument("--quantize", default=None, choices=list(QUANTIZE["onnx"]),
                         help=f"export a quantized file: {', '.join(QUANTIZE['onnx'])} (default: float32)")
    profile.add_argument("--runs", type=int, default=3, help="profiled calls after one warm-up")
    profile.add_argument("--top", type=int, default=12, help="rows of the slowest (node type, shapes)")
    profile.add_argument("--json", default=None, help="write the profile here too")
    profile.add_argument("--overwrite", action="store_true", help="replace existing result files")

    scale = command("bench-scale", _bench_scale, "time and peak memory against the input length M")
    scale.add_argument("--lengths", default="1000,10000,100000,1000000", help="comma-separated input lengths M")
    scale.add_argument("--backend", default="jax", choices=list(BACKENDS), help="the backend timed")
    scale.add_argument("--plot", default=None, help="write the plot (PNG) here")
    scale.add_argument("--json", default=None, help="write the rows here too")
    scale.add_argument("--overwrite", action="store_true", help="replace existing result files")

    worker = command("demo-worker", _demo_worker, "one backend's part of `demo`, in its own process")
    worker.add_argument("workdir", help="directory the reference run writes models and inputs to")
    worker.add_argument("--reference", action="store_true", help="build and save the models (the first backend)")
    worker.add_argument("--repeats", type=int, default=10, help="timed calls per cell")
    worker.add_argument("--models", default=None, help="comma-separated small models")

    # the usage line names the listed commands only
    commands.metavar = "{" + ",".join(name for name in commands.choices if name not in HIDDEN_COMMANDS) + "}"
    return parser


# ------------------------------------------------------------------------ the handlers
# Each takes the parsed `args` and the top-level `parser` (its `error` ends a bad argument
# with one line and exit 2) and returns the exit code.
def _demo(args, parser):
    from keras_perceiver import demo as demo_module
    from keras_perceiver.examples import SMALL_MODELS

    backends = args.backends or [os.environ.get("KERAS_BACKEND", "tensorflow")]
    models = [m for m in (args.models or ",".join(SMALL_MODELS)).split(",") if m]
    unknown = [m for m in models if m not in SMALL_MODELS]
    if unknown or not models:
        parser.error(f"--models: expected names among {','.join(SMALL_MODELS)}; received {args.models!r}")
    rows = demo_module.run(backends, repeats=args.repeats, models=models)
    print(demo_module.format_table(rows, backends[0]))
    worst = max(r["parity"] for r in rows)
    print(f"\nlargest cross-backend difference: {worst:.2e} (float32)")
    targets = [t for t in args.export_to.split(",") if t]
    if targets:
        import tempfile

        from keras_perceiver.converters import export_all, format_reports

        print("\nperceiver_digits (trained weights) exported and verified in each runtime:")
        with tempfile.TemporaryDirectory() as out:
            print(format_reports(export_all("perceiver_digits", targets, out)))
    return 0


def _demo_worker(args, parser):
    from keras_perceiver import demo as demo_module

    demo_module.worker(args.workdir, args.reference, args.repeats, (args.models or "").split(",") if args.models else None)
    return 0


def _zoo(args, parser):
    from keras_perceiver import presets

    if args.markdown:
        print(presets.zoo_table())
    else:
        for name in presets.list_presets(args.pattern):
            entry = presets.zoo_entries()[name]
            print(f"{name:28s} {entry['class_name']:20s} {entry['parameter_count'] / 1e6:8.1f} M  {entry['description']}")
    return 0


def _convert(args, parser):
    from keras_perceiver.converters import convert_checkpoint

    path = convert_checkpoint(args.source, args.out, num_heads=args.num_heads, overwrite=args.overwrite)
    print(f"wrote {path}; load it with keras_perceiver.from_preset({str(path)!r})")
    return 0


def _export(args, parser):
    from keras_perceiver.converters import export_all, format_reports
    from keras_perceiver.converters.artefacts import PRIMARY_INPUT

    targets = [t.strip() for t in args.to.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ROUTES]
    if unknown:
        parser.error(f"--to: expected targets among {','.join(ROUTES)}; received {','.join(unknown)}")
    calibration = None
    if args.calibration_data:
        from keras_perceiver.storage import read_npz

        try:
            stored = read_npz(args.calibration_data, "--calibration-data", expected="an .npz file of input arrays")
        except ValueError as error:
            parser.error(str(error))
        # "x" is the primary input (alone, a bare array); other keys name inputs
        calibration = {(PRIMARY_INPUT if k == "x" else k): array for k, array in stored.items()}
        calibration = calibration.pop(PRIMARY_INPUT) if list(calibration) == [PRIMARY_INPUT] else calibration
    reports = export_all(args.preset, targets, args.out, quantize=args.quantize, overwrite=args.overwrite,
                         random_weights=args.random_weights, calibration_data=calibration)
    print(format_reports(reports))
    return 0


def _finetune(args, parser):
    from keras_perceiver.finetuning import finetune

    model, history = finetune(
        args.preset, args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, num_classes=args.num_classes, freeze=args.freeze, dtype=args.dtype,
        validation_split=args.validation_split, seed=args.seed, model_parallel=args.model_parallel,
        from_scratch=args.from_scratch, overwrite=args.overwrite, backup_every_steps=args.backup_every_steps,
    )
    final = ", ".join(f"{name} {values[-1]:.4f}" for name, values in history.history.items() if values)
    print(f"wrote {args.out} ({type(model).__name__}); final epoch: {final}; load it with keras_perceiver.from_preset({args.out!r})")
    return 0


def _bench(args, parser):
    from keras_perceiver.benchmarks import run as bench_run
    from keras_perceiver.benchmarks.cells import artefact_options
    import json

    from keras_perceiver.benchmarks.report import fastest_routes, report

    presets = _bench_presets(parser, args.presets)
    backends = args.backends if isinstance(args.backends, list) else _backends(args.backends)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(BENCH_MODES):
        parser.error(f"--modes: expected names among {','.join(BENCH_MODES)} or ''; received {args.modes!r}")
    targets = [t for t in args.targets.split(",") if t]
    options = artefact_options()
    wrong = [t for t in targets if t.partition(":")[0] not in options
             or (":" in t and t.partition(":")[2] not in options[t.partition(":")[0]])]
    if wrong:
        parser.error(f"--targets: expected target[:option] with options {options}; received {','.join(wrong)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or set(dtypes) - set(bench_run.DTYPES):
        parser.error(f"--dtypes: expected one or more of float32,bfloat16; received {args.dtypes!r}")
    _refuse_existing(parser, args, out=args.out)
    bench_run.run(presets, backends, args.batch, args.repeats, modes, args.out,
                  peers=not args.no_peers, targets=targets, dtypes=dtypes, paired=args.paired)
    print(report([args.out]))
    with open(args.out) as written:
        print("\nfastest route per precision on this machine:\n" + fastest_routes([json.load(written)]))
    return 0


def _bench_report(args, parser):
    from keras_perceiver.benchmarks.report import report

    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        parser.error(f"bench-report: expected existing result files; received missing {', '.join(missing)}")
    _refuse_existing(parser, args, markdown=args.markdown, plot=args.plot)
    try:
        print(report(args.files, args.markdown, args.plot))
    except ValueError as error:
        parser.error(str(error))
    return 0


def _bench_bound(args, parser):
    from keras_perceiver.benchmarks import bound

    presets = _bench_presets(parser, args.presets)
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer; received {args.repeats}")
    _refuse_existing(parser, args, json=args.json)
    print(bound.table(bound.run(presets, args.batch, args.repeats, args.json)))
    return 0


def _bench_profile(args, parser):
    from keras_perceiver.benchmarks import profile as onnx_profile

    if len(_bench_presets(parser, args.preset, "preset")) != 1:
        parser.error(f"preset: expected one name; received {args.preset!r}")
    for flag, value in (("batch", args.batch), ("runs", args.runs), ("top", args.top)):
        if value < 1:
            parser.error(f"--{flag}: expected a positive integer; received {value}")
    if args.onnx and (args.static or args.quantize):
        parser.error(f"--onnx: a given file is profiled as it is; received it with --static / --quantize ({args.onnx})")
    if args.onnx and not os.path.isfile(args.onnx):
        parser.error(f"--onnx: expected an existing ONNX file; received {args.onnx}")
    _refuse_existing(parser, args, json=args.json)
    result = onnx_profile.run(args.preset, args.batch, args.onnx, args.quantize, args.static, args.runs, args.json)
    print(onnx_profile.table(result, args.top))
    return 0


def _bench_scale(args, parser):
    import json

    from keras_perceiver.benchmarks.scaling import scale

    _refuse_existing(parser, args, json=args.json, plot=args.plot)
    rows = scale([int(m) for m in args.lengths.split(",")], args.backend, plot_out=args.plot)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    print("| M | forward s | s per 1e6 inputs | compile s | peak RSS MB |\n|---|---|---|---|---|")
    for r in rows:
        per = r["median_s"] / r["length"] * 1e6
        print(f"| {r['length']:,} | {r['median_s']:.3f} | {per:.2f} | {r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return 0


# ------------------------------------------------------------------------ entry point
def main(argv=None):
    """The command line: a user's mistake (a bad argument, a refused overwrite, a missing
    package) ends with one line on stderr and exit code 2, never a traceback."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.handler(args, parser)
    except (ValueError, FileExistsError, FileNotFoundError, ConnectionError, ImportError) as error:
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
        message = " ".join(str(error).split())
        print(f"keras-perceiver {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
