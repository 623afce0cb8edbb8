"""`python -m moebius_jax.export`: the serialised sampler runs in a fresh process with plain JAX
(no moebius-jax, no Flax) and gives the pipeline's image."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from moebius_jax import export
from moebius_jax.pipeline.sampler import ALWAYS_GUIDE, SamplerSettings

SETTINGS = SamplerSettings(num_steps=2, guidance_cutoff=True)  # strength 0.99 keeps 1 step: cheap
SEED, GUIDANCE, OFFSET = 7, 2.5, 0.0357

# What a user without moebius-jax runs: deserialise, call, and prove no model code was imported.
_PLAIN_JAX = """
import sys
import numpy as np
from jax import export
inputs = np.load(sys.argv[1])
args = [inputs[k] for k in ("image", "mask", "seed", "guidance", "offset", "cfg_until")]
for program, weights, result in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    exported = export.deserialize(open(program, "rb").read())
    call_args = args if weights == "-" else [dict(np.load(weights)), *args]
    np.save(result, np.asarray(exported.call(*call_args)))
assert not any(m.split(".")[0] in ("flax", "moebius_jax") for m in sys.modules), "model code was imported"
"""


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    mask = np.zeros((1, 128, 128), np.uint8)
    mask[:, 40:90, 30:70] = 200  # any level >= 128 fills
    return image, mask


@pytest.mark.slow  # three compilations of the tiny sampler (about 100 s of CPU on 2 cores)
def test_exported_sampler_in_a_fresh_process_equals_the_pipeline(pipe, tmp_path):
    image, mask = _inputs()
    argv = []
    for name, bake in (("args", False), ("baked", True)):
        exported, weights = export.export_sampler(pipe, batch=1, height=128, width=128, settings=SETTINGS,
                                                  bake_weights=bake)
        assert len(exported.in_avals) == 6 + (0 if bake else len(weights))
        paths = export.write_export(tmp_path / f"{name}.stablehlo", exported, weights)
        argv += [str(paths[0]), str(paths[1]) if len(paths) > 1 else "-", str(tmp_path / f"{name}.npy")]
    np.savez(tmp_path / "inputs.npz", image=image, mask=mask, seed=np.int32(SEED), guidance=np.float32(GUIDANCE),
             offset=np.float32(OFFSET), cfg_until=np.int32(ALWAYS_GUIDE))
    proc = subprocess.run([sys.executable, "-c", _PLAIN_JAX, str(tmp_path / "inputs.npz"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (expected,) = pipe(image[0], mask[0], steps=SETTINGS.num_steps, guidance_scale=GUIDANCE, seed=SEED,
                       noise_offset=OFFSET, paste=False, reference_size=True)
    expected = np.asarray(expected)
    for name in ("args", "baked"):
        (ours,) = np.load(tmp_path / f"{name}.npy")
        # Another compiled program: float rounding may move a rare pixel by 1.
        diff = np.abs(ours.astype(int) - expected.astype(int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size, (name, diff.max(), np.count_nonzero(diff))


def test_export_never_overwrites_without_permission(pipe, tmp_path):
    out = tmp_path / "sampler.stablehlo"
    export.weights_path(out).write_bytes(b"keep me")
    assert export.main(["--out", str(out), "--weights", "unused", "--vae", "unused"]) == 1  # refused up front
    assert export.weights_path(out).read_bytes() == b"keep me" and not out.exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        export.output_paths(out, bake_weights=False)
    assert export.output_paths(out, bake_weights=True) == [out]  # a baked export writes no weights file
    assert export.output_paths(out, bake_weights=False, overwrite=True) == [out, export.weights_path(out)]
    with pytest.raises(ValueError, match="multiples of 64"):
        export.sampler_function(pipe, 1, 100, 128, SETTINGS)
