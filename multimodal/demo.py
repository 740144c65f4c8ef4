"""The offline demo: the whole Salamandra-vision recipe in miniature, on a laptop CPU, no download.

1. Data: synthetic scenes of shapes with captions in English, Spanish and Catalan, written as
   WebDataset shards (multimodal/data/synthetic.py), plus a text-only shard of captions.
2. A small BPE tokenizer with Salamandra's special tokens at Salamandra's ids.
3. The vision tower: contrastive pre-training with open_clip's own CLIP model and loss, each scene
   beside a near miss in its batch (hard negatives), saved as a local weights file (the stand-in
   for a downloaded CLIP/SigLIP checkpoint). Through the caption loss alone a tower from scratch
   learns far too slowly for a five-minute budget.
4. Stage 0: pre-train a small Salamandra-architecture decoder from scratch on text-only chats
   (a caption asked for in a language, answered in it), the stand-in for an instruct model.
5. Stage 1: train the projector alone, encoder and decoder frozen (alignment).
6. Stage 2: train encoder (at a fifth of the learning rate), projector and decoder together.
7. Caption held-out images in all three languages; print samples and metrics; write
   metrics.json, checkpoint/ (save_pretrained format) and captions.png.

Stages 0-2 run through the same LightningModule and data path as `salamandra-vl fit`.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
from PIL import Image, ImageDraw, ImageFont
from webdataset import TarWriter

from lm.tokenizer import train_tokenizer
from multimodal.conversation import IMAGE_MARKER, caption_messages
from multimodal.data import DataConfig
from multimodal.data import synthetic
from multimodal.model import VisionLanguageModel
from multimodal.prompts import CAPTION_PROMPTS
from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule, warmup_cosine

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
    sample_rows: int = 6  # rows of the printed table, per language


QUICK = DemoConfig(train_images=300, test_images=24, pretrain_texts=600, vocab_size=512,
                   decoder={"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 160, "max_seq_len": 256},
                   steps={"vision": 5, "pretrain": 10, "stage1": 5, "stage2": 10}, num_workers=0, sample_rows=2)


def pretraining_chats(num: int, seed: int, described: float = 1.0) -> list[list[dict[str, str]]]:
    """`num` text-only chats for pre-training the decoder, from training scenes only: the user asks
    for a description in one language, the assistant answers with the caption in that language.
    In a share `described` of them the user turn first gives the scene's caption in a random
    language, where the image goes in a caption sample: the decoder learns the chat template, to
    answer in the asked language, and to re-express content found in the user turn. Stage 1 then
    only has to make the projected image read like such a description (a real Salamandra instruct
    model brings all three from its own training)."""
    rng = random.Random(f"chats:{seed}")
    chats = []
    for image_seed in synthetic.split_seeds("train", num, seed):
        drawn = synthetic.scene(image_seed)
        language = rng.choice(synthetic.LANGUAGES)
        messages = caption_messages(synthetic.describe(drawn, language), language, rng)
        context = synthetic.describe(drawn, rng.choice(synthetic.LANGUAGES)) if rng.random() < described else ""
        messages[0]["content"] = messages[0]["content"].replace(IMAGE_MARKER, context).lstrip("\n")
        chats.append(messages)
    return chats


def write_chat_shard(path: Path, chats: list[list[dict[str, str]]]) -> str:
    with TarWriter(str(path), encoder=False) as sink:
        for index, messages in enumerate(chats):
            sink.write({"__key__": f"chat-{index:08d}",
                        "json": json.dumps({"messages": messages}, ensure_ascii=False).encode()})
    return str(path)


def tokenizer_corpus(texts: list[str]) -> list[str]:
    """Captions, prompts and the ChatML role names, so every piece of a demo conversation has
    learned pieces (and never falls back to bytes)."""
    rng = random.Random(0)
    chats = []
    for text in texts[:2000]:
        language = synthetic.detect_language(text) or "en"
        chats += [m["content"] for m in caption_messages(text, language, rng)]
    prompts = [p for pool in CAPTION_PROMPTS.values() for p in pool] * 20
    return texts + chats + prompts + ["user\nassistant\nsystem\n"] * 50


def read_training_scenes(shards: list[str], transform) -> tuple[list[synthetic.Scene], torch.Tensor]:
    """The scenes of the demo's training shards and their images through `transform`, one per image
    (the shards hold each image once per language)."""
    import webdataset as wds

    scenes, pixels, seen = [], [], set()
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        if meta["seed"] in seen:
            continue
        seen.add(meta["seed"])
        scenes.append(synthetic.Scene.from_dict(meta["scene"]))
        pixels.append(transform(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
    return scenes, torch.stack(pixels)


def pretrain_vision_tower(tokenizer, shards: list[str], steps: int, path: Path, seed: int) -> Path:
    """Contrastive pre-training of the tiny vision tower with open_clip's own CLIP model and loss,
    on the training shards' images and their captions (a random language each time). The weights go
    to a local file that OpenCLIPEncoder loads as `pretrained`, as a real open_clip checkpoint would."""
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
    scenes, scene_pixels = read_training_scenes(shards, transform)
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


def run_stage(name: str, spec: ModelSpec, stage: StageConfig, shards: list[str], steps: int, config: DemoConfig,
              export_dir: Path, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    started = time.perf_counter()
    module = VLMModule(spec, stage, export_dir=str(export_dir))
    data = ShardDataModule(
        DataConfig(shards, max_tokens=config.max_tokens, rows_per_batch=config.rows_per_batch,
                   shuffle_buffer=2000, seed=seed),
        num_workers=config.num_workers,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=steps, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
        enable_progress_bar=True,
    )
    print(f"\n== {name}: {steps} steps, training {', '.join(stage.train)}")
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    print(f"== {name}: done in {seconds:.0f} s")
    return seconds


def token_f1(prediction: str, reference: str) -> float:
    """Overlap of the two bags of words (F1), so a caption with one wrong colour still scores."""
    pred, ref = Counter(prediction.lower().split()), Counter(reference.lower().split())
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def evaluate(model: VisionLanguageModel, seeds: list[int]) -> tuple[dict, list[dict]]:
    images = [synthetic.render(synthetic.scene(s)) for s in seeds]
    rows, per_language = [], {}
    for language in synthetic.LANGUAGES:
        predictions = model.caption(images, language=language, batch_size=64, max_new_tokens=48)
        references = [synthetic.describe(synthetic.scene(s), language) for s in seeds]
        results = [
            {"seed": s, "language": language, "reference": r, "prediction": p, "exact": p.strip() == r,
             "f1": token_f1(p, r), "in_language": synthetic.detect_language(p) == language}
            for s, r, p in zip(seeds, references, predictions)
        ]
        rows += results
        per_language[language] = {
            "exact_match": sum(r["exact"] for r in results) / len(results),
            "token_f1": sum(r["f1"] for r in results) / len(results),
            "language_fidelity": sum(r["in_language"] for r in results) / len(results),
        }
    metrics = {
        key: sum(r[field] for r in rows) / len(rows)
        for key, field in (("exact_match", "exact"), ("token_f1", "f1"), ("language_fidelity", "in_language"))
    }
    metrics["per_language"] = per_language
    metrics["test_images"] = len(seeds)
    metrics["test_captions"] = len(rows)
    return metrics, rows


def draw_captions(rows: list[dict], path: Path, count: int = 8) -> None:
    """Test images beside their predicted captions in the three languages."""
    by_seed: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {})[row["language"]] = row
    seeds = list(by_seed)[:count]
    tile, text_width, line = 96, 560, 18
    height = tile + 8
    canvas = Image.new("RGB", (tile + text_width + 16, height * len(seeds) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    try:  # Pillow's built-in font lacks accented letters (í, ñ, ç); DejaVu has them where installed
        font = ImageFont.truetype("DejaVuSans.ttf", 13)
    except OSError:
        font = ImageFont.load_default(size=13)
    for i, seed in enumerate(seeds):
        top = 8 + i * height
        canvas.paste(synthetic.render(synthetic.scene(seed)).resize((tile, tile), Image.NEAREST), (8, top))
        for j, language in enumerate(synthetic.LANGUAGES):
            row = by_seed[seed][language]
            mark = "ok" if row["exact"] else "x "
            colour = (0, 110, 0) if row["exact"] else (170, 0, 0)
            draw.text((tile + 16, top + 6 + j * line * 1.6), f"{language} {mark} {row['prediction']}", fill=colour,
                      font=font)
    canvas.save(path)


def print_table(rows: list[dict], per_language: int) -> None:
    print(f"\n{'lang':<5}{'reference':<58}prediction")
    for language in synthetic.LANGUAGES:
        shown = [r for r in rows if r["language"] == language][:per_language]
        for r in shown:
            flag = "" if r["exact"] else "   <- differs"
            print(f"{language:<5}{r['reference']:<58}{r['prediction']}{flag}")


def run_demo(out: str | os.PathLike = "runs/demo", seed: int = 0, config: DemoConfig | None = None) -> dict:
    config = config or DemoConfig()
    out = Path(out)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    data_dir = out / "data"
    train_shards = synthetic.write_shards(data_dir, "train", config.train_images, samples_per_shard=4000, seed=seed)
    texts = synthetic.texts_for_pretraining(config.pretrain_texts, seed=seed)
    text_shards = [write_chat_shard(data_dir / "chats-000000.tar", pretraining_chats(config.pretrain_texts, seed, described=0.5))]
    tokenizer = train_tokenizer(tokenizer_corpus(texts), vocab_size=config.vocab_size)
    tokenizer.save(out / "tokenizer")
    seconds["data"] = time.perf_counter() - started
    print(f"data: {config.train_images} training images x 3 languages, {len(texts)} texts, "
          f"tokenizer of {tokenizer.vocab_size} pieces ({seconds['data']:.0f} s)")

    started = time.perf_counter()
    print(f"\n== vision: contrastive pre-training of the vision tower, {config.steps['vision']} steps")
    vision_weights = pretrain_vision_tower(tokenizer, train_shards, config.steps["vision"],
                                           out / "vision-tower.safetensors", seed)
    seconds["vision"] = time.perf_counter() - started

    spec = ModelSpec(tokenizer=str(out / "tokenizer"), decoder="demo",
                     decoder_options={**config.decoder, "attention": "sdpa"},
                     encoder={**DEMO_ENCODER, "pretrained": str(vision_weights)}, projector=DEMO_PROJECTOR)
    all_modules = ["encoder", "projector", "decoder"]
    stages = [
        ("pretrain", spec, StageConfig(train=["decoder"], lr={"decoder": config.lr["pretrain"]},
                                       warmup_steps=10, weight_decay=0.01), text_shards),
        ("stage1", None, StageConfig(train=["projector"], lr={"projector": config.lr["stage1"]},
                                     warmup_steps=5), train_shards),
        # The encoder learns 5x slower than the rest (LLaVA-OneVision's ratio), so stage 2 refines
        # the contrastive features instead of overwriting them with noisy early gradients.
        ("stage2", None, StageConfig(train=all_modules,
                                     lr={"encoder": config.lr["stage2"] / 5, "projector": config.lr["stage2"],
                                         "decoder": config.lr["stage2"]},
                                     warmup_steps=50, weight_decay=0.01), train_shards),
    ]
    previous = None
    for name, stage_spec, stage, shards in stages:
        stage_spec = stage_spec or replace(spec, init_from=str(previous))
        target = out / ("checkpoint" if name == "stage2" else name)
        seconds[name] = run_stage(name, stage_spec, stage, shards, config.steps[name], config, target, seed)
        previous = target

    started = time.perf_counter()
    model = VisionLanguageModel.from_pretrained(out / "checkpoint")
    test_seeds = synthetic.split_seeds("test", config.test_images, seed=seed)
    metrics, rows = evaluate(model, test_seeds)
    seconds["evaluation"] = time.perf_counter() - started
    metrics["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    metrics["seconds"]["total"] = round(sum(seconds.values()), 1)

    print_table(rows, config.sample_rows)
    print(f"\n{'language':<10}{'exact match':>12}{'token F1':>10}{'fidelity':>10}")
    for language, figures in metrics["per_language"].items():
        print(f"{synthetic.LANGUAGE_NAMES[language]:<10}{figures['exact_match']:>12.3f}"
              f"{figures['token_f1']:>10.3f}{figures['language_fidelity']:>10.3f}")
    print(f"{'all':<10}{metrics['exact_match']:>12.3f}{metrics['token_f1']:>10.3f}{metrics['language_fidelity']:>10.3f}")
    print(f"\nseconds: {metrics['seconds']}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    draw_captions(rows, out / "captions.png")
    print(f"wrote {out / 'metrics.json'}, {out / 'checkpoint'}/, {out / 'captions.png'}")
    return metrics
