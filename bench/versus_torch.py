"""The student CFG step and the VAE decode written in plain PyTorch, timed next to ours.

Only when torch is installed (it is never a dependency): `torch_cases` is empty otherwise.
The networks below are written from the architecture the key names describe (NCHW, the
reference's parameter names, so `load_state_dict(strict=True)` checks the structure) and
load the same random weights as our cases through our exporters. Before timing, each case
runs both implementations once on the same input and records the largest difference
(relative to the output's scale) in its details; the timing itself is the harness's, so
the records read like ours (wall and process CPU time, load average).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import jax
import numpy as np

from bench.harness import Case, Program, _cpu_count, device, progress
from bench.inference import (CFG_TIMESTEP, VAE_CONFIGS, Sizes, _student_forward_fn, _student_inputs, _vae_fn,
                             _vae_input, model_abstract, model_variables, vae_variables)
from moebius_jax.convert import keymap as km
from moebius_jax.convert.vae_keys import VAE_KEYMAP
from moebius_jax.layers.mixers import lookup
from moebius_jax.loading import export_state_dict
from moebius_jax.models.vae import VaeConfig

if importlib.util.find_spec("torch"):
    import torch
    from torch import nn
    from torch.nn import functional as F
else:  # the module still imports; torch_cases() is then empty
    torch = None
    nn = type("nn", (), {"Module": object})


def _conv(cin: int, cout: int, k: int = 1, bias: bool = True, groups: int = 1) -> nn.Module:
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)


class _Holder(nn.Module):
    """A module whose only child is `conv` (the reference nests some convs one level deeper)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv


class DWSep(nn.Module):
    """depthwise 3x3 -> BN + ReLU -> 1x1 -> BN, plus the input when the widths match."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_dw, self.bn1 = _conv(cin, cin, 3, False, groups=cin), nn.BatchNorm2d(cin)
        self.conv_pw, self.bn2 = _conv(cin, cout, 1, False), nn.BatchNorm2d(cout)

    def forward(self, x):
        h = self.bn2(self.conv_pw(F.relu(self.bn1(self.conv_dw(x)))))
        return h + x if h.shape == x.shape else h


class Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, eps: float, dwsep: bool = True, groups: int = 32):
        super().__init__()
        conv = DWSep if dwsep else (lambda i, o: _conv(i, o, 3))
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps), conv(cin, cout)
        self.time_emb_proj = nn.Linear(temb, cout) if temb else None
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps), conv(cout, cout)
        self.conv_shortcut = _conv(cin, cout) if cin != cout else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


def _lambda_output(q, content, position_lambda, position_eq):
    """Q (b, h, k, n) applied to the content lambda (b, k, v) and the position lambdas; (b, n, h*v)."""
    y = torch.einsum("bhkn,bkv->bhvn", q, content) + torch.einsum(position_eq, q, position_lambda)
    b, h, v, n = y.shape
    return y.reshape(b, h * v, n).transpose(1, 2)


class SelfLambda(nn.Module):
    """Local-λ: content lambda over all positions, position lambdas from an r x r conv over V."""

    def __init__(self, c: int, heads: int, r: int):
        super().__init__()
        dk = c // heads
        self.heads = heads
        self.to_q, self.to_k, self.to_v = _conv(c, c, bias=False), _conv(c, dk, bias=False), _conv(c, dk, bias=False)
        self.norm_q, self.norm_v = nn.BatchNorm2d(c), nn.BatchNorm2d(dk)
        self.pos_conv = nn.Conv3d(1, dk, (1, r, r), padding=(0, r // 2, r // 2))

    def forward(self, x, side):
        b, n, c = x.shape
        fmap = x.transpose(1, 2).reshape(b, c, side, side)
        q = self.norm_q(self.to_q(fmap)).reshape(b, self.heads, c // self.heads, n)
        keys = self.to_k(fmap).flatten(2).softmax(-1)
        v = self.norm_v(self.to_v(fmap))
        content = torch.einsum("bkm,bvm->bkv", keys, v.flatten(2))
        position = self.pos_conv(v[:, None]).flatten(3)  # (b, k, v, n)
        return _lambda_output(q, content, position, "bhkn,bkvn->bhvn")


class CrossLambda(nn.Module):
    """Interactive-λ: keys and values from the context tokens, a (n, m, k, 1) position table."""

    def __init__(self, c: int, heads: int, context_dim: int, side: int, tokens: int):
        super().__init__()
        dk = c // heads
        self.heads = heads
        self.rel_pos_emb = nn.Parameter(torch.zeros(side * side, tokens, dk, 1))
        self.to_q = _conv(c, c, bias=False)
        self.to_k, self.to_v = nn.Linear(context_dim, dk, bias=False), nn.Linear(context_dim, dk, bias=False)
        self.norm_q, self.norm_v = nn.BatchNorm2d(c), nn.BatchNorm1d(dk)

    def forward(self, x, context, side):
        b, n, c = x.shape
        q = self.norm_q(self.to_q(x.transpose(1, 2).reshape(b, c, side, side))).reshape(b, self.heads, -1, n)
        keys = self.to_k(context).transpose(1, 2).softmax(-1)
        v = self.norm_v(self.to_v(context).transpose(1, 2))  # (b, v, m)
        content = torch.einsum("bkm,bvm->bkv", keys, v)
        position = torch.einsum("nmk,bvm->bnkv", self.rel_pos_emb[..., 0], v)
        return _lambda_output(q, content, position, "bhkn,bnkv->bhvn")


class MixFFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.inverted_conv = _Holder(_conv(c, 2 * hidden))
        self.depth_conv = _Holder(_conv(2 * hidden, 2 * hidden, 3, groups=2 * hidden))
        self.point_conv = _Holder(_conv(hidden, c, bias=False))

    def forward(self, x, side):
        b, n, c = x.shape
        h = self.depth_conv.conv(F.silu(self.inverted_conv.conv(x.transpose(1, 2).reshape(b, c, side, side))))
        value, gate = h.chunk(2, dim=1)
        return self.point_conv.conv(value * F.silu(gate)).flatten(2).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, cfg, c: int, side: int, kernel_size: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn1 = SelfLambda(c, cfg.num_heads, kernel_size)
        self.attn2 = CrossLambda(c, cfg.num_heads, cfg.cross_attention_dim, side, cfg.context_length)
        self.ff = MixFFN(c, int(c * cfg.mix_mlp_ratio))

    def forward(self, t, context, side):
        t = t + self.attn1(self.norm1(t), side)
        t = t + self.attn2(self.norm2(t), context, side)
        return t + self.ff(self.norm3(t), side)


class Transformer(nn.Module):
    def __init__(self, cfg, c: int, side: int, kernel_size: int):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, c, cfg.transformer_norm_eps)
        self.proj_in, self.proj_out = _conv(c, c), _conv(c, c)
        self.transformer_blocks = nn.ModuleList([Block(cfg, c, side, kernel_size)])

    def forward(self, x, context):
        b, c, side, _ = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        t = self.transformer_blocks[0](t, context, side)
        return self.proj_out(t.transpose(1, 2).reshape(b, c, side, side)) + x


class Level(nn.Module):
    """A down or up block: (resnet -> transformer) pairs, then the resampler if any."""

    def __init__(self, cfg, index: int, ins: list[int], resample: str | None):
        super().__init__()
        c, side = cfg.levels[index].channels, cfg.native_side(index)
        kernel_size = lookup("self_mixer", "local_lambda").options(cfg.levels[index])["kernel_size"]
        self.resnets = nn.ModuleList([Resnet(i, c, cfg.time_embed_dim, cfg.norm_eps) for i in ins])
        self.attentions = nn.ModuleList([Transformer(cfg, c, side, kernel_size) for _ in ins])
        if resample == "down":
            self.downsamplers = nn.ModuleList([_Holder(nn.Conv2d(c, c, 3, stride=2, padding=1))])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([_Holder(_conv(c, c, 3))])
        self.resample = resample

    def forward(self, h, temb, context, skips=None):
        outputs = []
        for resnet, attention in zip(self.resnets, self.attentions):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = attention(resnet(h, temb), context)
            outputs.append(h)
        if self.resample == "down":
            h = self.downsamplers[0].conv(h)
            outputs.append(h)
        elif self.resample == "up":
            h = self.upsamplers[0].conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h, outputs


class StudentUNet(nn.Module):
    """The student's UNet (`diff_model`): depthwise-separable resnets and λ transformers, no mid block."""

    def __init__(self, cfg):
        super().__init__()
        widths = [level.channels for level in cfg.levels]
        c0, n = widths[0], len(widths)
        self.cfg = cfg
        self.conv_in = DWSep(cfg.in_channels, c0)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(c0, cfg.time_embed_dim)
        self.time_embedding.linear_2 = nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
        self.encoder_hid_proj = nn.Linear(cfg.encoder_hid_dim, cfg.cross_attention_dim)
        per = cfg.layers_per_block
        skips, down = [c0], []
        for i, c in enumerate(widths):
            ins = [widths[max(i - 1, 0)]] + [c] * (per - 1)
            down.append(Level(cfg, i, ins, "down" if i < n - 1 else None))
            skips += [c] * (per + (i < n - 1))
        self.down_blocks = nn.ModuleList(down)
        up, h = [], widths[-1]
        for i, level in enumerate(reversed(range(n))):
            c = widths[level]
            ins = [(h if j == 0 else c) + skips.pop() for j in range(per + 1)]
            up.append(Level(cfg, level, ins, "up" if level > 0 else None))
            h = c
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, cfg.norm_eps)
        self.conv_out = DWSep(c0, cfg.out_channels)

    def forward(self, sample, timesteps, embeddings):
        half = self.cfg.levels[0].channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = timesteps.float()[:, None] * freqs[None]
        sinusoid = torch.cat([angles.cos(), angles.sin()], dim=-1)  # cosines first
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(sinusoid)))
        context = self.encoder_hid_proj(embeddings)
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, temb, context)
            skips += outputs
        for block in self.up_blocks:
            h, _ = block(h, temb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Student(nn.Module):
    """The input-id front: an embedding table feeding `diff_model`."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding_layer = nn.Embedding(cfg.num_embeddings, cfg.encoder_hid_dim)
        self.diff_model = StudentUNet(cfg)

    def forward(self, sample, timesteps, input_ids):
        return self.diff_model(sample, timesteps, self.embedding_layer(input_ids))


class VaeAttention(nn.Module):
    """Single-head self-attention over the map's positions (GroupNorm first, residual after)."""

    def __init__(self, c: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)
        y = F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return self.to_out[0](y).transpose(1, 2).reshape(b, c, h, w) + x


class VaeDecoder(nn.Module):
    """post_quant_conv + the decoder of a diffusers AutoencoderKL (keys `post_quant_conv.*`, `decoder.*`)."""

    def __init__(self, cfg: VaeConfig, eps: float = 1e-6):
        super().__init__()
        widths, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.post_quant_conv = _conv(cfg.latent_channels, cfg.latent_channels) if cfg.use_post_quant_conv else None
        self.decoder = nn.Module()
        self.decoder.conv_in = _conv(cfg.latent_channels, widths[0], 3)
        self.decoder.mid_block = nn.Module()
        mid = [Resnet(widths[0], widths[0], 0, eps, dwsep=False, groups=g) for _ in range(2)]
        self.decoder.mid_block.resnets = nn.ModuleList(mid)
        attn = [VaeAttention(widths[0], g, eps)] if cfg.mid_block_add_attention else []
        self.decoder.mid_block.attentions = nn.ModuleList(attn)
        blocks, prev = [], widths[0]
        for i, c in enumerate(widths):
            block = nn.Module()
            ins = [prev] + [c] * cfg.layers_per_block
            block.resnets = nn.ModuleList([Resnet(cin, c, 0, eps, dwsep=False, groups=g) for cin in ins])
            if i < len(widths) - 1:
                block.upsamplers = nn.ModuleList([_Holder(_conv(c, c, 3))])
            blocks.append(block)
            prev = c
        self.decoder.up_blocks = nn.ModuleList(blocks)
        self.decoder.conv_norm_out = nn.GroupNorm(g, widths[-1], eps)
        self.decoder.conv_out = _conv(widths[-1], cfg.out_channels, 3)

    def forward(self, z):
        d = self.decoder
        h = d.conv_in(z if self.post_quant_conv is None else self.post_quant_conv(z))
        h = d.mid_block.resnets[0](h)
        for attention in d.mid_block.attentions:
            h = attention(h)
        h = d.mid_block.resnets[1](h)
        for block in d.up_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0].conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return d.conv_out(F.silu(d.conv_norm_out(h)))


def _load(module: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return module.eval()


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _relative_difference(ours: Any, theirs: torch.Tensor) -> float:
    ours = np.moveaxis(np.asarray(ours, np.float64), -1, 1)
    return float(np.abs(ours - theirs.double().numpy()).max() / np.abs(ours).max())


def _torch_program(module: nn.Module, inputs: tuple[torch.Tensor, ...], jax_output: Any,
                   details: dict[str, Any]) -> Program:
    """A Program whose "compiled" form calls the torch module (no XLA: no FLOPs, no memory plan)."""

    class Compiled:
        def __call__(self) -> None:
            with torch.inference_mode():
                module(*inputs)

        def cost_analysis(self) -> dict[str, Any]:
            return {}

        def memory_analysis(self) -> None:
            return None

    torch.set_num_threads(_cpu_count())  # torch's default is the physical cores; use what XLA gets
    with torch.inference_mode():
        # The case's details dict is read after build(): record the threads and the check there.
        details["torch_threads"] = torch.get_num_threads()
        details["max_rel_diff_vs_jax"] = _relative_difference(jax_output, module(*inputs))
    progress(f"  torch vs ours: max |difference| / max |ours| = {details['max_rel_diff_vs_jax']:.2e}")
    class Stages:  # what the harness calls: trace(...).lower().compile()
        def lower(self) -> Stages:
            return self

        def compile(self) -> Compiled:
            return Compiled()

    return Program(lambda: Stages(), (), lambda: ())


def torch_student(config: str, latent: int, details: dict[str, Any]) -> Program:
    """Our float32 CFG step's arithmetic in torch, on our random weights and inputs."""
    cfg = model_abstract(config)[0].unet
    variables = model_variables(config)
    inputs = _student_inputs(config, latent, 2)
    ours = jax.jit(_student_forward_fn(config, "float32"))(variables, *inputs)
    timesteps = np.broadcast_to(inputs[1], (2,)).astype(np.int64)
    module = _load(Student(cfg), export_state_dict(variables))
    return _torch_program(module, (_nchw(inputs[0]), torch.from_numpy(timesteps),
                                   torch.from_numpy(inputs[2].astype(np.int64))), ours, details)


def torch_vae_decode(config: str, side: int, details: dict[str, Any]) -> Program:
    variables = vae_variables(config)
    latents = _vae_input(config, "decode", side)
    ours = jax.jit(_vae_fn(config, "decode", "float32"))(variables, latents)
    state = {k: v for k, v in km.to_torch(dict(variables), VAE_KEYMAP).items()
             if k.startswith(("decoder.", "post_quant_conv."))}
    return _torch_program(_load(VaeDecoder(VAE_CONFIGS[config]), state), (_nchw(latents),), ours, details)


def torch_cases(sizes: Sizes) -> list[Case]:
    """The student CFG step and the VAE decode of `sizes` in torch (float32, one thread per core);
    [] without torch, or when JAX's device is not the CPU the torch code runs on."""
    if torch is None or device().platform != "cpu":
        return []
    base = {"framework": "torch", "torch_version": torch.__version__}
    latent = sizes.side // VAE_CONFIGS[sizes.vae].downsample_factor
    student_details = {**base, "timestep": CFG_TIMESTEP, "cfg_pair": True}
    vae_details = {**base, "image_side": sizes.side}
    return [
        Case("student_forward", "torch", sizes.student, "float32", (2, latent, latent, 9), 2, "samples/s",
             functools.partial(torch_student, sizes.student, latent, student_details), student_details,
             budget_s=sizes.budget_s),
        Case("vae_decode", f"torch_{sizes.side}", sizes.vae, "float32", (1, latent, latent, 4), 1, "images/s",
             functools.partial(torch_vae_decode, sizes.vae, sizes.side, vae_details), vae_details,
             budget_s=sizes.budget_s),
    ]
