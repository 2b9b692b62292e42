"""The `keras-rwkv` command line."""

import argparse
import os
import sys


def _convert(args):
    from keras_rwkv import RWKV6Tokenizer
    from keras_rwkv.convert import convert_checkpoint
    from keras_rwkv.convert import write_preset

    backbone = convert_checkpoint(args.source, dtype=args.dtype)
    path = write_preset(
        [backbone, RWKV6Tokenizer()], args.output_dir, overwrite=args.overwrite
    )
    print(f"Wrote KerasHub preset to {path}")
    print(f"Load it with keras_rwkv.RWKV6Backbone.from_preset({path!r})")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-rwkv",
        description="RWKV6 for Keras 3 and KerasHub.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser(
        "convert",
        help="Convert a BlinkDL RWKV6 .pth checkpoint to a KerasHub preset.",
    )
    convert.add_argument("source", help="path to RWKV-x060-*.pth")
    convert.add_argument("output_dir", help="preset directory to write")
    convert.add_argument(
        "--dtype",
        default=None,
        help="dtype of the converted weights (float32, bfloat16, ...); "
        "default: the checkpoint's own (lossless)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT_DIR"
    )
    convert.set_defaults(func=_convert)
    return parser


def main(argv=None):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    args = build_parser().parse_args(argv)
    from keras_rwkv.convert import CheckpointError

    try:
        args.func(args)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
