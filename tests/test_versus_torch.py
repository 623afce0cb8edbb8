"""The PyTorch versions of the student step and the VAE decode (bench/versus_torch.py) compute
what ours compute, and their records have the harness's schema. Skipped without torch."""

from __future__ import annotations

import pathlib
import sys

import pytest

pytest.importorskip("torch")
# bench/ is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.harness import MEASUREMENT_FIELDS, Repeats, measure, schema_errors  # noqa: E402
from bench.inference import QUICK  # noqa: E402
from bench.versus_torch import torch_cases  # noqa: E402


@pytest.mark.parametrize("key", ["student_forward.torch", "vae_decode.torch_128"])
def test_torch_versions_match_ours_on_the_same_weights(key):
    (case,) = [c for c in torch_cases(QUICK) if c.key == key]
    record = measure(case, Repeats(warmup=0, repeats=1))
    assert schema_errors(record, MEASUREMENT_FIELDS) == []
    assert record["details"]["framework"] == "torch" and record["median_cpu_s"] > 0
    assert record["flops"] is None and record["peak_memory_bytes"] is None
    assert record["details"]["max_rel_diff_vs_jax"] <= 1e-5
