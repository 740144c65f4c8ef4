"""What a synthetic scene is: one or two coloured shapes on a pale background, drawn from a seed.

A scene is what is drawn and where (`Scene`); its caption in English, Spanish or Catalan
(captions.py) is a deterministic function of what is drawn, so a model can reach exact match. The
demo trains at 32x32 pixels with 8-pixel patches (a 4x4 grid), and its calibration run showed that
nearly all errors were small shapes misnamed, so every shape spans at least 14 pixels (an area of
75 px or more, over one patch) and the shape kinds, colours and backgrounds were chosen to stay
apart at that resolution.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

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
NOISE_PATTERNS = 64

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
    noise_pattern: int  # which of the NOISE_PATTERNS fixed noise fields a "noise" background uses


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
                      period=round(rng.uniform(0.15, 0.3), 4), noise_pattern=rng.randrange(NOISE_PATTERNS))
