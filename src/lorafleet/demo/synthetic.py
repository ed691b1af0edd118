"""Synthetic multimodal tasks for the demo, one per department, drawn with Pillow.

Every answer depends on the picture (a shape's colour, which shape it is, how many dots), so an
adapter can only score by learning to read the image; the base model, never trained on these
questions, cannot.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")


@dataclass(frozen=True)
class Task:
    department: str
    question: str
    draw: Callable[[random.Random], tuple[Image.Image, str]]  # -> (image, answer)


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _random_box(rng: random.Random, low: int = 26, high: int = 48) -> tuple[int, int, int, int]:
    side = rng.randint(low, high)
    x0, y0 = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
    return x0, y0, x0 + side, y0 + side


def draw_colour(rng: random.Random) -> tuple[Image.Image, str]:
    image, draw = _canvas()
    colour = rng.choice(list(COLOURS))
    _draw_shape(draw, rng.choice(SHAPES), _random_box(rng), COLOURS[colour])
    return image, colour


def draw_shape(rng: random.Random) -> tuple[Image.Image, str]:
    image, draw = _canvas()
    shape = rng.choice(SHAPES)
    _draw_shape(draw, shape, _random_box(rng, 34, 56), COLOURS[rng.choice(list(COLOURS))])
    return image, shape


def draw_count(rng: random.Random) -> tuple[Image.Image, str]:
    image, draw = _canvas()
    count = rng.randint(1, len(COUNTS))
    cells = rng.sample([(x, y) for x in range(3) for y in range(3)], count)  # dots never overlap
    for x, y in cells:
        cx, cy = 11 + 21 * x, 11 + 21 * y
        draw.ellipse([cx - 7, cy - 7, cx + 7, cy + 7], fill=(20, 20, 20))
    return image, COUNTS[count - 1]


TASKS = (
    Task("marketing", "What colour is the shape? Answer with one word.", draw_colour),
    Task("facilities", "What shape is in the picture? Answer with one word.", draw_shape),
    Task("logistics", "How many dots are there? Answer with one word.", draw_count),
)


def write_task(task: Task, out_dir: Path, n: int, seed: int, split: str) -> Path:
    """Write `n` records of `task` as InternVL-layout JSONL with PNG images beside it."""
    rng = random.Random(f"{task.department}-{split}-{seed}")
    image_dir = out_dir / f"{task.department}-{split}-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task.department}{'' if split == 'train' else '-' + split}.jsonl"
    with path.open("w") as out:
        for index in range(n):
            image, answer = task.draw(rng)
            image.save(image_dir / f"{index:04d}.png")
            record = {
                "image": f"{image_dir.name}/{index:04d}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{task.question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
            out.write(json.dumps(record) + "\n")
    return path
