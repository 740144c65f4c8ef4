"""Synthetic multilingual captions for the offline demo: coloured shapes on pastel backgrounds.

A scene is one or two shapes; its caption in English, Spanish or Catalan is a deterministic function
of what is drawn, so a model can reach exact match. The demo trains at 32x32 pixels with 8-pixel
patches (a 4x4 grid), and its calibration run showed that nearly all errors were small shapes
misnamed, so every shape spans at least 14 pixels (an area of 75 px or more, over one patch) and
the shape kinds, colours and backgrounds were chosen to stay apart at that resolution.

The pieces, top to bottom:
- `scene(seed)` draws a `Scene` (what is drawn and where) from a seed;
- `render(scene, size)` paints it, anti-aliased by supersampling;
- `describe(scene, language)` words it from a small grammar per language;
- `split_of(scene)` assigns every caption-level content to exactly one of train / val / test, so
  held-out scenes are unseen combinations of attributes that each appear in training;
- `write_shards(...)` streams (png, txt, json) samples into WebDataset tar shards;
- `detect_language(text)` tells en / es / ca apart for the language-fidelity metric.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

LANGUAGES: tuple[str, ...] = ("en", "es", "ca")
LANGUAGE_NAMES: dict[str, str] = {"en": "English", "es": "Spanish", "ca": "Catalan"}

SPLITS: tuple[str, ...] = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------
# What can be drawn
# ---------------------------------------------------------------------------------------------

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond")

# Saturated, far apart in RGB and far from every background (all backgrounds are pale).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35),
    "orange": (245, 120, 0),
    "yellow": (240, 215, 25),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "black": (25, 25, 25),
}

# Pale tones only (every channel >= 205): a background is never mistaken for a shape colour.
BACKGROUND_COLOURS: tuple[tuple[int, int, int], ...] = (
    (250, 250, 250),
    (225, 225, 225),
    (245, 238, 215),
    (215, 230, 245),
    (220, 240, 220),
    (245, 225, 230),
    (232, 226, 245),
)
BACKGROUND_KINDS: tuple[str, ...] = ("flat", "gradient", "stripes", "noise")

# Single shapes: small ones sit at one of five places, large ones fill the centre.
POSITIONS: tuple[str, ...] = ("centre", "left", "right", "top", "bottom")
# Two shapes: side by side ("row", the left one first) or stacked ("column", the top one first).
PAIR_LAYOUTS: tuple[str, ...] = ("row", "column")
LAYOUTS: tuple[str, ...] = POSITIONS + PAIR_LAYOUTS

# Geometry in pixels of a 32-pixel image; everything scales with the rendered size. A shape's
# extent is the side of its bounding square. Small and pair shapes (14-15 px) cover 70-150 px,
# more than one 8x8 patch even for the thinnest kinds; large ones (22-25 px) have twice the area.
_REFERENCE = 32.0
_SMALL_EXTENT = (14.0, 15.0)
_PAIR_EXTENT = (14.0, 15.0)
_LARGE_EXTENT = (22.0, 25.0)
_POSITION_CENTRES = {"centre": (16.0, 16.0), "left": (8.5, 16.0), "right": (23.5, 16.0),
                     "top": (16.0, 8.5), "bottom": (16.0, 23.5)}
_JITTER = 1.0  # px: enough to vary the pixels, far too little to blur one position into another
# A fixed pool of noise fields, drawn once per size: a fresh field per image would cost more than
# the rest of the rendering, and 64 of them are plenty of texture variety.
_NOISE_PATTERNS = 64

# How often each kind of scene is drawn. Two-shape scenes carry most of the caption variety.
_P_SINGLE = 0.35
_P_LARGE_GIVEN_SINGLE = 0.3
_P_IDENTICAL_GIVEN_PAIR = 0.1  # "two red stars ...": rare by chance (1/49), so drawn on purpose


@dataclass(frozen=True)
class Shape:
    """One drawn shape. Centre and extent are fractions of the image side (size independent)."""

    kind: str
    colour: str
    size: str | None  # "small" / "large" for single shapes; None in pairs (the caption omits size)
    x: float
    y: float
    extent: float


@dataclass(frozen=True)
class Background:
    """A pale background: flat, a gradient, faint stripes or faint noise between two pale tones."""

    kind: str
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]
    angle: float  # gradient / stripe direction, radians
    period: float  # stripe period as a fraction of the image side
    noise_pattern: int  # which of the _NOISE_PATTERNS fixed noise fields a "noise" background uses


@dataclass(frozen=True)
class Scene:
    """What is drawn. `layout` is a position for one shape, "row" or "column" for two."""

    shapes: tuple[Shape, ...]
    layout: str
    background: Background

    @property
    def content(self) -> tuple:
        """What the caption states: the scene's identity for captions and for splits."""
        return (self.layout,) + tuple((s.kind, s.colour, s.size) for s in self.shapes)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (dataclasses.asdict deep-copies, and costs as much as rendering)."""
        return {"shapes": [dict(vars(shape)) for shape in self.shapes], "layout": self.layout,
                "background": dict(vars(self.background))}

    @staticmethod
    def from_dict(data: dict) -> Scene:
        """The inverse of `to_dict`, e.g. for the `scene` field of a shard's json."""
        background = dict(data["background"])
        for key in ("colour_a", "colour_b"):
            background[key] = tuple(background[key])
        return Scene(shapes=tuple(Shape(**shape) for shape in data["shapes"]), layout=data["layout"],
                     background=Background(**background))


def scene(seed: int) -> Scene:
    """The scene drawn for `seed`: the same in every language, every process and every platform."""
    rng = random.Random(seed)

    def kind_colour() -> tuple[str, str]:
        return rng.choice(SHAPE_KINDS), rng.choice(tuple(COLOURS))

    if rng.random() < _P_SINGLE:
        kind, colour = kind_colour()
        if rng.random() < _P_LARGE_GIVEN_SINGLE:
            size, layout, extent = "large", "centre", rng.uniform(*_LARGE_EXTENT)
        else:
            size, layout, extent = "small", rng.choice(POSITIONS), rng.uniform(*_SMALL_EXTENT)
        cx, cy = _POSITION_CENTRES[layout]
        shapes = (_shape(kind, colour, size, cx + rng.uniform(-_JITTER, _JITTER),
                         cy + rng.uniform(-_JITTER, _JITTER), extent),)
    else:
        layout = rng.choice(PAIR_LAYOUTS)
        first = kind_colour()
        if rng.random() < _P_IDENTICAL_GIVEN_PAIR:
            second = first
        else:
            second = kind_colour()
            while second == first:
                second = kind_colour()
        # Along the pair's line the shapes fill the two halves (a pixel apart at most size), so
        # "left of" / "above" is never in doubt; across it the line sits on a patch boundary or
        # a patch centre line (8, 16 or 24 px), so each shape covers the same 2x2 patches wherever
        # it is: the calibration run's errors were shapes cut awkwardly by the patch grid.
        across = rng.choice((8.0, 16.0, 24.0))
        along = (8.0, 24.0)
        shapes = []
        for (kind, colour), a in zip((first, second), along):
            b = min(max(across + rng.uniform(-_JITTER, _JITTER), 8.0), 24.0)
            x, y = (a, b) if layout == "row" else (b, a)
            shapes.append(_shape(kind, colour, None, x, y, rng.uniform(*_PAIR_EXTENT)))
        shapes = tuple(shapes)
    return Scene(shapes=shapes, layout=layout, background=_background(rng))


def near_miss(base: Scene, rng: random.Random) -> Scene:
    """A scene whose caption differs from `base`'s in one detail: a shape's kind or colour, the
    position of a single shape, or for a pair the order, the orientation (row <-> column) or
    whether both shapes are alike. The background and the geometry otherwise stay.

    Contrastive training with such hard negatives in the batch (NegCLIP's recipe) is what makes a
    tower encode where things are and which colour goes with which shape: against random captions
    a bag of attributes already wins, and the captioner then gets positions and pairings wrong.
    """
    shapes = list(base.shapes)
    i = rng.randrange(len(shapes))
    changes = ["kind", "colour"]
    if len(shapes) == 1 and shapes[0].size == "small":
        changes.append("position")
    if len(shapes) == 2:
        changes += ["swap", "turn", "alike"]
    while True:
        change = rng.choice(changes)
        layout = base.layout
        if change == "kind":
            shapes[i] = replace(shapes[i], kind=rng.choice([k for k in SHAPE_KINDS if k != shapes[i].kind]))
        elif change == "colour":
            shapes[i] = replace(shapes[i], colour=rng.choice([c for c in COLOURS if c != shapes[i].colour]))
        elif change == "position":
            layout = rng.choice([p for p in POSITIONS if p != base.layout])
            old_x, old_y = _POSITION_CENTRES[base.layout]
            new_x, new_y = _POSITION_CENTRES[layout]
            shape = shapes[0]
            shapes[0] = replace(shape, x=round(shape.x + (new_x - old_x) / _REFERENCE, 4),
                                y=round(shape.y + (new_y - old_y) / _REFERENCE, 4))
        elif change == "swap":
            (a, b) = shapes
            shapes = [replace(a, kind=b.kind, colour=b.colour), replace(b, kind=a.kind, colour=a.colour)]
        elif change == "turn":  # mirror about the diagonal: positions transpose, outlines stay upright
            layout = "column" if base.layout == "row" else "row"
            shapes = [replace(shape, x=shape.y, y=shape.x) for shape in shapes]
        else:  # "alike": make the pair identical, or an identical pair different
            a, b = shapes
            if (a.kind, a.colour) == (b.kind, b.colour):
                shapes[1] = replace(b, kind=rng.choice([k for k in SHAPE_KINDS if k != a.kind]))
            else:
                shapes[1] = replace(b, kind=a.kind, colour=a.colour)
        changed = Scene(shapes=tuple(shapes), layout=layout, background=base.background)
        if changed.content != base.content:
            return changed
        shapes = list(base.shapes)


def _shape(kind: str, colour: str, size: str | None, x: float, y: float, extent: float) -> Shape:
    return Shape(kind, colour, size, round(x / _REFERENCE, 4), round(y / _REFERENCE, 4),
                 round(extent / _REFERENCE, 4))


def _background(rng: random.Random) -> Background:
    kind = rng.choice(BACKGROUND_KINDS)
    colour_a = rng.choice(BACKGROUND_COLOURS)
    colour_b = rng.choice(BACKGROUND_COLOURS)
    return Background(kind, colour_a, colour_b, angle=round(rng.uniform(0.0, 2 * math.pi), 4),
                      period=round(rng.uniform(0.15, 0.3), 4), noise_pattern=rng.randrange(_NOISE_PATTERNS))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels.

    Shapes are drawn as masks at `supersample` times the size and box-averaged down, which gives
    exact area anti-aliasing; the smooth background is computed at the final size directly.
    """
    if size < 8:
        raise ValueError(f"size {size} is too small to show a shape; use at least 8 (the demo uses 32)")
    pixels = _background_pixels(scene.background, size)
    big = size * supersample
    for shape in scene.shapes:
        mask = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, big)
        alpha = np.asarray(mask.reduce(supersample), dtype=np.float32)[..., None] / 255.0
        pixels = pixels * (1.0 - alpha) + np.asarray(COLOURS[shape.colour], np.float32) * alpha
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _background_pixels(background: Background, size: int) -> np.ndarray:
    a = np.asarray(background.colour_a, np.float32)
    b = np.asarray(background.colour_b, np.float32)
    if background.kind == "flat":
        return np.broadcast_to(a, (size, size, 3)).copy()
    if background.kind == "noise":
        return np.clip(a + _noise_fields(size)[background.noise_pattern], 0, 255)
    xs, ys = _pixel_grid(size)
    along = xs * math.cos(background.angle) + ys * math.sin(background.angle)
    if background.kind == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    else:  # stripes, soft so they never form edges that look like a shape
        t = 0.5 + 0.5 * np.sin(2 * math.pi * along / background.period)
    return a + (b - a) * t[..., None]


@functools.lru_cache(maxsize=4)
def _noise_fields(size: int) -> np.ndarray:
    # RandomState's stream is frozen by numpy, so the same scene renders the same everywhere.
    rng = np.random.RandomState(size)
    return rng.uniform(-10, 10, (_NOISE_PATTERNS, size, size, 1)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return tuple(np.meshgrid(coords, coords))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, canvas: int) -> None:
    # Every kind, the circle too, is a polygon: PIL's ellipse overshoots its box by a pixel, which
    # after downsampling leaks a faint ring outside the shape and shifts it off centre.
    cx, cy, r = shape.x * canvas, shape.y * canvas, shape.extent * canvas / 2
    draw.polygon([(cx + r * px, cy + r * py) for px, py in _OUTLINES[shape.kind]], fill=255)


def _centred(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    # Outlines sit on their area centroid, not their bounding box: "on the left" / "in the centre"
    # then name where the colour mass is, which is what the encoder sees (a triangle's or a heart's
    # box centre is 1-2 px off its mass at 32 px, a third of the way to the next position).
    area = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        cross = x0 * y1 - x1 * y0
        area += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    cx, cy = cx / (3 * area), cy / (3 * area)
    moved = [(x - cx, y - cy) for x, y in points]
    scale = max(max(abs(x), abs(y)) for x, y in moved)
    return [(x / scale, y / scale) for x, y in moved]


def _outline_heart(steps: int = 48) -> list[tuple[float, float]]:
    # The classic heart curve, with the point at the bottom.
    return _centred([(16 * math.sin(t) ** 3,
                      -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
                     for t in (2 * math.pi * i / steps for i in range(steps))])


def _outline_star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    # A fat star (inner radius half the outer) keeps its arms visible at 14 px.
    verts = []
    for i in range(2 * points):
        radius = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * i / points
        verts.append((radius * math.cos(a), radius * math.sin(a)))
    return verts


def _outline_cross(h: float = 0.36) -> list[tuple[float, float]]:
    # A plus sign with arms 0.36 of the extent thick: 5 px at 14 px, solid after downsampling.
    return [(-h, -1), (h, -1), (h, -h), (1, -h), (1, h), (h, h), (h, 1), (-h, 1), (-h, h),
            (-1, h), (-1, -h), (-h, -h)]


# Square and diamond differ by a 45-degree turn; the diamond is also narrower than tall, so the
# two stay apart even when anti-aliasing rounds their corners.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "circle": [(math.cos(2 * math.pi * i / 64), math.sin(2 * math.pi * i / 64)) for i in range(64)],
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -1.0), (1.0, 0.5), (-1.0, 0.5)],  # centroid at the origin
    "star": _outline_star(),
    "heart": _outline_heart(),
    "cross": _outline_cross(),
    "diamond": [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)],
}


# ---------------------------------------------------------------------------------------------
# Grammars
# ---------------------------------------------------------------------------------------------

# English: (singular, plural). Spanish and Catalan: (singular, plural, gender).
_NOUNS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {"circle": ("circle", "circles"), "square": ("square", "squares"),
           "triangle": ("triangle", "triangles"), "star": ("star", "stars"),
           "heart": ("heart", "hearts"), "cross": ("cross", "crosses"),
           "diamond": ("diamond", "diamonds")},
    "es": {"circle": ("círculo", "círculos", "m"), "square": ("cuadrado", "cuadrados", "m"),
           "triangle": ("triángulo", "triángulos", "m"), "star": ("estrella", "estrellas", "f"),
           "heart": ("corazón", "corazones", "m"), "cross": ("cruz", "cruces", "f"),
           "diamond": ("rombo", "rombos", "m")},
    "ca": {"circle": ("cercle", "cercles", "m"), "square": ("quadrat", "quadrats", "m"),
           "triangle": ("triangle", "triangles", "m"), "star": ("estrella", "estrelles", "f"),
           "heart": ("cor", "cors", "m"), "cross": ("creu", "creus", "f"),
           "diamond": ("rombe", "rombes", "m")},
}

# Spanish and Catalan colour adjectives: (masc. sg., fem. sg., masc. pl., fem. pl.). Colours named
# after a fruit ("naranja", "taronja") stay invariable, as both academies recommend.
_COLOUR_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "es": {"red": ("rojo", "roja", "rojos", "rojas"),
           "orange": ("naranja", "naranja", "naranja", "naranja"),
           "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
           "green": ("verde", "verde", "verdes", "verdes"),
           "blue": ("azul", "azul", "azules", "azules"),
           "purple": ("morado", "morada", "morados", "moradas"),
           "black": ("negro", "negra", "negros", "negras")},
    "ca": {"red": ("vermell", "vermella", "vermells", "vermelles"),
           "orange": ("taronja", "taronja", "taronja", "taronja"),
           "yellow": ("groc", "groga", "grocs", "grogues"),
           "green": ("verd", "verda", "verds", "verdes"),
           "blue": ("blau", "blava", "blaus", "blaves"),
           "purple": ("morat", "morada", "morats", "morades"),
           "black": ("negre", "negra", "negres", "negres")},
}

_POSITION_PHRASES: dict[str, dict[str, str]] = {
    "en": {"centre": "in the centre", "left": "on the left", "right": "on the right",
           "top": "at the top", "bottom": "at the bottom"},
    "es": {"centre": "en el centro", "left": "a la izquierda", "right": "a la derecha",
           "top": "arriba", "bottom": "abajo"},
    "ca": {"centre": "al centre", "left": "a l'esquerra", "right": "a la dreta",
           "top": "a dalt", "bottom": "a baix"},
}


def describe(scene: Scene, language: str) -> str:
    """The caption of `scene` in `language` ("en", "es" or "ca"); it states only what is visible."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose one of {LANGUAGES}")
    return _caption(scene.content, language)


@functools.lru_cache(maxsize=None)
def _caption(content: tuple, language: str) -> str:
    layout, *shapes = content
    return {"en": _caption_en, "es": _caption_es, "ca": _caption_ca}[language](layout, shapes)


def _caption_en(layout: str, shapes: list[tuple]) -> str:
    def phrase(kind: str, colour: str, size: str | None = None) -> str:
        words = " ".join(w for w in (size, colour, _NOUNS["en"][kind][0]) if w)
        return ("an " if words[0] in "aeiou" else "a ") + words

    if len(shapes) == 1:
        kind, colour, size = shapes[0]
        if size == "large":
            return phrase(kind, colour, size)
        return f"{phrase(kind, colour, size)} {_POSITION_PHRASES['en'][layout]}"
    (k1, c1, _), (k2, c2, _) = shapes
    if (k1, c1) == (k2, c2):
        plural = f"two {c1} {_NOUNS['en'][k1][1]}"
        return f"{plural} side by side" if layout == "row" else f"{plural}, one above the other"
    if layout == "row":
        return f"{phrase(k1, c1)} on the left and {phrase(k2, c2)} on the right"
    return f"{phrase(k1, c1)} above {phrase(k2, c2)}"


def _romance_phrase(language: str, kind: str, colour: str, size: str | None = None) -> str:
    # Article, noun, colour, size: the adjectives follow the noun and agree with its gender.
    singular, _, gender = _NOUNS[language][kind]
    feminine = gender == "f"
    article = "una" if feminine else "un"
    words = [article, singular, _COLOUR_WORDS[language][colour][1 if feminine else 0]]
    if size is not None:
        words.append({
            ("es", "small"): ("pequeño", "pequeña"), ("es", "large"): ("grande", "grande"),
            ("ca", "small"): ("petit", "petita"), ("ca", "large"): ("gran", "gran"),
        }[language, size][1 if feminine else 0])
    return " ".join(words)


def _romance_plural(language: str, kind: str, colour: str) -> tuple[str, bool]:
    _, plural, gender = _NOUNS[language][kind]
    feminine = gender == "f"
    two = "dues" if language == "ca" and feminine else "dos"
    return f"{two} {plural} {_COLOUR_WORDS[language][colour][3 if feminine else 2]}", feminine


def _romance_single(language: str, layout: str, shape: tuple) -> str:
    # A large shape fills the centre, so its caption names no position.
    kind, colour, size = shape
    phrase = _romance_phrase(language, kind, colour, size)
    return phrase if size == "large" else f"{phrase} {_POSITION_PHRASES[language][layout]}"


def _caption_es(layout: str, shapes: list[tuple]) -> str:
    if len(shapes) == 1:
        return _romance_single("es", layout, shapes[0])
    (k1, c1, _), (k2, c2, _) = shapes
    if (k1, c1) == (k2, c2):
        plural, feminine = _romance_plural("es", k1, c1)
        one, other = ("una", "de la otra") if feminine else ("uno", "del otro")
        relation = "al lado" if layout == "row" else "encima"
        return f"{plural}, {one} {relation} {other}"
    first, second = _romance_phrase("es", k1, c1), _romance_phrase("es", k2, c2)
    if layout == "row":
        return f"{first} a la izquierda y {second} a la derecha"
    return f"{first} encima de {second}"


def _caption_ca(layout: str, shapes: list[tuple]) -> str:
    if len(shapes) == 1:
        return _romance_single("ca", layout, shapes[0])
    (k1, c1, _), (k2, c2, _) = shapes
    if (k1, c1) == (k2, c2):
        plural, feminine = _romance_plural("ca", k1, c1)
        one, other = ("una", "l'altra") if feminine else ("un", "l'altre")
        relation = "al costat" if layout == "row" else "damunt"
        return f"{plural}, {one} {relation} de {other}"
    first, second = _romance_phrase("ca", k1, c1), _romance_phrase("ca", k2, c2)
    if layout == "row":
        return f"{first} a l'esquerra i {second} a la dreta"
    # "de" elides before the vowel of "un" / "una": "damunt d'una estrella".
    return f"{first} damunt d'{second}"


def all_contents() -> Iterator[tuple]:
    """Every caption-level content a scene can have (what `Scene.content` returns)."""
    colours = tuple(COLOURS)
    for layout in POSITIONS:
        for kind in SHAPE_KINDS:
            for colour in colours:
                yield (layout, (kind, colour, "small"))
                if layout == "centre":
                    yield (layout, (kind, colour, "large"))
    objects = [(k, c) for k in SHAPE_KINDS for c in colours]
    for layout in PAIR_LAYOUTS:
        for first in objects:
            for second in objects:
                yield (layout, (*first, None), (*second, None))


def caption_of_content(content: tuple, language: str) -> str:
    """The caption for a content tuple from `all_contents()` (equal to `describe` of its scenes)."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose one of {LANGUAGES}")
    return _caption(tuple(content), language)


# ---------------------------------------------------------------------------------------------
# Language identification
# ---------------------------------------------------------------------------------------------

# A few frequent words beyond the captions, so short free text around the demo's prompts and
# answers is judged too (a model that drifts into "the image shows" is still caught as English).
_EXTRA_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("the", "is", "of", "with", "and", "this", "image", "shows", "there", "picture", "in"),
    "es": ("el", "los", "las", "y", "con", "es", "esta", "imagen", "muestra", "hay", "en"),
    "ca": ("el", "els", "les", "i", "amb", "és", "aquesta", "imatge", "mostra", "hi", "ha", "en"),
}
_WORD = re.compile(r"[^\W\d_]+'?")


def _words(text: str) -> list[str]:
    # Catalan elisions stay marked ("l'", "d'"): they are among its clearest signs.
    return _WORD.findall(text.lower().replace("’", "'"))


@functools.lru_cache(maxsize=1)
def _exclusive_lexicons() -> dict[str, frozenset[str]]:
    vocab = {language: set(_EXTRA_WORDS[language]) for language in LANGUAGES}
    for content in all_contents():
        for language in LANGUAGES:
            vocab[language].update(_words(_caption(content, language)))
    # Only words that belong to exactly one language vote ("estrella", "una", "triangle" do not).
    return {language: frozenset(words - set().union(*(vocab[o] for o in LANGUAGES if o != language)))
            for language, words in vocab.items()}


def detect_language(text: str) -> str | None:
    """The language of `text` ("en", "es" or "ca"), by counting words found only in that language's
    lexicon (captions plus a few function words); None on a tie, including no such word at all."""
    lexicons = _exclusive_lexicons()
    counts = {language: 0 for language in LANGUAGES}
    for word in _words(text):
        for language, lexicon in lexicons.items():
            if word in lexicon:
                counts[language] += 1
    best = max(counts.values())
    winners = [language for language, count in counts.items() if count == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


# ---------------------------------------------------------------------------------------------
# Splits, samples and shards
# ---------------------------------------------------------------------------------------------

# Per mille of contents held out. A content is held out as a whole, so a val/test caption never
# occurs in training, while each of its shapes, colours and positions does.
_HELD_OUT_PER_MILLE = {"test": 50, "val": 50}
# Disjoint seed ranges per split; `seed` picks a block of _SEED_BLOCK seeds inside the range.
_SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
_SEED_BLOCK = 10_000_000


def split_of(scene_or_content: Scene | tuple) -> str:
    """The split ("train", "val" or "test") that owns this scene's content; a pure function of the
    caption-level content, so no content can ever land in two splits."""
    content = scene_or_content.content if isinstance(scene_or_content, Scene) else tuple(scene_or_content)
    bucket = int.from_bytes(hashlib.sha256(repr(content).encode()).digest()[:8], "big") % 1000
    if bucket < _HELD_OUT_PER_MILLE["test"]:
        return "test"
    if bucket < _HELD_OUT_PER_MILLE["test"] + _HELD_OUT_PER_MILLE["val"]:
        return "val"
    return "train"


def split_seeds(split: str, num: int, seed: int = 0) -> list[int]:
    """The first `num` scene seeds of `split`: taken from the split's own seed range (block `seed`)
    and kept only where the scene's content belongs to the split."""
    return [image_seed for image_seed, _ in _split_scenes(split, num, seed)]


def _split_scenes(split: str, num: int, seed: int) -> list[tuple[int, Scene]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if not 0 <= seed < 100:
        raise ValueError(f"seed {seed} is out of range; use 0 <= seed < 100 (each picks its own block of seeds)")
    start = _SPLIT_SEED_BASE[split] + seed * _SEED_BLOCK
    found = []
    for candidate in range(start, start + _SEED_BLOCK):
        if len(found) == num:
            break
        drawn = scene(candidate)
        if split_of(drawn) == split:
            found.append((candidate, drawn))
    if len(found) < num:
        raise ValueError(f"asked for {num} {split} scenes; one seed block holds only {len(found)}")
    return found


def sample(seed: int, language: str, size: int = 32) -> tuple[Image.Image, str]:
    """One example: the image of `scene(seed)` and its caption in `language`."""
    drawn = scene(seed)
    return render(drawn, size), describe(drawn, language)


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG: lossless, and about 1 kB at 32x32."""
    buffer = io.BytesIO()
    # Level 1 is twice as fast as the default and only ~3% larger on these tiny images.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_shards(
    directory: str | os.PathLike,
    split: str,
    num_images: int,
    languages: Sequence[str] = LANGUAGES,
    samples_per_shard: int = 10_000,
    seed: int = 0,
    size: int = 32,
) -> list[str]:
    """Write `num_images` scenes of `split`, each once per language, as WebDataset tar shards.

    A sample is `{key}.png` (the image), `{key}.txt` (the caption) and `{key}.json`
    (`{"language": ..., "scene": ...}`); one image's languages follow each other. Shards are named
    `{split}-000000.tar`, ...; the list of their paths is returned. Deterministic in (split,
    num_images, languages, seed, size).
    """
    import webdataset as wds  # imported here so the rest of the module works without it

    for language in languages:
        if language not in LANGUAGES:
            raise ValueError(f"unknown language {language!r}; choose from {LANGUAGES}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(os.fspath(directory).replace("%", "%%"), f"{split}-%06d.tar")
    written = 0
    # An integer mtime keeps tarfile from adding a PAX header to every member (twice the size and
    # time) and makes the shards byte-identical from run to run.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0, encoder=False) as sink:
        for image_seed, drawn in _split_scenes(split, num_images, seed):
            image = png_bytes(render(drawn, size))
            scene_dict = drawn.to_dict()
            for language in languages:
                sink.write({
                    "__key__": f"{split}-{image_seed:010d}-{language}",
                    "png": image,
                    "txt": describe(drawn, language).encode(),
                    "json": json.dumps({"language": language, "seed": image_seed, "scene": scene_dict},
                                       ensure_ascii=False).encode(),
                })
                written += 1
    # The writer opens a new shard only when a sample arrives for it, so this is what exists.
    return [pattern % i for i in range(max(1, math.ceil(written / samples_per_shard)))]


def texts_for_pretraining(num: int, seed: int = 0) -> list[str]:
    """`num` captions for pre-training the decoder as a text LM, the languages taking turns; all
    from training scenes, so no held-out caption leaks into the decoder."""
    seeds = split_seeds("train", num, seed)
    return [describe(scene(s), LANGUAGES[i % len(LANGUAGES)]) for i, s in enumerate(seeds)]
