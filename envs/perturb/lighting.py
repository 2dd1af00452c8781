"""Lighting: brighter or dimmer scene lights, aimed elsewhere.

Severity s maps to:

    intensity  every scene light's diffuse, specular and ambient colour, and the renderer's headlight,
               are multiplied by max_intensity_factor ** (+s or -s) (default factor 2.5: at s = 1 the
               scene is lit 2.5 times brighter or 2.5 times dimmer, each with probability 1/2; at s = 0.5
               by 1.58 or 1/1.58)
    direction  every light's direction (`light_dir`) is tilted by s * max_tilt_deg (default 30 degrees)
               about one random horizontal axis (the same for all lights: the scene's light moves as one)

LIBERO's scenes hold two spot lights (no shadows) plus MuJoCo's headlight, which follows the camera.
Only rendering changes; the physics do not. Written into the MuJoCo model after the init state loads.
"""

from __future__ import annotations

import math

import numpy as np

from envs.perturb.base import ScenePerturbation, rotation_matrix


class Lighting(ScenePerturbation):
    name = "lighting"

    def __init__(self, env, severity: float = 0.0, max_intensity_factor: float = 2.5, max_tilt_deg: float = 30.0):
        if max_intensity_factor < 1 or max_tilt_deg < 0:
            raise ValueError(f"lighting: max_intensity_factor must be >= 1 and max_tilt_deg >= 0, got "
                             f"{max_intensity_factor}, {max_tilt_deg}")
        self.max_intensity_factor = float(max_intensity_factor)
        self.max_tilt_deg = float(max_tilt_deg)
        super().__init__(env, severity)

    def apply(self, libero, rng):
        model = libero.robosuite_env.sim.model._model
        sign = 1.0 if rng.random() < 0.5 else -1.0
        heading = rng.uniform(0, 2 * math.pi)
        factor = self.max_intensity_factor ** (sign * self.severity)
        tilt = math.radians(self.severity * self.max_tilt_deg)
        axis = np.array([math.cos(heading), math.sin(heading), 0.0])
        rot = rotation_matrix(axis, tilt)
        head = model.vis.headlight
        for array in (model.light_diffuse, model.light_specular, model.light_ambient, model.light_dir,
                      head.diffuse, head.specular, head.ambient):
            self.remember(model, array)
        for array in (model.light_diffuse, model.light_specular, model.light_ambient,
                      head.diffuse, head.specular, head.ambient):
            array *= factor
        model.light_dir[:] = model.light_dir @ rot.T
        return {"intensity_factor": factor, "tilt_deg": math.degrees(tilt), "tilt_axis": axis,
                "num_lights": int(model.nlight)}
