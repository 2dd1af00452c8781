"""One point of an episode's privileged trace: where the arm and the task's goal object are, for
failure triage (runners/triage.py classifies a sequence of these points; it never sees the simulator).

The goal object is the object the BDDL goal moves: the first argument of the first `On`/`In`
predicate (libero_spatial: the bowl; libero_object: the item). Goals without such a predicate
(open a drawer, turn on the stove) follow the first argument of their first predicate instead (a
fixture, or a region site such as a drawer's), for the reach only; `placement` is then false.

`Tracer(libero_env).point(raw_obs, step)` returns a JSON-ready dict (metres, world frame, rounded
to 0.1 mm):

    step       env steps executed so far in the episode
    object     the goal object's name; placement: whether the goal is an On/In placement
    eef        [x, y, z] of the grip site (robosuite's eef, between the fingertips)
    gripper    finger gap, qpos[0] - qpos[1] of the Panda fingers (about 0.078 open, 0.008 shut on nothing)
    obj        [x, y, z] of the goal object's root body (what LIBERO's predicates compare), or of the site
    quat       [x, y, z, w] its orientation (robosuite's order; null for a site)
    bottom     height of the object's underside (its collision geoms' lowest point)
    reach      distance from the grip site to the object's world bounding box (0 inside it)
    contact    both finger pads touch the object's geoms (robosuite's own grasp test,
               ManipulationEnv._check_grasp: the `left_fingerpad`/`right_fingerpad` geoms of the gripper)
    goal       distance from the centre of the object's underside to the goal point: the target
               object's top centre, or the target region site's centre; null without a placement

It reads MuJoCo's model and data directly (contacts included), unlike envs/privileged.py, whose
contract with scripted controllers leaves contacts out: the trace is for diagnosis, not control.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.privileged import bboxes, subtree_bodies

PLACEMENTS = ("on", "in")


def goal_object(goal: list[tuple]) -> tuple[str | None, str | None, bool]:
    """(object, target, is_placement) from a BDDL goal as envs/privileged.py lists it."""
    for pred in goal:
        if len(pred) == 3 and str(pred[0]).lower() in PLACEMENTS:
            return str(pred[1]), str(pred[2]), True
    for pred in goal:
        if len(pred) >= 2:
            return str(pred[1]), None, False
    return None, None, False


def _r(x) -> Any:
    if isinstance(x, np.ndarray):
        return [round(float(v), 4) for v in x]
    return round(float(x), 4)


class Tracer:
    """Trace points of one LIBERO problem environment's simulator (built once per simulator: names to
    MuJoCo ids)."""

    def __init__(self, libero_env):
        self.sim = sim = libero_env.sim
        self.model, self.data = sim.model._model, sim.data._data
        goal = [tuple(str(t).lower() if i == 0 else str(t) for i, t in enumerate(p))
                for p in libero_env.parsed_problem["goal_state"]]
        self.name, target, self.placement = goal_object(goal)
        things = {**libero_env.objects_dict, **libero_env.fixtures_dict}
        self.bodies = self.site = None
        if self.name in things:
            root = sim.model.body_name2id(things[self.name].root_body)
            self.bodies = subtree_bodies(self.model, root)
            body_set = set(self.bodies)
            self.geoms = {g for g in range(self.model.ngeom) if self.model.geom_bodyid[g] in body_set}
        elif self.name is not None and self.name in libero_env.object_sites_dict:
            self.site = sim.model.site_name2id(self.name)
        self.target_bodies = self.target_site = None
        if target in things:
            self.target_bodies = subtree_bodies(self.model, sim.model.body_name2id(things[target].root_body))
        elif target is not None and target in libero_env.object_sites_dict:
            self.target_site = sim.model.site_name2id(target)
        gripper = libero_env.robots[0].gripper
        self.pads = [{sim.model.geom_name2id(g) for g in gripper.important_geoms[side]}
                     for side in ("left_fingerpad", "right_fingerpad")]
        self.grip_site = sim.model.site_name2id("gripper0_grip_site")

    def _touching(self) -> bool:
        n = self.data.ncon
        if n == 0 or self.bodies is None:
            return False
        g1, g2 = self.data.contact.geom1[:n], self.data.contact.geom2[:n]
        touched = [False, False]
        for a, b in zip(g1.tolist(), g2.tolist()):
            for side, pad in enumerate(self.pads):
                if (a in pad and b in self.geoms) or (b in pad and a in self.geoms):
                    touched[side] = True
        return all(touched)

    def point(self, raw_obs: dict[str, np.ndarray], step: int) -> dict[str, Any]:
        eef = np.asarray(self.data.site_xpos[self.grip_site], dtype=np.float64)
        q = raw_obs["robot0_gripper_qpos"]
        out: dict[str, Any] = {"step": int(step), "object": self.name, "placement": self.placement,
                               "eef": _r(eef), "gripper": _r(q[0] - q[1]), "obj": None, "quat": None, "bottom": None,
                               "reach": None, "contact": False, "goal": None}
        if self.bodies is not None:
            lo, hi, _ = bboxes(self.model, self.data, self.bodies)
            pos = self.data.xpos[self.bodies[0]]
            w, x, y, z = self.data.xquat[self.bodies[0]]
            out["obj"], out["quat"], out["bottom"] = _r(pos), _r(np.array([x, y, z, w])), _r(lo[2])
            out["reach"] = _r(np.linalg.norm(np.maximum(0.0, np.maximum(lo - eef, eef - hi))))
            out["contact"] = self._touching()
            underside = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
            target = self._goal_point()
            if self.placement and target is not None:
                out["goal"] = _r(np.linalg.norm(underside - target))
        elif self.site is not None:
            pos = self.data.site_xpos[self.site]
            out["obj"], out["reach"] = _r(pos), _r(np.linalg.norm(pos - eef))
        return out

    def _goal_point(self) -> np.ndarray | None:
        if self.target_bodies is not None:
            lo, hi, _ = bboxes(self.model, self.data, self.target_bodies)
            return np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2]])
        if self.target_site is not None:
            return np.asarray(self.data.site_xpos[self.target_site], dtype=np.float64)
        return None
