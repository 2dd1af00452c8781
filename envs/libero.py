"""LIBERO (robosuite + MuJoCo) as a gymnasium environment, set up exactly as openpi evaluates Pi0.5.

openpi: examples/libero/main.py. Per episode: seed, `env.reset()`, `set_init_state(init_states[k])`,
`settle_steps` no-op steps with the gripper open (not counted), then up to `max_steps` policy steps;
success is LIBERO's `done`. The policy sees both camera frames rotated 180 degrees and resized with pad
to 224, the 8-D state (eef position, eef axis-angle, gripper qpos) and `task.language`.

Only LIBERO's upstream API is used (`libero.libero.benchmark`, `libero.libero.envs.OffScreenRenderEnv`),
so any LIBERO install works. robosuite is imported lazily, after the OpenGL backend is chosen.
Any suite of envs/suites.py runs, the LIBERO-PRO variants included (see `task_prompt` for their prompt).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from openpi_client.image_tools import resize_with_pad  # openpi's own resize (what Pi0.5 trained on)

from envs.checks import check_env_settings
from envs.images import upright
from envs.quiet import quiet_libero_stdout, quiet_robosuite
from envs.rendering import select_gl_backend
from envs.suites import check_task_id, get_suite

SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # no motion, gripper open


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """robosuite's (x, y, z, w) quaternion to an axis-angle vector, as openpi's LIBERO example computes it."""
    w = min(max(float(quat_xyzw[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat_xyzw[:3], dtype=np.float64) * 2.0 * math.acos(w) / den


CAMERAS = ("agentview", "robot0_eye_in_hand")  # LIBERO's agent view and wrist camera, as openpi uses them


def task_prompt(suite: str, task, language_instruction: str) -> str:
    """The instruction the policy gets: openpi's `task.language` (made from the task's file name), except
    where a LIBERO-PRO variant changed the instruction inside the task file.

    LIBERO-PRO's `_lan` and `_task` suites keep the base task's file names, so their `task.language` is
    the *base* instruction; their own ("lift the black bowl ... and set it on the plate", or another task
    altogether) is only the file's `:language`, which LIBERO-PRO's runner sends. So: where the variant's
    `:language` differs from that of the base suite's file of the same name, send it; otherwise (the
    standard suites, scene-only variants like `_swap` or `_with_mug`) send `task.language`, as openpi does.
    """
    from envs.suites import base_suite

    base = base_suite(suite)
    if base == suite:
        return task.language
    from libero.libero import get_libero_path
    from libero.libero.envs.bddl_utils import get_problem_info

    base_file = os.path.join(get_libero_path("bddl_files"), base, task.bddl_file)
    if os.path.isfile(base_file) and get_problem_info(base_file)["language_instruction"] != language_instruction:
        return str(language_instruction)
    return task.language


class LiberoEnv(gym.Env):
    """One LIBERO task. `reset(options={"init_state_id": k})` starts from the task's k-th fixed initial state.

    `options` may also carry `task_id` to switch this environment to another task of its suite (the
    simulator is rebuilt), which lets a pool of worker processes run every task of a suite.

    Rendering on demand: `set_rendering(False)` makes the following steps skip the cameras (their
    images are black and `info["rendered"]` is False) until `set_rendering(True)`; a runner that looks
    at one observation in five renders one step in five. Physics never depend on it, and a rendered
    step's pixels are exactly those of an env that renders every step: robosuite samples a camera
    at a fixed sub-step of each control step, and only the render call itself is skipped, not that
    sampling schedule.

    Reset hooks (`add_reset_hook`) run after the init state is loaded and before the settle steps; the
    perturbation wrappers in envs/perturb/ use them to move the robot or objects, the camera or the
    lights. With no hook set, reset is exactly openpi's.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        suite: str = "libero_spatial",
        task_id: int = 0,
        camera_size: int = 256,
        image_size: int = 224,
        settle_steps: int = 10,
        max_steps: int | None = None,
        seed: int = 7,
        render_mode: str | None = "rgb_array",
        cameras: bool = True,
    ):
        self.suite = get_suite(suite).name
        check_task_id(self.suite, task_id)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        check_env_settings(camera_size, image_size, settle_steps, max_steps, seed)
        self.camera_size = int(camera_size)
        self.image_size = int(image_size)
        self.settle_steps = int(settle_steps)
        self.max_steps = int(max_steps) if max_steps is not None else get_suite(self.suite).max_steps
        self.default_seed = int(seed)
        self.render_mode = render_mode
        # cameras=False skips rendering (10x faster on a CPU) for policies that read the privileged
        # state instead of images; the images are then black. Physics and success are unchanged.
        self.cameras = bool(cameras)
        self._render = self.cameras  # render the cameras on the next steps (set_rendering)
        self.render_seconds = 0.0  # time spent rendering and preparing images, for profiling runners
        self._rendered = self.cameras  # whether the last observation's images were rendered

        img = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.observation_space = spaces.Dict(
            {"image": img, "wrist_image": img, "state": spaces.Box(-np.inf, np.inf, (8,), np.float32)}
        )
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)

        select_gl_backend()
        quiet_robosuite()
        from libero.libero import benchmark

        with quiet_libero_stdout():
            self._benchmark = benchmark.get_benchmark_dict()[self.suite]()
        self._sim = None  # LIBERO's OffScreenRenderEnv, built for self.task_id
        self.task_id = -1
        self._load_task(int(task_id))
        self.init_state_id = 0
        self.episode_seed = self.default_seed  # the seed of the current episode (reset's, else default)
        self._step = 0
        self._raw: dict[str, np.ndarray] | None = None
        self._tracer = None  # envs/trace.py Tracer of the current task's simulator, built on first use
        self._reset_hooks: list[Callable[[LiberoEnv], bool]] = []

    # ----- task switching -------------------------------------------------------------------------
    def _load_task(self, task_id: int) -> None:
        check_task_id(self.suite, task_id)
        if task_id == self.task_id and self._sim is not None:
            return
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        self._close_sim()
        task = self._benchmark.get_task(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        self._sim = OffScreenRenderEnv(
            bddl_file_name=bddl,
            camera_heights=self.camera_size,
            camera_widths=self.camera_size,
            use_camera_obs=self.cameras,
            # robosuite refuses to step past its horizon; keep it beyond anything we run.
            horizon=self.settle_steps + self.max_steps + 10,
        )
        self._gate_cameras()
        self.task_id = task_id
        self.task = task_prompt(self.suite, task, self._sim.language_instruction)
        self._init_states = np.asarray(self._benchmark.get_task_init_states(task_id))

    def _gate_cameras(self) -> None:
        """Put a switch in front of robosuite's camera sensors (again after every hard reset, which
        makes new ones): when rendering is off they return a cached black frame without rendering."""
        if not self.cameras:
            return
        observables = self._sim.env._observables
        for cam in CAMERAS:
            obs = observables[f"{cam}_image"]
            inner = getattr(obs._sensor, "__wrapped__", obs._sensor)
            black = np.zeros((self.camera_size, self.camera_size, 3), dtype=np.uint8)

            def gated(obs_cache, inner=inner, black=black):
                if not self._render:
                    return black
                t0 = time.perf_counter()
                frame = inner(obs_cache)
                self.render_seconds += time.perf_counter() - t0
                return frame

            gated.__wrapped__ = inner
            gated.__modality__ = getattr(inner, "__modality__", "image")
            obs._sensor = gated

    def set_rendering(self, on: bool) -> None:
        """Render the cameras on the steps that follow (default), or skip them; see the class docstring."""
        self._render = bool(on) and self.cameras

    @property
    def num_init_states(self) -> int:
        return len(self._init_states)

    @property
    def robosuite_env(self):
        """LIBERO's robosuite environment for the current task (MuJoCo model and data at `.sim`), for
        perturbations and tests. It is rebuilt on every reset (hard reset) and on a task switch."""
        return self._sim.env

    # ----- reset hooks --------------------------------------------------------------------------------
    def add_reset_hook(self, hook: Callable[[LiberoEnv], bool]) -> None:
        """Call `hook(env)` on every reset, after the init state is loaded and before the settle steps.

        Hooks run in the order they were added. The hook may change the MuJoCo model or state (then it
        must call `sim.forward()`) and returns True if it changed anything: with `settle_steps=0` the
        observation is then re-read, so that it shows the change. `env.suite`, `task_id`, `init_state_id`
        and `episode_seed` already name the new episode when a hook runs.
        """
        if not callable(hook):
            raise TypeError(f"a reset hook must be callable, got {hook!r}")
        self._reset_hooks.append(hook)

    def remove_reset_hook(self, hook: Callable[[LiberoEnv], bool]) -> None:
        """Undo `add_reset_hook` (a ValueError if `hook` was never added)."""
        self._reset_hooks.remove(hook)

    # ----- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        if "task_id" in options:
            self._load_task(int(options.pop("task_id")))
        k = int(options.pop("init_state_id", 0))
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; known: task_id, init_state_id")
        if not 0 <= k < self.num_init_states:
            raise ValueError(
                f"init_state_id {k} is out of range: {self.suite} task {self.task_id} has "
                f"{self.num_init_states} initial states (0..{self.num_init_states - 1})"
            )
        self.init_state_id = k
        self.episode_seed = self.default_seed if seed is None else int(seed)
        # LIBERO's env.seed seeds NumPy's global generator (placement sampling); reseeding on every
        # reset makes an episode depend only on (task, init state, seed), not on what ran before.
        self._sim.seed(self.episode_seed)
        self._sim.reset()
        self._gate_cameras()  # a hard reset made new camera sensors
        render = self._render
        # Only the observation reset returns is looked at: render for it alone.
        self._render = render and self.settle_steps == 0
        self._raw = self._sim.set_init_state(self._init_states[k])
        changed = False
        for hook in self._reset_hooks:
            changed = bool(hook(self)) or changed
        if changed and self.settle_steps == 0:
            # The settle steps would render the changed scene; without them, render it here.
            self._sim.env._update_observables(force=True)
            self._raw = self._sim.env._get_observations()
        for i in range(self.settle_steps):
            self._render = render and i == self.settle_steps - 1
            self._raw, _, _, _ = self._sim.step(SETTLE_ACTION.tolist())
        self._render = render
        self._rendered = render
        self._step = 0
        return self._observation(), self._info(success=False)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"action must have shape (7,) (OSC_POSE delta xyz, delta rpy, gripper), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action contains NaN or inf: {action.tolist()}")
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        # Passed through without clipping, as openpi does; robosuite clips to its controller limits.
        self._raw, _, done, _ = self._sim.step(action.tolist())
        self._rendered = self._render
        self._step += 1
        success = bool(done)
        truncated = not success and self._step >= self.max_steps
        return self._observation(), float(success), success, truncated, self._info(success)

    def render(self):
        if self._raw is None:
            raise RuntimeError("call reset() before render()")
        if not self._rendered:
            return np.zeros((self.camera_size, self.camera_size, 3), dtype=np.uint8)
        return upright(self._raw["agentview_image"])

    def close(self):
        self._close_sim()

    def _close_sim(self):
        if self._sim is not None:
            self._sim.close()
            self._sim = None

    # ----- observations -----------------------------------------------------------------------------
    def _observation(self) -> dict[str, np.ndarray]:
        raw = self._raw
        size = self.image_size
        state = np.concatenate(
            [raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        )
        if not self._rendered:
            black = np.zeros((size, size, 3), dtype=np.uint8)
            return {"image": black, "wrist_image": black.copy(), "state": state.astype(np.float32)}
        t0 = time.perf_counter()
        obs = {
            "image": resize_with_pad(upright(raw["agentview_image"]), size, size),
            "wrist_image": resize_with_pad(upright(raw["robot0_eye_in_hand_image"]), size, size),
            "state": state.astype(np.float32),
        }
        self.render_seconds += time.perf_counter() - t0
        return obs

    def _info(self, success: bool) -> dict[str, Any]:
        return {
            "task": self.task,
            "success": success,
            "suite": self.suite,
            "task_id": self.task_id,
            "init_state_id": self.init_state_id,
            "step": self._step,
            "rendered": self._rendered,
        }

    # ----- privileged interface (for scripted controllers and tests) -------------------------------
    def privileged_state(self) -> dict[str, Any]:
        """Ground truth a scripted controller may use; see envs/privileged.py for the exact contents."""
        from envs.privileged import read_privileged_state

        return read_privileged_state(self._sim.env, self._raw)

    def trace_point(self) -> dict[str, Any]:
        """One point of the episode's privileged trace (failure triage; contents in envs/trace.py)."""
        from envs.trace import Tracer

        if self._raw is None:
            raise RuntimeError("call reset() before trace_point()")
        if self._tracer is None or self._tracer.sim is not self._sim.env.sim:  # robosuite may rebuild its sim on reset
            self._tracer = Tracer(self._sim.env)
        return self._tracer.point(self._raw, self._step)

    def set_object_pose(self, name: str, pos, quat_wxyz=None) -> None:
        """Teleport a free object (debugging and tests): write its free joint, then recompute the scene."""
        from envs.privileged import set_object_pose

        set_object_pose(self._sim.env, name, pos, quat_wxyz)
