"""Convert reference weights to a moebius-jax (orbax) directory.

    python -m moebius_jax.convert --config configs/moebius.yaml \\
        --weights weight/Moebius/pretrained/diffusion_pytorch_model.bin --out converted/moebius
"""

from __future__ import annotations

import sys

from moebius_jax import cli
from moebius_jax.io_safety import prepare_output_dir


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m moebius_jax.convert", description=__doc__)
    parser.add_argument("--config", required=True, help="reference-style model YAML")
    parser.add_argument("--weights", required=True, help=".bin / .safetensors / .EMA.bin")
    parser.add_argument("--out", required=True, help="output directory: new, empty, or an earlier conversion")
    parser.add_argument("--batch-stats-from", default=None,
                        help="plain checkpoint holding BatchNorm statistics (for an EMA file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --out")
    args = parser.parse_args(argv)

    from moebius_jax.config import load_config
    from moebius_jax.convert.orbax_io import CONFIG_FILE, VARIABLES_DIR, save_variables
    from moebius_jax.errors import read_yaml
    from moebius_jax.loading import load_model

    inputs = [p for p in (args.config, args.weights, args.batch_stats_from) if p is not None]
    prepare_output_dir(args.out, "--out", marker=VARIABLES_DIR, writes=[CONFIG_FILE], inputs=inputs,
                       overwrite=args.overwrite)
    config = load_config(args.config)  # a bad config is reported before the weights are read
    _, variables = load_model(config, args.weights, batch_stats_from=args.batch_stats_from)
    out = save_variables(args.out, variables, read_yaml(args.config), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
