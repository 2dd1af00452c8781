"""A privileged scripted expert for LIBERO pick-and-place tasks (no learned weights).

It proves the harness end to end where every learned policy would score 0 (no checkpoint) and
answers "is it my install or the model?". It reads only the environment's documented privileged
state (envs/privileged.py): the BDDL goal, object and region poses and their bounding boxes, and
the robot's own eef pose and gripper opening; never the images, contacts, masses or the simulator.

Supported goals: one predicate `(On OBJ TARGET)` or `(In OBJ REGION)` where OBJ is a movable object
(libero_spatial: a bowl onto the plate; libero_object: an item into the basket; the libero_goal
tasks of that form). Anything else is answered with a per-row "unsupported" error, so the episode
is recorded as an error that says why instead of the robot flailing.

Per episode it runs a closed-loop state machine, re-planned at every query from the current poses:
approach above the grasp point, descend, close, lift, carry above the target, lower, release,
retreat. Bowls are taken by the rim (they are wider than the gripper opens), other objects from the
top at their centre. Each query returns a chunk of `chunk_size` OSC_POSE deltas like Pi0.5's, so
the runner's replanning and ensembling are exercised.

`action_noise` (default 0) adds Gaussian noise of that standard deviation (in action units: 1 is
robosuite's 5 cm / 0.5 rad per-step limit) to the translation and rotation actions, clipped to
[-1, 1]; the gripper command is left alone. It is seeded per episode (suite, task, init state,
seed), so a noisy run is as reproducible as a clean one. It makes a competent policy fail in
realistic ways, which is what failure triage (runners/triage.py) is tested on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policy.base import ACTION_DIM, batch_size

POS_LIMIT = 0.05  # metres per step at |action| = 1 (robosuite's OSC_POSE output limit)
ROT_LIMIT = 0.5  # radians per step at |action| = 1
OPEN, CLOSE = -1.0, 1.0
CONTROL_DT = 0.05  # LIBERO's 20 Hz control
MAX_EPISODES_REMEMBERED = 1024  # far more than run at once
PAD_ABOVE_EEF = 0.004  # the finger pads' centre is this far above the eef (robosuite's grip site)
FINGER_BELOW_EEF = 0.008  # the lowest point of the fingers, below the eef


class Unsupported(ValueError):
    pass


def _quat_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Axis-angle (world frame) of the rotation taking `current` to `target` (3x3 matrices)."""
    r = target @ current.T
    angle = np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


@dataclass
class Task:
    obj: str
    target: str  # an object or a region site
    relation: str  # "on" or "in"


def parse_goal(goal: list[tuple]) -> Task:
    if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0] not in ("on", "in"):
        text = " ".join("(" + " ".join(p) + ")" for p in goal)
        raise Unsupported(f"the scripted expert only does one (On X Y) or (In X Y) placement; this goal is {text}")
    rel, obj, target = goal[0]
    return Task(obj, target, rel)


def _yaw(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _angle(u: np.ndarray, d: np.ndarray) -> float:
    """Yaw turning horizontal axis u onto d, modulo 180 degrees (the gripper is symmetric)."""
    a = np.arctan2(u[0] * d[1] - u[1] * d[0], u @ d)
    return float((a + np.pi / 2) % np.pi - np.pi / 2)


@dataclass
class Grasp:
    offset: np.ndarray  # from the object's bounding-box centre, horizontal
    yaw: float  # gripper turn from its resting orientation
    depth: float  # eef height below the object's top
    axis: np.ndarray  # horizontal direction the fingers open along

    def same(self, other: "Grasp") -> bool:
        return np.allclose(self.offset, other.offset, atol=1e-3) and abs(self.yaw - other.yaw) < 1e-3


@dataclass
class Memory:
    """Per-episode state of the state machine."""

    phase: str = "approach"
    since: int = 0  # episode step at which the phase began
    grasp_offset: np.ndarray | None = None  # object origin minus eef at grasp time
    lift_z: float = 0.0
    rotation: np.ndarray | None = None  # the eef orientation to hold (top-down; turned for a bowl's rim)
    initial_rotation: np.ndarray | None = None
    grasp: Grasp | None = None  # the chosen grasp (re-chosen after a failure)
    blocked: list = field(default_factory=list)  # grasps that stalled or slipped
    moved: float = 1.0  # how far the eef moved since the previous query
    last: np.ndarray | None = None
    log: list = field(default_factory=list)  # (step, phase) history, for debugging
    noise: np.random.Generator | None = None  # the episode's action-noise stream (action_noise > 0)


class ScriptedPolicy:
    """See the module docstring. `gain`: how hard position errors are corrected (action per metre,
    in units of the 5 cm step limit); `speed`: the largest translation action used; `action_noise`:
    std of the Gaussian noise on the translation/rotation actions (0: none)."""

    needs_privileged = True
    needs_images = False  # it reads the privileged state: cameras are rendered only for videos

    def __init__(self, chunk_size: int = 10, gain: float = 1.5, damping: float = 4.0, speed: float = 1.0,
                 rim_margin: float = 0.012, action_noise: float = 0.0):
        if action_noise < 0:
            raise ValueError(f"action_noise is a standard deviation and must be >= 0, got {action_noise}")
        self.action_noise = float(action_noise)
        self.chunk_size = int(chunk_size)
        self.gain, self.damping, self.speed, self.rim_margin = float(gain), float(damping), float(speed), float(rim_margin)
        self._memory: dict[Any, Memory] = {}

    def reset(self) -> None:
        self._memory.clear()

    # ----- geometry ----------------------------------------------------------------------------------
    @staticmethod
    def _top(box) -> float:
        return float(box["bbox_max"][2])

    def _target_pose(self, state, task: Task) -> tuple[np.ndarray, float]:
        """Where the object's body origin should go (xy) and the height of the surface it goes on.
        (LIBERO's On compares body origins: within 3 cm horizontally, in contact, above.)"""
        if task.target in state["objects"]:
            t = state["objects"][task.target]
            return t["pos"][:2].copy(), self._top(t)
        if task.target in state["sites"]:
            site = state["sites"][task.target]
            return site["pos"][:2], float(site["pos"][2] - site["size"][2])
        raise Unsupported(f"goal target {task.target!r} is neither an object nor a region of this scene")

    def _grasp_point(self, state, task: Task, mem: Memory) -> np.ndarray:
        """The eef position to grasp at (re-derived from the object's current pose each query)."""
        o = state["objects"][task.obj]
        if mem.grasp is None:
            mem.grasp = self._choose_grasp(state, task, mem)
            mem.rotation = _yaw(mem.grasp.yaw) @ mem.initial_rotation
        center = (o["bbox_min"] + o["bbox_max"]) / 2
        return np.array([*(center[:2] + mem.grasp.offset), o["bbox_max"][2] - mem.grasp.depth])

    def _choose_grasp(self, state, task: Task, mem: Memory) -> "Grasp":
        """Candidate grasps scored by how clear the hand and fingers stay of the other objects.
        Bowls (wider than the gripper opens) are taken by the rim wall, fingers radial; other objects
        across a side narrow enough for the fingers, possibly slid along the long side."""
        o = state["objects"][task.obj]
        lo, hi = o["bbox_min"], o["bbox_max"]
        height = hi[2] - lo[2]
        u0 = mem.initial_rotation[:2, 1] / np.linalg.norm(mem.initial_rotation[:2, 1])  # finger axis at rest
        rot = _quat_to_mat(o["quat_xyzw"])
        candidates = []
        if "bowl" in task.obj:
            radius = min(hi[0] - lo[0], hi[1] - lo[1]) / 2
            depth = 0.025 + PAD_ABOVE_EEF  # pads 2.5 cm down the wall
            for d in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                d = np.array(d, dtype=float)
                candidates.append(Grasp(d * (radius - self.rim_margin), _angle(u0, d), depth, d))
        else:
            # pads up to 3 cm below the top, fingertips clear of the support surface
            depth = min(0.03 + PAD_ABOVE_EEF, height - FINGER_BELOW_EEF - 0.004)
            for turn in (0.0, np.pi / 2):
                u = _yaw(turn)[:2, :2] @ u0
                w = np.array([-u[1], u[0]])
                across = np.abs(rot[:2, :].T @ u) @ o["half_size"]  # half extent between the fingers
                along = np.abs(rot[:2, :].T @ w) @ o["half_size"]
                if 2 * across > 0.075:
                    continue
                for slide in (0.0, 0.015, -0.015, 0.03, -0.03):
                    if abs(slide) <= max(along - 0.015, 0.0):
                        candidates.append(Grasp(slide * w, turn, depth, u))
        if not candidates:
            raise Unsupported(f"{task.obj} is too wide for the gripper in every orientation")
        # The same grasp with the hand turned the other way round: another arm posture, which helps
        # when the first one runs into a joint limit.
        candidates += [Grasp(c.offset, c.yaw - np.sign(c.yaw or 1.0) * np.pi, c.depth, c.axis) for c in candidates]
        fresh = [c for c in candidates if not any(c.same(b) for b in mem.blocked)] or candidates
        center = (lo + hi) / 2
        place_xy, surface = self._target_pose(state, task)
        shoulder = state["shoulder_pos"]

        def score(c: "Grasp"):
            p = center[:2] + c.offset
            z = hi[2] - c.depth
            clear = self._clearance(state, task, p, c.axis, z)
            # The arm's stretch at the place (eef = target + grasp offset): targets near the edge of the
            # workspace (LIBERO's plates often are) are reached only with the object held on the near side.
            reach = np.linalg.norm([*(place_xy + c.offset - shoulder[:2]), surface + height - shoulder[2]])
            return (round(min(clear, 0.02), 3), -round(reach, 2), -abs(c.yaw), -np.linalg.norm(c.offset))

        return max(fresh, key=score)

    @staticmethod
    def _clearance(state, task: Task, p: np.ndarray, u: np.ndarray, z: float) -> float:
        """Smallest horizontal gap between the hand/fingers at grasp pose (p, finger axis u, eef height
        z) and any other object tall enough to reach them."""
        w = np.array([-u[1], u[0]])
        hand = [p + a * u * 0.105 + b * w * 0.035 for a in np.linspace(-1, 1, 7) for b in (-1, 0, 1)]
        fingers = [p + s * u * 0.045 + b * w * 0.012 for s in (-1, 1) for b in (-1, 0, 1)]
        gaps = [1.0]
        for n, x in state["objects"].items():
            if n == task.obj:
                continue
            lo, hi = x["bbox_min"][:2], x["bbox_max"][:2]
            pts = (hand if x["bbox_max"][2] > z + 0.02 else []) + (fingers if x["bbox_max"][2] > z - 0.01 else [])
            for q in pts:
                gaps.append(np.linalg.norm(np.maximum(0, np.maximum(lo - q, q - hi))))
        return min(gaps)

    def _carry_height(self, state, task: Task, start: np.ndarray, end: np.ndarray) -> float:
        """High enough for the hanging object to pass over every object near the straight path."""
        o = state["objects"][task.obj]
        hang = (o["bbox_max"][2] - o["bbox_min"][2]) + 0.03
        seg = end[:2] - start[:2]
        tops = []
        for n, x in state["objects"].items():
            if n in (task.obj,) or x["bbox_max"][2] - x["bbox_min"][2] > 0.3:
                continue  # tall fixtures (cabinets) are in the scene's bounds, not on the path
            c = (x["bbox_min"][:2] + x["bbox_max"][:2]) / 2
            t = np.clip((c - start[:2]) @ seg / (seg @ seg + 1e-9), 0, 1)
            if np.linalg.norm(start[:2] + t * seg - c) < 0.12:
                tops.append(x["bbox_max"][2])
        return max(tops + [o["bbox_min"][2], start[2] - hang]) + hang + 0.03

    # ----- control -----------------------------------------------------------------------------------
    def _chunk(self, state, mem: Memory, step: int, target: np.ndarray, gripper: float) -> np.ndarray:
        """`chunk_size` actions driving the eef towards `target` with a proportional law, predicted on
        a crude model of the OSC controller (about a fifth of a commanded displacement is realised
        per step); re-planned from the measured pose at every query. The speed falls off near the
        target: at full speed the controller overshoots, and an arm overshooting to full stretch is
        singular (the controller cannot pull it back)."""
        pos = state["eef_pos"].copy()
        vel = state["eef_vel"] * CONTROL_DT  # metres per step
        rot_err = _rotation_error(mem.rotation, _quat_to_mat(state["eef_quat_xyzw"]))
        out = np.zeros((self.chunk_size, ACTION_DIM))
        for j in range(self.chunk_size):
            err = target - pos
            limit = min(self.speed, 0.3 + 8.0 * np.linalg.norm(err))
            a = np.clip((self.gain * err - self.damping * vel) / POS_LIMIT, -limit, limit)
            out[j, :3] = a
            out[j, 3:6] = np.clip(rot_err / ROT_LIMIT, -0.3, 0.3)
            out[j, 6] = gripper
            vel = 0.7 * vel + 0.3 * 0.2 * a * POS_LIMIT  # the controller's lag, roughly
            pos = pos + vel
        return out

    def _enter(self, mem: Memory, phase: str, step: int) -> None:
        mem.phase, mem.since = phase, step
        mem.log.append((step, phase))

    def plan(self, state: dict[str, Any], mem: Memory, step: int) -> np.ndarray:
        task = parse_goal(state["goal"])
        if task.obj not in state["objects"]:
            raise Unsupported(f"the goal's object {task.obj!r} is not a movable object of this scene")
        if mem.rotation is None:
            mem.rotation = mem.initial_rotation = _quat_to_mat(state["eef_quat_xyzw"])  # top-down, held
        eef = state["eef_pos"]
        obj = state["objects"][task.obj]
        obj_pos = obj["pos"]  # the body origin: what LIBERO's predicates compare
        place_xy, surface = self._target_pose(state, task)
        if mem.last is not None:
            mem.moved = float(np.linalg.norm(eef - mem.last))
        mem.last = eef.copy()

        def held() -> bool:
            return np.linalg.norm(obj_pos - eef - mem.grasp_offset) < 0.03 and state["gripper_qpos"][0] > 0.001

        for _ in range(8):  # a phase that is already done hands over within the same query
            elapsed = step - mem.since
            if mem.phase == "approach":
                g = self._grasp_point(state, task, mem)
                dist = np.linalg.norm(eef[:2] - g[:2])
                hover = g[2] + 0.05
                turned = np.linalg.norm(_rotation_error(mem.rotation, _quat_to_mat(state["eef_quat_xyzw"]))) < 0.15
                if dist < 0.01 and turned and abs(eef[2] - hover) < 0.03:
                    self._enter(mem, "descend", step)
                    continue
                far = dist > 0.015 or abs(eef[2] - hover) > 0.03
                if (elapsed >= 20 and far and turned and mem.moved < 0.003) or elapsed >= 80:
                    self._enter(mem, "regrasp", step)  # blocked (by an object or the arm's reach)
                    continue
                # glide down while closing in: high when far, just above the grasp when near
                return self._chunk(state, mem, step, np.array([g[0], g[1], hover + min(0.7 * dist, 0.25)]), OPEN)
            if mem.phase == "descend":
                g = self._grasp_point(state, task, mem)
                if np.linalg.norm(eef - g) < 0.008 or (elapsed >= 30 and abs(eef[2] - g[2]) < 0.02):
                    self._enter(mem, "close", step)
                    continue
                stuck = elapsed >= 15 and mem.moved < 0.003 and eef[2] - g[2] > 0.01
                if np.linalg.norm(eef[:2] - g[:2]) > 0.03 or stuck or elapsed >= 60:  # moved away, or blocked
                    self._enter(mem, "regrasp", step)
                    continue
                return self._chunk(state, mem, step, g, OPEN)
            if mem.phase == "close":
                if elapsed >= 10:
                    mem.grasp_offset = obj_pos - eef
                    mem.lift_z = eef[2] + 0.08
                    self._enter(mem, "lift", step)
                    continue
                return self._chunk(state, mem, step, eef.copy(), CLOSE)
            if mem.phase == "lift":
                if not held():  # slipped, or closed on nothing
                    self._enter(mem, "regrasp", step)
                    continue
                if eef[2] > mem.lift_z - 0.015:
                    self._enter(mem, "transport", step)
                    continue
                return self._chunk(state, mem, step, np.array([eef[0], eef[1], mem.lift_z]), CLOSE)
            if mem.phase == "transport":
                if not held():
                    self._enter(mem, "regrasp", step)
                    continue
                goal_xy = place_xy - mem.grasp_offset[:2]
                dist = np.linalg.norm(eef[:2] - goal_xy)
                gap = obj["bbox_min"][2] - surface  # how far the object's underside is above the target
                release_z = eef[2] - gap + 0.015
                if dist < 0.012 and gap < 0.025:
                    self._enter(mem, "release", step)
                    continue
                carry_z = self._carry_height(state, task, eef, np.array([*goal_xy, release_z]))
                z = min(max(carry_z, eef[2] if dist > 0.05 else -np.inf), release_z + 1.5 * dist)
                return self._chunk(state, mem, step, np.array([goal_xy[0], goal_xy[1], max(z, release_z)]), CLOSE)
            if mem.phase == "release":
                if elapsed >= 8:
                    self._enter(mem, "retreat", step)
                    continue
                return self._chunk(state, mem, step, eef.copy(), OPEN)
            if mem.phase == "retreat":
                return self._chunk(state, mem, step, np.array([eef[0], eef[1], eef[2] + 0.05]), OPEN)
            if mem.phase == "regrasp":  # open, back up, and start over from the object's new pose
                if elapsed >= 8 or state["gripper_qpos"][0] > 0.035:
                    if mem.grasp is not None:
                        mem.blocked.append(mem.grasp)
                    mem.grasp = None
                    mem.rotation = mem.initial_rotation
                    self._enter(mem, "approach", step)
                    continue
                return self._chunk(state, mem, step, eef + np.array([0, 0, 0.04]), OPEN)
        return self._chunk(state, mem, step, eef.copy(), OPEN)

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = batch_size(batch)
        if "privileged" not in batch:
            raise ValueError("the scripted expert needs the privileged state (batch['privileged']); "
                             "run it through runners.evaluate, which provides it")
        episodes = batch.get("episode") or [None] * n
        steps = batch.get("step") or [0] * n
        actions = np.zeros((n, self.chunk_size, ACTION_DIM))
        errors: list[str | None] = [None] * n
        for i in range(n):
            if int(steps[i]) == 0:  # an episode (or a retry of it) begins: forget any earlier attempt
                self._memory.pop(episodes[i], None)
            if episodes[i] not in self._memory and len(self._memory) >= MAX_EPISODES_REMEMBERED:
                del self._memory[next(iter(self._memory))]  # the oldest episode is long over
            mem = self._memory.setdefault(episodes[i], Memory())
            try:
                actions[i] = self.plan(batch["privileged"][i], mem, int(steps[i]))
            except Unsupported as exc:
                errors[i] = f"unsupported by the scripted expert: {exc}"
                continue
            if self.action_noise > 0:
                if mem.noise is None:
                    mem.noise = np.random.default_rng(_episode_seed(episodes[i]))
                noisy = actions[i, :, :6] + mem.noise.normal(0.0, self.action_noise, (self.chunk_size, 6))
                actions[i, :, :6] = np.clip(noisy, -1.0, 1.0)
        return {"actions": actions, "errors": errors}


def _episode_seed(episode) -> list[int]:
    """A noise seed from the episode's (suite, task, init state, seed); the runner appends its own
    slot id to the key, which must not change the noise."""
    if not episode:
        return [0]
    suite, *ids = episode[:4]
    return [zlib.crc32(str(suite).encode()), *(int(x) for x in ids)]
