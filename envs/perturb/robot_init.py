"""Robot initial joint noise: the arm starts from a perturbed joint configuration.

Severity s maps to: each of the 7 arm joints is offset by s * max_joint_rad * u, u uniform in [-1, 1]
(default max_joint_rad 0.20 rad = 11.5 degrees), clipped to the joint limits. Measured at s = 1 on
libero_spatial task 0, init states 0-3: the gripper starts 3-10 cm from where it would have (at
max_joint_rad 0.10: 1.6-5 cm). Gripper fingers are not touched; joint velocities are set to zero.

Applied after the init state loads and before the settle steps (a LiberoEnv reset hook): the settle
steps (zero OSC deltas) then hold the arm at the perturbed pose, as if the episode had started there.
If the perturbed arm would touch anything it did not touch before (see envs/perturb/placement.py), the
offset is redrawn, up to `attempts` times at full size, then as often at half and quarter size; failing
all, the arm is left unperturbed and `applied["attempts"]` says so. The objects are not moved.
"""

from __future__ import annotations

import numpy as np

from envs.perturb.base import ScenePerturbation
from envs.perturb.placement import contact_partners, new_contacts, subtree

SHRINK = (1.0, 0.5, 0.25)


class RobotInitNoise(ScenePerturbation):
    name = "robot_init"

    def __init__(self, env, severity: float = 0.0, max_joint_rad: float = 0.20, attempts: int = 8):
        if max_joint_rad < 0 or attempts < 1:
            raise ValueError(f"robot_init: max_joint_rad must be >= 0 and attempts >= 1, got {max_joint_rad}, {attempts}")
        self.max_joint_rad = float(max_joint_rad)
        self.attempts = int(attempts)
        super().__init__(env, severity)

    def apply(self, libero, rng):
        rs = libero.robosuite_env
        sim = rs.sim
        model, data = sim.model._model, sim.data._data
        robot = rs.robots[0]
        joints = [model.joint(name).id for name in robot.robot_joints]
        qpos_adr = model.jnt_qposadr[joints]
        dof_adr = model.jnt_dofadr[joints]
        lo, hi = model.jnt_range[joints].T
        limited = model.jnt_limited[joints].astype(bool)
        q0 = data.qpos[qpos_adr].copy()
        bodies = set(subtree(model, model.body(robot.robot_model.root_body).id))
        baseline = contact_partners(model, data, bodies)
        tried = 0
        for scale in SHRINK:
            for _ in range(self.attempts):
                tried += 1
                offset = rng.uniform(-1.0, 1.0, size=len(joints)) * self.severity * self.max_joint_rad * scale
                q = q0 + offset
                q = np.where(limited, np.clip(q, lo, hi), q)
                data.qpos[qpos_adr] = q
                data.qvel[dof_adr] = 0.0
                sim.forward()
                if not new_contacts(baseline, contact_partners(model, data, bodies)):
                    return {"joint_offset_rad": q - q0, "default_qpos": q0, "qpos": q.copy(), "scale": scale,
                            "attempts": tried}
        data.qpos[qpos_adr] = q0
        sim.forward()
        return {"joint_offset_rad": np.zeros(len(joints)), "default_qpos": q0, "qpos": q0.copy(), "scale": 0.0,
                "attempts": tried}
