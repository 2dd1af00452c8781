"""Turning action chunks into one action per environment step.

`chunking=replan` (openpi's LIBERO protocol, examples/libero/main.py): execute the first `replan`
actions of each chunk, then ask the policy again (openpi: replan_steps).

`chunking=ensemble` (ACT, Zhao et al. 2023, "temporal ensembling"): still ask every `replan` steps, but
the action at step t averages every stored chunk that covers t, weighted exp(-m * i) where i = 0 is
the oldest prediction (ACT's convention: m > 0 favours older chunks, m < 0 newer ones).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

CHUNKING = ("replan", "ensemble")


class ChunkExecutor:
    """Action bookkeeping for one environment over one episode."""

    def __init__(self, replan: int = 5, chunking: str = "replan", ensemble_m: float = 0.01):
        check_chunking(replan, chunking)
        self.replan = int(replan)
        self.chunking = chunking
        self.ensemble_m = float(ensemble_m)
        self.reset()

    def reset(self) -> None:
        self.t = 0  # steps executed this episode
        self._since_chunk = math.inf  # steps executed since the last chunk arrived
        self._queue: deque[np.ndarray] = deque()  # replan mode
        self._chunks: list[tuple[int, np.ndarray]] = []  # ensemble mode: (start step, chunk)

    def needs_chunk(self) -> bool:
        return self._since_chunk >= self.replan

    def add_chunk(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"a chunk must be (horizon, action_dim), got shape {chunk.shape}")
        check_chunking(self.replan, self.chunking, len(chunk))
        if self.chunking == "replan":
            self._queue = deque(chunk[: self.replan])
        else:
            self._chunks.append((self.t, chunk))
            self._chunks = [(s, c) for s, c in self._chunks if s + len(c) > self.t]
        self._since_chunk = 0

    def next_action(self) -> np.ndarray:
        if self.needs_chunk():
            raise RuntimeError("no action queued: the policy must be asked for a new chunk first")
        if self.chunking == "replan":
            action = self._queue.popleft()
        else:
            action = ensemble_action(self._chunks, self.t, self.ensemble_m)
        self.t += 1
        self._since_chunk += 1
        return action


def check_chunking(replan: int, chunking: str, chunk_size: int | None = None) -> None:
    """The one check of the chunking settings: run by the evaluation before any simulator starts
    (with the policy's chunk size when it declares one) and again on every chunk."""
    if chunking not in CHUNKING:
        raise ValueError(f"unknown chunking {chunking!r}; choose one of {', '.join(CHUNKING)}")
    if int(replan) < 1:
        raise ValueError(f"replan must be >= 1, got {replan}")
    if chunk_size is not None and int(replan) > int(chunk_size):
        raise ValueError(f"replan={replan} exceeds the policy's chunk length {chunk_size}; set replan <= {chunk_size}")


def ensemble_action(chunks: list[tuple[int, np.ndarray]], t: int, m: float) -> np.ndarray:
    """Weighted mean over chunks (oldest first) of their prediction for step t."""
    preds = [c[t - s] for s, c in chunks if s <= t < s + len(c)]
    weights = np.exp(-m * np.arange(len(preds)))
    return (weights[:, None] * np.stack(preds)).sum(0) / weights.sum()
