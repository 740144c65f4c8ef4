"""Convert public evaluation sets into the shards `salamandra-vl evaluate` reads (docs/evaluation.md).

  python scripts/make_eval_shards.py xm3600 --captions captions.jsonl --images images/ --out data/xm3600
  python scripts/make_eval_shards.py vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \\
      --annotations v2_mscoco_val2014_annotations.json --images val2014/ --out data/vqav2-val [--limit 5000]

xm3600 (Crossmodal-3600, multilingual captions of 3,600 images): `captions.jsonl` has one line per
image, `{"image/key": KEY, "<lang>": {"caption": [...], ...}, ...}`, and the images are
`images/KEY.jpg`. Each shard sample holds the image and `{"captions": {lang: [...]}}` for the
languages that are also Salamandra's (XM3600 has 36 languages; the shared ones include en, es, ...).

vqav2: the official question and annotation files; each sample holds the COCO image
(`COCO_<split>_<image_id:012d>.jpg`) and `{"question", "answers": [10 answers], "language": "en"}`.

Images are copied as they are (no re-encoding). Samples whose image is missing are reported and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from multimodal.evaluation.language import SALAMANDRA_LANGUAGES  # noqa: E402


def write(samples, out: Path, per_shard: int) -> tuple[int, int]:
    """Writes (key, image path, json) samples into out/eval-%06d.tar; returns (written, missing)."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    written = missing = 0
    with wds.ShardWriter(str(out / "eval-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for key, image, meta in samples:
            if not image.is_file():
                missing += 1
                print(f"missing image {image}: sample {key} left out", file=sys.stderr)
                continue
            extension = image.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sink.write({"__key__": key, extension: image.read_bytes(), "json": json.dumps(meta, ensure_ascii=False)})
            written += 1
    return written, missing


def xm3600(captions: Path, images: Path):
    with open(captions, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            record = json.loads(line)
            key = record["image/key"]
            by_language = {language: [c for c in record[language]["caption"] if c.strip()]
                           for language in SALAMANDRA_LANGUAGES if isinstance(record.get(language), dict)}
            by_language = {language: refs for language, refs in by_language.items() if refs}
            if by_language:
                yield key, images / f"{key}.jpg", {"captions": by_language}


def vqav2(questions: Path, annotations: Path, images: Path, limit: int | None):
    asked = json.loads(questions.read_text())["questions"]
    answers = {a["question_id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    split = next((part for part in images.name.split("_") if part.endswith("2014") or part.endswith("2015")),
                 images.name)
    for count, question in enumerate(asked):
        if limit is not None and count >= limit:
            break
        annotation = answers[question["question_id"]]
        image = images / f"COCO_{split}_{question['image_id']:012d}.jpg"
        yield (str(question["question_id"]), image,
               {"question": question["question"], "answers": [a["answer"] for a in annotation["answers"]],
                "language": "en"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="dataset", required=True)
    xm = commands.add_parser("xm3600")
    xm.add_argument("--captions", type=Path, required=True)
    xm.add_argument("--images", type=Path, required=True)
    vqa = commands.add_parser("vqav2")
    vqa.add_argument("--questions", type=Path, required=True)
    vqa.add_argument("--annotations", type=Path, required=True)
    vqa.add_argument("--images", type=Path, required=True, help="e.g. val2014/ (its name gives the split)")
    vqa.add_argument("--limit", type=int, default=None)
    for command in (xm, vqa):
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    samples = (xm3600(args.captions, args.images) if args.dataset == "xm3600"
               else vqav2(args.questions, args.annotations, args.images, args.limit))
    written, missing = write(samples, args.out, args.per_shard)
    print(json.dumps({"dataset": args.dataset, "written": written, "missing_images": missing, "out": str(args.out)}))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
