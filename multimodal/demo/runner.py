"""The offline demo: the whole Salamandra-vision recipe in miniature, on a laptop CPU, no download.

1. Data: synthetic scenes of shapes with captions in English, Spanish and Catalan, written as
   WebDataset shards (multimodal/demo/synthetic/), plus a text-only shard of captions.
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

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from lm.tokenizer import train_tokenizer
from multimodal.data import DataConfig
from multimodal.demo import synthetic
from multimodal.demo.chats import pretraining_chats, tokenizer_corpus, write_chat_shard
from multimodal.demo.config import DEMO_ENCODER, DEMO_PROJECTOR, DemoConfig
from multimodal.demo.evaluation import draw_captions, evaluate, print_table
from multimodal.demo.vision import pretrain_vision_tower
from multimodal.model import VisionLanguageModel
from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule


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
