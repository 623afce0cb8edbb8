"""The training loop: build everything from a TrainConfig, then step, log, sample and save.

Building: the mesh, the networks and the jitted step with its shardings (`train.program`,
no weights needed), then the state and frozen weights materialised in those shardings.
One batch's path: grain loader (host, per-process shard) -> global jax.Array sharded over
the mesh's (data, fsdp) axes -> the train step (VAE encode, noise, teacher, student, losses,
Muon, EMA) compiled ahead of time with donated state -> metrics.jsonl / TensorBoard.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import yaml
from tqdm import tqdm

from moebius_jax.data.loader import make_train_iterator
from moebius_jax.data.masks import load_mask_config
from moebius_jax.data.sources import Item, check_images, folder_source, jsonl_source, tfds_source
from moebius_jax.data.transforms import check_extra_fg_masks
from moebius_jax.errors import ConfigError
from moebius_jax.latents import latent_mask
from moebius_jax.pipeline.sampler import Sampler, SamplerNoise, SamplerSettings
from moebius_jax.train.checkpointing import Checkpoints, abstract_like
from moebius_jax.train.config import DataConfig, TrainConfig, config_to_dict
from moebius_jax.train.mesh import batch_sharding, mesh_from_config
from moebius_jax.train.metrics_log import MetricsWriter, save_sample_grid
from moebius_jax.train.optimizer import make_schedule
from moebius_jax.train.program import Networks, init_state, load_frozen, make_train_program
from moebius_jax.train.state import TrainState
from moebius_jax.train.step import Frozen

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trainer:
    """Everything a run needs, built once; `run()` trains until max_steps or SIGTERM."""

    config: TrainConfig
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    state: TrainState
    frozen: Frozen
    step_fn: Any  # the compiled step
    sampler: Sampler
    compile_seconds: float
    source: Any  # the checked data source (moebius_jax.data.sources)

    @classmethod
    def build(cls, config: TrainConfig, workdir: str | pathlib.Path, devices: list | None = None) -> Trainer:
        """Data source (checked), mesh (over `devices`, default all), networks, sharded state and
        frozen weights, compiled step."""
        source = open_data_source(config.data)  # bad data fails here, before the minutes of compiling
        mesh = mesh_from_config(config.mesh, devices)
        networks = Networks.from_config(config)
        program = make_train_program(config, networks, mesh)
        state = init_state(config, networks, program)
        frozen = load_frozen(config, networks, program)
        start = time.perf_counter()
        compiled = program.lower().compile()
        compile_seconds = time.perf_counter() - start
        log.info("train step compiled in %.1f s", compile_seconds)
        sampler = Sampler(networks.student, networks.vae, mesh)
        return cls(config, pathlib.Path(workdir), mesh, state, frozen, compiled, sampler, compile_seconds, source)

    def run(self, resume: bool = False, max_steps: int | None = None) -> TrainState:
        cfg = self.config
        max_steps = cfg.max_steps if max_steps is None else max_steps
        lead = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        checkpoints = Checkpoints(self.workdir / "checkpoints", cfg.keep_checkpoints, cfg.save_every)
        existing = checkpoints.latest_step()
        if not resume and existing is not None:
            checkpoints.close()
            raise restart_refusal(self.workdir, existing)
        if lead:
            (self.workdir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        writer = MetricsWriter(self.workdir, enabled=lead)
        data = self._data_iterator()
        if resume and checkpoints.latest_step() is not None:
            restored_step = checkpoints.latest_step()
            self.state, data_state = checkpoints.restore(restored_step, abstract_like(self.state))
            data.set_state(data_state)
            writer.truncate_after(restored_step)
            log.info("resumed from step %d", restored_step)
        schedule = make_schedule(cfg.optimizer)

        stop = {"now": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))  # preemption: save, exit
        step = saved = int(self.state.step)
        sample_batch = None
        progress = tqdm(total=max_steps, initial=step, unit="step", disable=not lead, desc="training")
        tick, tick_step = time.perf_counter(), step
        try:
            while step < max_steps and not stop["now"]:
                host_batch = next(data)
                if sample_batch is None:
                    sample_batch = host_batch
                self.state, metrics = self.step_fn(self.state, self.frozen, self._to_global(host_batch))
                step += 1
                if step % cfg.log_every == 0 or step == max_steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    rate = (step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    metrics.update(lr=float(schedule(step - 1)), steps_per_second=rate,
                                   images_per_second=rate * cfg.data.batch_size)
                    writer.write(step, metrics)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                         it_s=f"{rate:.2f}", img_s=f"{rate * cfg.data.batch_size:.1f}")
                if cfg.sample_every and step % cfg.sample_every == 0:
                    self._write_samples(step, sample_batch, lead)
                if checkpoints.save(step, self.state, data.get_state()):
                    saved = step
                progress.update(1)
            if saved != step:
                checkpoints.save(step, self.state, data.get_state(), force=True)
        finally:
            progress.close()
            checkpoints.close()
            writer.close()
            data.close()
            signal.signal(signal.SIGTERM, previous)
        if stop["now"]:
            log.info("SIGTERM: saved step %d and stopped", step)
        return self.state

    def _data_iterator(self):
        cfg = self.config.data
        return make_train_iterator(
            self.source, batch_size=cfg.batch_size // jax.process_count(), image_size=cfg.image_size,
            mask_config=cfg.mask_config, seed=self.config.seed, num_workers=cfg.num_workers,
            use_extra_fg_mask=cfg.use_extra_fg_mask)

    def _to_global(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's slice of the batch -> global arrays sharded over (data, fsdp)."""
        sharding = batch_sharding(self.mesh)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}

    def _write_samples(self, step: int, batch: dict[str, np.ndarray], lead: bool) -> None:
        """Inpaint the first training batch with the current (EMA if any) weights: a PNG grid."""
        images = batch["image"][:4]
        masked = batch["masked_image"][:4]
        mask = latent_mask(batch["mask"][:4], self.sampler.vae.config.downsample_factor)
        noise = SamplerNoise.draw(jax.random.key(0), len(images), mask.shape[1:3])
        variables = self.state.variables(use_ema=self.state.ema is not None)
        out = self.sampler(variables, self.frozen.vae, images, masked, mask, noise,
                           settings=SamplerSettings(num_steps=self.config.sample_steps))
        if lead:
            save_sample_grid(self.workdir / "samples" / f"step_{step:08d}.png",
                             (masked + 1) / 2, np.asarray(out.decoded), (images + 1) / 2)


def restart_refusal(workdir: pathlib.Path, latest_step: int) -> FileExistsError:
    """The error for starting afresh in a workdir that holds checkpoints (it would train over them)."""
    return FileExistsError(f"{workdir} already holds checkpoints (latest step {latest_step}): "
                           "pass --resume to continue it, or use a new workdir")


def open_data_source(cfg: DataConfig) -> Sequence[Item]:
    """The configured data source with every file's header read and the data settings checked,
    so that data errors surface before any model loads or the train step compiles."""
    if sum(x is not None for x in (cfg.jsonl, cfg.folder, cfg.tfds_name)) != 1:
        raise ConfigError("set exactly one of data.jsonl, data.folder, data.tfds_name")
    if cfg.batch_size < 1 or cfg.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size {cfg.batch_size}: must be a positive multiple of the "
                          f"{jax.process_count()} process(es)")
    if cfg.jsonl is not None:
        source = jsonl_source(cfg.jsonl)
    elif cfg.folder is not None:
        source = folder_source(cfg.folder, cfg.mask_folder)
    else:
        source = tfds_source(cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir)
    check_extra_fg_masks(source, cfg.use_extra_fg_mask)
    load_mask_config(cfg.mask_config)
    check_images(source)
    return source
