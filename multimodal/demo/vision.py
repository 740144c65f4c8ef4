"""The demo's vision tower: contrastive pre-training with open_clip's own CLIP model and loss, with a
near miss beside each scene in its batch, saved as a local weights file."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from multimodal.demo import synthetic
from multimodal.demo.config import DEMO_ENCODER
from multimodal.training import warmup_cosine


def pretrain_vision_tower(tokenizer, image_seeds: list[int], steps: int, path: Path, seed: int) -> Path:
    """Contrastive pre-training of the tiny vision tower with open_clip's own CLIP model and loss,
    on the training scenes `image_seeds` (those of the training shards) and their captions (a random
    language each time). The weights go to a local file that OpenCLIPEncoder loads as `pretrained`,
    as a real open_clip checkpoint would.

    The images are rendered again rather than read back from the shards: the pixels are the same
    (PNG is lossless), and rendering 8,000 scenes takes a sixth of the time of reading the 72,000
    members of the shards."""
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from encoders import encoder_transform

    torch.manual_seed(seed)
    # Captions are short (under 20 pieces); a short context keeps the text tower cheap.
    text_cfg = {"context_length": 24, "vocab_size": tokenizer.vocab_size, "width": 128, "heads": 4, "layers": 2,
                "pool_type": "eos", "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    model_cfg = DEMO_ENCODER["model_name"]
    clip = CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], text_cfg)
    transform = encoder_transform(_meta_encoder())
    rng = random.Random(seed)
    scenes = [synthetic.scene(s) for s in image_seeds]
    scene_pixels = torch.stack([transform(synthetic.render(s)) for s in scenes])
    # Each training scene is paired with one near miss (a caption one detail away) whose content is
    # also a training one, and the two always share a batch and a language: hard negatives.
    partners = []
    for base in scenes:
        partner = next((m for m in (synthetic.near_miss(base, rng) for _ in range(4))
                        if synthetic.split_of(m) == "train"), base)
        partners.append(partner)
    everything = scenes + partners
    pixels = torch.cat([scene_pixels, torch.stack([transform(synthetic.render(s)) for s in partners])])
    length = text_cfg["context_length"]

    def token_row(text: str) -> list[int]:
        ids = tokenizer.encode(text)[: length - 1] + [tokenizer.eos_id]
        return ids + [tokenizer.pad_id] * (length - len(ids))

    texts = {language: torch.tensor([token_row(synthetic.describe(s, language)) for s in everything])
             for language in synthetic.LANGUAGES}
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=2e-3, weight_decay=0.05, fused=True)
    # Warmup and cosine decay, as CLIP trains: the loss ends lower and steadier than at a fixed rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, max(1, steps // 20), steps, min_ratio=0.05))
    started = time.perf_counter()
    pairs_per_batch = min(64, len(scenes))
    for step in range(steps):
        bases = rng.sample(range(len(scenes)), k=pairs_per_batch)
        index = torch.tensor(bases + [len(scenes) + i for i in bases])
        languages = [rng.choice(synthetic.LANGUAGES) for _ in bases] * 2
        text_ids = torch.stack([texts[language][i] for language, i in zip(languages, index.tolist())])
        image_features, text_features, scale = clip(pixels[index], text_ids)
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"  vision step {step + 1}/{steps}: contrastive loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def _meta_encoder():
    """The demo encoder's shape and preprocessing settings, without allocating weights."""
    from encoders import OpenCLIPEncoder

    with torch.device("meta"):
        return OpenCLIPEncoder(**DEMO_ENCODER)
