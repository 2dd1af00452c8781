"""A pool of LIBERO environments stepped together, each running its own sequence of episodes.

Built on gymnasium's AsyncVectorEnv (one worker process per environment, started with "spawn" so
that every worker creates its own MuJoCo/EGL context) with autoreset disabled: the runner decides
when each slot starts its next episode (`reset_mask`) and which one (`pending`, set per slot).

Inside each worker, `EpisodeWorker` turns simulator exceptions into an `error` entry so that one
crashing episode does not take the pool down, and treats an all-NaN action as "stay idle" for
slots with no episode left to run.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

IDLE = np.full(7, np.nan, dtype=np.float32)


@dataclass(frozen=True)
class Episode:
    suite: str
    task_id: int
    init_state_id: int
    seed: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.suite, self.task_id, self.init_state_id, self.seed)


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
    return f"{type(exc).__name__}: {exc}\n" + "".join(tb[-3:])


class EpisodeWorker(gym.Wrapper):
    """Wraps a LiberoEnv inside a worker process (see the module docstring)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.pending: Episode | None = None
        self._last_obs = {k: np.zeros(s.shape, s.dtype) for k, s in env.observation_space.items()}
        self._last_info = self._blank_info()

    def _blank_info(self) -> dict[str, Any]:
        env = self.env.unwrapped
        return {"task": "", "success": False, "suite": env.suite, "task_id": -1, "init_state_id": -1,
                "step": 0, "error": ""}

    def reset(self, *, seed=None, options=None):
        ep = self.pending
        if ep is None:
            raise RuntimeError("EpisodeWorker.reset needs `pending` to be set to an Episode first")
        try:
            obs, info = self.env.reset(
                seed=ep.seed, options={"task_id": ep.task_id, "init_state_id": ep.init_state_id}
            )
            self._last_obs, self._last_info = obs, {**info, "error": ""}
        except Exception as exc:  # the simulator failed: report it, keep the worker alive
            self._last_info = {**self._blank_info(), "task_id": ep.task_id, "init_state_id": ep.init_state_id,
                               "error": _error_text(exc)}
        return self._last_obs, dict(self._last_info)

    def step(self, action):
        action = np.asarray(action)
        if np.isnan(action).all():
            return self._last_obs, 0.0, False, False, {**self._last_info, "error": ""}
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as exc:
            return self._last_obs, 0.0, False, True, {**self._last_info, "error": _error_text(exc)}
        self._last_obs, self._last_info = obs, {**info, "error": ""}
        return obs, reward, terminated, truncated, dict(self._last_info)

    def privileged_state(self):
        return self.env.unwrapped.privileged_state()

    def replan_state(self, privileged: bool) -> dict[str, Any]:
        """What the runner reads when it asks for a chunk, in one round trip: the trace point (failure
        triage, envs/trace.py; None when the env cannot give one) and, if asked, the privileged state."""
        env = self.env.unwrapped
        try:
            trace = env.trace_point()
        except Exception:  # an episode that failed to start; triage copes with a missing point
            trace = None
        return {"trace": trace, "privileged": env.privileged_state() if privileged else None}


def make_worker_env(env_kwargs: dict[str, Any]) -> EpisodeWorker:
    from envs.libero import LiberoEnv

    return EpisodeWorker(LiberoEnv(**env_kwargs))


class EnvPool:
    """`num_envs` LiberoEnv slots of one suite. `start` begins episodes; `step` advances every slot."""

    def __init__(self, num_envs: int, env_kwargs: dict[str, Any], vectorization: str = "async",
                 make_env=make_worker_env):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        fns = [functools.partial(make_env, dict(env_kwargs)) for _ in range(num_envs)]
        if vectorization == "async":
            self.venv = gym.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode="Disabled")
        elif vectorization == "sync":
            self.venv = gym.vector.SyncVectorEnv(fns, autoreset_mode="Disabled")
        else:
            raise ValueError(f"unknown vectorization {vectorization!r}; choose async or sync")
        self.num_envs = num_envs

    def start(self, episodes: dict[int, Episode]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Reset the given slots into their episodes. Returns the batched observation and, per slot, its
        info (an empty dict for slots that were not reset)."""
        pending = [None] * self.num_envs
        current = self.venv.get_attr("pending")
        for i in range(self.num_envs):
            pending[i] = episodes.get(i, current[i])
        self.venv.set_attr("pending", pending)
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[list(episodes)] = True
        obs, info = self.venv.reset(options={"reset_mask": mask})
        return obs, _split_info(info, self.num_envs, mask)

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info = self.venv.step(actions.astype(np.float32))
        return obs, terminated, truncated, _split_info(info, self.num_envs)

    def privileged_states(self) -> list[dict[str, Any]]:
        return list(self.venv.call("privileged_state"))

    def replan_states(self, privileged: bool = False) -> list[dict[str, Any]]:
        """Per slot {"trace": point, "privileged": state or None} (EpisodeWorker.replan_state)."""
        return list(self.venv.call("replan_state", privileged))

    def close(self) -> None:
        self.venv.close()


def _split_info(info: dict[str, Any], n: int, mask: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Undo gymnasium's batching of info dicts: one plain dict per slot."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in info.items():
        if key.startswith("_"):
            continue
        present = info.get("_" + key, np.ones(n, dtype=bool))
        for i in range(n):
            if present[i] and (mask is None or mask[i]):
                v = values[i]
                out[i][key] = v.item() if isinstance(v, np.generic) else v
    return out
