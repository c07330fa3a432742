"""`python -m checkpoints_conv SRC DEST [--dtype float32|bfloat16] [--quantize none|int8|int4] [--force]`:
see `checkpoints_conv.convert`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_conv",
                                     description="Convert a Hugging Face folder or a GGUF file into a jaxserve "
                                                 "checkpoint (orbax weights + config.json + tokenizer).")
    parser.add_argument("src", help="a Hugging Face folder (config.json + *.safetensors) or a .gguf file")
    parser.add_argument("dest", help="the checkpoint folder to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored dtype")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="quantize the projections (q/k/v/o, gate/up/down); GGUF Q8_0 / Q4_0 / Q4_1 tensors "
                             "are repacked as they are")
    parser.add_argument("--quantize-embeddings", choices=("none", "int8", "int4"), default="none",
                        help="quantize embed and lm_head too")
    parser.add_argument("--group-size", type=int, default=None,
                        help="inputs per quantization group (default: 32 for GGUF, else int8 per channel, int4 128)")
    parser.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    args = parser.parse_args(argv)

    from checkpoints_conv.convert import convert

    try:
        stats = convert(args.src, args.dest, dtype=args.dtype, force=args.force, quantize=args.quantize,
                        quantize_embeddings=args.quantize_embeddings, group_size=args.group_size)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dest}: {stats.checkpoint_bytes / 2**20:.1f} MiB in {stats.seconds:.1f} s, "
          f"peak RSS {stats.peak_rss_bytes / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
