"""The trainer's optimisation pieces against the reference's formulas.

Every expected value is computed here in plain numpy, independently of the code under test:
torch layouts by hand-written transposes, Newton–Schulz as a bfloat16 emulation (ml_dtypes,
rounding after every operation), everything else in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import traverse_util

from moebius_jax import loading
from moebius_jax.train.ema import EmaState, ema_init, ema_update
from moebius_jax.train.muon import (
    ADAMW_MODULES,
    muon,
    muon_param_labels,
    newton_schulz5,
    orthogonalized_update,
    torch_axes,
)
from moebius_jax.train.optimizer import (
    OptimizerConfig,
    clip_by_global_norm_torch,
    make_optimizer,
    make_schedule,
    torch_global_norm,
)

EPS32 = float(np.finfo(np.float32).eps)

# Flax layout <-> torch layout, written out per kind (not taken from the key map).
TO_TORCH = {
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # HWIO -> OIHW
    "conv3d": lambda a: a.transpose(3, 2, 0, 1)[:, :, None],  # (kh, kw, 1, O) -> (O, 1, 1, kh, kw)
    "dense": lambda a: a.T,
    "identity": lambda a: a,
}
TO_FLAX = {
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "conv3d": lambda a: a[:, :, 0].transpose(2, 3, 1, 0),
    "dense": lambda a: a.T,
    "identity": lambda a: a,
}

_BLOCK = ("diff_model", "down_blocks_0", "attentions_0", "transformer_blocks_0")
_RESNET = ("diff_model", "down_blocks_0", "resnets_0", "conv1")
# Flax path -> (Flax shape, expected branch, layout kind)
LEAVES = {
    ("diff_model", "down_blocks_0", "downsamplers_0", "conv", "kernel"): ((3, 3, 4, 6), "muon", "conv"),
    (*_RESNET, "conv_pw", "kernel"): ((1, 1, 8, 12), "muon", "conv"),  # tall matrix (12, 8)
    (*_RESNET, "conv_dw", "kernel"): ((3, 3, 1, 8), "muon", "conv"),  # depthwise
    ("diff_model", "time_embedding", "linear_1", "kernel"): ((5, 16), "muon", "dense"),
    (*_BLOCK, "attn2", "rel_pos_emb"): ((16, 10, 4, 1), "muon", "identity"),
    (*_BLOCK, "attn1", "pos_conv", "kernel"): ((5, 5, 1, 4), "muon", "conv3d"),
    ("diff_model", "time_embedding", "linear_1", "bias"): ((16,), "adamw", "identity"),
    ("diff_model", "conv_in", "bn1", "scale"): ((9,), "adamw", "identity"),
    ("embedding_layer", "embedding"): ((20, 6), "adamw", "identity"),
    ("diff_model", "conv_in", "conv_pw", "kernel"): ((1, 1, 9, 6), "adamw", "conv"),
    ("diff_model", "conv_out", "conv_dw", "kernel"): ((3, 3, 1, 6), "adamw", "conv"),
}


def _tree(values: dict) -> dict:
    return traverse_util.unflatten_dict(values)


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _random_tree(rng: np.random.Generator, scale: float = 1.0) -> dict:
    """float32 values with a different magnitude per leaf."""
    return _tree({
        path: (scale * 10 ** rng.uniform(-1, 0.5) * rng.standard_normal(shape)).astype(np.float32)
        for path, (shape, _, _) in LEAVES.items()
    })


# -- numpy reference ---------------------------------------------------------------------------

_A, _B, _C = 3.4445, -4.7750, 2.0315


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even) and hold the value in float32."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _bf16_matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _bf16(x.astype(np.float64) @ y.astype(np.float64))


def ns5_bf16_numpy(g: np.ndarray) -> np.ndarray:
    """The reference's NS5 with every torch bf16 op emulated: compute wide, round to bf16."""
    x = _bf16(g)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    norm = _bf16(np.sqrt(np.sum(x.astype(np.float64) ** 2)))
    x = _bf16(x / _bf16(norm + np.float32(1e-7)))
    for _ in range(5):
        a = _bf16_matmul(x, x.T)
        b = _bf16(_bf16(np.float32(_B) * a) + _bf16_matmul(_bf16(np.float32(_C) * a), a))
        x = _bf16(_bf16(np.float32(_A) * x) + _bf16_matmul(b, x))
    return x.T if transposed else x


def reference_muon(params: dict, grads_seq: list[dict], lrs: list[float], wd: float = 0.1,
                   momentum: float = 0.95) -> dict:
    """The reference's Muon step by step in torch layout: float32 momentum (as torch keeps it),
    bf16 NS5, float64 parameter arithmetic. Returns float64 params in Flax layout."""
    out = {}
    for path, (_, branch, kind) in LEAVES.items():
        p = TO_TORCH[kind](params[path]).astype(np.float64)
        buf = np.zeros(p.shape, np.float32)
        m = np.zeros(p.shape)
        v = np.zeros(p.shape)
        for k, (grads, lr) in enumerate(zip(grads_seq, lrs), start=1):
            g = TO_TORCH[kind](grads[path])
            if branch == "muon":
                buf = np.float32(momentum) * buf + g
                u = g + np.float32(momentum) * buf  # nesterov
                o = ns5_bf16_numpy(u.reshape(u.shape[0], -1)).reshape(u.shape)
                lr_adj = lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1]))
                p = p * (1 - lr * wd) - lr_adj * o
            else:
                g = g.astype(np.float64)
                m = m + 0.1 * (g - m)
                v = v + 0.05 * (g * g - v)
                u = m / (1e-8 + np.sqrt(v))
                scale = (1 - 0.9**k) / math.sqrt(1 - 0.95**k)
                p = p * (1 - lr * wd) - (lr / scale) * u
        out[path] = TO_FLAX[kind](p)
    return out


def _run(tx: optax.GradientTransformation, params: dict, grads_seq: list[dict]) -> list[dict]:
    """Params after each step (one compilation)."""
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step)
    state, history = tx.init(params), []
    for grads in grads_seq:
        params, state = step(params, state, grads)
        history.append(_flat(params))
    return history


def _assert_close(ours: dict, ref: dict, start: dict, rtol_update: float, ulps: float) -> None:
    """Per leaf: |ours − ref| ≤ rtol_update·max|ref − start| + ulps·eps32·max|ref|."""
    for path in ref:
        err = np.max(np.abs(ours[path] - ref[path]))
        tol = rtol_update * np.max(np.abs(ref[path] - start[path]))
        tol += ulps * EPS32 * np.max(np.abs(ref[path]))
        assert err <= tol, f"{'/'.join(path)}: {err:.3e} > {tol:.3e}"


# -- Muon ----------------------------------------------------------------------------------------


def test_param_labels_follow_the_rule():
    params = _random_tree(np.random.default_rng(0))
    labels = traverse_util.flatten_dict(muon_param_labels(params))
    assert labels == {path: branch for path, (_, branch, _) in LEAVES.items()}


def test_a_parameter_without_a_matrix_view_goes_to_adamw_with_one_notice(caplog):
    params = _tree({("diff_model", "mixer", "decay"): np.zeros(7, np.float32),  # 1-D: AdamW, silently
                    ("diff_model", "mixer", "mix"): np.zeros((3, 4, 5), np.float32),  # no known view
                    ("diff_model", "mixer", "kernel"): np.zeros((3, 4), np.float32)})
    with caplog.at_level("WARNING", logger="moebius_jax.train.muon"):
        labels = traverse_util.flatten_dict(muon_param_labels(params))
        muon_param_labels(params)  # asked again (a second optimizer): no second notice
    assert labels == {("diff_model", "mixer", "decay"): "adamw", ("diff_model", "mixer", "mix"): "adamw",
                      ("diff_model", "mixer", "kernel"): "muon"}
    notices = [r.getMessage() for r in caplog.records]
    assert notices == ["muon: 1 parameter(s) of a kind with no known matrix view train with AdamW: "
                       "diff_model/mixer/mix (3, 4, 5)"]


@functools.cache
def _shapes(config: str) -> dict:
    """Shapes of a model's "params" (eval_shape: nothing allocated)."""
    return loading.abstract_variables(*loading.build_model(config))["params"]


@pytest.fixture(scope="module")
def student_shapes() -> dict:
    return _shapes("configs/moebius.yaml")


def test_param_split_of_the_full_student(student_shapes):
    params = student_shapes
    labels, leaves = jax.tree.leaves(muon_param_labels(params)), jax.tree.leaves(params)
    count = {b: sum(lab == b for lab in labels) for b in ("muon", "adamw")}
    size = {b: sum(math.prod(x.shape) for lab, x in zip(labels, leaves) if lab == b)
            for b in ("muon", "adamw")}
    assert count == {"muon": 288, "adamw": 543}
    assert size == {"muon": 225_511_736, "adamw": 529_795}


def _reference_labels_and_layouts(params) -> dict:
    """The reference's own rule on its own names: path -> (label, torch layout), the names and
    layouts taken from the checkpoint key map (the converter, which the trainer does not use)."""
    from moebius_jax.convert.maps import UNET_KEYMAP

    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        name, layout = UNET_KEYMAP.flax_to_torch_key(("params", *path), len(leaf.shape))
        torch_ndim = layout.to_torch(np.broadcast_to(np.zeros((), np.uint8), leaf.shape)).ndim
        muon_ = torch_ndim >= 2 and not any(part in name for part in ("embedding_layer", "conv_in", "conv_out"))
        out[path] = ("muon" if muon_ else "adamw", layout)
    return out


@pytest.mark.parametrize("config", ["configs/moebius.yaml", "configs/pixelhacker.yaml"])
def test_labels_are_the_reference_split(config):
    """Full student and teacher: the Flax-tree rule labels every leaf as the reference's
    name rule does, and `ADAMW_MODULES` names exactly the modules its name parts pick."""
    params = _shapes(config)
    reference = _reference_labels_and_layouts(params)
    ours = traverse_util.flatten_dict(muon_param_labels(params))
    assert ours == {path: label for path, (label, _) in reference.items()}
    assert {p for path in ours for p in path} >= ADAMW_MODULES


@pytest.mark.parametrize("config", ["configs/moebius_tiny.yaml", "configs/pixelhacker_tiny.yaml"])
def test_matrix_views_are_the_reference_layouts(config):
    """Every Muon leaf of the tiny student and teacher: the matrix NS5 sees, built from the
    Flax kind and shape, is element for element the key map's torch tensor reshaped (dim 0, rest)."""
    params = _shapes(config)
    reference = _reference_labels_and_layouts(params)
    labels = traverse_util.flatten_dict(muon_param_labels(params))
    checked = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        if labels[path] != "muon":
            continue
        values = np.arange(math.prod(leaf.shape), dtype=np.float32).reshape(leaf.shape)
        torch_tensor = reference[path][1].to_torch(values)
        axes = torch_axes(path, leaf.shape)
        ours = np.transpose(values, axes)
        np.testing.assert_array_equal(ours.reshape(ours.shape[0], -1), torch_tensor.reshape(torch_tensor.shape[0], -1))
        assert ours.shape[:2] == torch_tensor.shape[:2], path  # the lr ratio's two dims
        checked += 1
    assert checked > 20
    # The round trip back to the Flax layout (NS5 output has the matrix's shape).
    kernel = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 4, 6)), jnp.float32)
    assert orthogonalized_update(kernel, (3, 2, 0, 1)).shape == kernel.shape


@pytest.mark.parametrize("shape", [(6, 36), (12, 8), (8, 9), (16, 40), (4, 25), (40, 16), (32, 32)])
def test_newton_schulz5_is_the_bf16_reference(shape):
    # Products of bf16 numbers are exact in float32 and these sums are short, so XLA's float32
    # accumulation and the float64 emulation round to the same bf16 unless a sum falls within
    # an ulp of a rounding boundary (none here): equality is exact. For sums of hundreds of
    # terms such a flip happens now and then and the two bf16 trajectories part by a few % of
    # max, as two torch runs with different GEMM orders would.
    rng = np.random.default_rng(sum(shape))
    for scale in (1e-3, 1.0, 30.0):
        g = (scale * rng.standard_normal(shape)).astype(np.float32)
        ours = np.asarray(jax.jit(newton_schulz5)(jnp.asarray(g)))
        np.testing.assert_array_equal(ours, ns5_bf16_numpy(g))


def test_muon_matches_reference_formula():
    rng = np.random.default_rng(1)
    params = _random_tree(rng)
    grads_seq = [_random_tree(rng, scale=1e-2) for _ in range(3)]
    lrs = [0.01, 0.03, 0.02]  # a schedule indexed by the 0-based step
    schedule = lambda k: jnp.asarray(lrs, jnp.float32)[k]  # noqa: E731
    history = _run(muon(schedule), params, grads_seq)
    for steps in (1, 3):
        ref = reference_muon(_flat(params), [_flat(g) for g in grads_seq[:steps]], lrs[:steps])
        # float32 against a float64 reference: p rounding per step, and update arithmetic.
        _assert_close(history[steps - 1], ref, _flat(params), rtol_update=1e-5, ulps=2 * steps)


# -- clipping -------------------------------------------------------------------------------------


def test_clip_matches_torch_rule():
    rng = np.random.default_rng(3)
    grads = _random_tree(rng)
    flat = _flat(grads)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in flat.values()))
    assert abs(float(torch_global_norm(grads)) - total) <= 1e-6 * total
    clip = clip_by_global_norm_torch(1.0)
    clipped, _ = jax.jit(clip.update)(grads, clip.init(grads))
    factor = 1.0 / (total + 1e-6)
    for path, g in _flat(clipped).items():
        np.testing.assert_allclose(g, flat[path] * factor, rtol=2e-6)
    # Below max_norm: the factor is exactly 1 and the grads pass unchanged.
    big = clip_by_global_norm_torch(10 * total)
    same, _ = big.update(grads, big.init(grads))
    for path, g in _flat(same).items():
        np.testing.assert_array_equal(g, flat[path])


def test_clip_differs_from_optax_at_the_threshold():
    grads = {"w": jnp.ones((1,), jnp.float32)}  # norm exactly max_norm
    ours, _ = clip_by_global_norm_torch(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    # torch forms the factor in float32 too: 1 / fl32(1 + 1e-6)
    assert float(ours["w"][0]) == np.float32(1) / (np.float32(1) + np.float32(1e-6)) < 1.0
    assert float(theirs["w"][0]) == 1.0


# -- schedules ------------------------------------------------------------------------------------


def _schedule(**fields) -> optax.Schedule:
    return make_schedule(OptimizerConfig(**fields))


def test_constant_with_warmup():
    steps = jnp.array([0, 1, 1000])
    np.testing.assert_allclose(_schedule(learning_rate=1e-4)(steps), [1e-4] * 3, rtol=1e-7)
    schedule = jax.jit(_schedule(learning_rate=1e-4, warmup_steps=10))
    got = [float(schedule(s)) for s in (0, 1, 5, 9, 10, 11, 500)]
    np.testing.assert_allclose(got, [0, 1e-5, 5e-5, 9e-5, 1e-4, 1e-4, 1e-4], rtol=1e-6)


def test_cosine_with_warmup():
    schedule = jax.jit(_schedule(schedule="cosine", learning_rate=1e-4, warmup_steps=10, total_steps=110,
                                 min_lr=1e-5))
    steps = (0, 5, 10, 35, 60, 110, 300)
    expected = [0, 5e-5, 1e-4, 1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 4)), 5.5e-5, 1e-5, 1e-5]
    np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-6, atol=1e-12)
    plain = _schedule(schedule="cosine", learning_rate=2e-4, total_steps=100)  # min_lr 0: diffusers' cosine
    np.testing.assert_allclose(float(plain(0)), 2e-4, rtol=1e-6)
    np.testing.assert_allclose(float(plain(25)), 2e-4 * 0.5 * (1 + math.cos(math.pi * 0.25)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"total_steps \(10\) must exceed warmup_steps \(10\)"):
        OptimizerConfig(schedule="cosine", warmup_steps=10, total_steps=10)


# -- EMA -----------------------------------------------------------------------------------------


def test_ema_follows_litema():
    rng = np.random.default_rng(4)
    params0 = _random_tree(rng)
    seq = [_random_tree(rng) for _ in range(3)]
    state = ema_init(params0)
    assert int(state.num_updates) == 0 and state.decay.dtype == jnp.float32
    update = jax.jit(ema_update)
    shadow = {k: v.astype(np.float64) for k, v in _flat(params0).items()}
    for n, params in enumerate(seq, start=1):
        state = update(state, params)
        d = min(0.9999, (1 + n) / (10 + n))  # first: 2/11
        shadow = {k: s - (1 - d) * (s - _flat(params)[k]) for k, s in shadow.items()}
        assert int(state.num_updates) == n
        for path, s in _flat(state.shadow).items():  # float32 rounding of |s − p| ~ max|s|
            np.testing.assert_allclose(s, shadow[path], rtol=0, atol=4 * n * EPS32 * np.max(np.abs(s)))
    first = ema_update(ema_init(params0), seq[0])
    for path, s in _flat(first.shadow).items():
        expected = _flat(params0)[path] - (9 / 11) * (_flat(params0)[path] - _flat(seq[0])[path])
        np.testing.assert_allclose(s, expected, rtol=0, atol=4 * EPS32 * np.max(np.abs(s)))


def test_ema_decay_caps_the_warmup():
    params = {"w": jnp.zeros((3,), jnp.float32)}
    state = EmaState({"w": jnp.ones((3,), jnp.float32)}, jnp.int32(1000), jnp.float32(0.9))
    out = ema_update(state, params)  # (1 + 1001) / (10 + 1001) > 0.9, so d = 0.9
    np.testing.assert_allclose(out.shadow["w"], 0.9, rtol=1e-6)
    assert int(out.num_updates) == 1001


# -- the assembled optimiser -----------------------------------------------------------------------


def test_default_config_is_the_reference():
    config = OptimizerConfig()
    assert dataclasses.astuple(config)[:11] == (
        "muon", 1e-4, 0.1, 0.95, True, 5, (0.9, 0.95), 1e-8, 1.0, "constant_with_warmup", 0)
    assert np.float32(make_schedule(config)(12345)) == np.float32(1e-4)
    with pytest.raises(ValueError):
        OptimizerConfig(name="sgd")


def test_make_optimizer_muon_clips_then_steps():
    rng = np.random.default_rng(5)
    params = _random_tree(rng)
    grads_seq = [_random_tree(rng) for _ in range(2)]  # global norm ≫ 1: clipping acts
    config = OptimizerConfig(learning_rate=0.02, warmup_steps=1)  # lrs 0 then 0.02
    ours = _run(make_optimizer(config, params), params, grads_seq)[-1]
    clipped = []
    for grads in grads_seq:
        flat = _flat(grads)
        total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in flat.values()))
        factor = min(1.0, 1.0 / (total + 1e-6))
        clipped.append({k: (g * factor).astype(np.float32) for k, g in flat.items()})
    ref = reference_muon(_flat(params), clipped, [0.0, 0.02])
    _assert_close(ours, ref, _flat(params), rtol_update=1e-5, ulps=4)


def test_make_optimizer_adamw_is_torch_adamw():
    rng = np.random.default_rng(6)
    params = _random_tree(rng)
    grads_seq = [_random_tree(rng, scale=1e-2) for _ in range(3)]  # norm < 1: no clipping
    config = OptimizerConfig(name="adamw", learning_rate=1e-2)
    ours = _run(make_optimizer(config, params), params, grads_seq)[-1]
    for path, p0 in _flat(params).items():
        p, m, v = p0.astype(np.float64), 0.0, 0.0
        for k, grads in enumerate(grads_seq, start=1):
            g = _flat(grads)[path].astype(np.float64)
            m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
            m_hat, v_hat = m / (1 - 0.9**k), v / (1 - 0.95**k)
            p = p * (1 - 1e-2 * 0.1) - 1e-2 * m_hat / (np.sqrt(v_hat) + 1e-8)
        err = np.max(np.abs(ours[path] - p))
        assert err <= 1e-5 * np.max(np.abs(p - p0)) + 6 * EPS32 * np.max(np.abs(p)), path


def test_muon_traces_over_the_full_student(student_shapes):
    params = student_shapes
    tx = make_optimizer(OptimizerConfig(), params)
    state = jax.eval_shape(tx.init, params)
    updates, _ = jax.eval_shape(tx.update, params, state, params)
    assert jax.tree.map(lambda u: (u.shape, u.dtype), updates) == jax.tree.map(
        lambda p: (p.shape, p.dtype), params)
