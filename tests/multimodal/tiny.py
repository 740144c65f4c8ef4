"""A tiny VisionLanguageModel for tests: tiny CLIP tower, MLP projector, tiny decoder, small BPE tokenizer."""

import torch

import projector
from encoders import OpenCLIPEncoder
from lm import Decoder, LMConfig
from multimodal import VisionLanguageModel
from tests.encoders.tiny_towers import CONFIGS

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}

TEXTS = [
    "A red circle on a blue background.",
    "Un círculo rojo sobre un fondo azul.",
    "Un cercle vermell sobre un fons blau.",
    "Describe the image in English, please.",
    "Describe la imagen en español.",
    "Descriu la imatge en català, si us plau.",
] * 20


def build_tiny_vlm(tokenizer, projector_kind: str = "mlp", tower: str = "clip", **projector_options) -> VisionLanguageModel:
    torch.manual_seed(0)
    if tower == "clip":
        encoder = OpenCLIPEncoder(TINY_CLIP, feature_layer=-2, drop_cls=True)
    else:  # SigLIP-style timm tower, last-layer features, all tokens (as Salamandra vision)
        encoder = OpenCLIPEncoder(CONFIGS["salamandra-test-tiny-siglip"], feature_layer=-1,
                                  preprocess_cfg={"mean": 0.5, "std": 0.5, "resize_mode": "squash"})
    decoder = Decoder(LMConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, attention="sdpa"))
    proj = projector.build(projector_kind, encoder.hidden_size, decoder.config.d_model, **projector_options)
    return VisionLanguageModel(encoder, proj, decoder, tokenizer, image_token_id=tokenizer.reserved_token_id(1))
