"""Image preprocessing shared by the environment and the policy transforms.

openpi: openpi_client/image_tools.py resize_with_pad (PIL bilinear, aspect kept, zero padding,
centered); examples/libero/main.py rotates both camera frames by 180 degrees.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def upright(frame: np.ndarray) -> np.ndarray:
    """MuJoCo renders LIBERO's cameras upside down; openpi trained on frames rotated 180 degrees."""
    return np.ascontiguousarray(frame[::-1, ::-1])


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to fit (height, width) keeping its aspect ratio; pad with black."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR)
    canvas = Image.new(resized.mode, (width, height), 0)
    canvas.paste(resized, (max(0, (width - new_w) // 2), max(0, (height - new_h) // 2)))
    return np.asarray(canvas)
