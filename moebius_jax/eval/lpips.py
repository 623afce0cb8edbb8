"""LPIPS (lpips 0.1.4, version 0.1) in Flax, NHWC, with the AlexNet or VGG16 backbone.

distance(x, y) = sum over 5 taps of mean_hw( sum_c w_c (f_x/|f_x| - f_y/|f_y|)^2 ), where f are
ReLU taps of the ImageNet backbone after lpips's scaling layer, |.| is the channel norm plus
1e-10, and w are the learned non-negative linear heads. Backbone convs keep torchvision's
`features.<i>` index as the Flax name `features_<i>`; heads `lin<L>` become `lin_<L>`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moebius_jax.eval import weights

# lpips's ScalingLayer: ImageNet mean/std rewritten for inputs in [-1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)

# Each backbone as five slices, one per tap; a slice is a sequence of ("pool", window) and
# ("conv", torchvision index, out channels, kernel, stride, padding), every conv followed by a ReLU.
_BACKBONES: dict[str, tuple[tuple[tuple, ...], ...]] = {
    "alex": (
        (("conv", 0, 64, 11, 4, 2),),
        (("pool", 3), ("conv", 3, 192, 5, 1, 2)),
        (("pool", 3), ("conv", 6, 384, 3, 1, 1)),
        (("conv", 8, 256, 3, 1, 1),),
        (("conv", 10, 256, 3, 1, 1),),
    ),
    "vgg": (
        (("conv", 0, 64, 3, 1, 1), ("conv", 2, 64, 3, 1, 1)),
        (("pool", 2), ("conv", 5, 128, 3, 1, 1), ("conv", 7, 128, 3, 1, 1)),
        (("pool", 2), ("conv", 10, 256, 3, 1, 1), ("conv", 12, 256, 3, 1, 1), ("conv", 14, 256, 3, 1, 1)),
        (("pool", 2), ("conv", 17, 512, 3, 1, 1), ("conv", 19, 512, 3, 1, 1), ("conv", 21, 512, 3, 1, 1)),
        (("pool", 2), ("conv", 24, 512, 3, 1, 1), ("conv", 26, 512, 3, 1, 1), ("conv", 28, 512, 3, 1, 1)),
    ),
}
NETS = tuple(_BACKBONES)


def scaling_layer(x: jnp.ndarray) -> jnp.ndarray:
    """lpips's input normalisation, (x - shift) / scale per RGB channel (NHWC, x in [-1, 1])."""
    return (x - _SHIFT) / _SCALE


def normalize_channels(f: jnp.ndarray) -> jnp.ndarray:
    """Unit-normalise each pixel's feature vector; lpips adds the 1e-10 to the norm itself."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)


class LPIPSNet(nn.Module):
    """Backbone taps and linear heads of LPIPS v0.1 on torchvision's AlexNet or VGG16."""

    net: str = "alex"
    precision: Any = jax.lax.Precision.HIGHEST  # float32 convs on GPU/TPU too, not TF32/bf16

    def setup(self) -> None:
        if self.net not in _BACKBONES:
            raise ValueError(f"unknown LPIPS network {self.net!r}; expected one of {NETS}")
        # Flax names these "features_<i>" (torchvision's index) and "lin_<L>".
        self.features = {
            str(op[1]): nn.Conv(
                op[2], (op[3], op[3]), strides=(op[4], op[4]), padding=((op[5], op[5]),) * 2, precision=self.precision
            )
            for piece in _BACKBONES[self.net]
            for op in piece
            if op[0] == "conv"
        }
        self.lin = [nn.Conv(1, (1, 1), use_bias=False, precision=self.precision) for _ in _BACKBONES[self.net]]

    def taps(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        """The five raw ReLU taps of scaling_layer(x) (x: (N, H, W, 3) in [-1, 1])."""
        out = []
        h = scaling_layer(x)
        for piece in _BACKBONES[self.net]:
            for op in piece:
                if op[0] == "pool":
                    h = nn.max_pool(h, (op[1], op[1]), strides=(2, 2), padding="VALID")
                else:
                    h = nn.relu(self.features[str(op[1])](h))
            out.append(h)
        return out

    def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        """(N, 5) per-layer LPIPS terms of two NHWC batches in [-1, 1]; they sum to the distance."""
        n = x.shape[0]
        # Both batches through the backbone together: one set of conv launches.
        taps = self.taps(jnp.concatenate([x, y], axis=0))
        terms = []
        for head, f in zip(self.lin, taps):
            f = normalize_channels(f)
            d = jnp.square(f[:n] - f[n:])
            terms.append(jnp.mean(head(d)[..., 0], axis=(1, 2)))
        return jnp.stack(terms, axis=-1)


@functools.partial(jax.jit, static_argnames=("module", "normalize"))
def _layer_terms(module: LPIPSNet, variables: Any, x: jnp.ndarray, y: jnp.ndarray, normalize: bool) -> jnp.ndarray:
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if normalize:  # lpips's normalize=True: inputs in [0, 1]
        x, y = 2 * x - 1, 2 * y - 1
    return module.apply(variables, x, y)


@dataclasses.dataclass(frozen=True, eq=False)
class LPIPS:
    """A loaded LPIPS metric: `lpips(x, y)` -> (N,) distances for NHWC batches in [-1, 1]."""

    module: LPIPSNet
    variables: Any

    def __call__(
        self, x: jnp.ndarray, y: jnp.ndarray, *, normalize: bool = False, return_layers: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """Per-pair distances (N,); with `return_layers`, also the (N, 5) per-layer terms that
        sum to them. `normalize=True` takes inputs in [0, 1] (mapped by 2x - 1), as lpips does.
        A data set's LPIPS is the mean of the per-pair distances."""
        terms = _layer_terms(self.module, self.variables, x, y, normalize)
        dist = jnp.sum(terms, axis=-1)
        return (dist, terms) if return_layers else dist


def load_lpips(
    net: str = "alex",
    backbone_path: str | os.PathLike | None = None,
    heads_path: str | os.PathLike | None = None,
) -> LPIPS:
    """LPIPS with torchvision's ImageNet backbone (`alexnet-owt-7be5be79.pth` or
    `vgg16-397923af.pth`, see `weights.BACKBONE_URLS`) and lpips's v0.1 linear heads
    (bundled; `heads_path` may name lpips's own `weights/v0.1/<net>.pth` instead)."""
    module = LPIPSNet(net)
    x = jnp.zeros((1, 64, 64, 3))
    target = jax.eval_shape(module.init, jax.random.key(0), x, x)
    variables = weights.lpips_variables(net, target, backbone_path, heads_path)
    return LPIPS(module, jax.tree.map(jnp.asarray, variables))
