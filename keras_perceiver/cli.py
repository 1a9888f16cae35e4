"""`keras-perceiver` (also `python -m keras_perceiver`)."""

import argparse
import os
import sys


def _backends(value):
    if value == "all":
        from keras_perceiver.demo import BACKENDS

        return list(BACKENDS)
    names = [b.strip() for b in value.split(",") if b.strip()]
    for name in names:
        if name not in ("jax", "tensorflow", "torch"):
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


def _run(argv=None):
    parser = _Parser(prog="keras-perceiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="build each family small, run eager and compiled, compare across backends"
    )
    demo.add_argument(
        "--backends",
        type=_backends,
        default=None,
        help="'all' or e.g. 'jax,torch' (default: the current KERAS_BACKEND); the first is the reference",
    )
    demo.add_argument("--repeats", type=int, default=10, help="timed calls per cell (median reported)")
    demo.add_argument("--models", default=None, help="comma-separated small models (default: every family)")
    demo.add_argument(
        "--export-to",
        default="saved_model,tflite,onnx,openvino,coreml",
        help="targets the demo preset (perceiver_digits) is exported to and verified in ('' for none)",
    )

    zoo = commands.add_parser("zoo", help="list the presets (pattern with wildcards), or print the README table")
    zoo.add_argument("pattern", nargs="?", default=None)
    zoo.add_argument("--markdown", action="store_true", help="print the README zoo table")

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint into a preset directory: a transformers Perceiver (hub id or "
        "save_pretrained directory) or a flamingo-pytorch / OpenFlamingo resampler state dict (.pt/.pth/.bin)",
    )
    convert.add_argument("source")
    convert.add_argument("out")
    convert.add_argument("--num-heads", type=int, default=8, help="resampler heads (not stored in a state dict)")
    convert.add_argument("--overwrite", action="store_true")

    export = commands.add_parser("export", help="export a preset (name or directory) and verify each artefact")
    export.add_argument("preset")
    export.add_argument("--to", default="coreml,openvino,tflite,onnx", help="comma-separated targets")
    export.add_argument("--out", required=True, help="directory for the artefacts")
    export.add_argument("--quantize", default=None,
                        help="dynamic_int8 (tflite, onnx), float16 (tflite) or bfloat16 (openvino); must apply to every --to target")
    export.add_argument("--random-weights", action="store_true",
                        help="export a preset that ships no weights with random ones (its metadata file says so)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace artefacts keras_perceiver wrote (their .keras-perceiver.json says so); never other files")

    bench = commands.add_parser("bench", help="latency / compile time / memory / %% of GEMM peak per preset x backend x mode")
    bench.add_argument("--presets", default="perceiver_digits", help="comma-separated preset names")
    bench.add_argument("--backends", type=_backends, default="all")
    bench.add_argument("--modes", default="eager,compiled", help="'' for none (artefacts only)")
    bench.add_argument(
        "--targets", default="",
        help="exported artefacts to time too, target[:quantize or static], e.g. onnx,onnx:static,onnx:dynamic_int8,openvino:bfloat16,tflite "
        "(onnx:static: one file per batch size, every axis fixed)",
    )
    bench.add_argument("--no-peers", action="store_true", help="skip the PyTorch originals")
    bench.add_argument("--paired", action="store_true",
                       help="also time each CPU cell in alternation with its float32 peer, in one process (twice the time)")
    bench.add_argument("--batch", type=_batches, default=[1], help="comma-separated batch sizes, e.g. 1,8")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--dtypes", default="float32", help="precisions of ours and the peers: float32 and / or bfloat16, comma-separated")
    bench.add_argument("--out", default="bench.json")
    bench.add_argument("--overwrite", action="store_true", help="replace existing result files")

    bench_report = commands.add_parser("bench-report", help="merge bench JSON files into a Markdown matrix (opening with our best route per preset against the originals) and a PNG")
    bench_report.add_argument("files", nargs="+")
    bench_report.add_argument("--markdown", default=None)
    bench_report.add_argument("--plot", default=None)
    bench_report.add_argument("--overwrite", action="store_true", help="replace existing result files")

    bound = commands.add_parser(
        "bench-bound", help="the best %% of GEMM peak a preset's matrix products allow (PyTorch profiler; ours and the peer)")
    bound.add_argument("--presets", default="perceiver_digits", help="comma-separated preset names")
    bound.add_argument("--batch", type=_batches, default=[1], help="comma-separated batch sizes, e.g. 1,4")
    bound.add_argument("--repeats", type=int, default=5)
    bound.add_argument("--json", default=None, help="write the rows here too")
    bound.add_argument("--overwrite", action="store_true", help="replace existing result files")

    profile = commands.add_parser(
        "bench-profile", help="where an ONNX artefact's time goes, by node type, and its products' %% of GEMM peak (onnxruntime)")
    profile.add_argument("preset", help="a preset or bench configuration (its bench inputs are used)")
    profile.add_argument("--onnx", default=None, help="profile this file instead of exporting the preset")
    profile.add_argument("--batch", type=int, default=1)
    profile.add_argument("--static", action="store_true", help="export with every axis fixed at the bench inputs' shapes")
    profile.add_argument("--quantize", default=None, choices=["dynamic_int8"], help="export an int8 file")
    profile.add_argument("--runs", type=int, default=3, help="profiled calls after one warm-up")
    profile.add_argument("--top", type=int, default=12, help="rows of the slowest (node type, shapes)")
    profile.add_argument("--json", default=None, help="write the profile here too")
    profile.add_argument("--overwrite", action="store_true", help="replace existing result files")

    scale = commands.add_parser("bench-scale", help="time and peak memory against the input length M")
    scale.add_argument("--lengths", default="1000,10000,100000,1000000")
    scale.add_argument("--backend", default="jax", choices=["jax", "tensorflow", "torch"])
    scale.add_argument("--plot", default=None)
    scale.add_argument("--json", default=None)
    scale.add_argument("--overwrite", action="store_true", help="replace existing result files")

    worker = commands.add_parser("demo-worker", help=argparse.SUPPRESS)
    worker.add_argument("workdir")
    worker.add_argument("--reference", action="store_true")
    worker.add_argument("--repeats", type=int, default=10)
    worker.add_argument("--models", default=None)

    args = parser.parse_args(argv)
    if args.command == "demo":
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
    if args.command == "zoo":
        from keras_perceiver import presets

        if args.markdown:
            print(presets.zoo_table())
        else:
            for name in presets.list_presets(args.pattern):
                entry = presets.zoo_entries()[name]
                print(f"{name:28s} {entry['class_name']:20s} {entry['parameter_count'] / 1e6:8.1f} M  {entry['description']}")
        return 0
    if args.command == "convert":
        from keras_perceiver.converters import convert_checkpoint

        path = convert_checkpoint(args.source, args.out, num_heads=args.num_heads, overwrite=args.overwrite)
        print(f"wrote {path}; load it with keras_perceiver.from_preset({str(path)!r})")
        return 0
    if args.command == "export":
        from keras_perceiver.converters import ROUTES, export_all, format_reports

        targets = [t.strip() for t in args.to.split(",") if t.strip()]
        unknown = [t for t in targets if t not in ROUTES]
        if unknown:
            parser.error(f"--to: expected targets among {','.join(ROUTES)}; received {','.join(unknown)}")
        reports = export_all(args.preset, targets, args.out, quantize=args.quantize, overwrite=args.overwrite,
                             random_weights=args.random_weights)
        print(format_reports(reports))
        return 0
    if args.command == "bench":
        from keras_perceiver.benchmarks import run as bench_run
        from keras_perceiver.benchmarks.cells import artefact_options
        from keras_perceiver.benchmarks.report import report

        presets = _bench_presets(parser, args.presets)
        backends = args.backends if isinstance(args.backends, list) else _backends(args.backends)
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
        bench_run.run(presets, backends, args.batch, args.repeats, [m for m in args.modes.split(",") if m], args.out,
                      peers=not args.no_peers, targets=targets, dtypes=dtypes, paired=args.paired)
        print(report([args.out]))
        return 0
    if args.command == "bench-bound":
        from keras_perceiver.benchmarks import bound

        presets = _bench_presets(parser, args.presets)
        if args.repeats < 1:
            parser.error(f"--repeats: expected a positive integer; received {args.repeats}")
        _refuse_existing(parser, args, json=args.json)
        print(bound.table(bound.run(presets, args.batch, args.repeats, args.json)))
        return 0
    if args.command == "bench-profile":
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
    if args.command == "bench-scale":
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
    if args.command == "bench-report":
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
    if args.command == "demo-worker":
        from keras_perceiver import demo as demo_module

        demo_module.worker(args.workdir, args.reference, args.repeats, (args.models or "").split(",") if args.models else None)
        return 0
    return 2


def main(argv=None):
    """The command line: a user's mistake (a bad argument, a refused overwrite, a missing
    package) ends with one line on stderr and exit code 2, never a traceback."""
    try:
        return _run(argv)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as error:
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), "")
        message = " ".join(str(error).split())
        print(f"keras-perceiver {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
