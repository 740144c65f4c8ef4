"""Evaluation items from WebDataset shards: one image and what to ask about it, with what counts as
right. One shard format for the three tasks (an image `jpg`/`png`/`webp`/`jpeg`, and a `json`):

- caption: `{"captions": ["...", ...], "language": "es"}` (the language defaults to en), or
  `{"captions": {"en": [...], "es": [...], ...}}` for multilingual references (XM3600-style: one
  item per language asked for), or a `txt` with one reference per line (English). The prompt is
  the language's canonical caption prompt (multimodal.prompts).
- vqa: `{"question": "...", "answers": ["...", x10], "language": "en"}`; the prompt is the question,
  in English followed by LLaVA's request for a short answer.
- choice: `{"question": "...", "options": ["...", ...], "answer": "B"}`; the prompt lists the options
  as A., B., ... and asks for the letter, as LLaVA's multiple-choice evaluations do.

A sample that cannot be used (no image or an undecodable one, no references, bad json) is skipped
and counted by reason; it never shifts an image onto another sample's text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from multimodal.data.decode import UNKNOWN_LANGUAGE, SkipSample, decode_image, decode_json, decode_text
from multimodal.data.samples import IMAGE_EXTENSIONS
from multimodal.evaluation.language import SALAMANDRA_LANGUAGES
from multimodal.prompts import caption_prompt

TASKS = ("caption", "vqa", "choice")
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalItem:
    key: str
    image: Image.Image
    language: str
    prompt: str
    references: list[str] = field(default_factory=list)  # captions, or the human answers (vqa)
    options: list[str] = field(default_factory=list)     # choice
    correct: str | None = None                            # choice: the right letter

    def record(self) -> dict[str, Any]:
        """What predictions.jsonl keeps of the item (all but the image)."""
        record = {"key": self.key, "language": self.language, "prompt": self.prompt}
        if self.options:
            record.update(options=self.options, correct=self.correct)
        else:
            record["references"] = self.references
        return record


def _image(sample: dict[str, Any]) -> Image.Image:
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise SkipSample("no_image")
    return decode_image(data)


def _json(sample: dict[str, Any]) -> dict[str, Any]:
    return decode_json(sample["json"]) if "json" in sample else {}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SkipSample("bad_references", "expected a list of strings")
    return [v.strip() for v in value if v.strip()]


def caption_items(key: str, sample: dict[str, Any], languages: Sequence[str] | None) -> list[EvalItem]:
    meta = _json(sample)
    if "captions" in meta and isinstance(meta["captions"], dict):
        by_language = {language: _strings(refs) for language, refs in meta["captions"].items()}
    elif "captions" in meta:
        by_language = {meta.get("language", "en"): _strings(meta["captions"])}
    elif "txt" in sample:
        by_language = {meta.get("language", "en"): _strings(decode_text(sample["txt"]).splitlines())}
    else:
        raise SkipSample("no_references")
    unknown = sorted(set(by_language) - set(SALAMANDRA_LANGUAGES))
    if unknown:
        raise SkipSample(UNKNOWN_LANGUAGE, ", ".join(unknown))
    wanted = {lang: refs for lang, refs in by_language.items() if languages is None or lang in languages}
    if not any(wanted.values()):
        raise SkipSample("no_references" if not languages else "language_not_asked")
    image = _image(sample)
    return [EvalItem(key, image, language, caption_prompt(language), refs)
            for language, refs in wanted.items() if refs]


def vqa_items(key: str, sample: dict[str, Any], languages: Sequence[str] | None) -> list[EvalItem]:
    meta = _json(sample)
    question, answers = meta.get("question"), _strings(meta.get("answers", []))
    language = meta.get("language", "en")
    if not isinstance(question, str) or not question.strip() or not answers:
        raise SkipSample("no_question", "needs a question and its answers")
    if languages is not None and language not in languages:
        raise SkipSample("language_not_asked")
    prompt = f"{question.strip()}\n{SHORT_ANSWER}" if language == "en" else question.strip()
    return [EvalItem(key, _image(sample), language, prompt, answers)]


def choice_items(key: str, sample: dict[str, Any], languages: Sequence[str] | None) -> list[EvalItem]:
    meta = _json(sample)
    question, options, answer = meta.get("question"), meta.get("options"), meta.get("answer")
    language = meta.get("language", "en")
    if (not isinstance(question, str) or not isinstance(options, list) or len(options) < 2
            or not all(isinstance(o, str) for o in options) or len(options) > 26):
        raise SkipSample("no_question", "needs a question and 2 to 26 options")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if not isinstance(answer, str) or answer.strip().upper() not in letters:
        raise SkipSample("bad_answer", f"answer must be one of {letters}")
    if languages is not None and language not in languages:
        raise SkipSample("language_not_asked")
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    prompt = f"{question.strip()}\n{listed}\n{CHOICE_ANSWER}"
    return [EvalItem(key, _image(sample), language, prompt, [], list(options), answer.strip().upper())]


ITEMS = {"caption": caption_items, "vqa": vqa_items, "choice": choice_items}


def shard_urls(data: str | Sequence[str]) -> list[str]:
    """The shard URLs that `data` (patterns as DataConfig.shards) names; ValueError for none,
    FileNotFoundError for a local shard that does not exist."""
    from multimodal.data.shards import check_local_shards, expand_shards

    urls = expand_shards(data)
    if not urls:
        raise ValueError(f"{data!r} names no shard")
    check_local_shards(urls)
    return urls


def read_items(urls: Sequence[str], task: str, languages: Sequence[str] | None,
               skipped: Counter) -> Iterator[EvalItem]:
    """The items of the shards at `urls`, in order; skipped samples are counted in `skipped`."""
    import webdataset as wds

    if task not in ITEMS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    make = ITEMS[task]
    dataset = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False, handler=wds.warn_and_continue)
    for sample in dataset:
        try:
            yield from make(sample["__key__"], sample, languages)
        except SkipSample as skip:
            skipped[skip.reason] += 1
