"""The synthetic demo data: determinism, grammar, visibility of every captioned attribute, richness,
language identification, disjoint splits and the shards webdataset reads back."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from multimodal.demo import synthetic as S


@pytest.fixture(scope="module")
def scenes_20k() -> list[S.Scene]:
    return [S.scene(seed) for seed in range(20_000)]


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_same_image_and_caption():
    for seed in (0, 1, 7, 123_456, 2_000_000_001):
        for language in S.LANGUAGES:
            image_a, caption_a = S.sample(seed, language)
            image_b, caption_b = S.sample(seed, language)
            assert image_a.size == (32, 32) and image_a.mode == "RGB"
            assert image_a.tobytes() == image_b.tobytes()
            assert S.png_bytes(image_a) == S.png_bytes(image_b)
            assert caption_a == caption_b


def test_scene_stream_is_pinned():
    # random.Random(seed) is stable across Python versions; a change here means the data changed.
    assert S.scene(0).content == ("column", ("circle", "yellow", None), ("star", "green", None))
    assert S.scene(1).content == ("right", ("diamond", "black", "small"))


def test_one_scene_in_every_language():
    for seed in range(50):
        images, captions = zip(*(S.sample(seed, language) for language in S.LANGUAGES))
        assert images[0].tobytes() == images[1].tobytes() == images[2].tobytes()
        assert len(set(captions)) == 3
        assert captions == tuple(S.describe(S.scene(seed), language) for language in S.LANGUAGES)


def test_render_size_is_the_callers():
    drawn = S.scene(3)
    assert S.render(drawn, 64).size == (64, 64)
    # The same scene at a larger size: scaled, not re-laid out (noise would differ per pixel).
    drawn = dataclasses.replace(drawn, background=dataclasses.replace(drawn.background, kind="flat"))
    small = np.asarray(S.render(drawn, 32), np.float32)
    large = np.asarray(S.render(drawn, 64).resize((32, 32), Image.Resampling.BOX), np.float32)
    assert np.abs(small - large).mean() < 4


def test_unknown_language_is_refused():
    with pytest.raises(ValueError, match="unknown language"):
        S.sample(0, "fr")
    assert set(S.LANGUAGE_NAMES) == set(S.LANGUAGES)


# --- grammar ----------------------------------------------------------------------------------

GOLDEN = [
    (("left", ("circle", "red", "small")),
     "a small red circle on the left",
     "un círculo rojo pequeño a la izquierda",
     "un cercle vermell petit a l'esquerra"),
    (("top", ("cross", "orange", "small")),
     "a small orange cross at the top",
     "una cruz naranja pequeña arriba",
     "una creu taronja petita a dalt"),
    (("centre", ("star", "yellow", "small")),
     "a small yellow star in the centre",
     "una estrella amarilla pequeña en el centro",
     "una estrella groga petita al centre"),
    (("centre", ("star", "yellow", "large")),
     "a large yellow star",
     "una estrella amarilla grande",
     "una estrella groga gran"),
    (("row", ("circle", "red", None), ("star", "blue", None)),
     "a red circle on the left and a blue star on the right",
     "un círculo rojo a la izquierda y una estrella azul a la derecha",
     "un cercle vermell a l'esquerra i una estrella blava a la dreta"),
    (("row", ("heart", "orange", None), ("circle", "red", None)),
     "an orange heart on the left and a red circle on the right",
     "un corazón naranja a la izquierda y un círculo rojo a la derecha",
     "un cor taronja a l'esquerra i un cercle vermell a la dreta"),
    (("column", ("heart", "green", None), ("square", "orange", None)),
     "a green heart above an orange square",
     "un corazón verde encima de un cuadrado naranja",
     "un cor verd damunt d'un quadrat taronja"),
    (("column", ("diamond", "purple", None), ("cross", "purple", None)),
     "a purple diamond above a purple cross",
     "un rombo morado encima de una cruz morada",
     "un rombe morat damunt d'una creu morada"),
    (("row", ("star", "yellow", None), ("star", "yellow", None)),
     "two yellow stars side by side",
     "dos estrellas amarillas, una al lado de la otra",
     "dues estrelles grogues, una al costat de l'altra"),
    (("column", ("triangle", "blue", None), ("triangle", "blue", None)),
     "two blue triangles, one above the other",
     "dos triángulos azules, uno encima del otro",
     "dos triangles blaus, un damunt de l'altre"),
    (("row", ("cross", "black", None), ("cross", "black", None)),
     "two black crosses side by side",
     "dos cruces negras, una al lado de la otra",
     "dues creus negres, una al costat de l'altra"),
]


@pytest.mark.parametrize("content,en,es,ca", GOLDEN)
def test_golden_captions(content, en, es, ca):
    for language, expected in zip(S.LANGUAGES, (en, es, ca)):
        assert S.caption_of_content(content, language) == expected


def test_describe_reads_only_the_content():
    # A drawn scene and its bare content give the same caption, and the caption names no size for
    # shapes in pairs (they are all alike) but always for single shapes.
    for seed in range(200):
        drawn = S.scene(seed)
        for language in S.LANGUAGES:
            assert S.describe(drawn, language) == S.caption_of_content(drawn.content, language)
        english = S.describe(drawn, "en")
        assert (("small" in english) or ("large" in english)) == (len(drawn.shapes) == 1)


def test_captions_are_unambiguous():
    # Different contents never share a caption: a caption pins down what is drawn.
    contents = list(S.all_contents())
    assert len(set(contents)) == len(contents)
    for language in S.LANGUAGES:
        assert len({S.caption_of_content(c, language) for c in contents}) == len(contents)


def test_all_contents_covers_every_drawn_scene(scenes_20k):
    contents = set(S.all_contents())
    assert all(drawn.content in contents for drawn in scenes_20k)


# --- every captioned attribute is visible ------------------------------------------------------


def _coverage(image: np.ndarray, background: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Per pixel, how much of `colour` is mixed over the background (0..1), read from pixels."""
    direction = np.asarray(colour, np.float32) - background
    amount = ((image - background) * direction).sum(-1) / np.maximum((direction**2).sum(-1), 1.0)
    return np.clip(amount, 0.0, 1.0)


def check_drawn_as_captioned(drawn: S.Scene, seed: int, areas: dict) -> None:
    """Every shape of `drawn` is solid, of its colour, apart from the other, and where its caption
    says; its solid area is recorded in `areas` by (kind, size)."""
    image = np.asarray(S.render(drawn), np.float32)
    background = np.asarray(S.render(S.Scene((), drawn.layout, drawn.background)), np.float32)
    centroids = []
    owned = np.zeros((32, 32), bool)
    for shape in drawn.shapes:
        # The pixels the shape's bounding box touches, plus the quarter pixel by which PIL's
        # inclusive polygon fill (at 4x) can overshoot; in pairs they never touch the other's.
        half = shape.extent * 16 + 0.25
        x0, x1 = int(max(shape.x * 32 - half, 0)), int(min(np.ceil(shape.x * 32 + half), 32))
        y0, y1 = int(max(shape.y * 32 - half, 0)), int(min(np.ceil(shape.y * 32 + half), 32))
        assert not owned[y0:y1, x0:x1].any(), f"seed {seed}: shapes overlap"
        owned[y0:y1, x0:x1] = True
        cover = np.zeros((32, 32), np.float32)
        cover[y0:y1, x0:x1] = _coverage(image, background, S.COLOURS[shape.colour])[y0:y1, x0:x1]
        solid = int((cover > 0.5).sum())
        areas[shape.kind, shape.size].append(solid)
        assert solid >= 40, f"seed {seed}: {shape.kind} covers only {solid} px"
        cy, cx = int(shape.y * 32), int(shape.x * 32)
        assert cover[cy, cx] > 0.9, f"seed {seed}: {shape.colour} {shape.kind} missing at its centre"
        ys, xs = np.nonzero(cover > 0.5)
        centroids.append((xs.mean() + 0.5, ys.mean() + 0.5))
    # Nothing of any shape colour outside the shapes' boxes.
    for colour in S.COLOURS.values():
        assert _coverage(image, background, colour)[~owned].max() < 0.25, f"seed {seed}: stray colour"
    if drawn.layout in ("row", "column"):
        (xa, ya), (xb, yb) = centroids
        along, across = (xb - xa, yb - ya) if drawn.layout == "row" else (yb - ya, xb - xa)
        assert along > 12 and abs(across) < along / 2.5, f"seed {seed}: {drawn.layout} not clear"
    elif drawn.shapes[0].size == "small":  # a large shape's caption names no position
        (x, y), = centroids
        # The position the caption names is, by a clear margin, the nearest to the shape's centroid.
        anchors = {"centre": (16, 16), "left": (8.5, 16), "right": (23.5, 16),
                   "top": (16, 8.5), "bottom": (16, 23.5)}
        distance = {name: np.hypot(x - ax, y - ay) for name, (ax, ay) in anchors.items()}
        others = min(d for name, d in distance.items() if name != drawn.layout)
        assert distance[drawn.layout] + 2 < others, f"seed {seed}: misplaced"


def test_every_shape_is_visible_big_and_where_the_caption_says():
    areas = defaultdict(list)
    for seed in range(3000):
        check_drawn_as_captioned(S.scene(seed), seed, areas)
    for kind in S.SHAPE_KINDS:
        for size in ("small", "large", None):
            assert areas[kind, size], f"no {size} {kind} in 3000 scenes"
        # "large" is visibly larger than any small or paired shape of the same kind.
        assert min(areas[kind, "large"]) > 1.6 * max(areas[kind, "small"] + areas[kind, None])


def test_near_miss_changes_one_detail_and_is_drawn_as_its_caption_says():
    rng = random.Random(0)
    changes = Counter()
    for seed in range(1500):
        base = S.scene(seed)
        miss = S.near_miss(base, rng)
        check_drawn_as_captioned(miss, seed, defaultdict(list))
        assert miss.background == base.background and len(miss.shapes) == len(base.shapes)
        assert S.describe(miss, "en") != S.describe(base, "en")
        old, new = [(s.kind, s.colour, s.size) for s in base.shapes], [(s.kind, s.colour, s.size) for s in miss.shapes]
        if miss.layout != base.layout:
            assert new == old  # a move (one shape) or a turn (row <-> column): nothing else changes
            changes["turn" if len(old) == 2 else "position"] += 1
        elif len(old) == 2 and new == old[::-1]:
            changes["swap"] += 1
        else:
            differing = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(differing) == 1, f"seed {seed}: {old} -> {new}"
            (a, b), = differing
            assert a[2] == b[2]  # size never changes
            changes["kind" if a[0] != b[0] else "colour"] += 1
            if a[0] != b[0] and a[1] != b[1]:  # both at once: only by making a pair alike, or unlike
                assert len(old) == 2 and (old[0][:2] == old[1][:2]) != (new[0][:2] == new[1][:2])
    assert set(changes) == {"kind", "colour", "position", "swap", "turn"}, changes
    assert min(changes.values()) > 50, changes
    # Deterministic in the random generator it is given.
    assert S.near_miss(S.scene(3), random.Random(5)) == S.near_miss(S.scene(3), random.Random(5))


def test_backgrounds_and_colours_never_mix_up():
    palette = np.asarray(list(S.COLOURS.values()), np.float32)
    gaps = np.linalg.norm(palette[:, None] - palette[None], axis=-1) + np.eye(len(palette)) * 1e3
    assert gaps.min() > 90
    for seed in range(500):
        drawn = S.scene(seed)
        background = np.asarray(S.render(S.Scene((), drawn.layout, drawn.background)), np.float32)
        distance = np.linalg.norm(background[:, :, None] - palette[None, None], axis=-1)
        assert distance.min() > 100, f"seed {seed}: background close to a shape colour"


# --- richness ----------------------------------------------------------------------------------


def test_thousands_of_distinct_captions(scenes_20k):
    for language in S.LANGUAGES:
        distinct = {S.describe(drawn, language) for drawn in scenes_20k}
        assert len(distinct) >= 2000, f"{language}: only {len(distinct)} distinct captions"
    counts = Counter(len(drawn.shapes) for drawn in scenes_20k)
    assert 0.25 < counts[1] / len(scenes_20k) < 0.45
    identical = sum(len(d.shapes) == 2 and d.content[1] == d.content[2] for d in scenes_20k)
    assert identical > 500  # the plural grammar is seen often enough to learn


# --- language identification ------------------------------------------------------------------


def test_detect_language_on_every_caption():
    for content in S.all_contents():
        for language in S.LANGUAGES:
            caption = S.caption_of_content(content, language)
            assert S.detect_language(caption) == language, caption
    for seed in range(2000):
        drawn = S.scene(seed)
        for language in S.LANGUAGES:
            assert S.detect_language(S.describe(drawn, language)) == language


@pytest.mark.parametrize("text", ["", "12345 !!", "xyzzy qwerty", "lorem ipsum dolor", "red rojo",
                                  "una estrella", "a la"])
def test_detect_language_gives_none_without_evidence(text):
    assert S.detect_language(text) is None


def test_detect_language_on_free_text():
    assert S.detect_language("The image shows a red circle.") == "en"
    assert S.detect_language("La imagen muestra un círculo rojo.") == "es"
    assert S.detect_language("La imatge mostra un cercle vermell.") == "ca"
    assert S.detect_language("Una estrella roja a l’esquerra d'un cercle") == "ca"


# --- splits ------------------------------------------------------------------------------------


def test_splits_are_disjoint_by_seed_and_by_scene():
    seeds = {split: S.split_seeds(split, num, seed=0)
             for split, num in (("train", 20_000), ("val", 1000), ("test", 1000))}
    assert not set(seeds["train"]) & set(seeds["val"])
    assert not set(seeds["train"]) & set(seeds["test"])
    assert not set(seeds["val"]) & set(seeds["test"])
    scenes = {split: [S.scene(s) for s in ss] for split, ss in seeds.items()}
    contents = {split: {drawn.content for drawn in drawn_scenes} for split, drawn_scenes in scenes.items()}
    assert not contents["train"] & contents["val"]
    assert not contents["train"] & contents["test"]
    assert not contents["val"] & contents["test"]
    # Structural: each content has exactly one owner, whatever seed range it is drawn from.
    for split, drawn_scenes in scenes.items():
        assert all(S.split_of(drawn) == split for drawn in drawn_scenes)
    owners = Counter(S.split_of(content) for content in S.all_contents())
    assert owners["val"] > 150 and owners["test"] > 150 and owners["train"] > 4000
    # Held out are combinations: every shape, colour and layout of test is also seen in training.
    seen = Counter()
    for content in contents["train"]:
        seen[content[0]] += 1
        for kind, colour, size in content[1:]:
            seen[kind] += 1
            seen[colour] += 1
            seen[kind, colour] += 1
    for content in contents["test"] | contents["val"]:
        assert seen[content[0]]
        for kind, colour, _ in content[1:]:
            assert seen[kind] and seen[colour] and seen[kind, colour]
    # Every split has both single shapes and pairs.
    for split in ("val", "test"):
        assert {len(c) for c in contents[split]} == {2, 3}


def test_split_seeds_are_deterministic_and_blocked():
    assert S.split_seeds("val", 50, seed=3) == S.split_seeds("val", 50, seed=3)
    assert not set(S.split_seeds("val", 50, seed=3)) & set(S.split_seeds("val", 50, seed=4))
    with pytest.raises(ValueError, match="unknown split"):
        S.split_seeds("dev", 10)


def test_pretraining_texts_come_from_training_scenes_only():
    texts = S.texts_for_pretraining(3000, seed=0)
    assert len(texts) == 3000
    assert Counter(S.detect_language(t) for t in texts) == {"en": 1000, "es": 1000, "ca": 1000}
    held_out = {S.caption_of_content(c, language) for c in S.all_contents() if S.split_of(c) != "train"
                for language in S.LANGUAGES}
    assert not set(texts) & held_out


# --- shards ------------------------------------------------------------------------------------


def test_write_shards_reads_back(tmp_path):
    paths = S.write_shards(tmp_path / "a", "val", num_images=30, samples_per_shard=40, seed=1)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert len(samples) == 90
    per_image = defaultdict(set)
    for sample in samples:
        assert {key for key in sample if not key.startswith("__")} == {"png", "txt", "json"}
        meta = json.loads(sample["json"])
        language = meta["language"]
        assert sample["__key__"].endswith("-" + language)
        drawn = S.Scene.from_dict(meta["scene"])
        assert drawn == S.scene(meta["seed"])
        assert S.split_of(drawn) == "val"
        caption = sample["txt"].decode()
        assert caption == S.describe(drawn, language)
        assert S.detect_language(caption) == language
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.size == (32, 32)
        assert image.convert("RGB").tobytes() == S.render(drawn).tobytes()
        per_image[meta["seed"]].add(language)
    assert len(per_image) == 30 and all(langs == set(S.LANGUAGES) for langs in per_image.values())
    # Byte-identical when written again.
    again = S.write_shards(tmp_path / "b", "val", num_images=30, samples_per_shard=40, seed=1)
    for a, b in zip(paths, again):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_write_shards_one_language(tmp_path):
    paths = S.write_shards(tmp_path, "test", num_images=5, languages=("ca",))
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert [json.loads(s["json"])["language"] for s in samples] == ["ca"] * 5
    with pytest.raises(ValueError, match="unknown language"):
        S.write_shards(tmp_path, "test", num_images=5, languages=("fr",))
