"""The camera-frame convention of LIBERO's simulator.

openpi: examples/libero/main.py rotates both camera frames by 180 degrees ("to match train
preprocessing"). Resizing with pad is openpi-client's own `image_tools.resize_with_pad` (PIL
bilinear, aspect kept, zero padding), used as is by the environment, the policy and the server, so
the three can never drift apart from what openpi trained on.
"""

from __future__ import annotations

import numpy as np


def upright(frame: np.ndarray) -> np.ndarray:
    """MuJoCo renders LIBERO's cameras upside down; openpi trained on frames rotated 180 degrees."""
    return np.ascontiguousarray(frame[::-1, ::-1])
