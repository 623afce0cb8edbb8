"""The eval fixtures' key-seeded backbone weights (FID Inception, LPIPS AlexNet/VGG16).

The weight files (96 MB, 10 MB, 59 MB) are not stored: every tensor is regenerated from its
own key by the rule in tests/fixtures/eval/README.txt section 1, and its sha256 (over the
little-endian float32 bytes) is checked against the *_keys.json files.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np

from conftest import fixture_path


def key_seeded_tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor by the rule: numpy default_rng(crc32(key)), drawn by the key's ending, in
    float64, cast once to float32."""
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    elif leaf == "weight":  # BatchNorm gamma
        value = 1 + 0.1 * rng.standard_normal(shape)
    elif leaf == "bias":
        value = 0.05 * rng.standard_normal(shape)
    elif leaf == "running_mean":
        value = 0.1 * rng.standard_normal(shape)
    elif leaf == "running_var":
        value = rng.uniform(0.5, 1.5, size=shape)
    else:
        raise ValueError(f"the rule does not cover {key!r}")
    return value.astype(np.float32)


def _checked(key: str, shape: list[int], sha256: str) -> np.ndarray:
    value = key_seeded_tensor(key, tuple(shape))
    digest = hashlib.sha256(value.astype("<f4").tobytes()).hexdigest()
    assert digest == sha256, f"regenerated {key} {tuple(shape)} has sha256 {digest}, the fixture {sha256}"
    return value


def inception_state_dict() -> dict[str, np.ndarray]:
    """The FID Inception weight file as pytorch-fid's state_dict lists it: 566 entries in
    order, num_batches_tracked as int64 zeros."""
    entries = json.loads(fixture_path("eval", "inception_keys.json").read_text())["keys"]
    return {
        e["key"]: np.zeros((), np.int64)
        if e["key"].endswith("num_batches_tracked")
        else _checked(e["key"], e["shape"], e["sha256_f32_le"])
        for e in entries
    }


def lpips_backbone_state_dict(net: str) -> dict[str, np.ndarray]:
    """The used `features.<i>.*` tensors of torchvision's AlexNet ("alex") or VGG16 ("vgg")."""
    entries = json.loads(fixture_path("eval", "lpips_keys.json").read_text())["nets"][net]["backbone_keys"]
    return {e["torchvision_key"]: _checked(e["torchvision_key"], e["shape"], e["sha256_f32_le"]) for e in entries}
