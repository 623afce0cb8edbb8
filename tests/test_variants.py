"""Architecture variants: every mixer / feed-forward choice builds and trains, the new layers
match their definitions, configs reject impossible combinations by level and field, `inspect`
counts the reference models exactly, and `transplant` copies everything that still fits."""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from conftest import MICRO_STUDENT_CONFIG, fixture_path
from flax import traverse_util

from moebius_jax.config import LevelConfig, UNetConfig, load_config
from moebius_jax.convert import keymap as km
from moebius_jax.convert.maps import UNET_KEYMAP
from moebius_jax.inspect_model import count_parameters, inspect_model, main as inspect_main, xla_cost
from moebius_jax.layers import mixers
from moebius_jax.layers import self_lambda
from moebius_jax.layers.self_lambda import SelfLambda
from moebius_jax.layers.linear_attention import LinearAttention, elu_feature_map
from moebius_jax.layers.transformer import Transformer2D
from moebius_jax.loading import export_state_dict
from moebius_jax.models.removal_model import RemovalModel
from moebius_jax.train.muon import muon_param_labels
from moebius_jax.train.optimizer import OptimizerConfig, make_optimizer
from moebius_jax.transplant import transplant

TINY_CONFIG = fixture_path("moebius_tiny", "config.yaml")
TINY_WEIGHTS = fixture_path("moebius_tiny", "diffusion_pytorch_model.bin")
TEACHER_TINY_CONFIG = fixture_path("pixelhacker_tiny", "config.yaml")
BN_EPS = 1e-5


def _raw(path=TINY_CONFIG) -> dict:
    return yaml.safe_load(path.read_text())


def _mini(levels: dict | list, **model_keys) -> dict:
    """The micro student (two levels at an 8x8 latent, one resnet per down block) with these
    levels: the whole generic UNet (embedding, resnets, transformers, samplers, head) in a
    program that compiles in seconds."""
    raw = _raw(MICRO_STUDENT_CONFIG)
    raw["model"].update(levels=levels, **model_keys)
    return raw


def _mini_inputs() -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A batch of two for `_mini` networks: an 8x8 latent, two timesteps, both id rows."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 9))
    return x, jnp.array([10, 900]), jnp.array([list(range(10, 20)), list(range(10))])


def _host_init(abstract: dict, seed: int = 0) -> dict:
    """Variables of the right shapes filled on the host (norms at identity, kernels ~ 1/sqrt(fan_in)):
    compiling Flax's init for a whole UNet costs more than the forward and backward together."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean", "count"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1]) or 1
        return jnp.asarray(rng.standard_normal(leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


# Every choice once, in the transformer wrapper the UNet builds for a level (the defaults cover
# cross_lambda and mix_ffn); the surrounding UNet is the same for all of them.
VARIANTS = [
    *[("self_mixer", name) for name in mixers.mixer_names("self_mixer")],
    *[("cross_mixer", name) for name in mixers.mixer_names("cross_mixer") if name != "cross_lambda"],
    *[("feed_forward", name) for name in mixers.mixer_names("feed_forward") if name != "mix_ffn"],
]
SUBLAYER = {"self_mixer": ("attn1", "norm1"), "cross_mixer": ("attn2", "norm2"), "feed_forward": ("ff", "norm3")}


def _loss_and_grads(apply, variables, *inputs):
    """Train-mode mean-square loss and its parameter gradients, jitted."""

    @jax.jit
    def run(params):
        def loss(p):
            out, _ = apply({**variables, "params": p}, *inputs, train=True, mutable=["batch_stats"])
            sample = getattr(out, "sample", out)
            return jnp.mean(jnp.square(sample)), sample

        return jax.value_and_grad(loss, has_aux=True)(params)

    return run(variables["params"])


@pytest.mark.parametrize("field, name", VARIANTS, ids=[f"{f}={n}" for f, n in VARIANTS])
def test_every_choice_trains_with_finite_gradients(field, name):
    level = LevelConfig(32, **{field: name})
    block = Transformer2D(UNetConfig(levels=(level,)), level, native_side=4)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 32))
    context = jax.random.normal(jax.random.key(2), (2, 10, 16))
    variables = _host_init(jax.eval_shape(block.init, jax.random.key(0), x, context))
    (value, out), grads = _loss_and_grads(block.apply, variables, x, context)
    assert out.shape == x.shape and bool(jnp.isfinite(value))
    flat = traverse_util.flatten_dict(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat.values())

    sublayer, norm = (("transformer_blocks_0", n) for n in SUBLAYER[field])
    if name == "none":  # the sub-layer and its LayerNorm are gone
        assert not any(p[:2] in (sublayer, norm) for p in flat)
    else:  # the chosen module is wired into the loss: some of its parameters get a gradient
        assert any(p[:2] == sublayer and float(jnp.max(jnp.abs(g))) > 0 for p, g in flat.items())


def test_a_mixed_variant_trains_end_to_end():
    """The whole generic UNet with different choices, widths and depths per level."""
    raw = _mini(
        [{"self_mixer": "global_lambda", "cross_mixer": "attention", "feed_forward": "geglu", "ff_mult": 1.5},
         {"channels": 96, "self_mixer": "linear_attention", "cross_mixer": "none", "transformer_depth": 2}],
    )
    model = RemovalModel(load_config(raw).unet)
    x, t, ids = _mini_inputs()
    variables = _host_init(jax.eval_shape(model.init, jax.random.key(0), x, t, ids))
    (value, out), grads = _loss_and_grads(model.apply, variables, x, t, ids)
    assert out.shape == (2, 8, 8, 4) and bool(jnp.isfinite(value))
    flat = traverse_util.flatten_dict(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat.values())
    assert ("diff_model", "up_blocks_0", "attentions_0", "transformer_blocks_1", "attn1", "to_out", "kernel") in flat
    assert flat[("diff_model", "down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "proj_in",
                 "kernel")].shape == (32, 96)  # GEGLU: 2 x int(1.5 * 32)


def test_mixer_options_reach_the_modules():
    raw = _mini({0: {"mixer_options": {"local_lambda": {"kernel_size": 7}}},
                 1: {"self_mixer": "gla", "mixer_options": {"gla": {"expand_k": 1}}}})
    model = RemovalModel(load_config(raw).unet)
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), *_mini_inputs())["params"])
    block = ("diff_model", "down_blocks_{}", "attentions_0", "transformer_blocks_0", "attn1")
    at = lambda level, *leaf: shapes[(*(p.format(level) for p in block), *leaf)].shape  # noqa: E731
    assert at(0, "pos_conv", "kernel") == (7, 7, 1, 4)  # 15 x 15 without the option
    assert at(1, "q_proj", "kernel") == (64, 64)  # expand_k 1: keys as wide as the tokens (0.5: 32)


class _Decay(nn.Module):
    """A toy self mixer: each channel gated by a learned 1-D `decay`, a name no key map knows."""

    init: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, hw, train=False):
        decay = self.param("decay", nn.initializers.constant(self.init), (x.shape[-1],))
        return x * jax.nn.sigmoid(decay).astype(x.dtype)


@pytest.fixture
def registry(monkeypatch):
    """The mixer registry, restored after the test (registrations are process-wide)."""
    monkeypatch.setattr(mixers, "_REGISTRY", dict(mixers._REGISTRY))
    return mixers


def test_a_toy_mixer_added_through_the_registry_trains_with_the_default_muon(registry):
    """One factory and its registration, nothing else: the config accepts the name and its
    option, the level's transformer builds it, and the reference's Muon trains it (its 1-D
    parameter of a name no key map knows goes to AdamW)."""

    @registry.register_mixer("self_mixer", "decay")
    def decay(site, init: float = 0.0):
        return _Decay(init, dtype=site.dtype, name=site.name)

    assert "decay" in registry.mixer_names("self_mixer")
    unet = load_config(_mini({0: {"self_mixer": "decay", "mixer_options": {"decay": {"init": 2.0}}}})).unet
    built = mixers.build_mixer("self_mixer", unet, unet.levels[0], native_side=8)
    assert isinstance(built, _Decay) and (built.init, built.name) == (2.0, "attn1")

    block = Transformer2D(unet, unet.levels[0], native_side=8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 32))
    context = jax.random.normal(jax.random.key(2), (2, 10, 16))
    variables = _host_init(jax.eval_shape(block.init, jax.random.key(0), x, context))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2), variables["params"])  # Muon, the reference's
    labels = traverse_util.flatten_dict(muon_param_labels(variables["params"]))
    assert labels[("transformer_blocks_0", "attn1", "decay")] == "adamw"
    assert labels[("transformer_blocks_0", "attn2", "to_k", "kernel")] == "muon"

    @jax.jit
    def step(params, opt_state, batch_stats):
        def loss(p):
            out, updates = block.apply({"params": p, "batch_stats": batch_stats}, x, context, train=True,
                                       mutable=["batch_stats"])
            return jnp.mean(jnp.square(out)), updates["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats, value

    params, opt_state, stats, losses = variables["params"], tx.init(variables["params"]), variables["batch_stats"], []
    for _ in range(2):
        params, opt_state, stats, value = step(params, opt_state, stats)
        losses.append(float(value))
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    flat, start = traverse_util.flatten_dict(params), traverse_util.flatten_dict(variables["params"])
    assert all(bool(jnp.any(flat[p] != start[p])) for p in flat)  # every parameter, the toy one too, moved
    with pytest.raises(ValueError, match=r"self_mixer 'decay' is taken"):
        registry.register_mixer("self_mixer", "decay")(decay)


def _global_lambda_by_definition(x, params, side, hw):
    """Global λ in eval mode with fresh BatchNorm statistics, by the λ-networks definition:
    an explicit (N, N, d_k) gather of relative embeddings, zero beyond the table's ±(S-1)."""
    b, n, c = x.shape
    heads = 8
    dk = c // heads
    wq, wk, wv = (np.asarray(params[k]["kernel"])[0, 0] for k in ("to_q", "to_k", "to_v"))
    bn = lambda a, p: a / np.sqrt(1 + BN_EPS) * np.asarray(p["scale"]) + np.asarray(p["bias"])  # noqa: E731
    q = bn(x @ wq, params["norm_q"]).reshape(b, n, heads, dk)
    v = bn(x @ wv, params["norm_v"])
    logits = x @ wk
    keys = np.exp(logits - logits.max(1, keepdims=True))
    keys /= keys.sum(1, keepdims=True)
    content = np.einsum("bnk,bnv->bkv", keys, v)
    table = np.asarray(params["rel_pos_emb"])[..., 0]
    ys, xs = np.divmod(np.arange(n), hw[1])
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # [query n, key m]: key minus query
    inside = (np.abs(dy) < side) & (np.abs(dx) < side)
    emb = table[np.clip(dy + side - 1, 0, 2 * side - 2), np.clip(dx + side - 1, 0, 2 * side - 2)]
    emb = emb * inside[..., None]
    position = np.einsum("nmk,bmv->bnkv", emb, v)
    y = np.einsum("bnhk,bkv->bnhv", q, content) + np.einsum("bnhk,bnkv->bnhv", q, position)
    return y.reshape(b, n, c)


@pytest.mark.parametrize("c", [32, 256])
@pytest.mark.parametrize("hw", [(6, 6), (4, 6), (8, 7)], ids=["native", "smaller", "larger"])
def test_global_lambda_matches_its_definition(hw, c):
    side = 6
    heads, dk = 8, c // 8
    # Both forms are checked: relative logits at 256 channels, except on the larger map, whose
    # absolute table would outgrow the lambdas.
    relative = self_lambda.relative_logits_are_cheaper(2, hw, heads, dk, dk, (2 * side - 1) ** 2)
    assert relative == (c == 256 and hw != (8, 7))
    layer = SelfLambda(num_heads=heads, position="global", table_side=side)
    x = jax.random.normal(jax.random.key(0), (2, hw[0] * hw[1], c))
    variables = layer.init(jax.random.key(1), x, hw)
    params = jax.tree.map(np.asarray, variables["params"])
    params["norm_q"] = {"scale": np.linspace(0.5, 2, c), "bias": np.linspace(-1, 1, c)}
    ours = layer.apply({**variables, "params": params}, x, hw)
    ref = _global_lambda_by_definition(np.asarray(x, np.float64), params, side, hw)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert params["rel_pos_emb"].shape == (2 * side - 1, 2 * side - 1, c // 8, 1)


@pytest.mark.parametrize("hw,taps,pad", [((16, 16), (15, 15), (7, 7)), ((5, 9), (15, 15), (7, 7)),
                                          ((6, 4), (3, 5), (1, 2)), ((4, 4), (7, 7), (3, 3))])
def test_position_forms_agree(hw, taps, pad):
    """The lambda form (convolution, then q) and the relative-logits form give the same position
    term, bias included, on square and oblong maps, maps smaller than the kernel and kernels
    of unequal sides."""
    b, heads, dk, dv = 2, 4, 6, 5
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, hw[0] * hw[1], heads, dk))
    v = jax.random.normal(ks[1], (b, *hw, dv))
    kernel = jax.random.normal(ks[2], (*taps, dk))
    bias = jax.random.normal(ks[3], (dk,))
    by_lambdas = self_lambda.position_by_lambdas(q, v, kernel, bias, pad, None)
    by_logits = self_lambda.position_by_relative_logits(q, v, kernel, bias, pad, None)
    assert by_lambdas.shape == by_logits.shape == (b, hw[0] * hw[1], heads, dv)
    scale = float(jnp.max(jnp.abs(by_lambdas)))
    assert float(jnp.max(jnp.abs(by_logits - by_lambdas))) <= 1e-5 * scale


def test_position_form_follows_the_shapes():
    """The student's Local-λ (8 heads, 15 x 15 taps) at 512²: relative logits on the 16 x 16,
    1280-channel level (a fifth of the multiply-adds, no lambdas), lambdas on the larger maps;
    at 1024² the 32 x 32 level's table would outgrow the lambdas, so lambdas there too."""
    def cheaper(batch, side, channels):
        return self_lambda.relative_logits_are_cheaper(batch, (side, side), 8, channels // 8, channels // 8, 225)

    assert cheaper(2, 16, 1280) and cheaper(16, 16, 1280)
    assert not cheaper(2, 32, 640) and not cheaper(2, 64, 320) and not cheaper(2, 32, 1280)
    assert not cheaper(1, 16, 1280)  # one example: the table is larger than its lambdas


def test_linear_attention_equals_its_quadratic_form():
    layer = LinearAttention(num_heads=4)
    x = jax.random.normal(jax.random.key(0), (2, 24, 16))
    variables = layer.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    xd = np.asarray(x, np.float64)
    split = lambda a: a.reshape(2, 24, 4, 4)  # noqa: E731
    q = np.asarray(elu_feature_map(split(xd @ p["to_q"]["kernel"])))
    k = np.asarray(elu_feature_map(split(xd @ p["to_k"]["kernel"])))
    v = split(xd @ p["to_v"]["kernel"])
    scores = np.einsum("bnhd,bmhd->bhnm", q, k)  # the N x N kernel matrix linear attention avoids
    mixed = np.einsum("bhnm,bmhd->bnhd", scores / scores.sum(-1, keepdims=True), v).reshape(2, 24, 16)
    ref = mixed @ p["to_out"]["kernel"] + p["to_out"]["bias"]
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x)), ref, rtol=1e-4, atol=1e-5)


# --- config ------------------------------------------------------------------------------


def test_empty_overrides_read_as_the_reference_file():
    reference = load_config(TINY_CONFIG)
    for levels in ([{}, {}, {}], {}):
        raw = _raw()
        raw["model"]["levels"] = levels
        assert load_config(raw) == reference


def test_overrides_and_reference_switches_build_the_expected_levels():
    raw = _raw()
    raw["model"].update(layers_per_block=3, levels={1: {"self_mixer": "attention", "channels": 96},
                                                    2: {"feed_forward": "geglu", "ff_mult": 3, "transformer_depth": 2}})
    unet = load_config(raw).unet
    assert unet.layers_per_block == 3
    assert [(lv.channels, lv.self_mixer, lv.feed_forward) for lv in unet.levels] == [
        (32, "local_lambda", "mix_ffn"), (96, "attention", "mix_ffn"), (128, "local_lambda", "geglu")
    ]
    assert (unet.levels[2].ff_mult, unet.levels[2].transformer_depth) == (3, 2)

    raw = _raw()
    raw["model"]["use_local_self_attn"] = False  # the reference's own global-lambda switch
    assert {lv.self_mixer for lv in load_config(raw).unet.levels} == {"global_lambda"}

    teacher = _raw(TEACHER_TINY_CONFIG)
    teacher["model"].update(levels={3: {"channels": 256}}, mid_level={"cross_mixer": "none"})
    unet = load_config(teacher).unet
    assert unet.mid_level.channels == 256 and unet.mid_level.cross_mixer == "none"


@pytest.mark.parametrize(
    "teacher, keys, message",
    [
        (False, {"levels": {1: {"self_mixer": "conv"}}}, r"level 1 self_mixer='conv': not one of"),
        (False, {"levels": {0: {"channels": 48}}}, r"level 0 channels=48: not divisible by norm_num_groups 32"),
        (False, {"levels": {2: {"colour": 1}}}, r"level 2 colour: not an override field"),
        (False, {"levels": {0: {"channels": "wide"}}}, r"level 0 channels='wide': expected int"),
        (False, {"levels": {0: {"transformer_depth": 0}}}, r"level 0 transformer_depth=0"),
        (False, {"levels": {0: {"ff_mult": 0.001}}}, r"level 0 ff_mult=0.001"),
        (False, {"levels": [{}, {}]}, r"levels: 2 entries for 3 levels"),
        (False, {"levels": {5: {}}}, r"levels: no level 5"),
        (False, {"mid_level": {"self_mixer": "gla"}}, r"mid_level: this network has no mid block"),
        (False, {"norm_num_groups": 8, "levels": {1: {"channels": 40, "self_mixer": "gla"}}},
         r"level 1 self_mixer='gla': key width channels\*0.5=20 not divisible by num_heads 8"),
        (False, {"levels": {0: {"channels": 96}}, "attention_head_dim": 64},
         r"level 0 self_mixer='local_lambda': channels=96 not divisible by num_heads 64"),
        (False, {"levels": {0: {"mixer_options": {"local_lambda": {"kernel": 7}}}}},
         r"level 0 mixer_options.local_lambda.kernel: not an option of local_lambda \(options: kernel_size\)"),
        (False, {"levels": {0: {"mixer_options": {"local_lambda": {"kernel_size": 7.5}}}}},
         r"level 0 mixer_options.local_lambda.kernel_size=7.5: expected int"),
        (False, {"levels": {0: {"mixer_options": {"local_lambda": {"kernel_size": 4}}}}},
         r"level 0 self_mixer='local_lambda': kernel_size=4: must be odd"),
        (False, {"levels": {0: {"mixer_options": {"gla": {"expand_k": 1.0}}}}},
         r"level 0 mixer_options.gla: this level uses no 'gla' \(it uses local_lambda, cross_lambda, mix_ffn\)"),
        (False, {"layers_per_block": 0}, r"layers_per_block 0"),
        (True, {"levels": {3: {"self_mixer": "attention"}}}, r"level 3 self_mixer: this level has no transformer"),
        (True, {"mid_level": {"channels": 64}}, r"mid_level channels: not an override field"),
    ],
)
def test_impossible_variants_name_the_level_and_field(tmp_path, teacher, keys, message):
    raw = _raw(TEACHER_TINY_CONFIG if teacher else TINY_CONFIG)
    raw["model"].update(keys)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


# --- inspect -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, params", [("configs/moebius.yaml", 226_041_531), ("configs/pixelhacker.yaml", 862_251_708)]
)
def test_inspect_counts_the_reference_models(config, params):
    """The paper's parameter table (student) and the teacher manifest: totals from shapes only."""
    assert count_parameters(config) == params


def test_inspect_cli_prints_the_table(capsys):
    assert inspect_main(["configs/moebius.yaml", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "config: valid" in out
    assert re.search(r"\ndown_blocks\.0\.attentions +5,868,640 ", out)  # the paper's parameter table
    assert re.search(r"\ntotal +226,041,531 ", out)


def test_inspect_cli_rejects_an_invalid_variant(tmp_path, capsys):
    raw = _raw()
    raw["model"]["levels"] = {1: {"channels": 48}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert inspect_main([str(path), "--no-flops"]) == 2
    assert "level 1 channels=48: not divisible by norm_num_groups" in capsys.readouterr().err


def test_inspect_flops_add_up_on_a_variant():
    raw = _mini({1: {"self_mixer": "gla"}})
    ins = inspect_model(raw, resolution=64, images=2, compile_it=False)
    assert ins.latent_hw == (8, 8) and ins.params == count_parameters(raw)
    blocks = {r.name: r.flops for r in ins.rows}
    assert all(blocks[f"{kind}_blocks.{i}.attentions"] > 0 for kind in ("down", "up") for i in (0, 1))
    # The rows cover the whole forward but for element-wise glue between modules.
    assert 0 <= ins.cfg_step.flops - sum(blocks.values()) < 0.01 * ins.cfg_step.flops


def test_loop_bodies_are_counted_per_iteration():
    def repeated(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=8)[0]

    a = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    assert xla_cost(repeated, a, a, compile_it=False).flops == pytest.approx(8 * 2 * 32**3, rel=1e-3)


@pytest.mark.slow
def test_inspect_full_student_step():
    ins = inspect_model("configs/moebius.yaml", resolution=512, images=1)
    assert ins.params == 226_041_531
    assert 5.5e11 < ins.cfg_step.flops < 6.5e11  # XLA's estimate, ~603 GFLOPs for 2 x 64x64
    assert ins.cfg_step.temp_bytes > 0


# --- transplant --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_variables(tiny_student):
    return tiny_student[1]


def _variant(levels: dict) -> dict:
    raw = _raw()
    raw["model"]["levels"] = levels
    return raw


def _flat(variables) -> dict[tuple[str, ...], np.ndarray]:
    return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(dict(variables)).items()}


def test_transplant_into_a_replaced_self_mixer(reference_variables):
    variables, report = transplant(TINY_WEIGHTS, _variant({1: {"self_mixer": "attention"}}), jax.random.key(0))
    ours, source = _flat(variables), _flat(reference_variables)
    # Level 1 is down_blocks.1 (2 transformers) and up_blocks.1 (3): their attn1 was replaced.
    replaced = lambda p: p[2] in ("down_blocks_1", "up_blocks_1") and "attn1" in p  # noqa: E731
    for path, value in ours.items():
        if not replaced(path):
            assert value.dtype == source[path].dtype and np.array_equal(value, source[path]), path
    assert set(report.reinitialised) == {"/".join(p) for p in ours if replaced(p)}
    assert {n for n, _ in report.copied} == {"/".join(p) for p in ours if not replaced(p)}
    assert {n for n, _ in report.unused} == {"/".join(p) for p in source if replaced(p) and p not in ours}
    assert len(report.reinitialised) == 5 * 5  # to_q/to_k/to_v kernels (other shape), to_out kernel/bias (new)
    assert "(1, 1, 64, 64) -> (64, 64)" in str(report)

    # The variant still saves under the reference's names and reads back unchanged.
    state = export_state_dict(variables)
    abstract = jax.eval_shape(lambda: variables)
    back = km.to_flax(state, UNET_KEYMAP, abstract, "export")
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


def test_transplant_local_to_global_lambda_keeps_the_projections(reference_variables):
    """Flax variables as the source; global λ shares Local-λ's names, so only the table is new."""
    variables, report = transplant(reference_variables, _variant({2: {"self_mixer": "global_lambda"}}),
                                   jax.random.key(0))
    assert all(n.endswith("attn1/rel_pos_emb") for n in report.reinitialised) and len(report.reinitialised) == 5
    assert all("attn1/pos_conv/" in n for n, _ in report.unused) and len(report.unused) == 10
    side = 128 // 8 // 4
    assert _flat(variables)[tuple(report.reinitialised[0].split("/"))].shape == (2 * side - 1, 2 * side - 1, 16, 1)


def test_transplant_into_the_same_architecture_copies_everything(reference_variables):
    variables, report = transplant(TINY_WEIGHTS, TINY_CONFIG, jax.random.key(0))
    assert not report.reinitialised and not report.unused
    assert len(report.copied) == len(_flat(reference_variables))
    assert sum(math.prod(s) for _, s in report.copied) == sum(v.size for v in _flat(reference_variables).values())
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables),
                 jax.tree.map(np.asarray, reference_variables))
