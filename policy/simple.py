"""Baseline policies for tests and sanity checks: `zero` holds still, `random` flails."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from policy.base import ACTION_DIM, batch_size


class ZeroPolicy:
    """No motion with the gripper open: what LIBERO's settle steps send. Never succeeds."""

    needs_privileged = False
    needs_images = False  # rendering skipped for it (runners/loop.py)

    def __init__(self, chunk_size: int = 10, delay_s: float = 0.0, needs_images: bool = False):
        self.chunk_size = int(chunk_size)
        self.delay_s = float(delay_s)  # simulated inference time (to exercise servers and batching)
        # True: the runner renders the cameras for it as for an image policy (simulator benchmarks)
        self.needs_images = bool(needs_images)

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        actions = np.zeros((batch_size(batch), self.chunk_size, ACTION_DIM), dtype=np.float32)
        actions[..., -1] = -1.0
        return {"actions": actions}

    def reset(self) -> None:
        pass


class RandomPolicy:
    """Uniform actions in [-scale, scale] (gripper in [-1, 1]), reproducible from `seed`."""

    needs_privileged = False
    needs_images = False  # rendering skipped for it (runners/loop.py)

    def __init__(self, chunk_size: int = 10, scale: float = 1.0, seed: int = 0):
        self.chunk_size = int(chunk_size)
        self.scale = float(scale)
        self.seed = int(seed)
        self.reset()

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        shape = (batch_size(batch), self.chunk_size, ACTION_DIM)
        actions = self._rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        actions[..., :6] *= self.scale
        return {"actions": actions}

    def reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
