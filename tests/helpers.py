"""Test policies and environment wrappers that record what crosses the runner's boundaries."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
from hydra import compose, initialize_config_dir

from envs.libero import LiberoEnv

CONF = Path(__file__).resolve().parents[1] / "conf"

# Every ActionLog created in this process (sync vectorization keeps envs in-process).
LOGS: list["ActionLog"] = []


def config(*overrides: str, name: str = "evaluate"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


class ActionLog(gym.Wrapper):
    """Records every action an environment receives, with the episode it belongs to."""

    def __init__(self, env):
        super().__init__(env)
        self.actions: list[tuple[str, int, int, np.ndarray]] = []  # (task, task_id, init_state_id, action)
        LOGS.append(self)

    def step(self, action):
        env = self.env.unwrapped
        self.actions.append((env.task, env.task_id, env.init_state_id, np.array(action, dtype=np.float64)))
        return self.env.step(action)


def make_logged_env(env_kwargs):
    return ActionLog(LiberoEnv(**env_kwargs))


class FailingStep(gym.Wrapper):
    """Raises inside `step` on the 3rd step of init state 0 (a simulator crash)."""

    def reset(self, **kw):
        self.n = 0
        return self.env.reset(**kw)

    def step(self, action):
        self.n += 1
        if self.env.unwrapped.init_state_id == 0 and self.n == 3:
            raise RuntimeError("simulated MuJoCo failure")
        return self.env.step(action)


def make_failing_env(env_kwargs):
    return FailingStep(LiberoEnv(**env_kwargs))


class ChunkPolicy:
    """Returns chunks whose x-translation encodes (call number, position in chunk, prompt), and records
    the batch it was given."""

    needs_privileged = False

    def __init__(self, chunk_size: int = 8, nan_for: str | None = None, supports_rtc: bool = False,
                 delay_s: float = 0.0):
        self.chunk_size = chunk_size
        self.nan_for = nan_for
        self.delay_s = delay_s  # each call takes this long on the wall clock (a slow model)
        self.supports_rtc = supports_rtc  # records the real-time chunking inputs (it does not use them)
        self.calls: list[dict] = []
        self.times: list[tuple[float, float]] = []  # (began, ended) of each call, time.monotonic()
        self.prompts: dict[str, int] = {}

    @staticmethod
    def encode(call: int, j: int, prompt_code: int) -> float:
        return round(1e-3 * (100 * prompt_code + 10 * call + j), 6)

    def infer(self, batch):
        n = len(batch["prompt"])
        assert batch["image"].shape[0] == n and batch["state"].shape == (n, 8)
        import time

        call = len(self.calls)
        began = time.monotonic()
        time.sleep(self.delay_s)
        self.calls.append({"prompts": list(batch["prompt"]), "n": n, "steps": list(batch.get("step", [])),
                           "episodes": list(batch.get("episode", [])),
                           "prev_actions": batch.get("prev_actions"), "prev_frozen": batch.get("prev_frozen"),
                           "prev_overlap": batch.get("prev_overlap")})
        self.times.append((began, time.monotonic()))
        actions = np.zeros((n, self.chunk_size, 7))
        actions[..., -1] = -1
        for r, prompt in enumerate(batch["prompt"]):
            code = self.prompts.setdefault(prompt, len(self.prompts))
            for j in range(self.chunk_size):
                actions[r, j, 0] = self.encode(call, j, code)
            if self.nan_for is not None and self.nan_for in prompt:
                actions[r, 2, 3] = np.nan
        return {"actions": actions}

    def reset(self):
        pass


class EventLog(gym.Wrapper):
    """Appends (slot kind, event, init state, time) lines to a file as the env resets and steps; resets
    of the init states in `slow` take `delay_s` longer. Lives in a worker process, hence the file."""

    def __init__(self, env, path: str, slow: tuple = (), delay_s: float = 0.0):
        super().__init__(env)
        self.path, self.slow, self.delay_s = path, set(slow), delay_s

    def _log(self, event: str, k: int) -> None:
        import time

        with open(self.path, "a") as f:
            f.write(f"{event} {k} {time.monotonic():.6f}\n")

    def reset(self, **kw):
        k = int(kw.get("options", {}).get("init_state_id", 0))
        self._log("reset_begin", k)
        if k in self.slow:
            import time

            time.sleep(self.delay_s)
        out = self.env.reset(**kw)
        self._log("reset_end", k)
        return out

    def step(self, action):
        out = self.env.step(action)
        self._log("step", self.env.unwrapped.init_state_id)
        return out


def make_event_env(env_kwargs, path: str, slow: tuple = (), delay_s: float = 0.0):
    return EventLog(LiberoEnv(**env_kwargs), path, slow, delay_s)


class DyingStep(gym.Wrapper):
    """On the 3rd step of init state 1 the worker process dies (a segfault in MuJoCo or EGL, the
    out-of-memory killer); on the 3rd step of init state 2 it hangs."""

    def reset(self, **kw):
        self.n = 0
        return self.env.reset(**kw)

    def step(self, action):
        import os
        import time

        self.n += 1
        k = self.env.unwrapped.init_state_id
        if k == 1 and self.n == 3:
            os._exit(139)
        if k == 2 and self.n == 3:
            time.sleep(3600)
        return self.env.step(action)


def make_dying_env(env_kwargs):
    return DyingStep(LiberoEnv(**env_kwargs))
