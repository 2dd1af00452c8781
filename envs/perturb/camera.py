"""Camera pose: move and turn the agent-view camera.

Severity s maps to physical units exactly (the direction is random, the size is not):

    position   the camera moves by s * max_shift_m (default 0.10 m) along a uniformly random direction
    rotation   it turns by s * max_rotation_deg (default 10 degrees) about a uniformly random axis of
               its own frame (pan, tilt and roll mixed)

Only the named camera changes (default `agentview`, the policy's third-person view); the wrist camera
and the physics do not. The change is written into the MuJoCo model (`cam_pos`, `cam_quat`) after the
init state loads, so the settle steps and every frame of the episode see the moved camera.
"""

from __future__ import annotations

import math

import numpy as np

from envs.perturb.base import ScenePerturbation, axis_angle_quat, quat_mul, unit


class CameraPose(ScenePerturbation):
    name = "camera"

    def __init__(self, env, severity: float = 0.0, max_shift_m: float = 0.10, max_rotation_deg: float = 10.0,
                 camera: str = "agentview"):
        if max_shift_m < 0 or max_rotation_deg < 0:
            raise ValueError(f"camera: max_shift_m and max_rotation_deg must be >= 0, got {max_shift_m}, "
                             f"{max_rotation_deg}")
        self.max_shift_m = float(max_shift_m)
        self.max_rotation_deg = float(max_rotation_deg)
        self.camera = str(camera)
        super().__init__(env, severity)

    def apply(self, libero, rng):
        sim = libero.robosuite_env.sim
        model = sim.model._model
        names = [model.camera(i).name for i in range(model.ncam)]
        if self.camera not in names:
            raise ValueError(f"camera: no camera {self.camera!r} in this scene; cameras: {', '.join(names)}")
        cid = names.index(self.camera)
        direction = unit(rng.standard_normal(3))  # a uniformly random direction (normal draws, normalized)
        axis = unit(rng.standard_normal(3))
        shift = self.severity * self.max_shift_m
        angle = math.radians(self.severity * self.max_rotation_deg)
        self.remember(model, model.cam_pos[cid])
        self.remember(model, model.cam_quat[cid])
        before = (model.cam_pos[cid].copy(), model.cam_quat[cid].copy())
        model.cam_pos[cid] = before[0] + shift * direction
        # Right-multiplying turns the camera about an axis of its own frame.
        model.cam_quat[cid] = quat_mul(before[1], axis_angle_quat(axis, angle))
        return {"camera": self.camera, "shift_m": shift, "rotation_deg": math.degrees(angle),
                "direction": direction, "axis": axis, "pos": model.cam_pos[cid].copy(),
                "quat": model.cam_quat[cid].copy(), "default_pos": before[0], "default_quat": before[1]}
