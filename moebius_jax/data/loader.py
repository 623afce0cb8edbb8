"""The training batch iterator: deterministic, sharded per JAX process, multi-worker, resumable.

Batches are a Grain ``MapDataset``, random access by step, so every batch is a pure function of
``(source, options, seed, process, step)``:

* **Sharding.** Process ``p`` of ``P`` owns the records ``p, p + P, p + 2P, ...`` (fixed for
  the run; ``grain.sharding.ShardByJaxProcess`` by default), so processes never read the same
  record.
* **Order.** A process's sample stream repeats its shard endlessly (``repeat``), in a fresh
  permutation every epoch (``shuffle``, seeded by ``(seed, process)`` and the epoch). Batch
  ``t`` holds stream positions ``t·B .. t·B + B − 1`` (``batch``), so the batch size is fixed and
  a batch may span two epochs (the reference's loader cycles with ``drop_last=False`` and so
  ends each epoch with a smaller batch; a constant shape is what a jitted step wants).
* **Randomness.** Each sample's masks, crop and flip come from its own generator, keyed by
  ``(seed, process)`` and its stream position (``random_map``), never from a global RNG or a
  worker's state.

Hence the iterator's whole position is the next step: :meth:`TrainIterator.get_state` returns a
small dict of ints (the step plus the settings it depends on) that can be saved with a
checkpoint, and :meth:`TrainIterator.set_state` resumes exactly there, with any
``num_workers``.

Why Grain: it is pure Python (no TensorFlow runtime), runs the per-sample NumPy / Pillow work
in worker processes with bounded prefetch and hands results back in a deterministic order, and
reads by record index, the access pattern of the reference's map-style dataset and of TFDS'
ArrayRecord files. tf.data would bring TensorFlow into every training run and makes exact,
index-keyed randomness awkward. Grain's iterator state is not saved because the step alone is
the position, independent of the worker count, and validated against the settings on resume.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np
from absl import flags

from moebius_jax.data.masks import (  # _check_int: the package's integer validation
    MaskGeneratorConfig,
    _check_int,
    load_mask_config,
)
from moebius_jax.data.sources import DataSourceError
from moebius_jax.data.transforms import ItemSource, check_extra_fg_masks, collate, prepare_sample

# Keep the loader's seeds apart from other users of the same run seed.
_SHUFFLE_STREAM = 0x5348  # "SH"
_SAMPLE_STREAM = 0x534D  # "SM"
# Batches each worker prepares ahead of the consumer.
_PER_WORKER_BUFFER = 2


def _stream_seed(seed: int, stream: int, process_index: int) -> int:
    """A 32-bit seed (what Grain takes) for one of the loader's streams on one process."""
    sequence = np.random.SeedSequence(seed, spawn_key=(stream, process_index))
    return int(sequence.generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class Sharding:
    """Which records one process reads, of how many."""

    num_records: int
    process_index: int
    process_count: int

    def __post_init__(self) -> None:
        _check_int("process_count", self.process_count, 1)
        _check_int("process_index", self.process_index, 0)
        if self.process_index >= self.process_count:
            raise ValueError(
                f"process_index {self.process_index} >= process_count {self.process_count}"
            )
        if self.num_records < self.process_count:
            raise DataSourceError(
                f"{self.num_records} records cannot be sharded over {self.process_count} processes"
            )


def record_stream(sharding: Sharding, seed: int) -> grain.MapDataset:
    """This process's endless sequence of record indices: its shard, reshuffled every epoch."""
    _check_int("seed", seed, 0)
    shard = grain.MapDataset.range(sharding.num_records)[sharding.process_index::sharding.process_count]
    return shard.shuffle(seed=_stream_seed(seed, _SHUFFLE_STREAM, sharding.process_index)).repeat()


@dataclass(frozen=True)
class SampleMaker:
    """Record index + generator -> one prepared sample: what each loader worker runs (picklable)."""

    source: ItemSource
    image_size: int
    mask_config: MaskGeneratorConfig
    use_extra_fg_mask: bool = False

    def __post_init__(self) -> None:
        _check_int("image_size", self.image_size, 1)
        check_extra_fg_masks(self.source, self.use_extra_fg_mask)  # fail now, not in a worker

    def __call__(self, record: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return prepare_sample(
            self.source,
            int(record),
            rng,
            image_size=self.image_size,
            mask_config=self.mask_config,
            use_extra_fg_mask=self.use_extra_fg_mask,
        )


def batch_dataset(
    make_sample: SampleMaker, sharding: Sharding, seed: int, batch_size: int
) -> grain.MapDataset:
    """Endless batches of one process, indexed by step."""
    _check_int("batch_size", batch_size, 1)
    samples = record_stream(sharding, seed).random_map(
        make_sample, seed=_stream_seed(seed, _SAMPLE_STREAM, sharding.process_index)
    )
    return samples.batch(batch_size, drop_remainder=True, batch_fn=collate)  # endless: no remainder


def _mark_absl_flags_parsed() -> None:
    """Let Grain start workers outside ``absl.app``: with JAX's profiler hooks present (grain
    0.2.17+, jaxlib 0.9+), starting them reads an absl flag, which raises until absl's flags
    are parsed. Marking them parsed leaves every flag at its default; a later ``absl.app.run``
    parses the command line as usual."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless iterator of training batches, with ``get_state`` / ``set_state`` for resuming.

    Close it (or use it as a context manager) to stop its worker processes.
    """

    def __init__(
        self, dataset: grain.MapDataset, settings: dict[str, int], num_workers: int, step: int = 0
    ) -> None:
        self.dataset = dataset  # batch t is dataset[t]
        self.settings = settings  # what the position is only valid with (seed, sizes, sharding)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self._step = _check_int("step", step, 0)
        self._batches: grain.DatasetIterator | None = self._start(self._step)

    def _start(self, step: int) -> grain.DatasetIterator:
        # No in-process threads: parallelism is the worker processes (the work is GIL-bound).
        dataset = self.dataset[step:].to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        )
        if self.num_workers > 0:
            _mark_absl_flags_parsed()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.num_workers, per_worker_buffer_size=_PER_WORKER_BUFFER
                )
            )
        return iter(dataset)

    @property
    def step(self) -> int:
        """Index of the batch the next ``next()`` returns."""
        return self._step

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            raise RuntimeError("this data iterator is closed")
        batch = next(self._batches)
        self._step += 1
        # Workers hand back arrays in shared memory that live as long as the array; a plain copy
        # (milliseconds) frees it now, so batches a caller keeps cannot pile up in /dev/shm.
        return {
            key: value if type(value) is np.ndarray else np.array(value)
            for key, value in batch.items()
        }

    def get_state(self) -> dict[str, int]:
        """The position (next step) and the settings it is only valid with; JSON-serialisable."""
        return {"step": self._step, **self.settings}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`get_state` result; the settings must be the same."""
        mismatched = {
            key: (state.get(key), value)
            for key, value in self.settings.items()
            if state.get(key) != value
        }
        if mismatched:
            details = ", ".join(f"{k}: saved {s!r}, now {v!r}" for k, (s, v) in mismatched.items())
            raise ValueError(f"data iterator state does not match this loader ({details})")
        step = _check_int("state['step']", state.get("step"), 0)
        self.close()
        self._step = step
        self._batches = self._start(step)

    def close(self) -> None:
        """Stop the worker processes (if any); ``set_state`` starts them again."""
        if self._batches is not None:
            # Grain 0.2.12 (the last release for Python 3.10) has no close(): there the workers
            # stop when the iterator is garbage-collected, which dropping it here allows.
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
            self._batches = None  # released now rather than during interpreter shutdown

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_train_iterator(
    source: ItemSource,
    *,
    batch_size: int,
    image_size: int,
    mask_config: MaskGeneratorConfig | str | pathlib.Path,
    seed: int,
    num_workers: int,
    process_index: int | None = None,
    process_count: int | None = None,
    use_extra_fg_mask: bool = False,
    start_step: int = 0,
) -> TrainIterator:
    """Endless per-process training batches (numpy): ``image`` (B,S,S,3) f32 in [-1, 1],
    ``mask`` (B,S,S,1) f32 {0, 1} (1 = hole), ``masked_image`` (B,S,S,3) f32, ``input_ids``
    (B,10) i32.

    ``batch_size`` is per process; ``process_index`` / ``process_count`` default to JAX's
    (``grain.sharding.ShardByJaxProcess``);
    ``mask_config`` is a config or a mask YAML path / shipped name; ``num_workers=0`` works
    in-process. ``start_step`` (or ``set_state``) starts at a given batch.
    """
    if process_index is None or process_count is None:
        jax_shard = grain.sharding.ShardByJaxProcess()  # imports JAX only when asked
        process_index = jax_shard.shard_index if process_index is None else process_index
        process_count = jax_shard.shard_count if process_count is None else process_count
    if not isinstance(mask_config, MaskGeneratorConfig):
        mask_config = load_mask_config(mask_config)
    sharding = Sharding(len(source), process_index, process_count)
    make_sample = SampleMaker(source, image_size, mask_config, use_extra_fg_mask)
    settings = {
        "seed": seed,
        "batch_size": batch_size,
        "process_index": process_index,
        "process_count": process_count,
        "num_records": len(source),
    }
    return TrainIterator(
        batch_dataset(make_sample, sharding, seed, batch_size), settings, num_workers, start_step
    )
