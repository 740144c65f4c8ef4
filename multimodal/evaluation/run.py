"""`salamandra-vl evaluate`: a checkpoint's answers on evaluation shards, scored.

Writes `predictions.jsonl` (key, language, prompt, prediction, and the references, human answers or
options) and `metrics.json`: overall and per language, `cider`, `bleu4`, `chrf` (caption),
`vqa_accuracy` (vqa), `choice_accuracy` (choice), and always `language_fidelity` (strict) and
`language_fidelity_grouped` (close relatives count). Generation is greedy and batched
(`model.answer`), compiled when asked.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from multimodal.evaluation.captions import bleu4, chrf, cider_d
from multimodal.evaluation.language import language_fidelity
from multimodal.evaluation.samples import TASKS, EvalItem, read_items, shard_urls
from multimodal.evaluation.vqa import choice_accuracy, vqa_accuracy


def score(records: Sequence[dict[str, Any]], task: str) -> dict[str, float]:
    """The task's metrics over `records` (predictions.jsonl's lines)."""
    predictions = [r["prediction"] for r in records]
    fidelity = language_fidelity(predictions, [r["language"] for r in records])
    metrics: dict[str, float] = {"items": len(records)}
    if task == "caption":
        references = [r["references"] for r in records]
        metrics.update(cider=cider_d(predictions, references)[0], bleu4=bleu4(predictions, references),
                       chrf=chrf(predictions, references))
    elif task == "vqa":
        metrics["vqa_accuracy"] = vqa_accuracy(predictions, [r["references"] for r in records])
    else:
        metrics["choice_accuracy"] = choice_accuracy(predictions, [r["options"] for r in records],
                                                     [r["correct"] for r in records])
    metrics.update(language_fidelity=fidelity["strict"], language_fidelity_grouped=fidelity["grouped"])
    return metrics


def score_by_language(records: Sequence[dict[str, Any]], task: str) -> dict[str, Any]:
    """{"overall": score(all), "per_language": {language: score(its records)}} (no records: {})."""
    if not records:
        return {}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["language"]].append(record)
    return {"overall": score(records, task),
            "per_language": {language: score(group, task) for language, group in sorted(groups.items())}}


def predict(model, items: Iterable[EvalItem], batch_size: int, progress: bool = True,
            **generation_options: Any) -> list[dict[str, Any]]:
    """Each item's record with its greedy `prediction`, generated `batch_size` items at a time."""
    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    bar = tqdm(desc="evaluate", unit="item", disable=not progress, file=sys.stderr)
    batch: list[EvalItem] = []

    def flush() -> None:
        answers = model.answer([item.image for item in batch], [item.prompt for item in batch], batch_size=batch_size,
                               **generation_options)
        for item, answer in zip(batch, answers):
            records.append({**item.record(), "prediction": str(answer).strip(), "finish_reason": answer.finish_reason})
        bar.update(len(batch))
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return records


def evaluate_checkpoint(checkpoint: str | Path, data: str | Sequence[str], out: str | Path, task: str = "caption",
                        languages: Sequence[str] | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                        compile: bool = False, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a save_pretrained checkpoint on the shards `data` (patterns as DataConfig.shards) and
    write predictions.jsonl and metrics.json into `out`; returns the metrics."""
    from itertools import islice

    from multimodal.model import VisionLanguageModel

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    urls = shard_urls(data)
    model = VisionLanguageModel.from_pretrained(checkpoint)
    skipped: Counter = Counter()
    items = read_items(urls, task, languages, skipped)
    records = predict(model, islice(items, limit) if limit else items, batch_size, progress,
                      max_new_tokens=max_new_tokens, compile=compile)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    metrics = {"task": task, "checkpoint": str(checkpoint), "data": urls, "items": len(records),
               "skipped": dict(skipped), **score_by_language(records, task)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics
