"""Train Moebius (task loss, or distillation from PixelHacker when a teacher is configured).

    python train.py --config configs/train_demo.yaml --workdir runs/demo
    python train.py --config configs/train_demo.yaml --workdir runs/demo --resume optimizer.learning_rate=3e-4

Any config field can be overridden as key=value (dotted for nested sections, values parsed as
YAML). The workdir receives checkpoints/, metrics.jsonl, tensorboard/, samples/ and the
resolved config.yaml; it must be new, empty or an earlier run's (continued with --resume).
The device mesh comes from mesh.data / mesh.fsdp; on multi-host TPU slices pass --distributed
(or set JAX's coordinator environment variables). Compiled programs go to JAX's persistent
cache (MOEBIUS_JAX_COMPILE_CACHE=DIR to move it, =off to disable).

Before anything compiles, the config, the workdir and the data are checked: every jsonl line is
parsed and every image and mask file's header read, so a bad data set fails in seconds.
"""

from __future__ import annotations

import logging
import pathlib
import sys

from moebius_jax import cli
from moebius_jax.io_safety import prepare_output_dir


def check_workdir(workdir: pathlib.Path, resume: bool) -> None:
    """Train only into a new or empty folder or an earlier run's (which needs --resume once it
    holds checkpoints): nothing of the user's is written over."""
    prepare_output_dir(workdir, "--workdir", marker="checkpoints", overwrite=True)
    if resume or not (workdir / "checkpoints").is_dir():
        return
    from moebius_jax.train.checkpointing import Checkpoints
    from moebius_jax.train.loop import restart_refusal

    checkpoints = Checkpoints(workdir / "checkpoints")
    latest = checkpoints.latest_step()
    checkpoints.close()
    if latest is not None:
        raise restart_refusal(workdir, latest)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="training YAML (see configs/train_demo.yaml)")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and samples go here")
    parser.add_argument("--max-steps", type=cli.positive_int, default=None, help="stop after this many steps (total)")
    parser.add_argument("--data-jsonl", default=None, help="the reference's jsonl (paths relative to it)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in workdir")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--print-shardings", action="store_true",
                        help="print every parameter's sharding on the mesh and exit (nothing is loaded or compiled)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):  # per-save chatter and backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import jax

    if args.distributed:
        jax.distributed.initialize()
    from moebius_jax.runtime import enable_compilation_cache

    enable_compilation_cache()  # a restart (resume, preemption) reloads its compiled step
    from moebius_jax.train.config import load_train_config
    from moebius_jax.train.loop import Trainer
    from moebius_jax.train.program import describe_program

    overrides = list(args.overrides)
    if args.data_jsonl is not None:
        overrides += [f"data.jsonl={args.data_jsonl}", "data.folder=null", "data.tfds_name=null"]
    config = load_train_config(args.config, overrides)
    if args.print_shardings:
        print("\n".join(describe_program(config)))
        return 0
    check_workdir(pathlib.Path(args.workdir), args.resume)
    trainer = Trainer.build(config, args.workdir)  # the data are checked first, then the step compiles
    trainer.run(resume=args.resume, max_steps=args.max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
