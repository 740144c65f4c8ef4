"""`salamandra-vl evaluate` on shards it writes itself, with a tiny saved model: every usable item gets
the answer the model gives alone to the same prompt (greedy), bad samples are counted and skipped,
and metrics.json holds what the metric functions give on predictions.jsonl, overall and per language."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from webdataset import TarWriter

from multimodal.cli import main
from multimodal.evaluation.run import score
from multimodal.evaluation.samples import CHOICE_ANSWER, SHORT_ANSWER
from multimodal.model import VisionLanguageModel
from multimodal.prompts import caption_prompt
from tests.multimodal.tiny import build_tiny_vlm


def png(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def js(value) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    build_tiny_vlm(tokenizer).save_pretrained(root / "model")
    with TarWriter(str(root / "captions.tar")) as writer:
        writer.write({"__key__": "multi", "png": png((200, 20, 20)),
                      "json": js({"captions": {"en": ["a red square", "red"], "es": ["un cuadrado rojo"]}})})
        writer.write({"__key__": "lines", "png": png((20, 200, 20)), "txt": b"a green square\na green box\n"})
        writer.write({"__key__": "catalan", "png": png((20, 20, 200)),
                      "json": js({"captions": ["un quadrat blau"], "language": "ca"})})
        writer.write({"__key__": "german", "png": png((90, 90, 90)), "json": js({"captions": ["ein graues Quadrat"],
                                                                                 "language": "de"})})
        writer.write({"__key__": "broken", "png": b"not an image", "txt": b"a caption"})
        writer.write({"__key__": "nothing", "png": png((0, 0, 0))})
        writer.write({"__key__": "klingon", "png": png((0, 0, 0)), "json": js({"captions": ["x"], "language": "tlh"})})
    with TarWriter(str(root / "vqa.tar")) as writer:
        for i, color in enumerate([(200, 20, 20), (20, 200, 20)]):
            writer.write({"__key__": f"q{i}", "png": png(color),
                          "json": js({"question": "What color is it?", "answers": ["red"] * 6 + ["green"] * 4})})
        writer.write({"__key__": "no_answers", "png": png((1, 2, 3)), "json": js({"question": "Why?"})})
    with TarWriter(str(root / "choice.tar")) as writer:
        writer.write({"__key__": "c0", "png": png((200, 20, 20)),
                      "json": js({"question": "Which color?", "options": ["red", "green", "blue"], "answer": "A"})})
        writer.write({"__key__": "bad", "png": png((200, 20, 20)),
                      "json": js({"question": "Which?", "options": ["red", "green"], "answer": "E"})})
    return root, VisionLanguageModel.from_pretrained(root / "model")


def read(out):
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, records


def test_caption_evaluation_answers_each_item_alone_and_scores_it(setup, capsys):
    root, model = setup
    out = root / "out-caption"
    assert main(["evaluate", "--checkpoint", str(root / "model"), "--data", str(root / "captions.tar"),
                 "--out", str(out), "--languages", "en,es,ca", "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    metrics, records = read(out)
    assert [(r["key"], r["language"]) for r in records] == [("multi", "en"), ("multi", "es"), ("lines", "en"),
                                                             ("catalan", "ca")]
    assert records[2]["references"] == ["a green square", "a green box"]
    colors = {"multi": (200, 20, 20), "lines": (20, 200, 20), "catalan": (20, 20, 200)}
    for record in records:
        image = Image.open(io.BytesIO(png(colors[record["key"]]))).convert("RGB")
        assert record["prompt"] == caption_prompt(record["language"])
        assert record["prediction"] == str(model.caption(image, record["language"], max_new_tokens=5)).strip()
    assert metrics["skipped"] == {"image_undecodable": 1, "no_references": 1, "unknown_language": 1,
                                  "language_not_asked": 1}
    assert metrics["overall"] == pytest.approx(score(records, "caption"))
    assert set(metrics["per_language"]) == {"en", "es", "ca"}
    assert metrics["per_language"]["en"] == pytest.approx(score(records[0:1] + records[2:3], "caption"))
    for name in ("cider", "bleu4", "chrf", "language_fidelity", "language_fidelity_grouped"):
        assert name in metrics["overall"]
    assert '"items": 4' in capsys.readouterr().out


def test_vqa_and_choice_evaluation(setup):
    root, model = setup
    for task, shard in (("vqa", "vqa.tar"), ("choice", "choice.tar")):
        out = root / f"out-{task}"
        assert main(["evaluate", "--checkpoint", str(root / "model"), "--data", str(root / shard), "--out", str(out),
                     "--task", task, "--max-new-tokens", "3"]) == 0
        metrics, records = read(out)
        assert metrics["overall"] == pytest.approx(score(records, task))
        image = Image.open(io.BytesIO(png((200, 20, 20)))).convert("RGB")
        assert records[0]["prediction"] == str(model.answer([image], [records[0]["prompt"]], max_new_tokens=3)[0]).strip()
        if task == "vqa":
            assert len(records) == 2 and records[0]["prompt"].endswith(SHORT_ANSWER)
            assert metrics["skipped"] == {"no_question": 1} and "vqa_accuracy" in metrics["overall"]
        else:
            assert records == [{**records[0], "options": ["red", "green", "blue"], "correct": "A"}]
            assert records[0]["prompt"] == f"Which color?\nA. red\nB. green\nC. blue\n{CHOICE_ANSWER}"
            assert metrics["skipped"] == {"bad_answer": 1} and "choice_accuracy" in metrics["overall"]


def test_evaluate_refuses_missing_shards(setup, capsys):
    root, _ = setup
    assert main(["evaluate", "--checkpoint", str(root / "model"), "--data", str(root / "none-{0..1}.tar"),
                 "--out", str(root / "x")]) == 2
    assert "none-0.tar" in capsys.readouterr().err
