"""A procedural caption -> image world: one coloured shape on a plain background, e.g. "a red circle on a
blue background".

Every scene is drawn from a seed (numpy's PCG64), so the dataset is the same on every machine. Shapes are
rendered at 4x and box-filtered down, which gives anti-aliased edges (a model trained on aliased
staircases learns to draw them). Colours get a small per-image jitter so that a colour word names a
neighbourhood of RGB values, not one exact triple.

The caption grammar has len(SHAPES) x len(COLOURS) x (len(COLOURS) - 1) captions (shape and background
never share a colour); `demo_prompts` splits them into the AlignProp demo's training and eval prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# Eight well-separated colours (sRGB, 0..255): six hues plus white and black, so that a hue reward has
# somewhere to go from every scene and a brightness reward has both ends.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 45, 185),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
JITTER = 12  # max per-channel colour jitter (0..255 scale)
SUPERSAMPLE = 4
# Shape size as its circumradius over the image side: small enough to leave background around it,
# large enough that a triangle is still a triangle at 64 px.
RADIUS_RANGE = (0.16, 0.32)


@dataclass(frozen=True)
class Scene:
    """One image: what is drawn (the caption's words), where, and the exact jittered colours."""

    shape: str
    colour: str
    background: str
    cx: float  # shape centre, as a fraction of the image side
    cy: float
    radius: float  # circumradius, as a fraction of the image side
    fill: tuple[int, int, int]
    backdrop: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_captions() -> list[str]:
    """Every caption of the grammar, in a fixed order."""
    return [
        caption(shape, colour, background)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if background != colour
    ]


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """`n` scenes with uniformly drawn shape, colours (shape != background), size, position and jitter."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    scenes = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour, background = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        radius = rng.uniform(*RADIUS_RANGE)
        cx, cy = rng.uniform(radius, 1 - radius, size=2)  # the circumcircle stays inside the image
        fill, backdrop = (_jitter(COLOURS[name], rng) for name in (colour, background))
        scenes.append(Scene(shape, colour, background, float(cx), float(cy), float(radius), fill, backdrop))
    return scenes


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    noise = rng.integers(-JITTER, JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def render(scene: Scene, size: int) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 RGB array."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.backdrop)
    ImageDraw.Draw(image).polygon(_outline(scene, big), fill=scene.fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def _outline(scene: Scene, side: int) -> list[tuple[float, float]]:
    """Polygon vertices in pixels: a 96-gon circle, or a regular square/triangle with one flat side down."""
    corners = {"circle": 96, "square": 4, "triangle": 3}[scene.shape]
    # Rotate so the square is axis-aligned and the triangle points up (image y grows downward).
    start = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2}[scene.shape]
    cx, cy, r = scene.cx * side, scene.cy * side, scene.radius * side
    angles = (start + 2 * math.pi * i / corners for i in range(corners))
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def inscribed_radius(shape: str) -> float:
    """Radius of the largest circle about the centre that lies inside the shape, over its circumradius."""
    return {"circle": 1.0, "square": math.cos(math.pi / 4), "triangle": math.cos(math.pi / 3)}[shape]


def make_dataset(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """`n` images as uint8 (n, 3, size, size) and their captions; deterministic in `seed`."""
    scenes = sample_scenes(n, seed)
    pixels = np.stack([render(scene, size) for scene in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes]


def write_captioned_folder(folder, n: int, seed: int, size: int = 64) -> None:
    """`make_dataset(n, seed, size)` as a caption-image folder: NNNN.png with NNNN.txt holding its caption
    (what ReFL's method.pretrain_data reads; models/toy-shapes/pretrain is write_captioned_folder(..., 16,
    seed=7))."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels, captions = make_dataset(n, seed, size)
    for i, (image, text) in enumerate(zip(pixels, captions, strict=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(text + "\n")


# The demo's prompts: AlignProp trains on DEMO_TRAIN_SIZE captions and evaluates on EVAL_PROMPTS, none of
# which it trains on. The eval scenes cover every shape and mostly cool or neutral colours, so that a
# warm-hue reward has a long way to move them.
EVAL_PROMPTS = (
    "a yellow circle on a blue background",
    "a white square on a green background",
    "a red triangle on a purple background",
    "an orange circle on a black background",
)
DEMO_TRAIN_SIZE = 32


def demo_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval): DEMO_TRAIN_SIZE captions drawn without replacement from the rest of the grammar."""
    rest = [c for c in all_captions() if c not in EVAL_PROMPTS]
    picks = np.random.default_rng(seed).choice(len(rest), size=DEMO_TRAIN_SIZE, replace=False)
    return [rest[i] for i in sorted(picks)], list(EVAL_PROMPTS)
