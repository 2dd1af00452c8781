"""The evaluation loop: a pool of environments, batched policy calls, chunked actions, latency.

Each slot of the pool runs its episodes one after another, and advances on its own: as soon as a
slot's step reply is in, it is sent its next action, unless its step needs a chunk that has not come
back yet. Slots due a policy request (runners/chunking.py) queue it, with the observation of that
step; whenever the policy is free, every queued request goes into ONE batched call, which runs on
the policy's own thread (runners/policy_thread.py) while the main thread keeps the other slots
stepping. So no slot waits for another slot's call, and the policy batches whoever is waiting
(the queue grows while a call runs). A slot asks for its next chunk only once the previous one is
in (real-time chunking continues it). Starting an episode (a LIBERO reset rebuilds the MuJoCo model)
runs in the slot's worker while the other slots go on.

What an episode sees does not depend on this timing: a chunk's noise depends on its episode and step
alone (policy/libero_policy.py), and a chunk is used from the step the execution mode says, however
long the call takes on the wall clock (a slot whose simulated latency has passed waits for it). One
caveat, as in any batched evaluation: which requests share a call does depend on timing, and on a
GPU a row's actions can differ in the last bits with the batch size its call ran at (bf16 kernels
differ by shape); exact on the CPU in fp32. `latency_ms=measured` uses the call's own wall time, not
the time its request waited behind an earlier call.

Execution (`execution`): `sync` waits for every chunk (the simulator is frozen while the policy
thinks, as openpi's example and lerobot-eval do); `async` keeps the simulator moving: a chunk asked
at step k is used from step k + d, d = ceil(latency / 50 ms), where the latency is a fixed number
(`latency_ms`, simulated time: deterministic, independent of the machine) or the call's measured
wall time (`latency_ms=measured`); `rtc` is `async` with real-time chunking (the policy is given
the previous chunk, which it must continue; policy/backends/rtc.py).

Cameras are rendered only for the observations something looks at: the policy's (at request
steps, when the policy uses images) and the video's (every `video_stride` steps while recording).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from policy.base import check_actions
from runners.chunking import ChunkExecutor, delay_steps
from runners.policy_thread import PolicyThread
from runners.pool import EnvPool, Episode, Reply
from runners.rundir import ResultsLog, latency_stats
from runners.triage import Trace
from videos.recorder import EpisodeVideo, VideoRecorder

MAX_CONSECUTIVE_POLICY_FAILURES = 3
EXECUTIONS = ("sync", "async", "rtc")
RENDER_MODES = ("on_demand", "every_step")


class PolicyFailure(RuntimeError):
    pass


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    replan: int = 5  # actions executed from each chunk before asking again
    chunking: str = "replan"  # replan | ensemble (runners/chunking.py)
    ensemble_m: float = 0.01
    execution: str = "sync"  # sync | async | rtc (module docstring)
    latency_ms: float | None = 0.0  # async/rtc: simulated policy latency; None = each call's measured time
    max_steps: int = 220  # of the suite (for the video's length)
    view: int = 224  # policy-facing image size (for the video's layout)
    video_stride: int = 1  # record every n-th step's frame
    render: str = "on_demand"  # on_demand | every_step (as an env that knows nothing of its consumers)

    def __post_init__(self):
        if self.execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {self.execution!r}; choose one of {', '.join(EXECUTIONS)}")
        if self.execution == "sync" and self.latency_ms != 0:
            asked = "measured" if self.latency_ms is None else self.latency_ms
            raise ValueError(f"execution=sync freezes the simulator while the policy thinks, so latency_ms="
                             f"{asked} has no effect; use execution=async or rtc")
        if self.render not in RENDER_MODES:
            raise ValueError(f"unknown render {self.render!r}; choose one of {', '.join(RENDER_MODES)}")
        if self.video_stride < 1:
            raise ValueError(f"video_stride must be >= 1, got {self.video_stride}")

    @property
    def fixed_delay(self) -> int | None:
        """Env steps a chunk arrives after its request, when fixed (None: measured per call)."""
        if self.execution == "sync":
            return 0
        return None if self.latency_ms is None else delay_steps(self.latency_ms)


@dataclass
class Slot:
    episode: Episode
    executor: ChunkExecutor
    task: str = ""
    video: EpisodeVideo | None = None
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    obs: dict[str, np.ndarray] = field(default_factory=dict)  # the current step's observation
    privileged: dict[str, Any] | None = None
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # rtc: (start, chunk) of the last one
    last_delay: int = 0  # rtc with measured latency: the estimate for the next request
    request_step: int = 0  # the step of the request in flight
    request_obs: tuple = ()  # (observation, privileged state) of that step: the slot may step past it
    requests: int = 0  # requests made (a call still running when the episode ends counts; its latency is lost)
    requested_now: bool = False  # a request was made at the current step (the video marks it)
    failed: str = ""  # its request failed while its step was in flight: ends as an error on the reply
    trace: Trace = field(default_factory=Trace)  # privileged trace points for failure triage (runners/triage.py)


@dataclass
class Phases:
    """Where the time goes (seconds): main-thread work of the loop, and the workers' own time."""

    policy: float = 0.0  # the policy calls (the policy's thread)
    input_prep: float = 0.0  # building the batches (main thread)
    wait_env: float = 0.0  # main thread waiting for step/start replies or the policy
    physics: float = 0.0  # summed over workers: stepping minus rendering
    render: float = 0.0  # summed over workers: cameras and image preparation
    reset: float = 0.0  # summed over workers: starting episodes (LIBERO reset + settle steps)
    ticks: int = 0  # rounds of the main loop (each handles whatever replies had arrived)
    env_steps: int = 0
    policy_calls: int = 0
    policy_rows: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items()}


class EvaluationLoop:
    """Runs `episodes` through `pool` with `policy`, appending each result to `results`."""

    def __init__(self, policy, pool: EnvPool, results: ResultsLog, settings: LoopSettings,
                 recorder: VideoRecorder | None = None, on_episode: Callable[[dict[str, Any]], None] | None = None,
                 stamp: dict[str, Any] | None = None, policy_thread: PolicyThread | None = None):
        self.policy, self.pool, self.results, self.s = policy, pool, results, settings
        self.policy_thread = policy_thread  # the thread the policy was prepared on (one is made if None)
        self._queue: list[tuple[int, Slot]] = []  # requests waiting for the policy
        self._call: tuple[Any, list[tuple[int, Slot]], float] | None = None  # (future, rows, input prep s)
        self.stamp = dict(stamp or {})  # written on every result line (code version, checkpoint identity)
        self.recorder = recorder
        self.on_episode = on_episode or (lambda rec: None)
        self.slots: dict[int, Slot] = {}
        self.starting: dict[int, Episode] = {}
        self._pending: list[tuple[dict[str, Any], EpisodeVideo]] = []
        self._policy_failures = 0
        self.needs_images = getattr(policy, "needs_images", True)
        self.needs_privileged = getattr(policy, "needs_privileged", False)
        self.phases = Phases()
        self._loaded_task: dict[int, int] = {}  # slot -> task id its env last ran (affinity)

    # ----- episode lifecycle ------------------------------------------------------------------------
    def _recording(self) -> bool:
        return self.recorder is not None and self.recorder.videos != "none"

    def _start(self, slot: int, todo: deque) -> None:
        """Send the slot its next episode, preferring one of the task its env already has loaded (a task
        switch rebuilds LIBERO's scene)."""
        loaded = self._loaded_task.get(slot)
        pick = next((k for k, ep in enumerate(todo) if ep.task_id == loaded), 0)
        ep = todo[pick]
        del todo[pick]
        self.starting[slot] = ep
        self._loaded_task[slot] = ep.task_id
        render = self.needs_images or self._recording() or self.s.render == "every_step"
        self.pool.send_start(slot, ep, render=render, privileged=self.needs_privileged)

    def _started(self, r: Reply) -> None:
        ep = self.starting.pop(r.slot)
        slot = Slot(ep, ChunkExecutor(replan=self.s.replan, chunking=self.s.chunking, ensemble_m=self.s.ensemble_m),
                    r.info.get("task", ""))
        self.slots[r.slot] = slot
        self.phases.reset += r.seconds
        if r.info.get("error"):
            self._end(r.slot, "error", steps=0, error=r.info["error"])
            return
        slot.obs, slot.privileged = r.obs, r.privileged
        slot.trace.add(r.trace)
        if self._recording():
            slot.video = self.recorder.start(ep.suite, ep.task_id, ep.init_state_id, ep.seed, slot.task,
                                             self.s.max_steps, self.s.view)

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
            "execution": self.s.execution,
            "sim_latency_ms": "measured" if self.s.latency_ms is None else float(self.s.latency_ms or 0.0),
            **slot.executor.metrics(),
            **latency_stats(slot.latencies_ms),
            "policy_calls": slot.requests,
            "latencies_ms": [round(x, 3) for x in slot.latencies_ms],
            "video": video,
            "wall_s": round(time.monotonic() - slot.started, 3),
            **self.stamp,
        }

    # ----- policy -----------------------------------------------------------------------------------
    def _batch(self, slots: list[Slot]) -> dict[str, Any]:
        obs = [s.request_obs[0] for s in slots]
        batch: dict[str, Any] = {"state": np.stack([o["state"] for o in obs])}
        if self.needs_images:
            batch["image"] = np.stack([o["image"] for o in obs])
            batch["wrist_image"] = np.stack([o["wrist_image"] for o in obs])
        else:  # privileged policies: black frames of the right shape, never rendered
            size = self.s.view
            batch["image"] = batch["wrist_image"] = np.zeros((len(slots), size, size, 3), np.uint8)
        batch["prompt"] = [s.task for s in slots]
        batch["episode"] = [s.episode.key for s in slots]
        batch["step"] = [s.request_step for s in slots]  # the observation's step (a stepping slot is past it)
        if self.needs_privileged:
            batch["privileged"] = [s.request_obs[1] for s in slots]
        if self.s.execution == "rtc":
            batch.update(self._rtc_inputs(slots))
        return batch

    def _rtc_inputs(self, slots: list[Slot]) -> dict[str, Any]:
        """For each row: the previous chunk's actions from the current step on (zeros where it has none),
        how many of them will execute before the new chunk arrives (frozen), and how many overlap."""
        prev, frozen, overlap = [], [], []
        fixed = self.s.fixed_delay
        for s in slots:
            t = s.request_step  # the request's step: the slot may already be stepping past it
            d = fixed if fixed is not None else s.last_delay
            if s.chunks:
                start, chunk = s.chunks[-1]
                rest = chunk[t - start:] if t - start < len(chunk) else chunk[:0]
                horizon = len(chunk)
            else:
                rest, horizon = np.zeros((0, 7)), 0
            row = np.zeros((max(horizon, len(rest), 1), 7))
            row[: len(rest)] = rest
            prev.append(row)
            frozen.append(min(d, len(rest)))
            overlap.append(len(rest))
        h = max(len(p) for p in prev)
        return {"prev_actions": np.stack([np.pad(p, ((0, h - len(p)), (0, 0))) for p in prev]),
                "prev_frozen": np.asarray(frozen), "prev_overlap": np.asarray(overlap)}

    def _request(self, i: int) -> None:
        """Queue slot i's request for the current step, with that step's observation."""
        slot = self.slots[i]
        slot.request_step = slot.executor.request_sent(self.s.fixed_delay)
        slot.request_obs = (slot.obs, slot.privileged)
        slot.requested_now = True
        slot.requests += 1
        self._queue.append((i, slot))

    def _submit(self) -> None:
        """One batched call for every queued request, on the policy's thread."""
        rows = [(i, slot) for i, slot in self._queue if self.slots.get(i) is slot]  # ended meanwhile: dropped
        self._queue = []
        if not rows:
            return
        t0 = time.perf_counter()
        batch = self._batch([slot for _, slot in rows])
        prep = time.perf_counter() - t0
        self._call = (self.policy_thread.submit(self.policy.infer, batch), rows, prep)

    def _complete(self) -> None:
        """Take the finished call's chunks (or its failure) to the slots that asked for them."""
        future, rows, prep = self._call
        self._call = None
        self.policy_thread.drain()
        try:
            out, seconds = future.result()
        except Exception as exc:  # a failing call marks its episodes; repeated failures stop the run
            self._policy_failures += 1
            if self._policy_failures >= MAX_CONSECUTIVE_POLICY_FAILURES:
                raise PolicyFailure(
                    f"the policy raised on {self._policy_failures} calls in a row; last error: "
                    f"{type(exc).__name__}: {exc}") from exc
            failed = {i: f"policy raised {type(exc).__name__}: {exc}" for i, _ in rows}
            latency_ms, actions, errors = 0.0, None, [None] * len(rows)
        else:
            latency_ms = 1000.0 * seconds
            self.phases.input_prep += prep
            self.phases.policy += seconds
            self.phases.policy_calls += 1
            self.phases.policy_rows += len(rows)
            self._policy_failures = 0
            actions, errors = check_actions(out, len(rows))
            failed = {}
        delay = self.s.fixed_delay
        if delay is None:
            delay = max(1, delay_steps(latency_ms))  # measured: the simulator moved on meanwhile
        for r, (i, slot) in enumerate(rows):
            if self.slots.get(i) is not slot:  # its episode ended meanwhile (its env failed)
                continue
            if i not in failed:
                slot.latencies_ms.append(latency_ms)
                if errors[r] is not None:
                    failed[i] = errors[r]
                else:
                    try:
                        slot.executor.add_chunk(actions[r], start=slot.request_step, delay=delay)
                        slot.last_delay = delay
                        slot.chunks = [(slot.request_step, actions[r])]
                    except ValueError as exc:  # e.g. a measured latency longer than the chunk: an error episode
                        failed[i] = str(exc)
            if i in failed:
                slot.executor.request_failed()
                if i in self.pool.busy:
                    slot.failed = failed[i]  # ends when its step in flight comes back
                else:
                    self._end(i, "error", slot.executor.t, failed[i])

    # ----- main loop --------------------------------------------------------------------------------
    def run(self, episodes: list[Episode], stop_after_s: float | None = None) -> None:
        """Run the episodes; with `stop_after_s`, start no new episode after that many seconds (those
        running finish): a benchmark's fixed-length window."""
        self._deadline = None if stop_after_s is None else time.monotonic() + float(stop_after_s)
        own = self.policy_thread is None
        if own:
            self.policy_thread = PolicyThread()
        finished = False
        try:
            self._run(episodes)
            finished = True
        finally:
            self._flush(wait=True)
            if own:
                self.policy_thread.close(wait=finished)
                self.policy_thread = None

    def _step(self, i: int) -> None:
        """Send slot i its action for the current step, asking for what the next step's observation
        must carry (images if the policy or the video looks at it, privileged state if needed)."""
        slot = self.slots[i]
        if slot.video is not None and "image" in slot.obs and slot.executor.t % self.s.video_stride == 0:
            slot.video.add(slot.obs["image"], slot.obs["wrist_image"], slot.executor.t, slot.requested_now)
        slot.requested_now = False
        action, _ = slot.executor.next_action()
        t = slot.executor.t  # the step the reply's observation belongs to
        request_next = t >= slot.executor.next_request
        render = ((request_next and self.needs_images) or (slot.video is not None and t % self.s.video_stride == 0)
                  or self.s.render == "every_step")
        self.pool.send_step(i, action, render=render, privileged=request_next and self.needs_privileged,
                            trace=request_next)  # a replan reads the next observation: trace it

    def _advance(self, i: int) -> None:
        """An idle slot: queue its request if one is due, and step it unless its step needs a chunk that
        is not in yet."""
        ex = self.slots[i].executor
        if ex.wants_request():
            if ex.pending:  # the previous chunk must be in before the next request (rtc continues it)
                return
            self._request(i)
        if not ex.blocked():
            self._step(i)

    def _wait(self) -> list[Reply]:
        """The replies that are in; blocks (when there are none and the policy is still thinking) until
        a reply arrives or the call finishes."""
        replies = self.pool.collect(timeout=0.0)
        call_done = self._call is not None and self._call[0].done()
        if replies or call_done:
            return replies
        busy = bool(self.pool.busy)
        if self._call is not None:
            if busy:
                return self.pool.collect(timeout=None, wake=[self.policy_thread.ready])
            self._call[0].exception()  # waits for the call (its error is taken by _complete)
            return []
        if not busy:
            raise RuntimeError("evaluation loop stalled: no simulator command and no policy call in flight "
                               f"(slots {sorted(self.slots)}, starting {sorted(self.starting)}); please report")
        return self.pool.collect(timeout=None)

    def _run(self, episodes: list[Episode]) -> None:
        todo = deque(episodes)
        n = self.pool.num_envs
        for i in range(min(n, len(todo))):
            self._start(i, todo)
        while self.slots or self.starting or self._call is not None:
            self._flush()
            self.phases.ticks += 1
            for i in sorted(self.slots):
                if i not in self.pool.busy:
                    self._advance(i)
            if self._call is None and self._queue:
                self._submit()
            t0 = time.perf_counter()
            replies = self._wait()
            self.phases.wait_env += time.perf_counter() - t0
            for r in sorted(replies, key=lambda r: r.slot):
                if r.kind == "start":
                    self._started(r)
                else:
                    self._stepped(r)
            if self._call is not None and self._call[0].done():  # after the replies: a slot ended by
                self._complete()  # its env is not also ended by a failed call
            for i in range(n):
                if self._deadline is not None and time.monotonic() > self._deadline:
                    todo.clear()
                if todo and i not in self.slots and i not in self.starting:
                    self._start(i, todo)

    def _stepped(self, r: Reply) -> None:
        i = r.slot
        slot = self.slots[i]
        self.phases.env_steps += 1
        self.phases.render += r.render_seconds
        self.phases.physics += r.seconds - r.render_seconds
        steps = int(r.info.get("step", slot.executor.t))  # the env's count: a failed step is not one
        if r.info.get("error"):
            self._end(i, "error", steps, r.info["error"])
            return
        if slot.failed:
            self._end(i, "error", steps, slot.failed)
            return
        slot.obs = r.obs  # images only when this step was rendered: a stale frame is never reused
        if r.privileged is not None:
            slot.privileged = r.privileged
        slot.trace.add(r.trace)  # before a replan and at the episode's end
        if r.terminated or r.truncated:
            if slot.video is not None and "image" in r.obs:
                slot.video.add(r.obs["image"], r.obs["wrist_image"], steps, False)
            self._end(i, "success" if r.terminated else "failure", steps)
