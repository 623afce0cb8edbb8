"""E-LatentLPIPS (sdxl, "bg") against elatentlpips 0.2 (fixtures/elatentlpips): network, taps,
augmentation ops, replayed ensembling, sampler statistics, loaders and JAX transformations.

Tolerances are the fixture README's (section 7): distances rtol 1e-5, taps atol 2e-6, theta and
grid atol 1e-6, upsampled atol 1e-5, grid-sampled atol 1e-4, augmented outputs atol 5e-5,
gradients rtol 1e-4 of the largest element.
"""

from __future__ import annotations

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity, fixture_path, load_npz, nchw_to_nhwc
from elatentlpips_weights import (
    W16_WIDTHS,
    full_width_entries,
    regenerate,
    w16_entries,
    write_trunk_file,
    write_tuned_file,
    write_w16_files,
)

from moebius_jax.convert import keymap as km
from moebius_jax.convert.errors import CheckpointError, CheckpointMismatchError
from moebius_jax.convert.torch_pickle import load_torch_file
from moebius_jax.losses import latent_augment as la
from moebius_jax.losses.elatentlpips import (
    SDXL_LATENT_SCALE,
    DistanceTerms,
    elatentlpips_distance,
    elatentlpips_features,
    elatentlpips_terms,
    l1_distance,
)
from moebius_jax.losses.elatentlpips_weights import (
    TRUNK_FILE,
    TUNED_FILE,
    TUNED_KEYMAP,
    check_trunk_file,
    load_elatentlpips,
)

DIST_RTOL = 1e-5
TAP_ATOL = 2e-6
GRAD_REL = 1e-4
AUG_OUT_ATOL = 5e-5
STAGE_CASES = ("identity", "rot90_1_3", "rot_pre", "combined")  # cases that record the intermediates
W16_TRUNK, W16_TUNED = "sdxl_latent_vgg16.w16.pth.tar", "sdxl_latest_vgg16_tuned.w16.pth"


def _group(data: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) + 1:]: v for k, v in data.items() if k.startswith(prefix + "/")}


def _draws(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("draw_"):]: v for k, v in group.items() if k.startswith("draw_")}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def full_state():
    return regenerate(full_width_entries())  # asserts every sha256 of keys.json


@pytest.fixture(scope="module")
def metric(full_state, tmp_path_factory):
    """The full-width metric, loaded from the tuned file alone (it carries every value)."""
    path = write_tuned_file(tmp_path_factory.mktemp("elatentlpips") / TUNED_FILE, full_state)
    return load_elatentlpips(heads_path=path)


@pytest.fixture(scope="module")
def w16_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("elatentlpips_w16")
    write_w16_files(directory)
    return directory


@pytest.fixture(scope="module")
def small_metric(w16_dir):
    """Reduced-width metric (widths / 16) for the cheap API and transformation checks."""
    return load_elatentlpips(w16_dir, widths=W16_WIDTHS)


@pytest.fixture(scope="module")
def io():
    return load_npz("elatentlpips", "io.npz")


@pytest.fixture(scope="module")
def aug_ops():
    return load_npz("elatentlpips", "aug_ops.npz")


@pytest.fixture(scope="module")
def ens():
    return load_npz("elatentlpips", "ensembling.npz")


@functools.partial(jax.jit, static_argnames=("normalize", "ensembling"))
def _loss_and_grad(metric, x0, x1, **kwargs):
    """Per-sample terms and the gradient of the trainer's batch mean w.r.t. x0, in one pass."""

    def loss(a):
        terms = elatentlpips_terms(metric, a, x1, **kwargs)
        return terms.total().mean(), terms

    return jax.value_and_grad(loss, has_aux=True)(x0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _params_matrix_margins(draws, height, width):
    params = la.params_from_draws(draws, height, width)
    g = la.inverse_matrix(params)
    return params, g, la.margins(g, height, width)


_augment = jax.jit(la.augment_pair)
_sample = jax.jit(la.sample_params, static_argnums=(1, 2, 3))


# ------------------------------------------------------------------------------ network (io.npz)


@pytest.fixture(scope="module", params=["normT", "normF"])
def io_run(request, metric, io):
    name = request.param
    (mean, terms), grad = _loss_and_grad(
        metric, nchw_to_nhwc(io["x0"]), nchw_to_nhwc(io["x1"]), normalize=name == "normT", ensembling=False
    )
    return name, mean, terms, grad


def test_io_distance_terms(io_run, io):
    name, mean, terms, _ = io_run
    np.testing.assert_allclose(terms.total(), io[f"{name}_dist"], rtol=DIST_RTOL, atol=0)
    np.testing.assert_allclose(terms.total(add_l1=False), io[f"{name}_dist_no_l1"], rtol=DIST_RTOL, atol=0)
    np.testing.assert_allclose(terms.l1, io[f"{name}_l1"], rtol=DIST_RTOL, atol=0)
    layers = np.stack([io[f"{name}_layer{k}"] for k in range(5)], axis=-1)
    np.testing.assert_allclose(terms.layers, layers, rtol=DIST_RTOL, atol=0)
    np.testing.assert_allclose(mean, io[f"{name}_loss_mean"], rtol=DIST_RTOL, atol=0)


def test_io_gradient(io_run, io):
    name, _, _, grad = io_run
    assert_parity(grad, nchw_to_nhwc(io[f"{name}_grad_x0_of_mean"]), rel=GRAD_REL, name=f"{name} grad")


def test_io_taps(metric, io):
    """Every tap with normalize on (the normalize-off taps differ only by the input scale, which
    the normalize-off distances above already pin)."""
    features = jax.jit(elatentlpips_features, static_argnames="normalize")
    taps = features(metric, nchw_to_nhwc(io["x0"]), normalize=True)
    for k, tap in enumerate(taps):
        ref = nchw_to_nhwc(io[f"normT_feat{k}_x0"])
        np.testing.assert_allclose(tap, ref, rtol=0, atol=TAP_ATOL, err_msg=f"tap{k}")


@pytest.mark.parametrize("name", ["normT", "normF"])
def test_sum_order_is_the_references(io, name):
    """Summing the recorded terms in our order reproduces the recorded distance bit for bit."""
    layers = np.stack([io[f"{name}_layer{k}"] for k in range(5)], axis=-1)
    total = DistanceTerms(jnp.asarray(layers), jnp.asarray(io[f"{name}_l1"])).total()
    np.testing.assert_array_equal(total, io[f"{name}_dist"])


# ------------------------------------------------------------------------------ augmentation ops


def test_filter_is_the_references(aug_ops):
    np.testing.assert_array_equal(la.SYM6_FILTER, aug_ops["Hz_geom"])


@pytest.mark.parametrize("case", list(load_npz("elatentlpips", "aug_ops.npz")["case_names"]))
def test_aug_op(aug_ops, case):
    """Draws -> parameters -> matrix -> margins -> theta -> outputs, for one op (or all) at a time."""
    c = _group(aug_ops, case)
    _, _, height, width = aug_ops["src"].shape
    params, g, margins = _params_matrix_margins(_draws(c), height, width)
    for field in params._fields:
        np.testing.assert_allclose(getattr(params, field), c[f"param_{field}"], rtol=0, atol=1e-6, err_msg=field)
    np.testing.assert_allclose(g, c["G_pixel"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(margins, c["margin_float"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.ceil(margins), c["margin"])
    pad = tuple(int(v) for v in c["margin"])
    theta = jax.jit(la.sampling_theta, static_argnums=(1, 2, 3))(g, pad, height, width)
    np.testing.assert_allclose(theta, c["theta"], rtol=0, atol=1e-6)
    out_src, out_tgt = _augment(params, nchw_to_nhwc(aug_ops["src"]), nchw_to_nhwc(aug_ops["tgt"]))
    np.testing.assert_allclose(out_src, nchw_to_nhwc(c["out_src"]), rtol=0, atol=AUG_OUT_ATOL)
    np.testing.assert_allclose(out_tgt, nchw_to_nhwc(c["out_tgt"]), rtol=0, atol=AUG_OUT_ATOL)


@pytest.mark.parametrize("case", STAGE_CASES)
def test_resampler_stages(aug_ops, case):
    """Each stage of the resampler from the reference's own input, with its data-dependent padding."""
    c = _group(aug_ops, case)
    _, _, height, width = aug_ops["src"].shape
    left, top, right, bottom = (int(v) for v in c["margin"])
    padded = np.pad(nchw_to_nhwc(aug_ops["src"]), ((0, 0), (top, bottom), (left, right), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(padded, nchw_to_nhwc(c["padded_src"]))  # the same reflect rule as jnp.pad
    np.testing.assert_allclose(jax.jit(la.upsample2x)(padded), nchw_to_nhwc(c["upsampled_src"]), rtol=0, atol=1e-5)
    out_h, out_w = 2 * (height + la.FILTER_MARGIN), 2 * (width + la.FILTER_MARGIN)
    grid = jax.jit(la.affine_grid, static_argnums=(1, 2))(c["theta"], out_h, out_w)
    np.testing.assert_allclose(grid, c["grid"], rtol=0, atol=1e-6)
    sampled = jax.jit(la.grid_sample)(nchw_to_nhwc(c["upsampled_src"]), c["grid"])
    np.testing.assert_allclose(sampled, nchw_to_nhwc(c["sampled_src"]), rtol=0, atol=1e-4)
    down = jax.jit(la.downsample2x)(nchw_to_nhwc(c["sampled_src"]))
    np.testing.assert_allclose(down, nchw_to_nhwc(c["out_src"]), rtol=0, atol=AUG_OUT_ATOL)


def test_identity_transform_nearly_preserves_input(aug_ops):
    c = _group(aug_ops, "identity")
    params, _, _ = _params_matrix_margins(_draws(c), *aug_ops["src"].shape[2:])
    out, _ = _augment(params, nchw_to_nhwc(aug_ops["src"]), nchw_to_nhwc(aug_ops["tgt"]))
    assert float(jnp.max(jnp.abs(out - nchw_to_nhwc(aug_ops["src"])))) < 2e-5  # the reference: 3e-6


# ------------------------------------------------------------------------------ ensembling.npz


def test_ensembling_single_call(metric, ens):
    """The package's one augmented call (torch seed 0), replayed from its recorded draws."""
    s = _group(ens, "single")
    x0, x1 = nchw_to_nhwc(ens["x0"]), nchw_to_nhwc(ens["x1"])
    params, g, margins = _params_matrix_margins(_draws(s), *x0.shape[1:3])
    for field in params._fields:
        np.testing.assert_allclose(getattr(params, field), s[f"param_{field}"], rtol=0, atol=1e-6, err_msg=field)
    np.testing.assert_allclose(g, s["G_pixel"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.ceil(margins), s["margin"])
    scale = np.float32(SDXL_LATENT_SCALE)  # the trunk inputs are the scaled, then augmented, latents
    aug0, aug1 = _augment(params, x0 * scale, x1 * scale)
    np.testing.assert_allclose(aug0, nchw_to_nhwc(s["aug_in0"]), rtol=0, atol=AUG_OUT_ATOL)
    np.testing.assert_allclose(aug1, nchw_to_nhwc(s["aug_in1"]), rtol=0, atol=AUG_OUT_ATOL)

    (_, terms), grad = _loss_and_grad(metric, x0, x1, aug_params=params)
    np.testing.assert_allclose(terms.total(), s["dist"], rtol=DIST_RTOL, atol=0)
    np.testing.assert_allclose(terms.l1, s["l1"], rtol=DIST_RTOL, atol=0)
    layers = np.stack([s[f"layer{k}"] for k in range(5)], axis=-1)
    np.testing.assert_allclose(terms.layers, layers, rtol=DIST_RTOL, atol=0)
    assert_parity(grad, nchw_to_nhwc(s["grad_x0_of_mean"]), rel=GRAD_REL, name="augmented grad")


def _check_replays(metric, ens, calls):
    r = _group(ens, "replay")
    x0, x1 = nchw_to_nhwc(ens["x0"]), nchw_to_nhwc(ens["x1"])
    draws = {k: v[calls] for k, v in _draws(r).items()}
    height, width = x0.shape[1:3]

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(None, 0))  # one reference call (own batch-wide margins) per seed
    def run(m, d):
        return elatentlpips_terms(m, x0, x1, aug_params=la.params_from_draws(d, height, width))

    terms = run(metric, draws)
    np.testing.assert_allclose(terms.total(), r["dist"][calls], rtol=DIST_RTOL, atol=0)
    np.testing.assert_allclose(np.swapaxes(terms.layers, 1, 2), r["layers"][calls], rtol=DIST_RTOL, atol=0)


def test_ensembling_replays(metric, ens):
    """8 of the 64 recorded calls, spread out (all 64 cost ~2 CPU-minutes; each passes)."""
    _check_replays(metric, ens, np.arange(0, 64, 9))


# ------------------------------------------------------------------------------ sampler statistics


def _ks_statistic(samples: np.ndarray, cdf) -> float:
    """One-sample Kolmogorov-Smirnov distance between the samples and a continuous CDF."""
    x = np.sort(samples)
    f = np.asarray(cdf(x), np.float64)
    i = np.arange(1, len(x) + 1)
    return float(max(np.max(i / len(x) - f), np.max(f - (i - 1) / len(x))))


def _rounded_uniform_pmf(half_width: float) -> dict[int, float]:
    """P(round(v) = k) for v ~ U(-a, a): the length of [k - 1/2, k + 1/2] inside (-a, a) over 2a."""
    top = math.ceil(half_width + 0.5)
    return {
        k: max(0.0, min(k + 0.5, half_width) - max(k - 0.5, -half_width)) / (2 * half_width)
        for k in range(-top, top + 1)
    }


def test_sampler_distributions():
    """Every parameter's law (README 3a) on N draws, with 5-sigma bounds for N, on a non-square
    image so that x/y mix-ups show; plus pairwise independence."""
    n, height, width = 40_000, 24, 40
    p = jax.tree.map(np.asarray, _sample(jax.random.key(7), n, height, width))
    five_sigma = lambda prob: 5 * math.sqrt(prob * (1 - prob) / n)  # noqa: E731
    ks_bound = 2.5 / math.sqrt(n)  # P(D > bound) ~ 2 exp(-12.5) ~ 7e-6
    normal_cdf = jax.scipy.stats.norm.cdf

    def check_frequencies(values: np.ndarray, pmf: dict[int, float], what: str) -> None:
        assert set(np.unique(values)) <= set(pmf), what
        for k, prob in pmf.items():
            assert abs(np.mean(values == k) - prob) <= five_sigma(prob) + 1e-12, f"{what} = {k}"

    check_frequencies(p.flip, {0: 0.5, 1: 0.5}, "flip")
    check_frequencies(p.rot90, {r: 0.25 for r in range(4)}, "rot90")
    check_frequencies(p.xint_px[:, 0], _rounded_uniform_pmf(la.XINT_MAX * width), "xint x")
    check_frequencies(p.xint_px[:, 1], _rounded_uniform_pmf(la.XINT_MAX * height), "xint y")
    standard_normals = {
        "log2 scale": np.log2(p.scale) / la.SCALE_STD,
        "log2 aniso": np.log2(p.aniso) / la.ANISO_STD,
        "xfrac x": p.xfrac_px[:, 0] / (la.XFRAC_STD * width),
        "xfrac y": p.xfrac_px[:, 1] / (la.XFRAC_STD * height),
    }
    for what, z in standard_normals.items():
        assert abs(z.mean()) < 5 / math.sqrt(n), what
        assert abs(z.var() - 1) < 5 * math.sqrt(2 / n), what
        assert _ks_statistic(z, normal_cdf) < ks_bound, what
    for what, theta in {"rot_pre": p.rot_pre, "rot_post": p.rot_post}.items():
        assert np.all(np.abs(theta) <= np.pi), what
        assert _ks_statistic(theta, lambda t: (t + np.pi) / (2 * np.pi)) < ks_bound, what
    columns = np.stack([p.flip, p.rot90, *p.xint_px.T, *standard_normals.values(), p.rot_pre, p.rot_post])
    corr = np.corrcoef(columns)
    assert np.max(np.abs(corr - np.eye(len(columns)))) < 5 / math.sqrt(n)


def test_sampler_draws_from_the_key_only():
    a, b, c = (_sample(jax.random.key(seed), 4, 16, 16) for seed in (1, 1, 2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.rot_pre, c.rot_pre)
    assert len(np.unique(np.asarray(a.rot_pre))) == 4  # one independent draw per sample


# ------------------------------------------------------------------------------ API, jit, vmap, grads


def _latents(seed: int, shape=(3, 16, 16, 4)) -> tuple[jax.Array, jax.Array]:
    k0, k1 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k0, shape), jax.random.normal(k1, shape)


def test_key_path_equals_explicit_params(small_metric):
    @jax.jit
    def run(m, x0, x1, key):
        return (
            elatentlpips_distance(m, x0, x1, key=key),
            elatentlpips_distance(m, x0, x1, aug_params=la.sample_params(key, *x0.shape[:3])),
            m(x0, x1, key=key),
            elatentlpips_distance(m, x0, x1, ensembling=False),
        )

    via_key, via_params, via_call, no_aug = run(small_metric, *_latents(0), jax.random.key(5))
    assert via_key.shape == (3,)
    np.testing.assert_array_equal(via_key, via_params)
    np.testing.assert_array_equal(via_call, via_key)
    assert not np.allclose(via_key, no_aug)


def test_transform_is_shared_and_per_sample(aug_ops):
    params = _sample(jax.random.key(3), 2, 12, 20)
    src, tgt = nchw_to_nhwc(aug_ops["src"]), nchw_to_nhwc(aug_ops["tgt"])
    a, b = _augment(params, src, src)
    np.testing.assert_array_equal(a, b)
    c, _ = _augment(params, src, tgt)
    np.testing.assert_allclose(c, a, rtol=0, atol=1e-6)  # an input's result does not depend on its partner


def test_identical_inputs_give_zero(small_metric):
    x0, _ = _latents(1)
    same = jax.jit(lambda m, x, k: elatentlpips_distance(m, x, x, key=k))(small_metric, x0, jax.random.key(0))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_ensembling_needs_a_key(small_metric):
    x0, x1 = _latents(2)
    with pytest.raises(ValueError, match="key"):
        elatentlpips_distance(small_metric, x0, x1)


def test_jit_and_vmap(small_metric):
    x0, x1 = _latents(3)
    keys = jax.random.split(jax.random.key(9), 4)
    fn = jax.jit(lambda m, a, b, k: elatentlpips_distance(m, a, b, key=k))
    vmapped = jax.jit(jax.vmap(fn, in_axes=(None, None, None, 0)))(small_metric, x0, x1, keys)
    assert vmapped.shape == (4, 3)
    looped = np.stack([fn(small_metric, x0, x1, k) for k in keys])
    np.testing.assert_allclose(vmapped, looped, rtol=1e-5, atol=0)
    assert len(np.unique(np.round(vmapped[:, 0], 7))) == 4  # each key is a different transform


def test_gradients_reach_inputs_only(small_metric):
    @jax.jit
    def grads(m, x0, x1, key):
        loss = lambda a, b, params: elatentlpips_distance(  # noqa: E731
            m.replace(variables={**m.variables, "params": params}), a, b, key=key
        ).mean()
        grad_x, grad_params = jax.grad(loss, argnums=(0, 2))(x0, x1, m.variables["params"])
        grad_same = jax.grad(loss)(x0, x0, m.variables["params"])  # x0 == x1: |0| and norms of 0
        return grad_x, grad_params, grad_same

    grad_x, grad_params, grad_same = grads(small_metric, *_latents(4), jax.random.key(11))
    assert np.all(np.isfinite(grad_x)) and np.any(grad_x != 0)
    assert np.all(np.isfinite(grad_same))
    assert all(not np.any(g) for g in jax.tree.leaves(grad_params))  # the metric is frozen


def test_l1_term_has_torchs_gradient_where_inputs_are_equal():
    """|d| with derivative sign(d): 0 where the latents coincide (jnp.abs would give +1 there)."""
    x0, x1 = _latents(5, (2, 4, 4, 4))
    x1 = x1.at[:, :2].set(x0[:, :2])  # half of every sample equal
    np.testing.assert_array_equal(l1_distance(x0, x1), jnp.mean(jnp.abs(x0 - x1), axis=(1, 2, 3)))
    grad = jax.grad(lambda a: l1_distance(a, x1).sum())(x0)
    n = x0[0].size
    np.testing.assert_array_equal(grad[:, :2], 0.0)
    np.testing.assert_array_equal(grad[:, 2:], np.sign(x0 - x1)[:, 2:] / n)


# ------------------------------------------------------------------------------ weights and loaders


def test_parameter_count_and_key_map_round_trip(metric, full_state):
    params = metric.variables["params"]
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) == 14_725_184
    back = km.to_torch(jax.device_get(metric.variables), TUNED_KEYMAP)
    expected = {k: v for k, v in full_state.items() if not k.startswith("lins.")}
    assert set(back) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_regenerated_w16_files_match_format_samples(w16_dir):
    """Our writer reproduces the package's nesting, key order and values (sha256-checked)."""
    for ours_name, theirs_name in ((TRUNK_FILE, W16_TRUNK), (TUNED_FILE, W16_TUNED)):
        ours = load_torch_file(w16_dir / ours_name)
        theirs = load_torch_file(fixture_path("elatentlpips", "format_samples", theirs_name))
        assert list(ours) == list(theirs)
        ours_sd, theirs_sd = ours.get("state_dict", ours), theirs.get("state_dict", theirs)
        assert list(ours_sd) == list(theirs_sd)
        for key in ours_sd:
            np.testing.assert_array_equal(ours_sd[key], theirs_sd[key], err_msg=key)


def test_load_format_samples(small_metric):
    """The package's own (reduced-width) files: shared storages, .pth.tar wrapper, module. prefix."""
    trunk = fixture_path("elatentlpips", "format_samples", W16_TRUNK)
    tuned = fixture_path("elatentlpips", "format_samples", W16_TUNED)
    loaded = load_elatentlpips(trunk, tuned, widths=W16_WIDTHS)
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, small_metric.variables)
    assert loaded.widths == W16_WIDTHS


def test_trunk_file_without_module_prefix(tmp_path):
    state = regenerate(w16_entries()[W16_TRUNK])
    bare = collections.OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
    check_trunk_file(write_trunk_file(tmp_path / TRUNK_FILE, bare), W16_WIDTHS)


def test_trunk_file_mismatch_is_reported(tmp_path):
    state = regenerate(w16_entries()[W16_TRUNK])
    del state["module.model.features.40.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"net\.slice5\.40\.weight"):
        check_trunk_file(write_trunk_file(tmp_path / TRUNK_FILE, state), W16_WIDTHS)


def test_wrong_width_is_reported(w16_dir):
    expected = r"lin4\.model\.1\.weight\s+expected \(1, 512, 1, 1\), actual \(1, 32, 1, 1\)"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_elatentlpips(heads_path=w16_dir / TUNED_FILE)


def test_differing_head_copies_are_refused(tmp_path):
    state = regenerate(w16_entries()[W16_TUNED])
    state["lins.2.model.1.weight"] = state["lins.2.model.1.weight"] + 1
    with pytest.raises(CheckpointError, match=r"lins\.2\.model\.1\.weight"):
        load_elatentlpips(heads_path=write_tuned_file(tmp_path / TUNED_FILE, state), widths=W16_WIDTHS)


def test_missing_weights_explain_source_and_licence(tmp_path, w16_dir):
    with pytest.raises(FileNotFoundError) as err:
        load_elatentlpips()
    message = str(err.value)
    for needle in ("elatentlpips", "huggingface.co/Mingguksky/elatentlpips", TRUNK_FILE, TUNED_FILE,
                   "CC BY-NC", "non-commercial", "does not ship"):
        assert needle in message, needle
    with pytest.raises(FileNotFoundError, match=TRUNK_FILE):
        load_elatentlpips(tmp_path)  # an empty directory
    with pytest.raises(ValueError, match="directory"):
        load_elatentlpips(w16_dir / TRUNK_FILE)  # one file alone is ambiguous
