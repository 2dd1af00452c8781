"""Drawing one rollout video frame: both camera views side by side under a header with the task.

Layout (pixels, all multiples of 16 so H.264 needs no rescaling for 224-pixel views):

    +---------------------------------------------+  HEADER rows: task text (wrapped), step counter
    | task text ...                  step 37/220  |
    +----------------------+----------------------+
    | agent view         * | wrist view           |  * = CHUNK_MARK on steps where a new chunk began
    +----------------------+----------------------+

The outcome banner is a coloured band across the middle of the last frames.
"""

from __future__ import annotations

import textwrap
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HEADER = 48
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
CHUNK_COLOR = (255, 200, 0)
CHUNK_MARK = (8, 8, 22)  # (x offset from the agent view's right edge, y offset below the header, size)
OUTCOME_COLORS = {"success": (30, 150, 60), "failure": (190, 40, 40), "error": (230, 120, 0)}


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def frame_size(view: int) -> tuple[int, int]:
    """(height, width) of a composed frame for square views of `view` pixels, rounded up to 16."""
    h, w = view + HEADER, 2 * view
    return -(-h // 16) * 16, -(-w // 16) * 16


def compose(image: np.ndarray, wrist: np.ndarray, task: str, step: int, max_steps: int, chunk_start: bool) -> np.ndarray:
    """One (H, W, 3) uint8 frame: the views under a header, with the chunk mark when `chunk_start`."""
    view = image.shape[0]
    height, width = frame_size(view)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(Image.fromarray(image), (0, HEADER))
    canvas.paste(Image.fromarray(wrist), (view, HEADER))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    counter = f"step {step}/{max_steps}"
    counter_w = draw.textlength(counter, font=font)
    chars = max(20, int((width - counter_w - 16) / 6.2))
    for i, line in enumerate(textwrap.wrap(task, chars)[:3]):
        draw.text((6, 4 + 14 * i), line, fill=TEXT, font=font)
    draw.text((width - counter_w - 6, HEADER - 16), counter, fill=TEXT, font=font)
    if chunk_start:
        dx, dy, size = CHUNK_MARK
        x0, y0 = view - dx - size, HEADER + dy
        draw.rectangle([x0, y0, x0 + size, y0 + size], fill=CHUNK_COLOR, outline=(0, 0, 0))
    return np.asarray(canvas)


def banner(frame: np.ndarray, outcome: str) -> np.ndarray:
    """The frame with a band saying SUCCESS, FAILURE or ERROR across its middle."""
    if outcome not in OUTCOME_COLORS:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOME_COLORS)}")
    img = Image.fromarray(frame).convert("RGB")
    draw = ImageDraw.Draw(img)
    h, w = frame.shape[:2]
    top, bottom = h // 2 - 22, h // 2 + 22
    draw.rectangle([0, top, w, bottom], fill=OUTCOME_COLORS[outcome])
    text = outcome.upper()
    font = _font(28)
    tw = draw.textlength(text, font=font)
    draw.text(((w - tw) / 2, top + 6), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)
