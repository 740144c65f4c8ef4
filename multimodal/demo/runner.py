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
import multiprocessing
import os
import pickle
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch

from lm.tokenizer import train_tokenizer
from multimodal.data import DataConfig
from multimodal.data.config import SourceConfig
from multimodal.demo import synthetic
from multimodal.demo.chats import pretraining_chats, tokenizer_corpus, write_chat_shard
from multimodal.demo.config import DEMO_ENCODER, DEMO_PROJECTOR, DemoConfig
from multimodal.demo.evaluation import draw_captions, evaluate, print_table
from multimodal.demo.vision import pretrain_vision_tower
from multimodal.model import VisionLanguageModel
from multimodal.training import ModelSpec, ShardDataModule, StageConfig, VLMModule


def run_stage(name: str, spec: ModelSpec, stage: StageConfig, shards: list[str], steps: int, config: DemoConfig,
              export_dir: Path, seed: int, progress_bar: bool = True,
              sources: list[SourceConfig] | None = None) -> float:
    """One training stage on `shards` (or on `sources` mixed by weight) into `export_dir`; its seconds."""
    L.seed_everything(seed, verbose=False)
    started = time.perf_counter()
    module = VLMModule(spec, stage, export_dir=str(export_dir))
    data = ShardDataModule(
        DataConfig(None if sources else shards, sources=sources, max_tokens=config.max_tokens,
                   rows_per_batch=config.rows_per_batch, shuffle_buffer=2000, seed=seed),
        num_workers=config.num_workers,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=steps, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
        enable_progress_bar=progress_bar,
    )
    print(f"\n== {name}: {steps} steps, training {', '.join(stage.train)}")
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    print(f"== {name}: done in {seconds:.0f} s")
    return seconds


def machine_info() -> dict:
    """What the seconds were measured on: CPU model, cores, and the load average when the run began
    (other processes on a 2-core machine change the demo's time by tens of percent)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "load_average_at_start": load,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _stage_from_stdin() -> None:
    """The second process of _run_stage_alongside: its arguments come pickled on stdin."""
    threads, arguments, result = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(threads)  # the parent's thread count: the same numbers
    Path(result).write_text(str(run_stage(*arguments, progress_bar=False)))


def _run_stage_alongside(*arguments):
    """Run `run_stage(*arguments)` in a second Python process while this one goes on; the returned
    function waits and gives its seconds. A fresh interpreter (not a fork: the parent's OpenMP pool
    cannot cross one; not multiprocessing's spawn, which re-imports the caller's main script).

    The decoder's pre-training needs only the tokenizer and the chats, not the vision tower, so it
    runs while the contrastive phase does: each keeps only about 1.3 of 2 cores busy (small
    matrices, threads that sleep between operations), so together they fill the idle share."""
    result = Path(arguments[6]).with_suffix(".seconds")
    result.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", "from multimodal.demo.runner import _stage_from_stdin; _stage_from_stdin()"],
        stdin=subprocess.PIPE)
    process.stdin.write(pickle.dumps((torch.get_num_threads(), arguments, str(result))))
    process.stdin.close()

    def wait() -> float:
        if process.wait() != 0:
            raise RuntimeError(f"the {arguments[0]} stage failed in its own process (exit status {process.returncode})")
        return float(result.read_text())
    return wait


def _put_vision_tower(checkpoint: Path, encoder: dict) -> None:
    """Load the pre-trained vision tower (`encoder`: OpenCLIPEncoder's arguments, with `pretrained`)
    into the save_pretrained directory `checkpoint`, in place: what building the model from it
    would have given (the encoder is frozen and unused while the decoder pre-trains on text)."""
    from encoders import OpenCLIPEncoder

    model = VisionLanguageModel.from_pretrained(checkpoint)
    model.encoder.load_state_dict(OpenCLIPEncoder(**encoder).state_dict())
    model.save_pretrained(checkpoint)


def _write_train_shards(data_dir: Path, config: DemoConfig, seed: int):
    """Start writing the training shards in a second process (they are first read by stage 1); the
    returned function waits for them and gives their paths. Without fork (macOS, Windows), inline."""
    arguments = (data_dir, "train", config.train_images)
    options = {"samples_per_shard": 4000, "seed": seed}
    if "fork" not in multiprocessing.get_all_start_methods():
        shards = synthetic.write_shards(*arguments, **options)
        return lambda: shards
    # Forked before the tokenizer's or torch's thread pools start: the child only renders and writes.
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    future = pool.submit(synthetic.write_shards, *arguments, **options)

    def wait() -> list[str]:
        try:
            return future.result()
        finally:
            pool.shutdown()
    return wait


def run_demo(out: str | os.PathLike = "runs/demo", seed: int = 0, config: DemoConfig | None = None) -> dict:
    """The demo end to end into `out`; its metrics. It uses every core while it runs and puts torch's
    thread count back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        return _run_demo(Path(out), seed, config or DemoConfig())
    finally:
        torch.set_num_threads(threads)


@dataclass
class Prepared:
    """What the demo has made when stage 1 is done: the stage-2 run starts from here."""

    spec: ModelSpec               # the model (init_from still to set)
    stage2: StageConfig
    data_dir: Path
    train_shards: list[str]       # captions in all three languages
    text_shards: list[str]        # text-only chats in all three languages
    stage1: Path                  # stage 1's export
    seconds: dict[str, float]
    machine: dict
    wait_for_pretrain: bool


def through_stage1(out: Path, seed: int, config: DemoConfig) -> Prepared:
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['usable_cores']} cores, load average {machine['load_average_at_start']}, "
          f"torch {machine['torch']} with {machine['torch_threads']} threads, OMP_WAIT_POLICY={machine['omp_wait_policy']}")
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    wait_for_train_shards = _write_train_shards(data_dir, config, seed)
    train_seeds = synthetic.split_seeds("train", config.train_images, seed=seed)  # the shards' scenes
    texts = synthetic.texts_for_pretraining(config.pretrain_texts, seed=seed)
    text_shards = [write_chat_shard(data_dir / "chats-000000.tar", pretraining_chats(config.pretrain_texts, seed, described=0.5))]
    tokenizer = train_tokenizer(tokenizer_corpus(texts), vocab_size=config.vocab_size)
    tokenizer.save(out / "tokenizer")
    seconds["data"] = time.perf_counter() - started
    print(f"data: {config.train_images} training images x 3 languages (shards written alongside), {len(texts)} texts, "
          f"tokenizer of {tokenizer.vocab_size} pieces ({seconds['data']:.0f} s)")

    vision_weights = out / "vision-tower.safetensors"
    spec = ModelSpec(tokenizer=str(out / "tokenizer"), decoder="demo",
                     decoder_options={**config.decoder, "attention": "sdpa"},
                     encoder={**DEMO_ENCODER, "pretrained": str(vision_weights)}, projector=DEMO_PROJECTOR)
    all_modules = ["encoder", "projector", "decoder"]
    # Stage 0 (the decoder's pre-training) reads no image: it runs in a second process alongside the
    # contrastive phase (config.pretrain_alongside), and its seconds overlap the vision's.
    pretrain = StageConfig(train=["decoder"], lr={"decoder": config.lr["pretrain"]}, warmup_steps=10, weight_decay=0.01)
    pretrain_arguments = ("pretrain", spec, pretrain, text_shards, config.steps["pretrain"], config, out / "pretrain", seed)
    stage1 = StageConfig(train=["projector"], lr={"projector": config.lr["stage1"]}, warmup_steps=5)
    # The encoder learns 5x slower than the rest (LLaVA-OneVision's ratio), so stage 2 refines
    # the contrastive features instead of overwriting them with noisy early gradients.
    stage2 = StageConfig(train=all_modules,
                         lr={"encoder": config.lr["stage2"] / 5, "projector": config.lr["stage2"],
                             "decoder": config.lr["stage2"]},
                         warmup_steps=50, weight_decay=0.01)
    wait_for_pretrain = None
    if config.pretrain_alongside:
        # Without the tower's weights yet: the encoder is built (same random draws, so the same
        # projector and decoder initialisation) but never run on text-only chats; its trained
        # weights go into the pre-trained checkpoint afterwards (_put_vision_tower).
        alongside = replace(spec, encoder={**DEMO_ENCODER})
        wait_for_pretrain = _run_stage_alongside("pretrain", alongside, *pretrain_arguments[2:])

    started = time.perf_counter()
    print(f"\n== vision: contrastive pre-training of the vision tower, {config.steps['vision']} steps")
    pretrain_vision_tower(tokenizer, train_seeds, config.steps["vision"], vision_weights, seed)
    seconds["vision"] = time.perf_counter() - started
    if wait_for_pretrain is None:
        seconds["pretrain"] = run_stage(*pretrain_arguments)
    else:
        started = time.perf_counter()
        seconds["pretrain"] = wait_for_pretrain()
        _put_vision_tower(out / "pretrain", spec.encoder)
        seconds["pretrain_wait"] = time.perf_counter() - started  # what the pre-training added to the wall clock
    started = time.perf_counter()
    train_shards = wait_for_train_shards()
    seconds["data"] += time.perf_counter() - started  # any wait for the shards is the data's time

    seconds["stage1"] = run_stage("stage1", replace(spec, init_from=str(out / "pretrain")), stage1, train_shards,
                                  config.steps["stage1"], config, out / "stage1", seed)
    return Prepared(spec, stage2, data_dir, train_shards, text_shards, out / "stage1", seconds, machine,
                    wait_for_pretrain is not None)


def _run_demo(out: Path, seed: int, config: DemoConfig) -> dict:
    prepared = through_stage1(out, seed, config)
    seconds, machine = prepared.seconds, prepared.machine
    seconds["stage2"] = run_stage("stage2", replace(prepared.spec, init_from=str(prepared.stage1)), prepared.stage2,
                                  prepared.train_shards, config.steps["stage2"], config, out / "checkpoint", seed)
    started = time.perf_counter()
    model = VisionLanguageModel.from_pretrained(out / "checkpoint")
    test_seeds = synthetic.split_seeds("test", config.test_images, seed=seed)
    metrics, rows = evaluate(model, test_seeds)
    seconds["evaluation"] = time.perf_counter() - started
    metrics["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    # The stages' wall clock: the pre-training's seconds overlap the vision's, only its wait counts.
    metrics["seconds"]["total"] = round(sum(v for k, v in seconds.items()
                                            if k != "pretrain" or not prepared.wait_for_pretrain), 1)
    metrics["machine"] = machine

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
