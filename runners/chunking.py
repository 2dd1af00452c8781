"""Turning action chunks into one action per environment step, with or without inference latency.

Requests: the policy is asked for a chunk at episode steps 0, `replan`, 2 `replan`, ... with the
observation of that step (openpi's LIBERO protocol executes `replan` actions of each chunk;
openpi: replan_steps). A chunk's action i is meant for the step `request + i`.

Latency (`execution`, runners/evaluate.py): with a delay of d env steps (LIBERO runs at 20 Hz, so
d = ceil(latency / 50 ms)), the chunk requested at step k arrives at step k + d. Until then the
previous chunk goes on being executed; its first d actions are stale and skipped (at step k + d
the action executed is chunk[d]). With d = 0 this is exactly synchronous execution: the simulator
waits for the policy. When no chunk covers a step (the first d steps of an episode, or a delay
longer than the chunk's remaining actions), the robot holds still: zero motion with the last
gripper command (open before any), and the step is counted in `held_steps`.

`chunking=replan` executes, at each step, the newest arrived chunk covering it.
`chunking=ensemble` (ACT, Zhao et al. 2023, "temporal ensembling") averages every arrived chunk
covering the step, weighted exp(-m * i) with i = 0 the oldest (ACT's convention: m > 0 favours
older chunks, m < 0 newer ones).

Execution quality is measured on the executed actions' motion part (xyz, rpy; the gripper's
+-1 flips would drown it): `action_jerk` is the mean L2 norm of their second difference,
`chunk_boundary_jump` the mean L2 distance, at each step where a new chunk takes over, between
its action and the one the previous chunk would have executed there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CHUNKING = ("replan", "ensemble")
CONTROL_HZ = 20.0  # LIBERO's control rate (robosuite control_freq): one env step is 50 ms
MOTION = slice(0, 6)  # xyz, rpy of LIBERO's 7-D action; index 6 is the gripper
OPEN_GRIPPER = -1.0


def check_chunking(replan: int, chunking: str, chunk_size: int | None = None, delay_steps: int = 0) -> None:
    """The one check of the chunking settings: run by the evaluation before any simulator starts
    (with the policy's chunk size when it declares one) and again on every chunk."""
    if chunking not in CHUNKING:
        raise ValueError(f"unknown chunking {chunking!r}; choose one of {', '.join(CHUNKING)}")
    if int(replan) < 1:
        raise ValueError(f"replan must be >= 1, got {replan}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"the policy's chunk size must be >= 1 actions, got {chunk_size}")
    if chunk_size is not None and int(delay_steps) >= int(chunk_size):
        raise ValueError(f"the latency is {delay_steps} env steps at {CONTROL_HZ:g} Hz, as long as the policy's "
                         f"whole chunk of {chunk_size} actions: every chunk would arrive already spent. Use "
                         f"latency_ms <= {1000 * (int(chunk_size) - int(replan)) / CONTROL_HZ:g} with replan={replan}")
    if chunk_size is not None and int(replan) + int(delay_steps) > int(chunk_size):
        extra = f" + the latency's {delay_steps} steps" if delay_steps else ""
        raise ValueError(f"replan={replan}{extra} exceeds the policy's chunk length {chunk_size}: the chunk would "
                         f"run out before the next one arrives; set replan <= {int(chunk_size) - int(delay_steps)}")


def delay_steps(latency_ms: float) -> int:
    """Env steps that pass while the policy thinks for `latency_ms` (ceil, at LIBERO's 20 Hz)."""
    if latency_ms < 0 or not math.isfinite(latency_ms):
        raise ValueError(f"latency must be a finite number of milliseconds >= 0, got {latency_ms}")
    return int(math.ceil(round(latency_ms * CONTROL_HZ / 1000.0, 9)))


@dataclass
class _Chunk:
    start: int  # the step its action 0 is meant for (the request's step)
    arrival: int  # the first step it may be executed at
    actions: np.ndarray  # (H, 7)

    def covers(self, t: int) -> bool:
        return self.arrival <= t < self.start + len(self.actions)


@dataclass
class ExecutionStats:
    held_steps: int = 0
    jerk: list = field(default_factory=list)
    jumps: list = field(default_factory=list)
    delays: list = field(default_factory=list)


class ChunkExecutor:
    """Action bookkeeping for one environment over one episode (see the module docstring)."""

    def __init__(self, replan: int = 5, chunking: str = "replan", ensemble_m: float = 0.01):
        check_chunking(replan, chunking)
        self.replan = int(replan)
        self.chunking = chunking
        self.ensemble_m = float(ensemble_m)
        self.reset()

    def reset(self) -> None:
        self.t = 0  # steps executed this episode
        self.next_request = 0  # the step of the next request
        self.pending = 0  # requests sent whose chunk has not been added yet
        self._due: list[int] = []  # ... the step by which each one's chunk must be in (oldest first)
        self._chunks: list[_Chunk] = []
        self._current: _Chunk | None = None  # replan mode: the chunk executed last
        self._gripper = OPEN_GRIPPER
        self._history: list[np.ndarray] = []  # the last two executed actions
        self.stats = ExecutionStats()

    # ----- requests ---------------------------------------------------------------------------------
    def wants_request(self) -> bool:
        """Whether the policy must be asked now (with the current step's observation)."""
        return self.t >= self.next_request

    def request_sent(self, delay: int | None = 0) -> int:
        """Book a request at the current step, whose chunk will be usable `delay` steps later (None:
        not known before it arrives, but at least one step); returns the step (the chunk's `start`).
        The step `start + delay` (`start + 1` when not known) cannot execute before the chunk is added:
        the simulated latency holds however long the call takes on the wall clock."""
        start = self.t
        self.next_request = start + self.replan
        self.pending += 1
        self._due.append(start + (1 if delay is None else int(delay)))
        return start

    def add_chunk(self, chunk: np.ndarray, start: int | None = None, delay: int = 0) -> None:
        """The chunk requested at step `start`, usable from step start + delay. Without `start`
        (synchronous use), the request is the current step's."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"a chunk must be (horizon, action_dim), got shape {chunk.shape}")
        check_chunking(self.replan, self.chunking, len(chunk))
        if start is None:
            if self.pending == 0:
                self.request_sent(delay)
            start = self.t
        self.pending = max(0, self.pending - 1)
        if self._due:
            self._due.pop(0)  # chunks come back in the order they were asked for
        self._chunks.append(_Chunk(int(start), int(start) + int(delay), chunk))
        self.stats.delays.append(int(delay))

    def request_failed(self) -> None:
        """A request that will get no chunk (the episode ends as an error)."""
        self.pending = max(0, self.pending - 1)
        if self._due:
            self._due.pop(0)

    def blocked(self) -> bool:
        """True while the current step waits for a chunk not yet added: a synchronous (delay 0) one, or
        one whose simulated latency has passed while the real call is still running."""
        return bool(self._due) and self._due[0] <= self.t

    def needs_chunk(self) -> bool:
        """Synchronous replanning: a request is due now (the chunk it gets is used at once)."""
        return self.wants_request()

    # ----- actions ----------------------------------------------------------------------------------
    def _arrived(self) -> list[_Chunk]:
        return [c for c in self._chunks if c.covers(self.t)]

    def next_action(self) -> tuple[np.ndarray, bool]:
        """The action for the current step and whether it is a hold (no chunk covers it); advances t."""
        if self.blocked():
            raise RuntimeError("no action yet: the policy's chunk for this step has not been added")
        t = self.t
        live = self._arrived()
        held = not live
        if held:
            action = np.zeros(7)
            action[6] = self._gripper
            self.stats.held_steps += 1
        elif self.chunking == "replan":
            newest = max(live, key=lambda c: c.start)
            if self._current is not None and newest is not self._current and self._current.covers(t):
                self.stats.jumps.append(float(np.linalg.norm(newest.actions[t - newest.start, MOTION]
                                                             - self._current.actions[t - self._current.start, MOTION])))
            self._current = newest
            action = newest.actions[t - newest.start]
        else:
            action = ensemble_action([(c.start, c.actions) for c in live], t, self.ensemble_m)
        # Chunks that can never be used again are dropped (memory stays bounded on long episodes).
        self._chunks = [c for c in self._chunks if c.start + len(c.actions) > t + 1]
        self._gripper = float(action[6])
        self._history = (self._history + [np.asarray(action, dtype=np.float64)])[-3:]
        if len(self._history) == 3:
            a, b, c = self._history
            self.stats.jerk.append(float(np.linalg.norm((c - 2 * b + a)[MOTION])))
        self.t += 1
        return np.asarray(action), held

    def metrics(self) -> dict[str, float | int | None]:
        s = self.stats
        return {
            "action_jerk": float(np.mean(s.jerk)) if s.jerk else None,
            "chunk_boundary_jump": float(np.mean(s.jumps)) if s.jumps else None,
            "held_steps": s.held_steps,
            "delay_steps": float(np.mean(s.delays)) if s.delays else None,
            "delay_steps_max": max(s.delays) if s.delays else None,
        }


def ensemble_action(chunks: list[tuple[int, np.ndarray]], t: int, m: float) -> np.ndarray:
    """Weighted mean over chunks (oldest first) of their prediction for step t."""
    preds = [c[t - s] for s, c in sorted(chunks, key=lambda sc: sc[0]) if s <= t < s + len(c)]
    weights = np.exp(-m * np.arange(len(preds)))
    return (weights[:, None] * np.stack(preds)).sum(0) / weights.sum()
