"""`salamandra-vl demo --study fidelity`: Salamandra's multilingual-fidelity finding in miniature.

BSC's report on its vision model (arXiv 2503.22577): once an image is in the prompt, VLMs drift into
English; mixing multilingual text-only data into each training stage brings the asked language
back. Here the demo is run up to stage 1 (as `salamandra-vl demo`), then stage 2 twice from that
same starting point, with the same steps and seed, on English-only image captions, as LLaVA-style
data are:
  (a) captions_en: the English captions alone;
  (b) captions_en+text: the same captions with the demo's multilingual text-only chats mixed in by
      weight (data.train.sources, as real configs mix them).
Both then caption the held-out images in English, Spanish and Catalan. `study.json` holds exact
match, token F1 and language fidelity per arm and language; `fidelity.png` draws them side by side.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from multimodal.data.config import SourceConfig
from multimodal.demo import synthetic
from multimodal.demo.config import DemoConfig
from multimodal.demo.evaluation import evaluate
from multimodal.demo.runner import through_stage1, run_stage
from multimodal.model import VisionLanguageModel

TEXT_WEIGHT = 0.25  # the share of text-only chats in arm (b)
ARMS = ("captions_en", "captions_en+text")


def run_fidelity_study(out: str | os.PathLike = "runs/fidelity", seed: int = 0, config: DemoConfig | None = None,
                       text_weight: float = TEXT_WEIGHT) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        return _run(Path(out), seed, config or DemoConfig(), text_weight)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, seed: int, config: DemoConfig, text_weight: float) -> dict:
    prepared = through_stage1(out, seed, config)
    seconds = prepared.seconds
    started = time.perf_counter()
    english = synthetic.write_shards(prepared.data_dir / "captions-en", "train", config.train_images, languages=("en",),
                                     samples_per_shard=4000, seed=seed)
    seconds["data"] += time.perf_counter() - started
    sources = {
        "captions_en": [SourceConfig("captions_en", english, 1.0)],
        "captions_en+text": [SourceConfig("captions_en", english, 1.0 - text_weight),
                             SourceConfig("text", prepared.text_shards, text_weight)],
    }
    test_seeds = synthetic.split_seeds("test", config.test_images, seed=seed)
    arms = {}
    for arm in ARMS:
        export = out / arm
        seconds[arm] = run_stage(f"stage2 ({arm})", replace(prepared.spec, init_from=str(prepared.stage1)),
                                 prepared.stage2, [], config.steps["stage2"], config, export, seed,
                                 sources=sources[arm])
        started = time.perf_counter()
        metrics, rows = evaluate(VisionLanguageModel.from_pretrained(export), test_seeds)
        seconds[f"evaluation ({arm})"] = time.perf_counter() - started
        arms[arm] = metrics
        with open(out / f"predictions-{arm}.jsonl", "w") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
    study = {"study": "fidelity", "seed": seed, "text_weight": text_weight, "stage2_steps": config.steps["stage2"],
             "arms": arms, "seconds": {k: round(v, 1) for k, v in seconds.items()}, "machine": prepared.machine}
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    draw_study(arms, out / "fidelity.png")
    print(f"\n{'arm':<20}{'language':<10}{'fidelity':>10}{'exact match':>13}")
    for arm, metrics in arms.items():
        for language, figures in metrics["per_language"].items():
            print(f"{arm:<20}{language:<10}{figures['language_fidelity']:>10.3f}{figures['exact_match']:>13.3f}")
    print(f"\nwrote {out / 'study.json'} and {out / 'fidelity.png'}")
    return study


def draw_study(arms: dict[str, dict], path: Path) -> None:
    """Two panels (language fidelity, exact match): per language, one bar per arm."""
    colours = [(70, 110, 200), (230, 140, 40)]
    panel_width, height, margin, bar = 330, 230, 40, 36
    canvas = Image.new("RGB", (2 * panel_width + margin, height + 70), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        font = ImageFont.load_default(size=12)
    for panel, (metric, title) in enumerate((("language_fidelity", "language fidelity"),
                                             ("exact_match", "exact match"))):
        left = margin + panel * panel_width
        base = height
        draw.text((left, 8), title, fill="black", font=font)
        draw.line((left, base, left + panel_width - 30, base), fill="black")
        for i, language in enumerate(synthetic.LANGUAGES):
            group = left + 10 + i * (2 * bar + 24)
            for j, arm in enumerate(ARMS):
                value = arms[arm]["per_language"][language][metric]
                x = group + j * bar
                top = base - int(value * (height - 40))
                draw.rectangle((x, top, x + bar - 4, base), fill=colours[j])
                draw.text((x, top - 14), f"{value:.2f}", fill="black", font=font)
            draw.text((group + bar - 8, base + 4), language, fill="black", font=font)
    for j, arm in enumerate(ARMS):
        draw.rectangle((margin + j * 200, height + 30, margin + j * 200 + 12, height + 42), fill=colours[j])
        draw.text((margin + j * 200 + 18, height + 29), arm, fill="black", font=font)
    canvas.save(path)
