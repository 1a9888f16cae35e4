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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-perceiver", description=__doc__)
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

    worker = commands.add_parser("demo-worker", help=argparse.SUPPRESS)
    worker.add_argument("workdir")
    worker.add_argument("--reference", action="store_true")
    worker.add_argument("--repeats", type=int, default=10)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from keras_perceiver import demo as demo_module

        backends = args.backends or [os.environ.get("KERAS_BACKEND", "tensorflow")]
        rows = demo_module.run(backends, repeats=args.repeats)
        print(demo_module.format_table(rows, backends[0]))
        worst = max(r["parity"] for r in rows)
        print(f"\nlargest cross-backend difference: {worst:.2e} (float32)")
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
    if args.command == "demo-worker":
        from keras_perceiver import demo as demo_module

        demo_module.worker(args.workdir, args.reference, args.repeats)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
