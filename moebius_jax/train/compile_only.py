"""`train.py --compile-only`: the trainer's own step compiled for a target, nothing allocated.

The step, its mesh and its shardings are what `Trainer.build` compiles (`make_train_program`
over every device of the target, laid out by the config's `mesh` section), on abstract state:
no weights are read and no data are loaded, so a TPU topology (`v5e:2x2`, or a multi-host one
such as `v5e:4x4`) compiles on any host with libtpu (the `tpu` extra). The report
(`moebius_jax.aot`) gives per-chip memory against HBM, flops, bytes accessed, the roofline,
MFU and the collectives; a step that does not fit is a one-line error.
"""

from __future__ import annotations

import logging

import jax

from moebius_jax import aot
from moebius_jax.errors import ConfigError
from moebius_jax.models.vae import VaeConfig
from moebius_jax.train.config import TrainConfig
from moebius_jax.train.mesh import mesh_from_config
from moebius_jax.train.program import Networks, make_train_program
from moebius_jax.vae_loading import vae_structure

log = logging.getLogger(__name__)


def trace_train_step(config: TrainConfig, target: str, vae_config: VaeConfig | None = None,
                     name: str = "train step") -> jax.stages.Traced:
    """The train step `config` describes, traced for a mesh of every device of `target` (see
    `moebius_jax.aot.target_devices`) on abstract, sharded arguments (`DoesNotFit` if they
    alone exceed a chip's HBM). `vae_config`: the VAE's structure (default
    `vae_structure(config.vae)`: no weights are read)."""
    mesh = mesh_from_config(config.mesh, aot.target_devices(target))
    if config.data.batch_size % mesh.size:
        raise ConfigError(f"the global batch {config.data.batch_size} is split over the {mesh.size} devices of "
                          f"{target}: expected a multiple of {mesh.size}", field=("data", "batch_size"))
    networks = Networks.from_config(config, vae_config or vae_structure(config.vae))
    program = make_train_program(config, networks, mesh)
    args = (program.state, program.frozen, program.batch)
    aot.check_arguments_fit(args, name=name, target=target)
    return program.step.trace(*args)


def compile_train_step(config: TrainConfig, target: str, *, vae_config: VaeConfig | None = None,
                       name: str = "train_step") -> tuple[aot.CompileReport, jax.stages.Compiled]:
    """`trace_train_step`, compiled and reported."""
    return aot.compile_traced(trace_train_step(config, target, vae_config, name), name=name, target=target)


def run_compile_only(config: TrainConfig, topology: str) -> int:
    """Print the report of `config`'s step compiled for `topology`; 0 when it fits, a
    `DoesNotFit` error (one line, exit status 1 at the command line) when it does not."""
    target = aot.topology_target(topology)
    label = (f"train step ({'distillation' if config.teacher.config else 'student only'}, global batch "
             f"{config.data.batch_size}{', remat' if config.remat else ''})")
    log.info("compiling the %s for %s (nothing is loaded or allocated)", label, target)
    report, _ = compile_train_step(config, target, name=label)
    print(report.summary(), flush=True)
    report.check_fits()
    return 0
