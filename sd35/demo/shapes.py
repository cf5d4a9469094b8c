"""Captioned synthetic scenes, and a pixel-based detector that reads them back.

A scene is one flat-coloured shape (circle, square or triangle) in one quadrant of a plain background,
captioned like "a red circle at the top left on a blue background". Everything is deterministic from a seed.
The detector recovers colour, shape and position from pixels alone, so generated images can be scored
against their prompts (the prompt-adherence check).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZE = 64
SQUARE_FILL = 0.85  # see detect()


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every combination whose shape and background colours differ (7 * 3 * 4 * 6 = 504)."""
    return [Scene(c, s, p, b) for c in COLOURS for s in SHAPES for p in POSITIONS for b in COLOURS if b != c]


def render(scene: Scene, rng: random.Random | None = None, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image; ``rng`` jitters the shape's size and place inside its quadrant."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    half = size // 2
    extent = rng.uniform(0.55, 0.75) * half
    cx = (half if "right" in scene.position else 0) + half / 2 + rng.uniform(-0.08, 0.08) * half
    cy = (half if "bottom" in scene.position else 0) + half / 2 + rng.uniform(-0.08, 0.08) * half
    r = extent / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def dataset(n: int, seed: int = 0, size: int = SIZE) -> list[tuple[Image.Image, Scene]]:
    """``n`` scenes cycling through every combination in a seeded order, each with its own jitter."""
    rng = random.Random(seed)
    scenes = all_scenes()
    out = []
    while len(out) < n:
        order = scenes[:]
        rng.shuffle(order)
        for scene in order[: n - len(out)]:
            out.append((render(scene, random.Random(rng.random()), size), scene))
    return out


@dataclass(frozen=True)
class Detection:
    colour: str | None
    shape: str | None
    position: str | None
    background: str | None


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(1)))]


def detect(image: Image.Image) -> Detection:
    """Read colour, shape and position from pixels.

    Background: the nearest palette colour to the median of the border pixels. Foreground: pixels far from
    the background's measured colour. Colour: nearest palette colour to the foreground's median. Position:
    the quadrant of the foreground's centroid. Shape: how much of its bounding box the foreground fills
    (square ~1, circle ~pi/4, triangle ~1/2), with the triangle also told apart by its widening rows.
    """
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = px.shape
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg_rgb = np.median(border, axis=0)
    distance = np.sqrt(((px - bg_rgb) ** 2).sum(-1))
    mask = distance > 60
    if mask.sum() < 0.01 * h * w:
        return Detection(None, None, None, _nearest_colour(bg_rgb))
    ys, xs = np.nonzero(mask)
    colour = _nearest_colour(np.median(px[mask], axis=0))
    cy, cx = ys.mean(), xs.mean()
    position = f"{'top' if cy < h / 2 else 'bottom'} {'left' if cx < w / 2 else 'right'}"
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = mask[y0 : y1 + 1, x0 : x1 + 1].mean()
    rows = mask[y0 : y1 + 1, x0 : x1 + 1].sum(1).astype(np.float32)
    third = max(1, len(rows) // 3)
    widening = rows[-third:].mean() / max(rows[:third].mean(), 1.0)
    if fill > SQUARE_FILL:
        shape = "square"
    elif widening > 1.8 or fill < 0.62:
        shape = "triangle"
    else:
        shape = "circle"
    return Detection(colour, shape, position, _nearest_colour(bg_rgb))
