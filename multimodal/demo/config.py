"""The demo's settings: its tiny vision tower, its projector and its step counts (`DemoConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The tiny vision tower: 32 px images, patch 8 -> a 4 x 4 grid of 16 image tokens.
DEMO_ENCODER = {
    "model_name": {
        "embed_dim": 128,
        # "avg" pooling: the contrastive pre-training then supervises every patch token of the last
        # layer, which is what the VLM reads (feature_layer=-1).
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8,
                       "pool_type": "avg"},
    },
    "feature_layer": -1,
    "drop_cls": True,
    "preprocess_cfg": {"mean": 0.5, "std": 0.5, "resize_mode": "squash", "interpolation": "bicubic"},
}


# LLaVA's two-layer MLP, plus a learned embedding per image-token slot. The tiny tower's last-layer
# tokens say what they show but hardly where they are (a linear probe finds a token's own grid cell
# 92% of the time before the projector, 21% after it), and the decoder cannot tell the cells apart
# by RoPE distance either, since prompts of different lengths sit between image and answer. Without
# the slot embedding nearly every remaining error was a position or a pairing; with it exact match
# went from 0.62 to 0.89 in the same steps. Outputs here have a std near 4, hence position_std=1.
DEMO_PROJECTOR = {"kind": "mlp", "depth": 2, "positions": 16, "position_std": 1.0}


@dataclass
class DemoConfig:
    train_images: int = 8000
    test_images: int = 300
    pretrain_texts: int = 12000
    vocab_size: int = 768
    decoder: dict = field(default_factory=lambda: {
        "n_layers": 4, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "d_ff": 384, "max_seq_len": 256})
    max_tokens: int = 256
    rows_per_batch: int = 8
    steps: dict = field(default_factory=lambda: {"vision": 300, "pretrain": 80, "stage1": 40, "stage2": 460})
    lr: dict = field(default_factory=lambda: {"pretrain": 3e-3, "stage1": 3e-3, "stage2": 2e-3})
    num_workers: int = 1
    # The decoder's pre-training in a second process while the vision tower trains (runner.py).
    pretrain_alongside: bool = True
    sample_rows: int = 6  # rows of the printed table, per language


QUICK = DemoConfig(train_images=300, test_images=24, pretrain_texts=600, vocab_size=512,
                   decoder={"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 160, "max_seq_len": 256},
                   steps={"vision": 5, "pretrain": 10, "stage1": 5, "stage2": 10}, num_workers=0, sample_rows=2,
                   pretrain_alongside=False)  # a second interpreter's start-up would outlast these steps
