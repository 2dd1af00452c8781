"""Turning action chunks into one action per environment step.

`replan` (openpi's LIBERO protocol, examples/libero/main.py): execute the first `replan_steps` actions
of each chunk, then ask the policy again.

`ensemble` (ACT, Zhao et al. 2023, "temporal ensembling"): still ask every `replan_steps` steps, but
the action at step t averages every stored chunk that covers t, weighted exp(-m * i) where i = 0 is
the oldest prediction (ACT's convention: m > 0 favours older chunks, m < 0 newer ones).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

MODES = ("replan", "ensemble")


class ChunkExecutor:
    """Action bookkeeping for one environment over one episode."""

    def __init__(self, replan_steps: int = 5, mode: str = "replan", ensemble_m: float = 0.01):
        if mode not in MODES:
            raise ValueError(f"unknown chunking mode {mode!r}; choose one of {', '.join(MODES)}")
        if replan_steps < 1:
            raise ValueError(f"replan_steps must be >= 1, got {replan_steps}")
        self.replan_steps = int(replan_steps)
        self.mode = mode
        self.m = float(ensemble_m)
        self.reset()

    def reset(self) -> None:
        self.t = 0  # steps executed this episode
        self._since_chunk = math.inf  # steps executed since the last chunk arrived
        self._queue: deque[np.ndarray] = deque()  # replan mode
        self._chunks: list[tuple[int, np.ndarray]] = []  # ensemble mode: (start step, chunk)

    def needs_chunk(self) -> bool:
        return self._since_chunk >= self.replan_steps

    def add_chunk(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"a chunk must be (horizon, action_dim), got shape {chunk.shape}")
        if self.replan_steps > len(chunk):
            raise ValueError(
                f"replan_steps={self.replan_steps} exceeds the policy's chunk length {len(chunk)}; "
                f"set replan <= {len(chunk)}"
            )
        if self.mode == "replan":
            self._queue = deque(chunk[: self.replan_steps])
        else:
            self._chunks.append((self.t, chunk))
            self._chunks = [(s, c) for s, c in self._chunks if s + len(c) > self.t]
        self._since_chunk = 0

    def next_action(self) -> np.ndarray:
        if self.needs_chunk():
            raise RuntimeError("no action queued: the policy must be asked for a new chunk first")
        if self.mode == "replan":
            action = self._queue.popleft()
        else:
            action = ensemble_action(self._chunks, self.t, self.m)
        self.t += 1
        self._since_chunk += 1
        return action


def ensemble_action(chunks: list[tuple[int, np.ndarray]], t: int, m: float) -> np.ndarray:
    """Weighted mean over chunks (oldest first) of their prediction for step t."""
    preds = [c[t - s] for s, c in chunks if s <= t < s + len(c)]
    weights = np.exp(-m * np.arange(len(preds)))
    return (weights[:, None] * np.stack(preds)).sum(0) / weights.sum()
