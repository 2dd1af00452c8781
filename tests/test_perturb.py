"""Perturbation wrappers (envs/perturb/) and LIBERO-PRO suites (envs/suites.py), on real LIBERO.

One environment serves the module (libero_spatial task 3: a bowl stacked on a cookie box, a bowl on the
cabinet, so object placement meets stacks and fixtures); every test wraps it, then detaches its hooks.
The reference is the same episode without any wrapper.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest

from envs.libero import LiberoEnv
from envs.perturb import KINDS, normalize_specs, perturbations, wrap
from envs.perturb.base import quat_angle
from envs.perturb.image import corrupt
from envs.perturb.language import load_vocabulary, perturb_text

TASK = 3
SEED = 7
ACTIONS = np.random.default_rng(0).uniform(-0.5, 0.5, size=(2, 7))


# ----- fast: specs, configs, pure functions -------------------------------------------------------------

def test_specs_fail_clearly():
    with pytest.raises(ValueError, match="choose from robot_init, object_init, camera, lighting, image, language"):
        normalize_specs([{"name": "fog", "severity": 0.5}])
    with pytest.raises(ValueError, match=r"'camera': severity must be in \[0, 1\], got 1.5"):
        normalize_specs([{"name": "camera", "severity": 1.5}])
    with pytest.raises(ValueError, match=r"severity must be in \[0, 1\], got -0.1"):
        normalize_specs({"lighting": {"severity": -0.1}})
    with pytest.raises(ValueError, match="severity must be a number"):
        normalize_specs([{"name": "image", "severity": "high"}])
    with pytest.raises(ValueError, match="unknown options \\['max_shift'\\]; its options: max_shift_m"):
        normalize_specs([{"name": "camera", "severity": 0.5, "max_shift": 0.1}])
    with pytest.raises(ValueError, match="given twice"):
        normalize_specs([{"name": "camera"}, {"name": "camera"}])
    with pytest.raises(ValueError, match="needs a 'name'"):
        normalize_specs([{"severity": 0.5}])
    with pytest.raises(ValueError, match="must agree"):
        normalize_specs({"camera": {"name": "lighting"}})


def test_specs_are_put_in_the_documented_order():
    specs = [{"name": k, "severity": 0.1} for k in reversed(list(KINDS))]
    assert [s["name"] for s in normalize_specs(specs)] == list(KINDS)
    assert normalize_specs(None) == [] and normalize_specs({}) == []


def test_hydra_group_composes_to_specs_wrap_accepts():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from runners.evaluate import perturb_specs

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        none = compose(config_name="evaluate")  # the default: perturb=none
        assert perturb_specs(none) == []
        both = compose(config_name="evaluate", overrides=["perturb=[lighting,camera]", "perturb.camera.severity=1.0"])
        specs = perturb_specs(both)
        assert [(s["name"], s["severity"]) for s in specs] == [("camera", 1.0), ("lighting", 0.5)]
        shared = compose(config_name="evaluate", overrides=["perturb=[lighting,camera]", "perturb.severity=0.25"])
        assert [(s["name"], s["severity"]) for s in perturb_specs(shared)] == [("camera", 0.25), ("lighting", 0.25)]
        every = compose(config_name="evaluate", overrides=[f"perturb=[{','.join(KINDS)}]"])
        specs = perturb_specs(every)
        assert [s["name"] for s in specs] == list(KINDS)  # every file's options are options of its wrapper
        raw = OmegaConf.to_container(every.perturb, resolve=True)
        raw.pop("severity")
        assert normalize_specs(raw) == specs  # what the runner passes to envs.perturb.wrap


def test_language_text_severity_zero_one_and_determinism():
    vocab = load_vocabulary()
    text = "pick up the black bowl on the cookie box and place it on the plate"
    draw = lambda s, seed=1: perturb_text(text, s, np.random.default_rng(seed), vocab)  # noqa: E731
    assert draw(0.0) == text
    full = draw(1.0)
    assert full == draw(1.0) and full != text
    assert "pick up" not in full and "black" not in full  # every swappable phrase swapped at severity 1
    assert full.count(". ") == 2  # two distractor clauses
    assert any(draw(1.0, seed) != full for seed in range(2, 6))  # another episode, another edit
    assert "plate" in full and "cookie box" in full  # words without synonyms stay


def test_image_corruption_function():
    rng = np.random.default_rng(0)
    img = (np.indices((64, 64)).sum(0) % 256).astype(np.uint8)[..., None].repeat(3, -1)
    out0 = corrupt(img, 0.0, np.random.default_rng(1))
    np.testing.assert_array_equal(out0, img)
    errs = [np.abs(corrupt(img, s, np.random.default_rng(1)).astype(int) - img).mean() for s in (0.25, 0.5, 1.0)]
    assert 0 < errs[0] < errs[1] < errs[2]
    np.testing.assert_array_equal(corrupt(img, 0.5, np.random.default_rng(1)), corrupt(img, 0.5, np.random.default_rng(1)))
    only_noise = corrupt(img, 1.0, rng, kinds=("noise",))
    assert abs(float((only_noise.astype(int) - img).std()) - 25.5) < 2.0  # 0.10 * 255 grey levels


# ----- real LIBERO ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env():
    e = LiberoEnv(suite="libero_spatial", task_id=TASK, camera_size=96, image_size=96, settle_steps=5, seed=SEED)
    yield e
    e.close()


def _arm_qpos(base) -> np.ndarray:
    rs = base.robosuite_env
    model, data = rs.sim.model._model, rs.sim.data._data
    return np.array([data.qpos[model.jnt_qposadr[model.joint(j).id]] for j in rs.robots[0].robot_joints])


def _rollout(env, k: int = 1, seed: int = SEED) -> dict:
    base = env.unwrapped
    obs, info = env.reset(seed=seed, options={"init_state_id": k})
    rec = {"obs": [obs], "info": [info], "reward": [], "sim": [base.robosuite_env.sim.get_state().flatten()],
           "qpos": _arm_qpos(base), "objects": {n: o["pos"] for n, o in base.privileged_state()["objects"].items()}}
    model = base.robosuite_env.sim.model._model
    cid = model.camera("agentview").id
    rec["camera"] = (model.cam_pos[cid].copy(), model.cam_quat[cid].copy())
    for a in ACTIONS:
        obs, reward, terminated, truncated, info = env.step(a)
        rec["obs"].append(obs)
        rec["info"].append(info)
        rec["reward"].append((reward, terminated, truncated))
        rec["sim"].append(base.robosuite_env.sim.get_state().flatten())
    return rec


@pytest.fixture(scope="module")
def reference(env):
    assert not env._reset_hooks
    return _rollout(env)


@contextlib.contextmanager
def wrapped(env, *specs):
    w = wrap(env, list(specs))
    try:
        yield w
    finally:
        for p in perturbations(w):
            if hasattr(p, "detach"):
                p.detach()


def _same(a, b, keys=("image", "wrist_image", "state")):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a["obs"], b["obs"]) for k in keys)


def _same_physics(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a["sim"], b["sim"])) and a["reward"] == b["reward"]


@pytest.mark.slow
def test_severity_zero_is_bit_identical_to_no_wrapper(env, reference):
    with wrapped(env, *({"name": k, "severity": 0.0} for k in KINDS)) as w:
        assert len(perturbations(w)) == len(KINDS)
        got = _rollout(w)
    assert _same(got, reference) and _same_physics(got, reference)
    assert got["info"] == reference["info"]


@pytest.mark.slow
def test_camera_moves_the_agent_view_only(env, reference):
    with wrapped(env, {"name": "camera", "severity": 1.0}) as w:
        got = _rollout(w)
        camera = perturbations(w)[0]
        applied = camera.applied
        # Were the model not rebuilt between episodes (LIBERO rebuilds it on every reset), the hook would
        # first restore the defaults: applying twice does not add up, and severity 0 puts them back.
        model = env.robosuite_env.sim.model._model
        cid = model.camera("agentview").id
        camera._on_reset(env)
        np.testing.assert_array_equal(model.cam_pos[cid], got["camera"][0])
        camera.set_severity(0.0)
        camera._on_reset(env)
        np.testing.assert_array_equal(model.cam_pos[cid], reference["camera"][0])
        np.testing.assert_array_equal(model.cam_quat[cid], reference["camera"][1])
    pos0, quat0 = reference["camera"]
    pos, quat = got["camera"]
    assert np.linalg.norm(pos - pos0) == pytest.approx(0.10, abs=1e-9)  # severity 1 = 10 cm
    assert math.degrees(quat_angle(quat, quat0)) == pytest.approx(10.0, abs=1e-6)  # and 10 degrees
    assert applied["shift_m"] == pytest.approx(0.10)
    assert not np.array_equal(got["obs"][0]["image"], reference["obs"][0]["image"])
    assert _same(got, reference, keys=("wrist_image", "state")) and _same_physics(got, reference)


@pytest.mark.slow
def test_lighting_changes_pixels_not_state(env, reference):
    with wrapped(env, {"name": "lighting", "severity": 1.0}) as w:
        got = _rollout(w)
        applied = perturbations(w)[0].applied
    assert applied["intensity_factor"] in (pytest.approx(2.5), pytest.approx(1 / 2.5))
    assert applied["tilt_deg"] == pytest.approx(30.0)
    for view in ("image", "wrist_image"):
        diff = np.abs(got["obs"][0][view].astype(int) - reference["obs"][0][view]).mean()
        assert diff > 5, view
    assert _same(got, reference, keys=("state",)) and _same_physics(got, reference)


@pytest.mark.slow
def test_image_corruption_changes_images_only(env, reference):
    with wrapped(env, {"name": "image", "severity": 0.5}) as w:
        got = _rollout(w)
    for step in range(len(ACTIONS) + 1):
        for view in ("image", "wrist_image"):
            assert not np.array_equal(got["obs"][step][view], reference["obs"][step][view])
            assert got["obs"][step][view].dtype == np.uint8
    assert _same(got, reference, keys=("state",)) and _same_physics(got, reference)
    assert got["info"] == reference["info"]


@pytest.mark.slow
def test_robot_init_noise_moves_the_arm_not_the_objects(env, reference):
    with wrapped(env, {"name": "robot_init", "severity": 1.0}) as w:
        got = _rollout(w)
        applied = perturbations(w)[0].applied
    offset = applied["joint_offset_rad"]
    assert applied["scale"] > 0 and 0 < np.abs(offset).max() <= 0.20 * applied["scale"] + 1e-12  # 0.2 rad
    assert np.abs(got["qpos"] - reference["qpos"]).max() > 0.01  # still off after the settle steps
    assert np.abs(got["obs"][0]["state"][:3] - reference["obs"][0]["state"][:3]).max() > 0.005  # eef moved
    for name, pos in reference["objects"].items():
        np.testing.assert_allclose(got["objects"][name], pos, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_object_init_noise_moves_objects_within_the_radius_not_the_robot(env, reference):
    with wrapped(env, {"name": "object_init", "severity": 1.0}) as w:
        got = _rollout(w)
        applied = perturbations(w)[0].applied
        data = env.robosuite_env.sim.data._data
        depth = min((data.contact[i].dist for i in range(data.ncon)), default=0.0)
    assert ["akita_black_bowl_1", "cookies_1"] in applied["groups"]  # the bowl on the box moves with it
    offsets = applied["offsets"]
    np.testing.assert_array_equal(offsets["akita_black_bowl_1"], offsets["cookies_1"])
    moved = 0
    for name, pos in reference["objects"].items():
        if name not in offsets:
            np.testing.assert_allclose(got["objects"][name], pos, atol=1e-4, err_msg=name)  # fixtures stay
            continue
        d = offsets[name]
        assert np.linalg.norm(d) <= 0.05 + 1e-12 and d[2] == 0
        # It landed where it was put, on what it stood on (same height after the settle steps).
        np.testing.assert_allclose(got["objects"][name], pos + d, atol=5e-3, err_msg=name)
        moved += np.linalg.norm(d) > 0.005
    assert moved >= 3
    np.testing.assert_allclose(got["qpos"], reference["qpos"], atol=1e-4)
    np.testing.assert_allclose(got["obs"][0]["state"], reference["obs"][0]["state"], atol=1e-4)
    assert depth > -2e-3  # nothing sunk into anything


@pytest.mark.slow
def test_language_changes_the_prompt_only(env, reference):
    with wrapped(env, {"name": "language", "severity": 1.0}) as w:
        got = _rollout(w)
    original = reference["info"][0]["task"]
    prompt = got["info"][0]["task"]
    assert prompt != original and all(i["task"] == prompt for i in got["info"])
    assert env.task == original
    strip = lambda infos: [{k: v for k, v in i.items() if k != "task"} for i in infos]  # noqa: E731
    assert strip(got["info"]) == strip(reference["info"])
    assert _same(got, reference) and _same_physics(got, reference)


@pytest.mark.slow
def test_combined_perturbations_are_deterministic_per_episode(env, reference):
    specs = [{"name": k, "severity": 0.8} for k in KINDS]
    with wrapped(env, *specs) as w:
        first = _rollout(w, k=1)
        applied = {p.name: p.applied for p in perturbations(w)}
        other = _rollout(w, k=2)  # another init state in between: order must not matter
        other_applied = {p.name: p.applied for p in perturbations(w)}
        second = _rollout(w, k=1)
        reseeded = _rollout(w, k=1, seed=SEED + 1)
        reseeded_applied = {p.name: p.applied for p in perturbations(w)}
    assert _same(first, second) and _same_physics(first, second) and first["info"] == second["info"]
    # Every kind acted.
    assert first["info"][0]["task"] != reference["info"][0]["task"]
    assert not np.array_equal(first["camera"][0], reference["camera"][0])
    assert np.abs(first["qpos"] - reference["qpos"]).max() > 0.005
    assert max(np.linalg.norm(d) for d in applied["object_init"]["offsets"].values()) > 0.005
    assert not np.array_equal(first["obs"][0]["wrist_image"], reference["obs"][0]["wrist_image"])
    # Another init state or seed: another perturbation.
    for alt in (other_applied, reseeded_applied):
        assert not np.allclose(alt["camera"]["pos"], applied["camera"]["pos"])
        assert not np.allclose(alt["robot_init"]["joint_offset_rad"], applied["robot_init"]["joint_offset_rad"])
    assert not _same(first, reseeded)


@pytest.mark.slow
def test_scene_hooks_show_without_settle_steps(env):
    """With settle_steps=0 the observation is the init state's: LiberoEnv re-reads it after a hook."""
    env.settle_steps = 0
    try:
        plain = env.reset(seed=SEED, options={"init_state_id": 0})[0]
        with wrapped(env, {"name": "camera", "severity": 1.0}) as w:
            moved = w.reset(seed=SEED, options={"init_state_id": 0})[0]
    finally:
        env.settle_steps = 5
    assert not np.array_equal(plain["image"], moved["image"])
    np.testing.assert_array_equal(plain["wrist_image"], moved["wrist_image"])


@pytest.mark.slow
def test_gallery_on_a_small_setting(env, tmp_path):
    from envs.perturb_gallery import contact_sheet, collect

    env.settle_steps = 0  # the frames of the init state itself: 13 resets, no steps
    try:
        data = collect(env=env, init_state_id=0, severities=(0.0, 1.0), seed=SEED)
    finally:
        env.settle_steps = 5
    ref = data["reference"]
    changes = {  # which views each kind should change (arm and objects show in both)
        "camera": {"image"}, "lighting": {"image", "wrist_image"}, "image": {"image", "wrist_image"},
        "robot_init": {"image", "wrist_image"}, "object_init": {"image", "wrist_image"}, "language": set(),
    }
    for kind, views in changes.items():
        zero, one = data["cells"][(kind, 0.0)], data["cells"][(kind, 1.0)]
        for view in ("image", "wrist_image"):
            np.testing.assert_array_equal(zero[view], ref[view], err_msg=f"{kind} at severity 0, {view}")
            assert (not np.array_equal(one[view], ref[view])) == (view in views), f"{kind} at severity 1, {view}"
        assert zero["task"] == ref["task"] and (one["task"] != ref["task"]) == (kind == "language")
    sheet = contact_sheet(data, thumb=48)
    assert sheet.size[0] > 4 * 48 and sheet.size[1] > 6 * 48
    sheet.save(tmp_path / "g.png")
    assert not env._reset_hooks  # the gallery detached what it added
