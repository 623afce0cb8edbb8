"""The fixtures' key-seeded weight rule, so large random-weight files need not be committed.

For pixelhacker_tiny and the distillation teacher the reference filled every tensor from
numpy default_rng(crc32(key)); regenerating them is bit-identical to the reference's .bin
(checked once against the original files).
"""

from __future__ import annotations

import zlib

import numpy as np


def key_seeded_tensor(key: str, shape) -> np.ndarray:
    z = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(tuple(shape))
    if key.endswith("embedding_layer.weight"):
        value = z
    elif key.rsplit(".", 1)[-1] == "bias":
        value = 0.05 * z
    elif len(shape) == 1:
        value = 1 + 0.1 * z
    else:
        value = z / np.sqrt(np.prod(shape[1:]))
    return value.astype(np.float32)


def key_seeded_state_dict(entries) -> dict[str, np.ndarray]:
    """entries: [key, shape, dtype] rows as in the fixtures' keys.json."""
    return {key: key_seeded_tensor(key, shape) for key, shape, *_ in entries}
