"""Checks that a perturbed initial state is physically sound: nothing interpenetrates and nothing
loses what it stands on. Used by the robot and object initial-state perturbations.

LIBERO's init states hold the objects a few centimetres above their supports (they drop onto them in
the first settle steps; measured: ~7 cm on libero_spatial), so at the moment a perturbation runs few
things touch. Three checks, each against the scene as it was before the perturbation (the baseline):

    contacts   MuJoCo's contacts (after `mj_forward`) between the moved bodies and anything else: no new
               partner, and no contact deeper than the baseline's by more than 1 mm (penetration)
    footprint  the world-axis-aligned box around a moved object, seen from above (x, y), must not newly
               overlap another object's or fixture's box: they would collide once they drop
    support    a ray cast straight down from a moved object's centre must hit the same body at the same
               height (within 1 cm) as before: it still lands on what it stood on

Bounding boxes come from envs/privileged.py, so they are the ones scripted controllers see.
"""

from __future__ import annotations

import numpy as np

from envs.privileged import bboxes, subtree_bodies

DEPTH_TOLERANCE_M = 1e-3
SUPPORT_TOLERANCE_M = 1e-2


def contact_partners(model, data, bodies: set[int]) -> dict[int, float]:
    """{root body of the partner: deepest contact distance (negative = penetration)} over the current
    contacts between `bodies` and any body outside them."""
    out: dict[int, float] = {}
    for i in range(data.ncon):
        c = data.contact[i]
        b1, b2 = int(model.geom_bodyid[c.geom1]), int(model.geom_bodyid[c.geom2])
        if (b1 in bodies) == (b2 in bodies):
            continue
        other = int(model.body_rootid[b2 if b1 in bodies else b1])
        out[other] = min(out.get(other, np.inf), float(c.dist))
    return out


def new_contacts(baseline: dict[int, float], now: dict[int, float]) -> list[int]:
    """Partners touched now but not before, or touched more deeply than before (interpenetration)."""
    return [b for b, d in now.items() if b not in baseline or d < baseline[b] - DEPTH_TOLERANCE_M]


def subtree(model, root_body: int) -> list[int]:
    return subtree_bodies(model, root_body)


def footprint(model, data, bodies: list[int]) -> np.ndarray:
    """(x_min, y_min, x_max, y_max) of the bodies' collision geoms."""
    lo, hi, _ = bboxes(model, data, bodies)
    return np.array([lo[0], lo[1], hi[0], hi[1]])


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def support(model, data, root_body: int) -> tuple[int, float]:
    """(root body hit, height hit) by a ray cast down from the centre of the body's box; (-1, nan) if none."""
    import mujoco

    lo, hi, _ = bboxes(model, data, subtree_bodies(model, root_body))
    start = (lo + hi) / 2
    geom = np.zeros(1, dtype=np.int32)
    dist = mujoco.mj_ray(model, data, start, np.array([0.0, 0.0, -1.0]), None, 1, root_body, geom)
    if geom[0] < 0:
        return -1, float("nan")
    return int(model.body_rootid[model.geom_bodyid[geom[0]]]), float(start[2] - dist)


def same_support(before: tuple[int, float], after: tuple[int, float]) -> bool:
    if before[0] < 0:
        return True  # nothing below it before either (nothing to keep)
    return after[0] == before[0] and abs(after[1] - before[1]) <= SUPPORT_TOLERANCE_M
