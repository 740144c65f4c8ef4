"""Synthetic multilingual captions for the offline demo: coloured shapes on pastel backgrounds.

A scene is one or two shapes; its caption in English, Spanish or Catalan is a deterministic function
of what is drawn, so a model can reach exact match. Read in this order:
- scenes.py    `scene(seed)` draws a `Scene` (what is drawn and where) from a seed; `near_miss`
               changes one captioned detail (the contrastive pre-training's hard negatives);
- render.py    `render(scene, size)` paints it, anti-aliased by supersampling;
- captions.py  `describe(scene, language)` words it from a small grammar per language;
- language.py  `detect_language(text)` tells en / es / ca apart for the language-fidelity metric;
- shards.py    `split_of(scene)` assigns every caption-level content to exactly one of train / val /
               test, so held-out scenes are unseen combinations of attributes that each appear in
               training; `write_shards(...)` streams (png, txt, json) samples into WebDataset shards.
"""

from multimodal.demo.synthetic.captions import (
    LANGUAGE_NAMES,
    LANGUAGES,
    all_contents,
    caption_of_content,
    describe,
)
from multimodal.demo.synthetic.language import detect_language
from multimodal.demo.synthetic.render import render
from multimodal.demo.synthetic.scenes import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    LAYOUTS,
    PAIR_LAYOUTS,
    POSITIONS,
    SHAPE_KINDS,
    Background,
    Scene,
    Shape,
    near_miss,
    scene,
)
from multimodal.demo.synthetic.shards import (
    SPLITS,
    png_bytes,
    sample,
    split_of,
    split_seeds,
    texts_for_pretraining,
    write_shards,
)

__all__ = [
    "BACKGROUND_COLOURS", "BACKGROUND_KINDS", "COLOURS", "LANGUAGES", "LANGUAGE_NAMES", "LAYOUTS",
    "PAIR_LAYOUTS", "POSITIONS", "SHAPE_KINDS", "SPLITS", "Background", "Scene", "Shape",
    "all_contents", "caption_of_content", "describe", "detect_language", "near_miss", "png_bytes",
    "render", "sample", "scene", "split_of", "split_seeds", "texts_for_pretraining", "write_shards",
]
