"""scripts/make_eval_shards.py turns XM3600- and VQAv2-shaped files (made here, tiny) into shards that
`salamandra-vl evaluate` reads: the references per language, the human answers, missing images left
out and reported."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

from PIL import Image

from multimodal.evaluation.samples import read_items

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "make_eval_shards.py"


def script():
    spec = importlib.util.spec_from_file_location("make_eval_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xm3600_captions_become_per_language_references(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    lines = []
    for i, key in enumerate(["aaa", "bbb", "ccc"]):
        if key != "ccc":  # ccc's image is missing
            Image.new("RGB", (20, 20), (i * 90, 0, 0)).save(tmp_path / "images" / f"{key}.jpg")
        lines.append({"image/key": key, "en": {"caption": [f"a red square {i}"]},
                      "es": {"caption": [f"un cuadrado rojo {i}", "rojo"]}, "ja": {"caption": ["赤い四角"]}})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    assert script().main(["xm3600", "--captions", str(tmp_path / "captions.jsonl"), "--images", str(tmp_path / "images"),
                          "--out", str(tmp_path / "shards")]) == 0
    assert json.loads(capsys.readouterr().out)["missing_images"] == 1
    skipped = Counter()
    items = list(read_items(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), "caption", ["en", "es"],
                            skipped))
    assert [(i.key, i.language, i.references) for i in items] == [
        ("aaa", "en", ["a red square 0"]), ("aaa", "es", ["un cuadrado rojo 0", "rojo"]),
        ("bbb", "en", ["a red square 1"]), ("bbb", "es", ["un cuadrado rojo 1", "rojo"])]
    assert not skipped  # Japanese (not a Salamandra language) was left out by the converter


def test_vqav2_questions_carry_their_ten_answers(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    Image.new("RGB", (20, 20), (0, 90, 0)).save(images / "COCO_val2014_000000000042.jpg")
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"image_id": 42, "question": "What color?", "question_id": 420}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 420, "image_id": 42, "answers": [{"answer": "green"}] * 7 + [{"answer": "Green."}] * 3}]}))
    assert script().main(["vqav2", "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                          "--images", str(images), "--out", str(tmp_path / "shards")]) == 0
    items = list(read_items([str(p) for p in (tmp_path / "shards").glob("*.tar")], "vqa", None, Counter()))
    assert len(items) == 1 and items[0].key == "420" and items[0].references == ["green"] * 7 + ["Green."] * 3
