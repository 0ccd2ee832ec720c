"""`convert-to-sparse-gguf` and the `powerinfer-py convert` / `inspect` subcommands."""
from __future__ import annotations

import argparse
import sys

from powerinfer_py.errors import InputError, PowerInferError
from powerinfer_py.formats.gguf import read_gguf

from .hf_to_gguf import OUTTYPES, convert
from .inspect import describe


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face checkpoint folder (config.json, safetensors or .bin, tokenizer)")
    p.add_argument("predictor_dir", nargs="?", help="predictor folder (model_<i>.pt, config.json); not with --dense")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. model.powerinfer.gguf")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f16", help="type of 2-D weights (default f16)")
    p.add_argument("--dense", action="store_true", help="write a plain llama.cpp GGUF (ffn_down, no predictors)")
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    if args.dense and args.predictor_dir:
        raise InputError("--dense writes no predictors: drop the predictor folder argument")
    convert(args.hf_dir, args.output, args.predictor_dir, args.outtype, args.dense, args.force)
    print(args.output)
    return 0


def cmd_inspect(args) -> int:
    print(describe(read_gguf(args.file)))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="Hugging Face folder + predictors -> PowerInfer sparse GGUF (or --dense GGUF)")
    add_convert_args(p)
    p = subparsers.add_parser("inspect", help="print the header, keys and tensor table of a GGUF, PowerInfer or .gpuidx file")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)


def main(argv=None) -> int:
    """Console script `convert-to-sparse-gguf HF_DIR PREDICTOR_DIR -o OUT`."""
    parser = argparse.ArgumentParser(prog="convert-to-sparse-gguf", description=convert.__doc__)
    add_convert_args(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PowerInferError as e:
        print(f"convert-to-sparse-gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert-to-sparse-gguf: interrupted (no output written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
