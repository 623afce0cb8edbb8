"""Export a training checkpoint to the reference's formats, so the PyTorch code loads it.

    python -m moebius_jax.train.export --workdir runs/demo --out exported/   [--step N] [--overwrite]

writes `diffusion_pytorch_model.safetensors` (parameters and BatchNorm statistics under
the reference's names and layouts) and, when the run kept an EMA,
`diffusion_pytorch_model.EMA.bin` in the reference's LitEma layout.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import numpy as np

from moebius_jax import cli
from moebius_jax.convert.state_dict import write_ema_file, write_safetensors
from moebius_jax.errors import UserError
from moebius_jax.io_safety import prepare_output_dir
from moebius_jax.loading import export_state_dict
from moebius_jax.train.checkpointing import Checkpoints

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
EMA_NAME = "diffusion_pytorch_model.EMA.bin"


def export_state(state: Any, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """A (host) train-state tree -> reference files in out_dir; returns the paths written."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / WEIGHTS_NAME]
    write_safetensors(written[0], export_state_dict({"params": state["params"], "batch_stats": state["batch_stats"]}))
    ema = state.get("ema")
    if ema:
        shadow = export_state_dict({"params": ema["shadow"]})
        written.append(out_dir / EMA_NAME)
        write_ema_file(written[1], shadow, float(np.asarray(ema["decay"])), int(np.asarray(ema["num_updates"])))
    return written


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True, help="a train.py workdir")
    parser.add_argument("--out", required=True, help="output directory: new, empty, or an earlier export")
    parser.add_argument("--step", type=cli.non_negative_int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.workdir) / "checkpoints"
    if not directory.is_dir():  # checked first: opening the checkpoints would create the folder
        raise UserError(f"--workdir {args.workdir}: not a train.py workdir (no checkpoints/ folder)")
    prepare_output_dir(args.out, "--out", marker=WEIGHTS_NAME, writes=[EMA_NAME], overwrite=args.overwrite)
    checkpoints = Checkpoints(directory)
    steps = sorted(checkpoints.manager.all_steps())
    if args.step is not None and args.step not in steps:
        raise UserError(f"--step {args.step}: {directory} holds the steps {steps or 'none'}")
    state = checkpoints.restore_params(args.step)
    for path in export_state(state, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
