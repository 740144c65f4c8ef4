"""A tiny model in LLaVA-OneVision's layout, for tests: a SigLIP-style timm tower at OneVision's
geometry (384 px, patch 14: 27x27 tokens a view) but 32 wide and 2 blocks deep, tanh GELU as in
OneVision, the MLP projector, a tiny Salamandra-architecture decoder with a long enough context,
anyres_max_9 over the 36 pinpoints, a video token. Importing this module registers the tower."""

import timm
import torch
from timm.models import register_model

import projector
from encoders import OpenCLIPEncoder
from lm import Decoder, LMConfig
from multimodal import VisionLanguageModel
from multimodal.layouts import ImageLayout, onevision_pinpoints
from tests.encoders.tiny_towers import CONFIGS


def _tiny_siglip384(depth: int, kwargs: dict):
    """timm's vit_base_patch16_siglip_224 at OneVision's 384 px / patch 14, width 32, `depth` blocks."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=384, patch_size=14,
                             embed_dim=32, depth=depth, num_heads=2, **kwargs)


@register_model
def vit_salamandra_test_tiny_siglip384(pretrained: bool = False, **kwargs):
    return _tiny_siglip384(2, kwargs)


@register_model
def vit_salamandra_test_tiny_siglip384_27(pretrained: bool = False, **kwargs):
    """SigLIP-So400m's 27 blocks (OneVision keeps 26), for the released model's layout."""
    return _tiny_siglip384(27, kwargs)


TINY_SIGLIP_384 = {
    **CONFIGS["salamandra-test-tiny-siglip"],
    "vision_cfg": {**CONFIGS["salamandra-test-tiny-siglip"]["vision_cfg"], "image_size": 384,
                   "timm_model_name": "vit_salamandra_test_tiny_siglip384"},
}


def build_tiny_onevision_vlm(tokenizer, max_tiles: int = 9) -> VisionLanguageModel:
    torch.manual_seed(0)
    encoder = OpenCLIPEncoder(TINY_SIGLIP_384, feature_layer=-1, activation="gelu_tanh",
                              preprocess_cfg={"mean": 0.5, "std": 0.5, "resize_mode": "squash"})
    decoder = Decoder(LMConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, attention="sdpa",
                                         max_seq_len=16384))
    proj = projector.build("mlp", encoder.hidden_size, decoder.config.d_model, depth=2)
    layout = ImageLayout.anyres(f"anyres_max_{max_tiles}", onevision_pinpoints(384))
    return VisionLanguageModel(encoder, proj, decoder, tokenizer, image_token_id=tokenizer.reserved_token_id(1),
                               layout=layout, video_token_id=tokenizer.reserved_token_id(2))

