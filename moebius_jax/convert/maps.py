"""The key-map tables: one per model family, read top to bottom (first matching rule wins)."""

from __future__ import annotations

from moebius_jax.convert.keymap import CONV2D, CONV3D_DEPTH1, IDENTITY, LINEAR, KeyMap, LeafRule

# Parameter kinds shared by every torch model here, in Flax naming.
BATCH_NORM_STAT_RULES = (
    LeafRule(r"\.num_batches_tracked$", 0, "batch_stats", "count", IDENTITY, "num_batches_tracked"),
    LeafRule(r"\.running_mean$", 1, "batch_stats", "mean", IDENTITY, "running_mean"),
    LeafRule(r"\.running_var$", 1, "batch_stats", "var", IDENTITY, "running_var"),
)
GENERIC_RULES = (
    LeafRule(r"\.weight$", 4, "params", "kernel", CONV2D, "weight"),  # conv, depthwise, 1x1
    LeafRule(r"\.weight$", 2, "params", "kernel", LINEAR, "weight"),  # nn.Linear
    LeafRule(r"\.weight$", 1, "params", "scale", IDENTITY, "weight"),  # Batch/Group/Layer/RMS norm
    LeafRule(r"\.bias$", 1, "params", "bias", IDENTITY, "bias"),
)

# Moebius student and PixelHacker teacher (both wrapped in RemovalModel).
UNET_KEYMAP = KeyMap(
    rules=(
        *BATCH_NORM_STAT_RULES,
        LeafRule(r"^embedding_layer\.weight$", 2, "params", "embedding", IDENTITY, "weight"),
        LeafRule(r"\.rel_pos_emb$", 4, "params", "rel_pos_emb", IDENTITY, "rel_pos_emb"),
        LeafRule(r"\.pos_conv\.weight$", 5, "params", "kernel", CONV3D_DEPTH1, "weight"),
        *GENERIC_RULES,
    ),
    containers=frozenset(
        {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
         "downsamplers", "upsamplers", "gk_proj"}
    ),
    renames=(
        # Mix-FFN convs sit in one-conv wrappers in the reference; ours are the convs.
        ("inverted_conv.conv", "inverted_conv"),
        ("depth_conv.conv", "depth_conv"),
        ("point_conv.conv", "point_conv"),
        # diffusers' Sequential containers, named for what they are.
        ("ff.net.0.proj", "ff.proj_in"),
        ("ff.net.2", "ff.proj_out"),
        ("to_out.0", "to_out"),
    ),
)
