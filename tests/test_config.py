"""Reading the reference's YAML model configs as they are."""

from __future__ import annotations

import pytest
import yaml
from conftest import fixture_path

from moebius_jax.config import TEACHER_MODEL_TYPE, load_config


def test_full_student_config_matches_the_paper_model():
    cfg = load_config("configs/moebius.yaml")
    unet = cfg.unet
    assert cfg.image_size == 512 and unet.sample_size == 64
    assert unet.block_out_channels == (320, 640, 1280)
    assert unet.mid_level is None and unet.conv_kind == "dwsep"
    assert (unet.in_channels, unet.out_channels, unet.num_heads) == (9, 4, 8)
    assert (unet.cross_attention_dim, unet.encoder_hid_dim, unet.context_length) == (768, 3072, 10)
    assert {(lv.self_mixer, lv.cross_mixer, lv.feed_forward) for lv in unet.levels} == {
        ("local_lambda", "cross_lambda", "mix_ffn")
    }
    assert unet.time_embed_dim == 1280 and unet.mix_mlp_ratio == 2.5


def test_teacher_config_uses_diffusers_defaults_for_missing_block_types():
    cfg = load_config("configs/pixelhacker.yaml")
    assert cfg.model_type == TEACHER_MODEL_TYPE and cfg.is_teacher
    assert [lv.attention for lv in cfg.unet.levels] == [True, True, True, False]
    assert cfg.unet.mid_level.self_mixer == "gla" and cfg.unet.conv_kind == "dense"


def test_tiny_fixture_config_loads_from_a_dict():
    raw = yaml.safe_load(fixture_path("moebius_tiny", "config.yaml").read_text())
    assert load_config(raw).unet.block_out_channels == (32, 64, 128)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(block_out_channels=[32, 48, 128]), "not divisible by norm_num_groups"),
        (lambda m: m.update(down_block_types=["CrossAttnDownBlock2D"] * 3), "not supported"),
        (lambda m: m.update(mystery=1), "unknown model config key"),
        (lambda m: m.update(conv_in_kernel=5), "conv_in_kernel 5: only 3 is supported"),
        (lambda m: m.update(model_type="Nope"), "unknown model_type"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, edit, message):
    raw = yaml.safe_load(fixture_path("moebius_tiny", "config.yaml").read_text())
    edit(raw["model"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)
