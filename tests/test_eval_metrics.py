"""FID, LPIPS, PSNR and SSIM against the PyTorch tools' own numbers (tests/fixtures/eval).

Backbones carry the fixtures' key-seeded random weights, regenerated (sha256-checked), saved
as torch files and read back through the converters, so loading is tested end to end. The
LPIPS heads are the real ones shipped in the package. Tolerances are the fixture README's.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity, fixture_path, load_npz, nchw_to_nhwc
from eval_weights import inception_state_dict, lpips_backbone_state_dict

from moebius_jax.convert.errors import CheckpointMismatchError
from moebius_jax.convert.keymap import plan, to_torch
from moebius_jax.convert.torch_pickle import save_torch_file
from moebius_jax.eval import image_metrics
from moebius_jax.eval.fid import InceptionStats, frechet_distance, inception_features, load_fid_inception
from moebius_jax.eval.inception import resize_for_inception
from moebius_jax.eval.lpips import LPIPSNet, load_lpips, normalize_channels, scaling_layer
from moebius_jax.eval.weights import INCEPTION_KEYMAP, LPIPS_BACKBONE_KEYMAP, LPIPS_HEADS_KEYMAP

INCEPTION_TAGS = ("small", "299", "u8_512")
BLOCKS = ("block0", "block1", "mixed_5b", "block2", "mixed_7c")


def _max_abs(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


# -- FID Inception ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_io():
    return load_npz("eval", "inception_io.npz")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    # The torch writer only emits the zip layout; the legacy reader has its own tests.
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    save_torch_file(path, inception_state_dict())
    return load_fid_inception(path)


@pytest.fixture(scope="module")
def inception_inputs(inception_io):
    """The three fixture inputs as NHWC floats in [0, 1] (the uint8 one as x / 255)."""
    io = inception_io
    u8 = nchw_to_nhwc(io["x_u8_512"]).astype(np.float32) / 255
    return dict(zip(INCEPTION_TAGS, (nchw_to_nhwc(io["x_small"]), nchw_to_nhwc(io["x_299"]), u8)))


@pytest.fixture(scope="module")
def inception_run(inception, inception_inputs):
    """pool3 and the sown blocks of all five images in one compiled pass. The inputs are
    resized beforehand; the network's own resize of a 299x299 input is then the identity."""
    module, variables = inception
    batch = jnp.concatenate([resize_for_inception(jnp.asarray(x)) for x in inception_inputs.values()])
    run = jax.jit(lambda v, x: module.apply(v, x, mutable=["intermediates"]))
    pool3, state = run(variables, batch)
    return np.asarray(pool3), {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}


@pytest.mark.parametrize("tag", INCEPTION_TAGS)
def test_resize_to_299(inception_io, inception_inputs, tag):
    ours = resize_for_inception(jnp.asarray(inception_inputs[tag][:1]))
    assert _max_abs(ours, nchw_to_nhwc(inception_io[f"resized_{tag}"])) <= 1e-6


@pytest.mark.parametrize("block", BLOCKS)
def test_inception_blocks(inception_io, inception_run, block):
    _, blocks = inception_run
    assert_parity(blocks[block][:1], nchw_to_nhwc(inception_io[f"{block}_small"]), rel=1e-5, name=block)


def test_inception_pool3(inception_io, inception_run):
    pool3, _ = inception_run
    ours = dict(zip(INCEPTION_TAGS, np.split(pool3, [2, 4])))
    for tag in INCEPTION_TAGS:
        assert _max_abs(ours[tag], inception_io[f"pool3_{tag}"]) <= 1e-6, tag


def test_inception_features_from_uint8(inception, inception_io):
    """The public entry point: uint8 NHWC at 512x512, converted and resized inside."""
    module, variables = inception
    feats = inception_features(module, variables, nchw_to_nhwc(inception_io["x_u8_512"]))
    assert feats.shape == (1, 2048) and feats.dtype == jnp.float32
    assert _max_abs(feats, inception_io["pool3_u8_512"]) <= 1e-6


@pytest.fixture(scope="module")
def inception_file_shapes():
    """Every entry of the real weight file with its shape, num_batches_tracked included."""
    keys = json.loads(fixture_path("eval", "inception_keys.json").read_text())["keys"]
    return {e["key"]: tuple(e["shape"]) for e in keys}


def test_inception_keymap_round_trip(inception, inception_file_shapes):
    """Flax -> torch names give back exactly the file's used keys (error messages name them)."""
    _, variables = inception
    used = {k for k in inception_file_shapes if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert set(to_torch(variables, INCEPTION_KEYMAP)) == used


def test_inception_file_variants(inception, inception_file_shapes):
    """num_batches_tracked and fc present or absent all load; a torchvision Inception3 (with
    AuxLogits) or a mis-shaped tensor is refused with the keys named."""
    _, variables = inception
    shapes = inception_file_shapes
    plan(shapes, INCEPTION_KEYMAP, variables, "full")
    bare = {k: s for k, s in shapes.items() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    plan(bare, INCEPTION_KEYMAP, variables, "bare")
    bad = dict(shapes, **{"AuxLogits.fc.weight": (1000, 768), "Mixed_5b.branch1x1.conv.weight": (64, 192, 3, 3)})
    with pytest.raises(CheckpointMismatchError) as err:
        plan(bad, INCEPTION_KEYMAP, variables, "wrong.pth")
    assert "AuxLogits.fc.weight" in str(err.value) and "Mixed_5b.branch1x1.conv.weight" in str(err.value)


def test_missing_weight_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases/download/fid_weights"):
        load_fid_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        load_lpips("alex")
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        load_lpips("vgg", tmp_path / "vgg16.pth")


# -- Frechet distance ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_cases():
    return load_npz("eval", "fid_cases.npz")


def _stats(cases, case):
    return [cases[f"{case}_{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")]


@pytest.mark.parametrize("case", ["gauss", "lowrank", "singular_eps", "relu256"])
def test_frechet_distance(fid_cases, case):
    """The stored statistics give pytorch-fid's value, taking the eps path exactly where it did."""
    eps_path = json.loads(fixture_path("eval", "fid_cases.json").read_text())[case]["eps_offset_path_taken"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = frechet_distance(*_stats(fid_cases, case))
    assert any("singular" in str(w.message) for w in caught) == eps_path
    ref = float(fid_cases[f"{case}_fid"])
    assert abs(ours - ref) <= 1e-9 * abs(ref), (ours, ref)


def test_frechet_distance_of_a_set_with_itself(fid_cases):
    mu1, sigma1, mu2, sigma2 = _stats(fid_cases, "same")
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(ours) <= 1e-6
    # pytorch-fid's 4.7e-11 is cancellation noise: compare on the scale of the cancelling terms.
    assert abs(ours - float(fid_cases["same_fid"])) <= 1e-9 * (np.trace(sigma1) + np.trace(sigma2))


def test_frechet_distance_rejects_a_complex_root():
    mu = np.zeros(3)
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance(mu, np.eye(3), mu, -np.eye(3))


@pytest.mark.parametrize("case", ["gauss", "lowrank"])
def test_statistics_from_features(fid_cases, case):
    """mean / np.cov (N - 1) as pytorch-fid computes them, and the FID that follows; ddof=0 is
    MAT's convention."""
    stats = [InceptionStats.from_features(fid_cases[f"{case}_feats{i}"]) for i in (1, 2)]
    for i, s in enumerate(stats, 1):
        assert_parity(s.mean, fid_cases[f"{case}_mu{i}"], rel=1e-13, name="mu")
        assert_parity(s.cov(), fid_cases[f"{case}_sigma{i}"], rel=1e-13, name="sigma")
    for ddof, key in ((1, "fid"), (0, "fid_ddof0")):
        ours = frechet_distance(stats[0].mean, stats[0].cov(ddof), stats[1].mean, stats[1].cov(ddof))
        ref = float(fid_cases[f"{case}_{key}"])
        assert abs(ours - ref) <= 1e-9 * abs(ref), (ddof, ours, ref)


def test_streaming_statistics_equal_one_shot(fid_cases):
    feats = fid_cases["gauss_feats2"]  # 300 x 64
    one_shot = InceptionStats.from_features(feats)
    streamed = InceptionStats.empty(64)
    for chunk in np.split(feats, [1, 8, 58, 158]):  # uneven batches, one of a single row
        streamed = streamed.update(chunk)
    # Shards merged out of order, as hosts would report them.
    sharded = InceptionStats.from_features(feats[200:]).merge(InceptionStats.from_features(feats[:200]))
    for stats in (streamed, sharded):
        assert stats.count == 300
        assert_parity(stats.mean, one_shot.mean, rel=1e-14, name="mean")
        assert_parity(stats.cov(), one_shot.cov(), rel=1e-13, name="cov")
        assert_parity(stats.cov(), np.cov(feats, rowvar=False), rel=1e-13, name="np.cov")
    ref = frechet_distance(one_shot.mean, one_shot.cov(), fid_cases["gauss_mu1"], fid_cases["gauss_sigma1"])
    ours = frechet_distance(streamed.mean, streamed.cov(), fid_cases["gauss_mu1"], fid_cases["gauss_sigma1"])
    assert abs(ours - ref) <= 1e-12 * ref


def test_fid_of_features_against_themselves(fid_cases):
    stats = InceptionStats.from_features(fid_cases["same_feats1"])
    assert abs(frechet_distance(stats.mean, stats.cov(), stats.mean, stats.cov())) <= 1e-6


# -- LPIPS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_io():
    # Images and taps to NHWC; the (N, 1, 1, 1) distances are unaffected.
    return {k: nchw_to_nhwc(v) if v.ndim == 4 else v for k, v in load_npz("eval", "lpips_io.npz").items()}


@pytest.fixture(scope="module", params=["alex", "vgg"])
def lpips_metric(request, tmp_path_factory):
    """(net, LPIPS) with the key-seeded backbone saved as a torchvision-style file."""
    net = request.param
    state = lpips_backbone_state_dict(net)
    state["classifier.1.weight"] = np.ones((4, 3), np.float32)  # torchvision files hold one; unused
    path = tmp_path_factory.mktemp(f"lpips_{net}") / f"{net}_backbone.pth"
    save_torch_file(path, state)
    return net, load_lpips(net, path)


@pytest.mark.parametrize("pair", ["", "_b"])
def test_lpips_distances(lpips_io, lpips_metric, pair):
    net, metric = lpips_metric
    other = lpips_io["in1" if pair == "" else "in1b"]
    dist, layers = metric(lpips_io["in0"], other, return_layers=True)
    assert dist.shape == (2,) and layers.shape == (2, 5)
    assert _max_abs(dist, lpips_io[f"{net}_dist{pair}"].reshape(-1)) <= 1e-6
    assert _max_abs(layers, lpips_io[f"{net}_dist{pair}_perlayer"].reshape(5, 2).T) <= 1e-6


def test_lpips_normalize_flag(lpips_io, lpips_metric):
    net, metric = lpips_metric
    dist = metric((lpips_io["in0"] + 1) / 2, (lpips_io["in1"] + 1) / 2, normalize=True)
    assert _max_abs(dist, lpips_io[f"{net}_dist_normalize_flag"].reshape(-1)) <= 1e-6


def test_lpips_taps(lpips_io, lpips_metric):
    """Scaling layer, raw ReLU taps (relative, like the Inception blocks) and unit-normalised taps."""
    net, metric = lpips_metric
    x = lpips_io["in0"][:1]
    assert _max_abs(scaling_layer(x), lpips_io[f"{net}_scaled_in0"]) <= 1e-6
    taps = metric.module.apply(metric.variables, x, method=LPIPSNet.taps)
    for layer, tap in enumerate(taps):
        if f"{net}_raw{layer}_in0" in lpips_io:  # vgg layer 0 was not stored
            assert_parity(tap, lpips_io[f"{net}_raw{layer}_in0"], rel=1e-5, name=f"raw{layer}")
        assert _max_abs(normalize_channels(tap), lpips_io[f"{net}_feat{layer}_in0"]) <= 1e-6, layer


def test_lpips_keymaps(lpips_metric):
    """Flax -> torch names are torchvision's and lpips's, and one net's backbone file is refused
    for the other."""
    net, metric = lpips_metric
    params = metric.variables["params"]
    backbone = {"params": {k: v for k, v in params.items() if k.startswith("features_")}}
    heads = {"params": {k: v for k, v in params.items() if k.startswith("lin_")}}
    nets = json.loads(fixture_path("eval", "lpips_keys.json").read_text())["nets"]
    assert set(to_torch(backbone, LPIPS_BACKBONE_KEYMAP)) == {e["torchvision_key"] for e in nets[net]["backbone_keys"]}
    assert set(to_torch(heads, LPIPS_HEADS_KEYMAP)) == {k for k, _ in nets[net]["head_keys"]}
    other = nets["vgg" if net == "alex" else "alex"]["backbone_keys"]
    with pytest.raises(CheckpointMismatchError):
        plan({e["torchvision_key"]: tuple(e["shape"]) for e in other}, LPIPS_BACKBONE_KEYMAP, backbone, "other.pth")


# -- PSNR and SSIM ---------------------------------------------------------------------------

PAIRS = ("identical", "noisy", "shifted", "offset")


@pytest.fixture(scope="module")
def image_pairs():
    return load_npz("eval", "psnr_ssim.npz")


@pytest.mark.parametrize("pair", PAIRS)
def test_psnr(image_pairs, pair):
    ours = image_metrics.psnr(image_pairs[f"{pair}_a"], image_pairs[f"{pair}_b"])
    ref = float(image_pairs[f"{pair}_psnr"])
    assert ours == ref if np.isinf(ref) else abs(ours - ref) <= 1e-12 * ref


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("variant,key", [("skimage", "default"), ("gaussian", "gaussian")])
def test_ssim(image_pairs, pair, variant, key):
    a, b = image_pairs[f"{pair}_a"], image_pairs[f"{pair}_b"]
    assert abs(image_metrics.ssim(a, b, variant) - float(image_pairs[f"{pair}_ssim_{key}"])) <= 1e-6
    per_channel = [image_metrics.ssim(a[..., c : c + 1], b[..., c : c + 1], variant) for c in range(3)]
    assert _max_abs(per_channel, image_pairs[f"{pair}_ssim_{key}_per_channel"]) <= 1e-6


def test_image_metrics_on_a_batch(image_pairs):
    """An NHWC batch gives the per-image values."""
    a = np.stack([image_pairs[f"{p}_a"] for p in PAIRS[1:]])
    b = np.stack([image_pairs[f"{p}_b"] for p in PAIRS[1:]])
    np.testing.assert_allclose(image_metrics.psnr(a, b), [image_pairs[f"{p}_psnr"] for p in PAIRS[1:]], rtol=1e-12)
    for variant, key in (("skimage", "default"), ("gaussian", "gaussian")):
        ref = [image_pairs[f"{p}_ssim_{key}"] for p in PAIRS[1:]]
        np.testing.assert_allclose(image_metrics.ssim(a, b, variant), ref, rtol=0, atol=1e-6)
