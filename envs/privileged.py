"""The privileged view of a LIBERO scene: the task's goal and where things are.

This is the whole contract between the environment and scripted controllers (and tests), so
that no caller reaches into LIBERO's private attributes. `read_privileged_state` returns:

    goal      list of tuples from the task's BDDL goal, e.g. ("on", "akita_black_bowl_1", "plate_1")
    objects   {name: {"pos": (3,), "quat_xyzw": (4,), "bbox_min": (3,), "bbox_max": (3,),
              "half_size": (3,)}} for every movable object and fixture: the root body's world pose, the
              world-axis-aligned box around its collision geoms, and that box's half sizes in the body's
              own frame (what a camera sees: shape and pose, not masses, frictions or contacts)
    sites     {name: {"pos": (3,), "size": (3,)}} for the scene's named regions (BDDL regions and
              object-attached regions such as "basket_1_contain_region")
    eef_pos, eef_quat_xyzw, gripper_qpos   the robot's own proprioception (as in the policy state)
    eef_vel        the eef's linear velocity (m/s, from the joint velocities)
    shoulder_pos   where the arm's reach is measured from (its first joint, robot0_link1)

Quaternions follow robosuite's (x, y, z, w) order. All arrays are float64 copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def subtree_bodies(model, root: int) -> list[int]:
    """Body ids of `root` and everything attached below it."""
    parents = model.body_parentid
    bodies = []
    for b in range(model.nbody):
        a = b
        while a != 0 and a != root:
            a = parents[a]
        if a == root:
            bodies.append(b)
    return bodies


_SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)


def bboxes(model, data, bodies: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World AABB (min, max) of the bodies' collision geoms, and half sizes of their box in the frame
    of the first (root) body."""
    body_set = set(bodies)
    geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] in body_set]
    solid = [g for g in geoms if model.geom_contype[g] or model.geom_conaffinity[g]]
    geoms = solid or geoms
    if not geoms:
        p = data.xpos[bodies[0]].copy()
        return p, p.copy(), np.zeros(3)
    corners = []
    for g in geoms:
        aabb = model.geom_aabb[g]  # local center (3) and half sizes (3)
        corners.append(data.geom_xpos[g] + (aabb[:3] + _SIGNS * aabb[3:]) @ data.geom_xmat[g].reshape(3, 3).T)
    world = np.concatenate(corners)
    root_rot = data.xmat[bodies[0]].reshape(3, 3)
    local = (world - data.xpos[bodies[0]]) @ root_rot
    return world.min(0), world.max(0), (local.max(0) - local.min(0)) / 2


def read_privileged_state(libero_env, raw_obs: dict[str, np.ndarray]) -> dict[str, Any]:
    """`libero_env` is LIBERO's problem environment (robosuite env); `raw_obs` its last observation."""
    sim = libero_env.sim
    model, data = sim.model._model, sim.data._data
    objects = {}
    for name, obj in {**libero_env.objects_dict, **libero_env.fixtures_dict}.items():
        body = sim.model.body_name2id(obj.root_body)
        lo, hi, half = bboxes(model, data, subtree_bodies(model, body))
        w, x, y, z = data.xquat[body]
        objects[name] = {
            "pos": data.xpos[body].copy(),
            "quat_xyzw": np.array([x, y, z, w]),
            "bbox_min": lo,
            "bbox_max": hi,
            "half_size": half,
        }
    site_names = {model.site(i).name for i in range(model.nsite)}
    sites = {}
    for name in libero_env.object_sites_dict:
        if name in site_names:
            sid = sim.model.site_name2id(name)
            sites[name] = {"pos": data.site_xpos[sid].copy(), "size": model.site_size[sid].copy()}
    goal = [tuple(str(t).lower() if i == 0 else str(t) for i, t in enumerate(p)) for p in
            libero_env.parsed_problem["goal_state"]]
    return {
        "goal": goal,
        "objects": objects,
        "sites": sites,
        "eef_pos": np.array(raw_obs["robot0_eef_pos"], dtype=np.float64),
        "eef_quat_xyzw": np.array(raw_obs["robot0_eef_quat"], dtype=np.float64),
        "gripper_qpos": np.array(raw_obs["robot0_gripper_qpos"], dtype=np.float64),
        "eef_vel": np.array(sim.data.get_site_xvelp("gripper0_grip_site"), dtype=np.float64),
        "shoulder_pos": data.xpos[sim.model.body_name2id("robot0_link1")].copy(),
    }


def set_object_pose(libero_env, name: str, pos, quat_wxyz=None) -> None:
    """Write a free object's joint (position, MuJoCo w-x-y-z quaternion), zero its velocity, recompute."""
    objs = libero_env.objects_dict
    if name not in objs:
        raise KeyError(f"no movable object {name!r}; objects: {', '.join(objs)}")
    sim = libero_env.sim
    joint = objs[name].joints[0]
    current = sim.data.get_joint_qpos(joint)
    quat = current[3:7] if quat_wxyz is None else np.asarray(quat_wxyz, dtype=np.float64)
    sim.data.set_joint_qpos(joint, np.concatenate([np.asarray(pos, dtype=np.float64), quat]))
    sim.data.set_joint_qvel(joint, np.zeros(6))
    sim.forward()
