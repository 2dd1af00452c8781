"""The evaluation loop: a pool of environments, one batched policy call per tick, chunked actions.

Every tick: (1) the slots whose action queue ran dry are asked for a new chunk in ONE policy call;
(2) every active slot gets its next action and all slots step together; (3) slots whose episode
ended write their result line, and are given the next episode from the plan.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from policy.base import check_actions
from runners.chunking import ChunkExecutor
from runners.pool import IDLE, EnvPool, Episode
from runners.rundir import ResultsLog, latency_stats
from runners.triage import Trace
from videos.recorder import EpisodeVideo, VideoRecorder

MAX_CONSECUTIVE_POLICY_FAILURES = 3


class PolicyFailure(RuntimeError):
    pass


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    replan: int = 5  # actions executed from each chunk before asking again
    chunking: str = "replan"  # replan | ensemble (runners/chunking.py)
    ensemble_m: float = 0.01
    max_steps: int = 220  # of the suite (for the video's length)
    view: int = 224  # policy-facing image size (for the video's layout)


@dataclass
class Slot:
    episode: Episode
    executor: ChunkExecutor
    task: str = ""
    video: EpisodeVideo | None = None
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    trace: Trace = field(default_factory=Trace)  # privileged trace points for failure triage


def _select(obs: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in obs.items()}


class EvaluationLoop:
    """Runs `episodes` through `pool` with `policy`, appending each result to `results`."""

    def __init__(self, policy, pool: EnvPool, results: ResultsLog, settings: LoopSettings,
                 recorder: VideoRecorder | None = None, on_episode: Callable[[dict[str, Any]], None] | None = None):
        self.policy, self.pool, self.results, self.s = policy, pool, results, settings
        self.recorder = recorder
        self.on_episode = on_episode or (lambda rec: None)
        self.slots: dict[int, Slot] = {}
        self._pending: list[tuple[dict[str, Any], EpisodeVideo]] = []
        self._policy_failures = 0

    # ----- episode lifecycle ------------------------------------------------------------------------
    def _begin(self, todo: deque, free: list[int], obs) -> dict[str, np.ndarray]:
        """Start the next planned episodes on the free slots (resetting them together)."""
        starts = {i: todo.popleft() for i in free if todo}
        if not starts:
            return obs
        obs, infos = self.pool.start(starts)
        for i, ep in starts.items():
            info = infos[i]
            slot = Slot(ep, ChunkExecutor(replan=self.s.replan, chunking=self.s.chunking, ensemble_m=self.s.ensemble_m), info.get("task", ""))
            self.slots[i] = slot
            if info.get("error"):
                self._end(i, "error", steps=0, error=info["error"])
            elif self.recorder is not None:
                slot.video = self.recorder.start(ep.suite, ep.task_id, ep.init_state_id, ep.seed, slot.task,
                                                 self.s.max_steps, self.s.view)
        return obs

    def _end(self, i: int, outcome: str, steps: int, error: str = "") -> None:
        slot = self.slots.pop(i)
        video = self.recorder.finish(slot.video, outcome) if self.recorder is not None else None
        rec = self._record(slot, outcome, steps, error, video)
        rec["failure"] = slot.trace.classify(outcome)
        self.results.append_trace(slot.trace.finish(rec, rec["failure"]))  # before the result line
        if slot.video is not None and slot.video.is_alive():
            self._pending.append((rec, slot.video))  # written once its video is on disk
        else:
            self._write(rec)

    def _write(self, rec: dict[str, Any]) -> None:
        self.results.append(rec)
        self.on_episode(rec)

    def _flush(self, wait: bool = False) -> None:
        """Write the results of episodes whose video encoder has finished (all of them if `wait`), so a
        result line never points at a video that a kill could still lose."""
        still = []
        for rec, video in self._pending:
            if wait:
                video.wait()
            if video.is_alive():
                still.append((rec, video))
            else:
                self._write(rec)
        self._pending = still

    def _record(self, slot: Slot, outcome: str, steps: int, error: str, video: str | None) -> dict[str, Any]:
        ep = slot.episode
        return {
            "suite": ep.suite,
            "task_id": ep.task_id,
            "task": slot.task,
            "init_state_id": ep.init_state_id,
            "seed": ep.seed,
            "success": outcome == "success",
            "env_steps": int(steps),
            "error": error,
            **latency_stats(slot.latencies_ms),
            "policy_calls": len(slot.latencies_ms),
            "latencies_ms": [round(x, 3) for x in slot.latencies_ms],
            "video": video,
            "wall_s": round(time.monotonic() - slot.started, 3),
        }

    # ----- policy -----------------------------------------------------------------------------------
    def _query_policy(self, obs, rows: list[int]) -> dict[int, str]:
        """Ask the policy for chunks for `rows`; returns {slot: error} for rows that got none."""
        batch = _select(obs, rows)
        batch["prompt"] = [self.slots[i].task for i in rows]
        batch["episode"] = [(*self.slots[i].episode.key, id(self.slots[i])) for i in rows]
        batch["step"] = [self.slots[i].executor.t for i in rows]
        privileged = bool(getattr(self.policy, "needs_privileged", False))
        states = self.pool.replan_states(privileged)  # one round trip: trace points (+ privileged states)
        for i in rows:
            self.slots[i].trace.add(states[i]["trace"])
        if privileged:
            batch["privileged"] = [states[i]["privileged"] for i in rows]
        t0 = time.perf_counter()
        try:
            out = self.policy.infer(batch)
        except Exception as exc:  # a failing call marks its episodes; repeated failures stop the run
            self._policy_failures += 1
            if self._policy_failures >= MAX_CONSECUTIVE_POLICY_FAILURES:
                raise PolicyFailure(
                    f"the policy raised on {self._policy_failures} calls in a row; last error: "
                    f"{type(exc).__name__}: {exc}") from exc
            return {i: f"policy raised {type(exc).__name__}: {exc}" for i in rows}
        self._policy_failures = 0
        latency_ms = 1000.0 * (time.perf_counter() - t0)
        actions, errors = check_actions(out, len(rows))
        failed = {}
        for r, i in enumerate(rows):
            slot = self.slots[i]
            slot.latencies_ms.append(latency_ms)
            if errors[r] is not None:
                failed[i] = errors[r]
                continue
            slot.executor.add_chunk(actions[r])  # raises if replan exceeds the chunk
        return failed

    # ----- main loop --------------------------------------------------------------------------------
    def run(self, episodes: list[Episode]) -> None:
        try:
            self._run(episodes)
        finally:
            self._flush(wait=True)

    def _run(self, episodes: list[Episode]) -> None:
        todo = deque(episodes)
        n = self.pool.num_envs
        obs = None
        while True:
            self._flush()
            free = [i for i in range(n) if i not in self.slots]
            if free and todo:
                obs = self._begin(todo, free, obs)
            if not self.slots:
                if todo:
                    continue  # every start failed; try the next episodes
                return
            need = [i for i, s in sorted(self.slots.items()) if s.executor.needs_chunk()]
            failed = self._query_policy(obs, need) if need else {}
            for i, err in failed.items():
                self._end(i, "error", self.slots[i].executor.t, err)
            if not self.slots:
                continue
            actions = np.tile(IDLE, (n, 1))
            for i, slot in self.slots.items():
                if slot.video is not None:
                    slot.video.add(obs["image"][i], obs["wrist_image"][i], slot.executor.t, i in need)
                actions[i] = slot.executor.next_action()
            obs, terminated, truncated, infos = self.pool.step(actions)
            ended = [i for i in self.slots if not infos[i].get("error") and (terminated[i] or truncated[i])]
            if ended:  # the final trace point, read before the slot is reset into its next episode
                finals = self.pool.replan_states()
                for i in ended:
                    self.slots[i].trace.add(finals[i]["trace"])
            for i in list(self.slots):
                slot, info = self.slots[i], infos[i]
                steps = int(info.get("step", slot.executor.t))  # the env's count: a failed step is not one
                if info.get("error"):
                    self._end(i, "error", steps, info["error"])
                elif terminated[i] or truncated[i]:
                    if slot.video is not None:
                        slot.video.add(obs["image"][i], obs["wrist_image"][i], steps, False)
                    self._end(i, "success" if terminated[i] else "failure", steps)
