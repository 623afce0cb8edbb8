"""Muon exactly as the reference trains with it (the moonlight variant).

Which optimiser a parameter gets is read from the Flax parameter tree, as the reference's
rule says it: matrix-shaped (≥ 2-D) weights inside the network body are updated with
Nesterov momentum orthogonalised by five bfloat16 Newton–Schulz steps; everything else
(biases, norm affines, any 1-D or scalar parameter, the input-id embedding, `conv_in` /
`conv_out`) by the reference's own AdamW. Both branches decay every parameter by `lr·wd`
with the unadjusted lr.

Newton–Schulz and the lr scaling see a weight as the reference's matrix: torch's dim 0 as
rows, the other dims (in torch's order) as columns. That view follows from the kind of
Flax leaf (a Dense or Conv kernel, an embedding table, a lambda position table) and its
shape; a ≥ 2-D parameter of any other kind has no known view and goes to AdamW, with a
notice.

Why not `optax.contrib.muon` (optax 0.2.8), although its coefficients and Frobenius
preconditioning are the same: its Nesterov momentum is a bias-corrected EMA whose direction
matches the reference's undamped `buf = μ·buf + g; U = g + μ·buf` only asymptotically (at
step 2 the weight of g₁ relative to g₂ is 0.37 there, μ²/(1+μ) = 0.46 here); its Newton–Schulz
runs in the gradient's dtype, not bfloat16; one `eps` serves both its NS (reference 1e-7) and
its Adam (1e-8); its RMS scaling `0.2·sqrt(max(fan_in, fan_out))` counts a conv's kernel taps
while the reference uses the first two torch dims only; and its AdamW branch is optax's (eps
on the bias-corrected sqrt(v), Nesterov whenever Muon is), not the reference's
`m / (eps + sqrt(v))` with the corrections folded into the step size. None of these is a
flag, so the transformation is written here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# The network's edges train with AdamW whatever their shape, as in the reference: the
# input-id embedding table and the UNet's first and last convs (Flax module names).
ADAMW_MODULES = frozenset({"embedding_layer", "conv_in", "conv_out"})
# (leaf name, ndim) -> the axis order that turns the Flax leaf into the reference's tensor.
# A lambda layer's position conv is a Conv3d (O, 1, 1, kh, kw) there: its matrix
# (O, kh·kw) and its first two dims (O, 1) are those of the Conv2d view used here.
TORCH_AXES: dict[tuple[str, int], tuple[int, ...]] = {
    ("kernel", 2): (1, 0),  # Dense (in, out) -> Linear (out, in)
    ("kernel", 4): (3, 2, 0, 1),  # Conv HWIO -> OIHW
    ("embedding", 2): (0, 1),  # Embed (num, features), stored alike
    ("rel_pos_emb", 4): (0, 1, 2, 3),  # lambda position tables, stored alike
}

ParamLabels = Any  # a pytree of "muon" / "adamw" with the structure of the params
_noticed: set[str] = set()  # parameters already reported as having no matrix view


def _path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """('diff_model', 'conv_in', ...) from a jax key path over nested dicts."""
    return tuple(str(getattr(key, "key", key)) for key in path)


def torch_axes(path: Sequence[Any], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The Flax -> reference axis order of a leaf, or None when its kind has no known view."""
    return TORCH_AXES.get((_path_names(path)[-1], len(shape)))


def muon_param_labels(params: Any) -> ParamLabels:
    """Label each leaf of the `params` collection "muon" or "adamw" by the reference's rule.

    Muon iff the leaf is ≥ 2-D, lies in none of `ADAMW_MODULES` and has a known matrix view
    (`TORCH_AXES`); leaves may be arrays or `jax.ShapeDtypeStruct`s. ≥ 2-D leaves without a
    view go to AdamW, reported once per process in one log line.
    """
    unknown = []

    def label(path, leaf) -> str:
        shape = tuple(leaf.shape)
        if len(shape) < 2 or ADAMW_MODULES.intersection(_path_names(path)):
            return "adamw"
        if torch_axes(path, shape) is None:
            unknown.append(f"{'/'.join(_path_names(path))} {shape}")
            return "adamw"
        return "muon"

    labels = jax.tree_util.tree_map_with_path(label, params)
    new = [name for name in unknown if name not in _noticed]
    if new:
        _noticed.update(new)
        log.warning("muon: %d parameter(s) of a kind with no known matrix view train with AdamW: %s",
                    len(new), ", ".join(new))
    return labels


def _round_bf16(x: jax.Array) -> jax.Array:
    """Round float32 values to bfloat16 precision, staying float32.

    An explicit rounding op: XLA may keep excess precision across f32→bf16→f32 converts
    (xla_allow_excess_precision), but never drops a reduce_precision.
    """
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def _matmul_bf16(x: jax.Array, y: jax.Array) -> jax.Array:
    """bf16 × bf16 with float32 accumulation, result rounded to bf16 (as a bf16 GEMM)."""
    out = jnp.matmul(
        x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )
    return _round_bf16(out)


def newton_schulz5(
    g: jax.Array, steps: int = 5, coeffs: tuple[float, float, float] = NS_COEFFS, eps: float = NS_EPS
) -> jax.Array:
    """Approximate orthogonalisation UVᵀ of the 2-D `g`, every operation rounded to bf16.

    X = bf16(g), transposed to be wide; X /= ‖X‖_F + eps; `steps` × (A = XXᵀ;
    B = b·A + (c·A)·A; X = a·X + B·X). Values are carried as float32 holding bf16 numbers:
    each elementwise op computes in float32 with float32 scalars and rounds once, as torch
    does for bf16 tensors; `(c·A)·A` is the left-to-right reading of `c·A·A`. Returns float32.
    """
    a, b, c = coeffs
    x = _round_bf16(g.astype(jnp.float32))
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    norm = _round_bf16(jnp.sqrt(jnp.sum(jnp.square(x))))  # float32 accumulation, bf16 result
    x = _round_bf16(x / _round_bf16(norm + eps))
    for _ in range(steps):
        gram = _matmul_bf16(x, x.T)
        poly = _round_bf16(_round_bf16(b * gram) + _matmul_bf16(_round_bf16(c * gram), gram))
        x = _round_bf16(_round_bf16(a * x) + _matmul_bf16(poly, x))
    return x.T if transposed else x


def muon_lr_ratio(torch_shape: tuple[int, ...]) -> float:
    """lr_adj / lr = 0.2·sqrt(max(shape[0], shape[1])) of the torch shape (Python float64)."""
    return 0.2 * math.sqrt(max(torch_shape[0], torch_shape[1]))


def orthogonalized_update(u: jax.Array, axes: tuple[int, ...], steps: int = 5) -> jax.Array:
    """NS5 of a Flax leaf's update viewed as the reference's matrix (torch dim 0, the rest).

    `axes` (from `torch_axes`) orders the leaf as torch does; the torch-order reshape differs
    from a Flax one for HWIO kernels, and NS5 is equivariant to that column permutation only
    in exact arithmetic, so the torch view is used. float32 out.
    """
    torch_u = jnp.transpose(u, axes)
    ortho = newton_schulz5(torch_u.reshape(torch_u.shape[0], -1), steps=steps)
    return jnp.transpose(ortho.reshape(torch_u.shape), np.argsort(axes))


def _zeros_f32(params: optax.Params) -> optax.Updates:
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def _lr_at(learning_rate: float | optax.Schedule, count: jax.Array) -> jax.Array:
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(lr, jnp.float32)


def _decayed_step(p: jax.Array, lr: jax.Array, weight_decay: float, step: jax.Array) -> jax.Array:
    """The optax update for the reference's `p ← p·(1 − lr·wd) − step`: −lr·wd·p − step.

    Equal in exact arithmetic, not bit-identical in float32: the reference rounds p·(1 − lr·wd)
    before subtracting and forms its scalars in float64; measured, p + update differs from the
    reference's float32 result by 1 ulp of p in 25–35% of the elements. (Forming the new
    value in the reference's order and returning new − p does not help: XLA fuses the
    multiply-subtract into an FMA.)
    """
    return -(lr * weight_decay) * p - step


class MuonBranchState(NamedTuple):
    """Steps taken (schedule index) and the momentum buffers, in the Flax param shape
    (momentum is elementwise, so the layout of the buffer does not change any value)."""

    count: jax.Array
    momentum: optax.Updates


def scale_by_reference_muon(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
) -> optax.GradientTransformation:
    """The Muon branch alone: complete updates (lr, shape ratio and decay included).

    Needs `params` in `update`. Every leaf it sees must have a matrix view (`torch_axes`).
    """

    def init_fn(params: optax.Params) -> MuonBranchState:
        return MuonBranchState(count=jnp.zeros([], jnp.int32), momentum=_zeros_f32(params))

    def update_fn(grads, state: MuonBranchState, params=None):
        if params is None:
            raise ValueError("muon needs params for the decoupled weight decay")
        lr = _lr_at(learning_rate, state.count)
        buf = jax.tree.map(lambda b, g: momentum * b + g, state.momentum, grads)
        nest = jax.tree.map(lambda b, g: g + momentum * b, buf, grads) if nesterov else buf

        def leaf_update(path, u, p):
            axes = torch_axes(path, tuple(p.shape))
            if axes is None:
                raise ValueError(f"muon: no matrix view for {'/'.join(_path_names(path))} {tuple(p.shape)} "
                                 "(label it 'adamw')")
            ortho = orthogonalized_update(u, axes, ns_steps)
            lr_adj = lr * muon_lr_ratio(tuple(p.shape[a] for a in axes))
            return _decayed_step(p, lr, weight_decay, lr_adj * ortho)

        updates = jax.tree_util.tree_map_with_path(leaf_update, nest, params)
        return updates, MuonBranchState(optax.safe_increment(state.count), buf)

    return optax.GradientTransformation(init_fn, update_fn)


class AdamWBranchState(NamedTuple):
    """Steps taken and the two moment estimates (float32, param shape)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_reference_adamw(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Muon's internal AdamW branch: complete updates, as the reference computes them.

    m ← lerp(m, g, 1−β1); v ← lerp(v, g², 1−β2); u = m / (eps + sqrt(v)) with eps on the
    UNcorrected sqrt(v); p ← p·(1 − lr·wd) − (lr/scale)·u, scale = (1−β1^k)/sqrt(1−β2^k),
    k counted from 1. In exact arithmetic this is torch's AdamW with eps/sqrt(1−β2^k) in
    place of eps, hence not optax.adamw.
    """
    beta1, beta2 = betas

    def init_fn(params: optax.Params) -> AdamWBranchState:
        return AdamWBranchState(jnp.zeros([], jnp.int32), _zeros_f32(params), _zeros_f32(params))

    def update_fn(grads, state: AdamWBranchState, params=None):
        if params is None:
            raise ValueError("muon's AdamW branch needs params for the decoupled weight decay")
        lr = _lr_at(learning_rate, state.count)
        k = optax.safe_increment(state.count)
        # torch.lerp(start, end, w) = start + w·(end − start) for w < 0.5.
        mu = jax.tree.map(lambda m, g: m + (1 - beta1) * (g - m), state.mu, grads)
        nu = jax.tree.map(lambda v, g: v + (1 - beta2) * (jnp.square(g) - v), state.nu, grads)
        kf = k.astype(jnp.float32)
        scale = (1 - beta1**kf) / jnp.sqrt(1 - beta2**kf)
        updates = jax.tree.map(
            lambda p, m, v: _decayed_step(p, lr, weight_decay, (lr / scale) * (m / (eps + jnp.sqrt(v)))),
            params,
            mu,
            nu,
        )
        return updates, AdamWBranchState(k, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    param_labels: ParamLabels | Callable[[optax.Params], ParamLabels] | None = None,
) -> optax.GradientTransformation:
    """The reference's Muon (defaults = its defaults) over the `params` collection.

    Emits complete updates for `optax.apply_updates` (lr, decay included; nothing may follow
    it in a chain). The lr of step k (0-based) is `learning_rate(k)`. `param_labels` defaults
    to `muon_param_labels(params)`.
    """
    labels = param_labels if param_labels is not None else muon_param_labels
    return optax.partition(
        {
            "muon": scale_by_reference_muon(
                learning_rate, weight_decay=weight_decay, momentum=momentum,
                nesterov=nesterov, ns_steps=ns_steps,
            ),
            "adamw": scale_by_reference_adamw(
                learning_rate, weight_decay=weight_decay, betas=adamw_betas, eps=adamw_eps
            ),
        },
        labels,
    )
