"""A pool of LIBERO environments in worker processes, each slot driven on its own.

Every slot is one worker process (started with "spawn", so each creates its own MuJoCo/EGL context)
owning one environment. The runner sends a slot a command (start an episode, step with an action)
and collects the replies as they arrive, so a slot that is resetting into its next episode (a
LIBERO reset rebuilds the MuJoCo model: about a second) never holds up the slots that are stepping,
and the workers keep stepping while the runner's main thread runs the policy.

A command may ask for more than the observation: `render` (render the cameras for the observation
this command returns; LiberoEnv.set_rendering), `privileged` (the env's privileged state, for
scripted policies, in the same round trip) and `trace` (a trace point for failure triage,
LiberoEnv.trace_point; starts and episode ends always carry one). Simulator exceptions come back
as an `error` entry, so one crashing episode does not take the pool down; neither does a worker
that dies (a segfault in MuJoCo or EGL, the out-of-memory killer) or stops answering for
`command_timeout_s`: it is replaced by a fresh one and its command answered with an `error` reply
(a run whose workers keep dying stops with PoolError). `vectorization="sync"`
runs the same slots in-process, one command at a time (for debugging, and for tests that inspect
the envs).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import multiprocessing.connection
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

VECTORIZATIONS = ("async", "sync")


@dataclass(frozen=True)
class Episode:
    suite: str
    task_id: int
    init_state_id: int
    seed: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.suite, self.task_id, self.init_state_id, self.seed)


@dataclass
class Reply:
    """What a slot sends back for a start or step command."""

    slot: int
    kind: str  # "start" | "step"
    obs: dict[str, np.ndarray] = field(default_factory=dict)  # image/wrist_image only when rendered
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # the env's info; "error" is "" or the exception text
    privileged: dict[str, Any] | None = None
    trace: dict[str, Any] | None = None  # envs/trace.py point: at a start, before a replan, at the episode's end
    seconds: float = 0.0  # time the worker spent on the command (physics + rendering + observation)
    render_seconds: float = 0.0  # ... of which rendering the cameras and preparing the images


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
    return f"{type(exc).__name__}: {exc}\n" + "".join(tb[-3:])


def make_worker_env(env_kwargs: dict[str, Any]):
    from envs.libero import LiberoEnv

    return LiberoEnv(**env_kwargs)


class SlotEnv:
    """One slot's environment and its command handling (inside the worker, or in-process for sync)."""

    def __init__(self, make_env: Callable, env_kwargs: dict[str, Any], perturb: list[dict] | None = None):
        self.env = make_env(dict(env_kwargs))
        if perturb:
            from envs.perturb import wrap

            self.env = wrap(self.env, perturb)
        self.base = self.env.unwrapped

    def _obs(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> dict[str, np.ndarray]:
        if info.get("rendered", True):
            return obs
        return {k: v for k, v in obs.items() if k not in ("image", "wrist_image")}  # black frames: not sent

    def _timed(self, reply: Reply, t0: float, r0: float) -> Reply:
        reply.seconds = time.perf_counter() - t0
        reply.render_seconds = getattr(self.base, "render_seconds", 0.0) - r0
        return reply

    def _trace(self) -> dict[str, Any] | None:
        try:
            return self.base.trace_point()
        except Exception:  # an env without one (a test double); triage copes with missing points
            return None

    def start(self, slot: int, ep: Episode, render: bool, privileged: bool) -> Reply:
        t0, r0 = time.perf_counter(), getattr(self.base, "render_seconds", 0.0)
        try:
            self.base.set_rendering(render)
            obs, info = self.env.reset(seed=ep.seed, options={"task_id": ep.task_id, "init_state_id": ep.init_state_id})
            reply = Reply(slot, "start", self._obs(obs, info), info={**info, "error": ""},
                          privileged=self.base.privileged_state() if privileged else None, trace=self._trace())
        except Exception as exc:  # the simulator failed: report it, keep the worker alive
            reply = Reply(slot, "start", info={"task": "", "task_id": ep.task_id, "init_state_id": ep.init_state_id,
                                               "step": 0, "error": _error_text(exc)})
        return self._timed(reply, t0, r0)

    def step(self, slot: int, action: np.ndarray, render: bool, privileged: bool, trace: bool = False) -> Reply:
        t0, r0 = time.perf_counter(), getattr(self.base, "render_seconds", 0.0)
        try:
            self.base.set_rendering(render)
            obs, _, terminated, truncated, info = self.env.step(action)
            reply = Reply(slot, "step", self._obs(obs, info), bool(terminated), bool(truncated), {**info, "error": ""},
                          privileged=self.base.privileged_state() if privileged else None,
                          trace=self._trace() if trace or terminated or truncated else None)
        except Exception as exc:
            reply = Reply(slot, "step", truncated=True, info={"step": getattr(self.base, "_step", 0),
                                                               "error": _error_text(exc)})
        return self._timed(reply, t0, r0)

    def close(self) -> None:
        self.env.close()


def _worker(conn, make_env, env_kwargs, slot: int, environ: dict[str, str], perturb: list[dict]) -> None:
    """A worker process: builds its env, then answers commands until told to close."""
    os.environ.update(environ)  # before robosuite is imported: it reads MUJOCO_GL/MUJOCO_EGL_DEVICE_ID once
    try:
        env = SlotEnv(make_env, env_kwargs, perturb)
    except Exception as exc:
        conn.send(("failed", _error_text(exc)))
        conn.close()
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            cmd, args = conn.recv()
            if cmd == "close":
                break
            conn.send(getattr(env, cmd)(slot, *args))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the runner went away: exit quietly
    finally:
        env.close()
        conn.close()


class PoolError(RuntimeError):
    pass


def error_reply(slot: int, cmd: str, args: tuple, error: str) -> Reply:
    """The reply to a command that got none (its worker died or hung): an error for the episode."""
    if cmd == "start":
        ep = args[0]
        return Reply(slot, "start", info={"task": "", "task_id": ep.task_id, "init_state_id": ep.init_state_id,
                                          "step": 0, "error": error})
    return Reply(slot, "step", truncated=True, info={"error": error})  # no "step": the runner keeps its count


class EnvPool:
    """`num_envs` slots of one suite. `send_start`/`send_step` issue a command to one slot;
    `collect` returns the replies that are in (waiting for the slots named, if any)."""

    def __init__(self, num_envs: int, env_kwargs: dict[str, Any], vectorization: str = "async",
                 make_env: Callable = make_worker_env, start_timeout_s: float = 600.0, wait: bool = True,
                 environ: dict[str, str] | None = None, perturb: list[dict] | None = None,
                 command_timeout_s: float | None = 300.0, max_replacements: int | None = None):
        """Starts the workers; with `wait=False` returns at once (the caller does other start-up work,
        e.g. compiling the policy) and `wait_ready()` must be called before the first command.
        `environ`: variables set in each worker before it imports the simulator (render_environ);
        `perturb`: envs.perturb specs wrapped around every slot's env; `command_timeout_s`: a worker
        that takes longer on one command is taken for hung and replaced (None: wait forever);
        `max_replacements`: dead or hung workers replaced before the pool gives up (default
        max(3, num_envs))."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if vectorization not in VECTORIZATIONS:
            raise ValueError(f"unknown vectorization {vectorization!r}; choose {' or '.join(VECTORIZATIONS)}")
        self.num_envs = num_envs
        self.sync = vectorization == "sync"
        self.busy: set[int] = set()  # slots with a command in flight
        self._inline: list[SlotEnv] = []
        self._done: list[Reply] = []  # sync mode: replies computed on send
        self._conns, self._procs = [], []
        self._ready = False
        self._timeout_s = start_timeout_s
        self._environ = dict(environ or {})
        self._perturb = list(perturb or [])
        self._make_env, self._env_kwargs = make_env, dict(env_kwargs)
        if command_timeout_s is not None and not command_timeout_s > 0:
            raise ValueError(f"command_timeout_s must be > 0 seconds or None, got {command_timeout_s}")
        self._command_timeout_s = command_timeout_s
        self._inflight: dict[int, tuple[str, tuple, float]] = {}  # slot -> (command, args, deadline)
        self.replaced = 0  # workers replaced after dying or hanging
        self._max_replacements = max(3, num_envs) if max_replacements is None else int(max_replacements)
        if self.sync:
            self._inline = [SlotEnv(make_env, env_kwargs, self._perturb) for _ in range(num_envs)]
            self._ready = True
        else:
            self._spawn(make_env, env_kwargs)
            if wait:
                self.wait_ready()

    def _spawn(self, make_env, env_kwargs) -> None:
        if mp.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
            # joblib's loky workers (a joblib sweep's jobs) set a start method of their own, which a spawned
            # child cannot recreate ("cannot find context for 'loky'"): start ours the standard way.
            mp.set_start_method("spawn", force=True)
        for i in range(self.num_envs):
            conn, proc = self._start_worker(i)
            self._conns.append(conn)
            self._procs.append(proc)
        self._spawned_at = time.monotonic()

    def _start_worker(self, i: int):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, self._make_env, self._env_kwargs, i, self._environ,
                                                 self._perturb), daemon=True, name=f"libero-slot-{i}")
        proc.start()
        child.close()
        return parent, proc

    def _replace(self, slot: int, why: str) -> Reply:
        """Kill slot's worker, start a fresh one in its place (waiting until its env is built) and return
        the error reply to the command it never answered."""
        cmd, args, _ = self._inflight.pop(slot)
        self.busy.discard(slot)
        proc, conn = self._procs[slot], self._conns[slot]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)
        conn.close()
        self.replaced += 1
        error = f"simulator worker {slot} {why} (exit code {proc.exitcode}); a fresh worker took its slot"
        if self.replaced > self._max_replacements:
            raise PoolError(f"{error}, but {self.replaced} workers have now died or hung in this run: stopping. "
                            "Look for a crash (segfault, out of memory: dmesg) in the output above")
        conn, proc = self._start_worker(slot)
        self._conns[slot], self._procs[slot] = conn, proc
        if not conn.poll(self._timeout_s):
            raise PoolError(f"{error}, but the new worker did not start within {self._timeout_s:.0f} s")
        try:
            status, detail = conn.recv()
        except EOFError:
            status, detail = "failed", f"it exited with code {proc.exitcode}"
        if status != "ready":
            raise PoolError(f"{error}, but the new worker could not build its environment:\n{detail}")
        return error_reply(slot, cmd, args, error)

    def wait_ready(self) -> None:
        """Block until every worker has built its environment (raises PoolError naming a failure)."""
        if self._ready:
            return
        timeout_s = self._timeout_s
        deadline = self._spawned_at + timeout_s
        for i, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self.close()
                raise PoolError(f"simulator worker {i} did not start within {timeout_s:.0f} s")
            try:
                status, detail = conn.recv()
            except EOFError:
                self._procs[i].join(timeout=5)
                status, detail = "failed", (f"the process ended (exit code {self._procs[i].exitcode}) before its "
                                            "environment was built; its own error is printed above")
            if status != "ready":
                self.close()
                raise PoolError(f"simulator worker {i} could not build its environment:\n{detail}")
        self._ready = True

    # ----- commands ------------------------------------------------------------------------------------
    def _send(self, slot: int, cmd: str, args: tuple) -> None:
        self.wait_ready()
        if slot in self.busy:
            raise RuntimeError(f"slot {slot} already has a command in flight")
        self.busy.add(slot)
        if self.sync:
            self._done.append(getattr(self._inline[slot], cmd)(slot, *args))
            return
        timeout = self._command_timeout_s
        self._inflight[slot] = (cmd, args, float("inf") if timeout is None else time.monotonic() + timeout)
        try:
            self._conns[slot].send((cmd, args))
        except (BrokenPipeError, OSError):  # died since its last reply: collect reports it
            pass

    def send_start(self, slot: int, episode: Episode, render: bool = True, privileged: bool = False) -> None:
        self._send(slot, "start", (episode, bool(render), bool(privileged)))

    def send_step(self, slot: int, action: np.ndarray, render: bool = True, privileged: bool = False,
                  trace: bool = False) -> None:
        self._send(slot, "step", (np.asarray(action, dtype=np.float32), bool(render), bool(privileged), bool(trace)))

    def collect(self, wait_for: set[int] | None = None, timeout: float | None = 0.0,
                wake: list | None = None) -> list[Reply]:
        """The replies that have arrived. Blocks until every slot in `wait_for` has answered (or, with
        `wait_for` empty/None, until at least one reply is in when `timeout` is None). `wake`: more
        connections (e.g. the policy thread's, runners/policy_thread.py) whose readiness ends a block
        early; they are not read here."""
        wait_for = set(wait_for or ()) & self.busy
        wake = list(wake or ())
        replies: list[Reply] = []
        if self.sync:
            replies, self._done = self._done, []
        else:
            block = timeout is None and not wait_for
            woken = False
            while True:
                wait_s = None if (wait_for or block) else timeout
                if self.busy:  # wake up for the first command past its deadline
                    first = min(self._inflight[i][2] for i in self.busy) - time.monotonic()
                    wait_s = max(0.0, first) if wait_s is None else min(wait_s, max(0.0, first))
                    wait_s = None if wait_s == float("inf") else wait_s
                ready = mp.connection.wait([self._conns[i] for i in self.busy] + wake, timeout=wait_s)
                for conn in ready:
                    if any(conn is w for w in wake):
                        woken = True
                        continue
                    slot = self._conns.index(conn)
                    try:
                        replies.append(conn.recv())
                        self._inflight.pop(slot, None)
                    except EOFError:
                        replies.append(self._replace(slot, "died"))
                    self.busy.discard(slot)
                    wait_for.discard(slot)
                now = time.monotonic()
                for slot in [i for i in self.busy if self._inflight[i][2] <= now]:
                    replies.append(self._replace(slot, f"did not answer within {self._command_timeout_s:g} s "
                                                       "(hung) and was killed"))
                    wait_for.discard(slot)
                block = block and not replies and not woken
                if not wait_for and not block:
                    break
        for r in replies:
            self.busy.discard(r.slot)
        return replies

    def close(self) -> None:
        for slot, conn in enumerate(self._conns):
            try:
                if slot in self.busy:
                    conn.poll(30)  # let an in-flight command finish so the env closes cleanly
                    if conn.poll():
                        conn.recv()
                conn.send(("close", ()))
            except (OSError, EOFError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        for env in self._inline:
            env.close()
        self._inline = []
        self.busy.clear()
        self._inflight.clear()


def render_environ(render_device, policy_device=None) -> dict[str, str]:
    """Worker environment variables for `render_device`: `auto` renders through EGL on the policy's GPU
    (cuda:k -> EGL device k; a multi-GPU sweep's jobs each render on their own GPU), else on the
    default device; an integer picks that EGL device; `cpu` renders with OSMesa on the CPU (slow; the
    way out if a driver misbehaves with CUDA and EGL on one GPU)."""
    choice = str(render_device).strip().lower()
    if choice == "cpu":
        return {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    if choice == "auto":
        dev = str(policy_device or "")
        if dev.startswith("cuda:") and dev[5:].isdigit() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            return {"MUJOCO_EGL_DEVICE_ID": dev[5:]}
        return {}
    if choice.isdigit():
        return {"MUJOCO_EGL_DEVICE_ID": choice}
    raise ValueError(f"render_device must be auto, cpu or an EGL device number, got {render_device!r}")


def env_factory(make_env: Callable, **kwargs) -> Callable:
    """`make_env` with keyword arguments bound (picklable, for spawn)."""
    return functools.partial(make_env, **kwargs) if kwargs else make_env
