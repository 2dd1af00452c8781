"""LiberoEnv on real LIBERO (robosuite + MuJoCo, software rendering on the CPU)."""

import os

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.libero import LiberoEnv
from envs.suites import STANDARD_SUITES, SUITES


def _check_obs(obs, size=224):
    assert set(obs) == {"image", "wrist_image", "state"}
    for key in ("image", "wrist_image"):
        assert obs[key].shape == (size, size, 3) and obs[key].dtype == np.uint8
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    assert np.all(np.isfinite(obs["state"]))


@pytest.mark.parametrize("suite", STANDARD_SUITES)  # LIBERO-PRO suites: tests/test_suites.py
def test_task0_of_every_suite_makes_resets_and_steps(suite):
    env = gym.make(envs.ENV_ID, suite=suite, task_id=0)
    try:
        obs, info = env.reset(options={"init_state_id": 0})
        _check_obs(obs)
        assert info["suite"] == suite and info["task_id"] == 0 and info["init_state_id"] == 0
        assert info["step"] == 0 and info["success"] is False
        assert isinstance(info["task"], str) and len(info["task"]) > 5
        obs, reward, terminated, truncated, info = env.step(np.zeros(7, dtype=np.float32))
        _check_obs(obs)
        assert info["step"] == 1 and not terminated and not truncated and reward == 0.0
        assert env.unwrapped.max_steps == SUITES[suite].max_steps
        assert obs in env.observation_space
    finally:
        env.close()


def test_gymnasium_env_checker_passes():
    from gymnasium.utils.env_checker import check_env

    env = gym.make(envs.ENV_ID, suite="libero_spatial", task_id=1)
    try:
        check_env(env.unwrapped)
    finally:
        env.close()


@pytest.fixture(scope="module")
def spatial_env():
    env = LiberoEnv(suite="libero_spatial", task_id=0, camera_size=224, image_size=224, max_steps=4)
    yield env
    env.close()


def test_image_is_the_raw_libero_frame_rotated_180_degrees(spatial_env):
    """Build LIBERO's own env the way openpi's example does and compare pixels."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    obs, _ = spatial_env.reset(options={"init_state_id": 3})
    suite = benchmark.get_benchmark_dict()["libero_spatial"]()
    task = suite.get_task(0)
    ref = OffScreenRenderEnv(
        bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
        camera_heights=224,
        camera_widths=224,
    )
    try:
        ref.seed(7)
        ref.reset()
        raw = ref.set_init_state(suite.get_task_init_states(0)[3])
        for _ in range(10):
            raw, *_ = ref.step([0, 0, 0, 0, 0, 0, -1])
        np.testing.assert_array_equal(obs["image"], raw["agentview_image"][::-1, ::-1])
        np.testing.assert_array_equal(obs["wrist_image"], raw["robot0_eye_in_hand_image"][::-1, ::-1])
        assert not np.array_equal(obs["image"], raw["agentview_image"])  # the rotation matters
        np.testing.assert_allclose(obs["state"][:3], raw["robot0_eef_pos"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(obs["state"][6:], raw["robot0_gripper_qpos"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(spatial_env.render(), raw["agentview_image"][::-1, ::-1])
    finally:
        ref.close()


def test_same_task_init_state_and_seed_give_identical_trajectories(spatial_env):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(3, 7)).astype(np.float32)

    def rollout():
        obs, _ = spatial_env.reset(options={"init_state_id": 5})
        frames = [obs]
        for a in actions:
            obs, *_ = spatial_env.step(a)
            frames.append(obs)
        return frames

    first, second = rollout(), rollout()
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["state"], first[-1]["state"])  # the actions moved the robot


def test_different_init_states_differ(spatial_env):
    a, _ = spatial_env.reset(options={"init_state_id": 0})
    b, _ = spatial_env.reset(options={"init_state_id": 1})
    assert not np.array_equal(a["image"], b["image"])


def test_moving_the_target_onto_its_goal_terminates_with_success(spatial_env):
    spatial_env.reset(options={"init_state_id": 0})
    state = spatial_env.privileged_state()
    assert state["goal"] == [("on", "akita_black_bowl_1", "plate_1")]
    plate = state["objects"]["plate_1"]
    bowl = state["objects"]["akita_black_bowl_1"]
    # Rest the bowl's underside 5 mm above the plate's top surface; it drops onto it.
    lift = plate["bbox_max"][2] - bowl["bbox_min"][2] + 0.005
    spatial_env.set_object_pose("akita_black_bowl_1", [plate["pos"][0], plate["pos"][1], bowl["pos"][2] + lift])
    results = [spatial_env.step(np.zeros(7)) for _ in range(3)]
    terminated = [r[2] for r in results]
    assert any(terminated), "LIBERO did not report success with the bowl on the plate"
    first = terminated.index(True)
    _, reward, _, truncated, info = results[first]
    assert info["success"] is True and reward == 1.0 and truncated is False


def test_no_success_without_moving_the_object(spatial_env):
    spatial_env.reset(options={"init_state_id": 0})
    for _ in range(3):
        _, _, terminated, _, info = spatial_env.step(np.zeros(7))
        assert not terminated and not info["success"]


def test_truncates_at_max_steps(spatial_env):
    spatial_env.reset(options={"init_state_id": 0})
    flags = [spatial_env.step(np.zeros(7))[3] for _ in range(4)]
    assert flags == [False, False, False, True]


@pytest.mark.parametrize(
    "action, message",
    [
        (np.zeros(6), "shape"),
        (np.zeros((1, 7)), "shape"),
        (np.array([0, 0, np.nan, 0, 0, 0, 0]), "NaN"),
        (np.array([0, 0, 0, np.inf, 0, 0, 0]), "NaN or inf"),
    ],
)
def test_bad_actions_raise(spatial_env, action, message):
    spatial_env.reset(options={"init_state_id": 0})
    with pytest.raises(ValueError, match=message):
        spatial_env.step(action)


def test_bad_arguments_name_the_valid_choices():
    with pytest.raises(ValueError, match="libero_spatial"):
        LiberoEnv(suite="libero_nope")
    with pytest.raises(ValueError, match="0..9"):
        LiberoEnv(suite="libero_goal", task_id=10)


def test_init_state_out_of_range_raises(spatial_env):
    with pytest.raises(ValueError, match="0..49"):
        spatial_env.reset(options={"init_state_id": 50})


def test_reset_can_switch_task(spatial_env):
    try:
        _, info = spatial_env.reset(options={"task_id": 2, "init_state_id": 0})
        assert info["task_id"] == 2 and info["task"] != ""
        assert spatial_env.privileged_state()["goal"][0][0] == "on"
    finally:
        spatial_env.reset(options={"task_id": 0})


def _make(task_id):
    return lambda: LiberoEnv(suite="libero_spatial", task_id=task_id, camera_size=128, image_size=128)


def test_async_vector_env_over_two_tasks_steps_and_closes():
    venv = gym.vector.AsyncVectorEnv([_make(0), _make(4)], context="spawn")
    try:
        obs, info = venv.reset(options={"init_state_id": 0})
        assert obs["image"].shape == (2, 128, 128, 3) and obs["state"].shape == (2, 8)
        assert list(info["task_id"]) == [0, 4] and info["task"][0] != info["task"][1]
        obs, reward, terminated, truncated, info = venv.step(np.zeros((2, 7), dtype=np.float32))
        assert obs["image"].dtype == np.uint8 and reward.shape == (2,) and not terminated.any()
        assert list(info["step"]) == [1, 1]
    finally:
        venv.close()
    assert venv.closed


def test_rendering_backend_error_names_the_packages(monkeypatch):
    from envs import rendering

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(rendering, "_works", lambda backend: False)
    with pytest.raises(rendering.RenderingUnavailable) as info:
        rendering.select_gl_backend()
    text = str(info.value)
    assert "libosmesa6" in text  # the CPU route
    assert "libglvnd0" in text and "__EGL_VENDOR_LIBRARY_FILENAMES" in text  # the NVIDIA route


def test_rendering_backend_probe_finds_egl_or_osmesa(monkeypatch):
    from envs import rendering

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    assert rendering.select_gl_backend() in ("egl", "osmesa")
    assert os.environ["MUJOCO_GL"] in ("egl", "osmesa")


def test_rendering_backend_honours_mujoco_gl(monkeypatch):
    from envs import rendering

    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    assert rendering.select_gl_backend() == "osmesa"
    assert os.environ["PYOPENGL_PLATFORM"] == "osmesa"


def test_renders_when_cuda_visible_devices_is_empty(monkeypatch):
    """Cluster jobs given no GPU get CUDA_VISIBLE_DEVICES='' (robosuite used to crash on it)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = ("import envs.libero as l; e = l.LiberoEnv(suite='libero_object', task_id=0, camera_size=64, image_size=64);"
            "o, _ = e.reset(); assert o['image'].std() > 0; e.close(); print('ok')")
    import subprocess, sys

    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_cameras_off_gives_the_same_physics():
    rng = np.random.default_rng(3)
    actions = rng.uniform(-1, 1, size=(6, 7))
    states = []
    for cameras in (True, False):
        env = LiberoEnv(suite="libero_object", task_id=2, cameras=cameras, camera_size=64, image_size=64)
        try:
            obs, _ = env.reset(options={"init_state_id": 1})
            run = [obs["state"]] + [env.step(a)[0]["state"] for a in actions]
            states.append(np.stack(run))
            if not cameras:
                assert not obs["image"].any() and obs["image"].shape == (64, 64, 3)
        finally:
            env.close()
    np.testing.assert_array_equal(states[0], states[1])


def test_rendering_only_some_steps_keeps_physics_and_the_rendered_pixels_exactly():
    """A runner renders only the steps whose observation the policy (or a video) looks at: physics,
    success and the pixels of the rendered steps must equal an env that renders every step."""
    rng = np.random.default_rng(5)
    actions = rng.uniform(-1, 1, size=(12, 7))
    runs = {}
    for every_step in (True, False):
        env = LiberoEnv(suite="libero_spatial", task_id=1, camera_size=96, image_size=96)
        try:
            obs, info = env.reset(options={"init_state_id": 2})
            frames, states, flags = [(obs["image"], obs["wrist_image"])], [obs["state"]], [info["rendered"]]
            for t, a in enumerate(actions):
                env.set_rendering(every_step or t % 5 == 4)  # the step that ends a 5-action chunk
                obs, _, terminated, _, info = env.step(a)
                frames.append((obs["image"], obs["wrist_image"]))
                states.append(obs["state"])
                flags.append(info["rendered"])
            runs[every_step] = (frames, np.stack(states), flags, env._sim.env.sim.get_state().flatten())
        finally:
            env.close()
    (f_all, s_all, _, sim_all), (f_some, s_some, flags, sim_some) = runs[True], runs[False]
    np.testing.assert_array_equal(s_all, s_some)
    np.testing.assert_array_equal(sim_all, sim_some)
    assert flags == [True] + [t % 5 == 4 for t in range(12)]
    for t, rendered in enumerate(flags):
        for a, b in zip(f_all[t], f_some[t]):
            if rendered:
                np.testing.assert_array_equal(a, b)
                assert a.any()
            else:
                assert not b.any()  # skipped: black, never a stale frame


def test_rendering_with_mesa_then_importing_triton_does_not_crash():
    """Mesa's LLVM (software EGL/OSMesa) loaded before Triton's used to kill the process when torch then
    imported triton (a segmentation fault); envs/rendering.py loads Triton's library first."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("triton") is not None, "the dev extra installs triton (make setup)"
    code = ("from envs.libero import LiberoEnv\n"
            "e = LiberoEnv(suite='libero_object', task_id=0, camera_size=64, image_size=64)\n"
            "o, _ = e.reset(); assert o['image'].std() > 0\n"
            "import triton, torch._dynamo\n"
            "e.close(); print('survived')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
