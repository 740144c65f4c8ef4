"""Painting a scene: `render(scene, size)`, anti-aliased by supersampling."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from multimodal.demo.synthetic.scenes import COLOURS, NOISE_PATTERNS, Background, Scene, Shape


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
    return rng.uniform(-10, 10, (NOISE_PATTERNS, size, size, 1)).astype(np.float32)


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
