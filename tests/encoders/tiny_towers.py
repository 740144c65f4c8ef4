"""Tiny vision towers shaped like open_clip's CLIP and SigLIP configs, for tests (no download).

Importing this module registers the tiny timm models with timm.
"""

import timm
from timm.models import register_model

TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


@register_model
def vit_salamandra_test_tiny_siglip(pretrained: bool = False, **kwargs):
    """open_clip's SigLIP tower (timm's vit_base_patch16_siglip_224) at 32 px, width 64, 4 blocks."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=4,
        num_heads=2, **kwargs,
    )


@register_model
def vit_salamandra_test_tiny_prefix(pretrained: bool = False, **kwargs):
    """A timm ViT with 1 class + 2 register tokens outside the position table, and a pre-norm (as
    timm's CLIP ViTs have)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, img_size=24, patch_size=8, embed_dim=48, depth=3,
        num_heads=3, class_token=True, reg_tokens=2, no_embed_class=True, pre_norm=True, **kwargs,
    )


CONFIGS = {
    "salamandra-test-tiny-clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": TINY_TEXT,
    },
    "salamandra-test-tiny-siglip": {
        "embed_dim": 64,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32, "timm_model_name": "vit_salamandra_test_tiny_siglip",
            "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none",
        },
        "text_cfg": {**TINY_TEXT, "width": 64, "no_causal_mask": True, "proj_bias": True, "pool_type": "last"},
    },
    "salamandra-test-tiny-prefix": {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 24, "timm_model_name": "vit_salamandra_test_tiny_prefix",
            "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear",
        },
        "text_cfg": TINY_TEXT,
    },
}
