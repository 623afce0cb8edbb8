"""Convert reference weights to a moebius-jax (orbax) directory.

    python -m moebius_jax.convert --config configs/moebius.yaml \\
        --weights weight/Moebius/pretrained/diffusion_pytorch_model.bin --out converted/moebius
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moebius_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="reference-style model YAML")
    parser.add_argument("--weights", required=True, help=".bin / .safetensors / .EMA.bin")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--batch-stats-from", default=None,
                        help="plain checkpoint holding BatchNorm statistics (for an EMA file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)

    from moebius_jax.convert.errors import CheckpointError
    from moebius_jax.convert.orbax_io import save_variables
    from moebius_jax.loading import load_model

    try:
        _, variables = load_model(args.config, args.weights, batch_stats_from=args.batch_stats_from)
        raw_config = yaml.safe_load(pathlib.Path(args.config).read_text())
        out = save_variables(args.out, variables, raw_config, overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
