"""The SD AutoencoderKL: parity with the reference (vae_tiny), every checkpoint naming, tiling."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_parity, fixture_path, load_npz, nchw_to_nhwc

from moebius_jax.convert.errors import CheckpointMismatchError
from moebius_jax.convert.keymap import plan
from moebius_jax.convert.state_dict import read_state_dict, write_safetensors
from moebius_jax.convert.torch_pickle import save_torch_file
from moebius_jax.convert.vae_keys import VAE_KEYMAP
from moebius_jax.models.vae import SD_VAE_CONFIG, AutoencoderKL, DiagonalGaussian, VaeConfig
from moebius_jax.vae_loading import abstract_vae_variables, load_vae, save_vae

TINY = fixture_path("vae_tiny")
SD_MANIFEST = json.loads(fixture_path("vae_sd_manifest.json").read_text())


@pytest.fixture(scope="module")
def io():
    return {k: nchw_to_nhwc(v) for k, v in load_npz("vae_tiny", "io.npz").items()}


@pytest.fixture(scope="module")
def tiny(tiny_vae):
    return tiny_vae


@pytest.fixture(scope="module")
def tiny_state():
    return read_state_dict(TINY / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def encode(tiny):
    vae, _ = tiny
    return jax.jit(lambda v, x: (vae.apply(v, x, method="moments"), *vae.apply(v, x, method="encode")))


@pytest.fixture(scope="module")
def decode(tiny):
    vae, _ = tiny
    return jax.jit(lambda v, z: vae.apply(v, z, method="decode"))


@pytest.fixture(scope="module")
def encoded(tiny, encode, io):
    return encode(tiny[1], io["image"])


def assert_same_variables(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# -- parity with the reference -------------------------------------------------------------


@pytest.mark.parametrize("index, name", [(0, "moments"), (1, "mean"), (2, "logvar")])
def test_encode_matches_reference(encoded, io, index, name):
    assert_parity(encoded[index], io[name], name=name)


def test_posterior_matches_reference(encoded, io):
    posterior = DiagonalGaussian(encoded[1], encoded[2])
    assert_parity(posterior.std, io["std"], name="std")
    assert_parity(posterior.reparameterize(io["sample_noise"]), io["latent_sample"], name="latent_sample")
    np.testing.assert_array_equal(posterior.mode(), encoded[1])


def test_decode_matches_reference(tiny, decode, io):
    assert_parity(decode(tiny[1], io["latent_in"]), io["decoded"], name="decoded")


def test_sample_draws_from_the_key_and_zeroes_nans():
    mean = jnp.array([[0.5, jnp.nan, -1.0]])
    posterior = DiagonalGaussian(mean, jnp.array([[0.0, 0.0, 100.0]]).clip(-30, 20))
    key = jax.random.key(3)
    z = posterior.sample(key)
    expected = posterior.mean + posterior.std * jax.random.normal(key, mean.shape)
    np.testing.assert_array_equal(z[0, [0, 2]], expected[0, [0, 2]])
    assert z[0, 1] == 0.0  # NaN replaced by 0, as the reference pipeline does


def test_clamped_logvar_and_scaling_attributes(tiny, encode, io):
    vae, variables = tiny
    # A huge quant_conv bias drives every logvar far above 20; encode clamps it.
    params = jax.tree.map(lambda x: x, variables["params"])
    params["quant_conv"]["bias"] = params["quant_conv"]["bias"].at[4:].set(1e3)
    moments, _, logvar = encode({"params": params}, io["image"])
    assert float(moments[..., 4:].min()) > 20.0
    np.testing.assert_array_equal(logvar, 20.0)
    assert vae.scaling_factor == 0.18215 and vae.shift_factor is None
    assert vae.config.downsample_factor == 8


# -- structure and key maps ----------------------------------------------------------------


def test_sd_manifest_maps_exactly_onto_the_flax_tree():
    """All 248 SD VAE tensors land on a Flax leaf of the right shape (shapes only, no allocation)."""
    config = VaeConfig.from_dict(SD_MANIFEST["config"])
    assert config == SD_VAE_CONFIG  # the default for config-less LDM files is exactly this VAE
    abstract = abstract_vae_variables(AutoencoderKL(config))
    entries = SD_MANIFEST["state_dict"]
    matched = plan({key: shape for key, shape, _ in entries}, VAE_KEYMAP, abstract, "vae_sd_manifest.json")
    assert len(matched) == len(entries) == 248
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])) == 83_653_863


def _diffusers_folder(tmp_path, state, name="diffusion_pytorch_model.safetensors"):
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder / "config.json")
    if name.endswith(".safetensors"):
        write_safetensors(folder / name, state)
    else:
        save_torch_file(folder / name, state)
    return folder


def test_bin_weights_load_when_there_is_no_safetensors(tiny, tiny_state, tmp_path):
    _, variables = load_vae(_diffusers_folder(tmp_path, tiny_state, "diffusion_pytorch_model.bin"))
    assert_same_variables(variables, tiny[1])


def test_legacy_attention_names_load_bit_identically(tiny, tiny_state, tmp_path):
    legacy = SD_MANIFEST["legacy_diffusers_attention_names"]
    new_to_old = {new: old for old, new in legacy["suffix_map_old_to_new"].items()}
    renamed = {}
    for key, value in tiny_state.items():
        for path in legacy["paths"]:
            for new, old in new_to_old.items():
                if key.startswith(f"{path}.{new}."):
                    key = f"{path}.{old}.{key[len(path) + len(new) + 2:]}"
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    _, variables = load_vae(_diffusers_folder(tmp_path, renamed))
    assert_same_variables(variables, tiny[1])


def _ldm_state(diffusers_state):
    """The tiny VAE in CompVis/LDM names and layouts, through the manifest's recorded correspondence.

    vae_tiny has the SD VAE's level count and layers per block, and its conv shortcuts sit at
    levels where the SD VAE has them too, so each of its names appears in the SD table.
    """
    table = {d: (ldm, ldm_shape) for ldm, d, ldm_shape, _ in
             SD_MANIFEST["ldm_original_names"]["pairs_ldm_diffusers_ldmshape_diffusersshape"]}
    out = {}
    for key, value in diffusers_state.items():
        ldm, ldm_shape = table[key]
        out[ldm] = value.reshape(*value.shape, 1, 1) if len(ldm_shape) == 4 and value.ndim == 2 else value
    return out


def test_ldm_single_file_loads_bit_identically(tiny, tiny_state, tmp_path):
    ldm = _ldm_state(tiny_state)
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    ldm["loss.logvar"] = np.zeros((), np.float32)  # training leftovers in LDM files are ignored
    path = tmp_path / "vae.safetensors"
    write_safetensors(path, ldm)
    _, variables = load_vae(path, config=TINY / "config.json")
    assert_same_variables(variables, tiny[1])
    vae, _ = load_vae(path, config=json.loads((TINY / "config.json").read_text()))
    assert vae.config == tiny[0].config


def test_whole_sd_checkpoint_loads_its_first_stage_model(tiny, tiny_state, tmp_path):
    state = {f"first_stage_model.{k}": v for k, v in _ldm_state(tiny_state).items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((320, 4, 3, 3), np.float32)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones((768,), np.float32)
    path = tmp_path / "sd.ckpt"
    save_torch_file(path, {"state_dict": state, "global_step": 470000})
    _, variables = load_vae(path, config=TINY)
    assert_same_variables(variables, tiny[1])


def test_missing_and_misshaped_keys_are_named(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["decoder.conv_in.bias"]
    state["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((64, 32), np.float32)
    folder = _diffusers_folder(tmp_path, state)
    with pytest.raises(CheckpointMismatchError) as err:
        load_vae(folder)
    message = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in message
    assert "decoder.conv_in.bias  expected (64,)" in message
    assert "encoder.mid_block.attentions.0.to_q.weight  expected (64, 64), actual (64, 32)" in message


def test_unsupported_config_is_refused():
    raw = json.loads((TINY / "config.json").read_text())
    with pytest.raises(ValueError, match="act_fn"):
        VaeConfig.from_dict({**raw, "act_fn": "gelu"})
    sdxl = VaeConfig.from_dict({**SD_MANIFEST["config"], "scaling_factor": 0.13025, "shift_factor": 0.0})
    assert (sdxl.scaling_factor, sdxl.shift_factor) == (0.13025, 0.0)
    assert VaeConfig.from_dict(sdxl.to_dict()) == sdxl


def test_orbax_round_trip_is_bit_identical(tiny, tmp_path):
    vae, variables = tiny
    save_vae(tmp_path / "converted", vae, variables)
    restored_vae, restored = load_vae(tmp_path / "converted")
    assert restored_vae.config == vae.config
    assert_same_variables(restored, variables)


# -- tiling --------------------------------------------------------------------------------


def _crossfade_2x2(parts, out_tile: int, out_overlap: int) -> np.ndarray:
    """parts[i][j]: outputs of a 2x2 tile grid whose neighbours overlap by out_overlap, blended linearly."""
    up = (np.arange(out_overlap) + 0.5) / out_overlap
    flat = np.ones(out_tile - out_overlap)
    weights = (np.concatenate([flat, 1 - up]), np.concatenate([up, flat]))
    side, stride = 2 * out_tile - out_overlap, out_tile - out_overlap
    out = np.zeros((1, side, side, parts[0][0].shape[-1]))
    for i in range(2):
        for j in range(2):
            w = weights[i][:, None] * weights[j][None, :]
            rows, cols = slice(i * stride, i * stride + out_tile), slice(j * stride, j * stride + out_tile)
            out[:, rows, cols] += w[None, :, :, None] * parts[i][j]
    return out


def _jit_tiled(vae, method: str, tile: int, overlap: int):
    return jax.jit(lambda v, x: vae.apply(v, x, tile=tile, overlap=overlap, method=method))


def test_decode_tiled_blends_tiles_and_is_exact_inside_them(tiny, decode):
    """12x12 latents, 8x8 tiles overlapping by 4: four decodes cross-faded over 32 pixels."""
    vae, variables = tiny
    z = jax.random.normal(jax.random.key(0), (1, 12, 12, 4))
    tiled = _jit_tiled(vae, "decode_tiled", tile=8, overlap=4)(variables, z)
    parts = [[np.asarray(decode(variables, z[:, 4 * i:4 * i + 8, 4 * j:4 * j + 8])) for j in range(2)]
             for i in range(2)]
    # Where only one tile reaches, the output is that tile's decode.
    np.testing.assert_allclose(tiled[:, :32, :32], parts[0][0][:, :32, :32], rtol=0, atol=1e-4)
    np.testing.assert_allclose(tiled[:, 64:, 64:], parts[1][1][:, 32:, 32:], rtol=0, atol=1e-4)
    assert_parity(tiled, _crossfade_2x2(parts, 64, 32), rel=1e-6, name="decode_tiled")


def test_tiled_with_one_tile_is_the_untiled_call(tiny, decode, encoded, io):
    vae, variables = tiny
    z = io["latent_in"]
    tiled = _jit_tiled(vae, "decode_tiled", tile=16, overlap=4)(variables, z)
    np.testing.assert_allclose(tiled, decode(variables, z), rtol=0, atol=1e-6)
    mean, logvar = _jit_tiled(vae, "encode_tiled", tile=128, overlap=32)(variables, io["image"])
    np.testing.assert_allclose(mean, encoded[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(logvar, encoded[2], rtol=0, atol=1e-6)


def test_encode_tiled_blends_moments(tiny, encode):
    """96x96 images, 64-pixel tiles overlapping by 32: moments cross-faded over 4 latent pixels."""
    vae, variables = tiny
    images = jax.random.uniform(jax.random.key(1), (1, 96, 96, 3), minval=-1.0, maxval=1.0)
    mean, logvar = _jit_tiled(vae, "encode_tiled", tile=64, overlap=32)(variables, images)
    parts = [[np.asarray(encode(variables, images[:, 32 * i:32 * i + 64, 32 * j:32 * j + 64])[0])
              for j in range(2)] for i in range(2)]
    moments = _crossfade_2x2(parts, 8, 4)
    assert_parity(mean, moments[..., :4], rel=1e-6, name="mean")
    assert_parity(logvar, np.clip(moments[..., 4:], -30, 20), rel=1e-6, name="logvar")
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.apply(variables, images, tile=60, overlap=16, method="encode_tiled")
