"""Train Moebius (task loss, or distillation from PixelHacker when a teacher is configured).

    python train.py --config configs/train_demo.yaml --workdir runs/demo
    python train.py --config configs/train_demo.yaml --workdir runs/demo --resume optimizer.learning_rate=3e-4

Any config field can be overridden as key=value (dotted for nested sections, values parsed as
YAML). The workdir receives checkpoints/, metrics.jsonl, tensorboard/, samples/ and the
resolved config.yaml. The device mesh comes from mesh.data / mesh.fsdp; on multi-host TPU
slices pass --distributed (or set JAX's coordinator environment variables).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML (see configs/train_demo.yaml)")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and samples go here")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (total)")
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
    from moebius_jax.train.config import load_train_config
    from moebius_jax.train.loop import Trainer
    from moebius_jax.train.program import describe_program

    overrides = list(args.overrides)
    if args.data_jsonl is not None:
        overrides += [f"data.jsonl={args.data_jsonl}", "data.folder=null", "data.tfds_name=null"]
    try:
        config = load_train_config(args.config, overrides)
        if args.print_shardings:
            print("\n".join(describe_program(config)))
            return 0
        trainer = Trainer.build(config, args.workdir)
    except (ValueError, FileNotFoundError) as e:
        logging.error("%s", e)
        return 1
    trainer.run(resume=args.resume, max_steps=args.max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
