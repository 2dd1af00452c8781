"""Object initial position noise: movable objects start displaced on their support.

Severity s maps to: each movable object (one with a free joint) is moved horizontally by a vector drawn
uniformly from the disc of radius s * max_radius_m (default 0.05 m), heights and orientations unchanged.
Objects that rest on one another at the start (found by a ray cast down, see placement.py: a bowl on a
plate, on a cookie box) move together, by one vector, so stacks stay stacked.

Applied after the init state loads and before the settle steps (a LiberoEnv reset hook). A placement is
kept only if nothing interpenetrates, no object's footprint newly overlaps another object or fixture, and
every object still lands on what it stood on (envs/perturb/placement.py); otherwise it is redrawn, up to
`attempts` times at the full radius, then as often at half and quarter radius, and failing all the group
stays where it was (`applied["attempts"]` records this). Groups are placed one after the other in name
order, each with its own generator (so one group's redraws never change another's draws). The robot is
not moved. Fixtures (cabinets, stoves, baskets welded to the scene) are not moved.
"""

from __future__ import annotations

import math

import numpy as np

from envs.perturb.base import ScenePerturbation, episode_rng
from envs.perturb.placement import (contact_partners, footprint, new_contacts, overlaps, same_support, subtree,
                                    support)

SHRINK = (1.0, 0.5, 0.25)


class ObjectInitNoise(ScenePerturbation):
    name = "object_init"

    def __init__(self, env, severity: float = 0.0, max_radius_m: float = 0.05, objects=None, attempts: int = 8):
        if max_radius_m < 0 or attempts < 1:
            raise ValueError(f"object_init: max_radius_m must be >= 0 and attempts >= 1, got {max_radius_m}, {attempts}")
        self.max_radius_m = float(max_radius_m)
        self.objects = None if objects is None else [str(o) for o in objects]
        self.attempts = int(attempts)
        super().__init__(env, severity)

    def apply(self, libero, rng):
        rs = libero.robosuite_env
        sim = rs.sim
        model, data = sim.model._model, sim.data._data
        movable = _free_objects(rs, model)
        if self.objects is not None:
            unknown = [o for o in self.objects if o not in movable]
            if unknown:
                raise ValueError(f"object_init: {unknown} are not movable objects of this task; movable: "
                                 f"{', '.join(sorted(movable))}")
            chosen = set(self.objects)
        else:
            chosen = set(movable)
        roots = {n: model.body(rs.objects_dict[n].root_body).id for n in movable}
        bodies = {n: subtree(model, roots[n]) for n in movable}
        others = {n: bodies[n] for n in movable}
        others.update({n: subtree(model, model.body(f.root_body).id) for n, f in rs.fixtures_dict.items()})
        groups = _stacks(model, data, roots, chosen)
        radius = self.severity * self.max_radius_m
        offsets, attempts = {}, {}
        for group in groups:
            key = "+".join(group)
            grng = episode_rng(libero, self.name, key)
            tried, accepted = self._place(sim, model, data, group, movable, roots, bodies, others, radius, grng)
            attempts[key] = tried
            for n in group:
                offsets[n] = accepted
        return {"radius_m": radius, "offsets": offsets, "groups": groups, "attempts": attempts}

    def _place(self, sim, model, data, group, movable, roots, bodies, others, radius, grng):
        adr = {n: model.jnt_qposadr[movable[n]] for n in group}
        dof = {n: model.jnt_dofadr[movable[n]] for n in group}
        start = {n: data.qpos[adr[n]:adr[n] + 3].copy() for n in group}
        group_bodies = {b for n in group for b in bodies[n]}
        base_contacts = contact_partners(model, data, group_bodies)
        rest = {k: v for k, v in others.items() if k not in group}
        base_prints = {n: footprint(model, data, bodies[n]) for n in group}
        rest_prints = {k: footprint(model, data, v) for k, v in rest.items()}
        base_overlap = {(n, k) for n in group for k in rest if overlaps(base_prints[n], rest_prints[k])}
        base_support = {n: support(model, data, roots[n]) for n in group}
        tried = 0
        for scale in SHRINK:
            for _ in range(self.attempts):
                tried += 1
                # Uniform on the disc: radius sqrt(u) * R, angle 2 pi v.
                u, v = grng.random(2)
                r = radius * scale * math.sqrt(u)
                d = np.array([r * math.cos(2 * math.pi * v), r * math.sin(2 * math.pi * v), 0.0])
                for n in group:
                    data.qpos[adr[n]:adr[n] + 3] = start[n] + d
                    data.qvel[dof[n]:dof[n] + 6] = 0.0
                sim.forward()
                if self._sound(model, data, group, roots, bodies, group_bodies, base_contacts, rest_prints,
                               base_overlap, base_support):
                    return tried, d
        for n in group:
            data.qpos[adr[n]:adr[n] + 3] = start[n]
        sim.forward()
        return tried, np.zeros(3)

    @staticmethod
    def _sound(model, data, group, roots, bodies, group_bodies, base_contacts, rest_prints, base_overlap,
               base_support) -> bool:
        if new_contacts(base_contacts, contact_partners(model, data, group_bodies)):
            return False
        for n in group:
            fp = footprint(model, data, bodies[n])
            if any(overlaps(fp, p) and (n, k) not in base_overlap for k, p in rest_prints.items()):
                return False
            if not same_support(base_support[n], support(model, data, roots[n])):
                return False
        return True


def _free_objects(rs, model) -> dict[str, int]:
    """{object name: its free joint id} for the task's movable objects, in name order."""
    out = {}
    for name in sorted(rs.objects_dict):
        for joint in rs.objects_dict[name].joints:
            jid = model.joint(joint).id
            if model.jnt_type[jid] == 0:  # mjJNT_FREE
                out[name] = jid
                break
    return out


def _stacks(model, data, roots: dict[str, int], chosen: set[str]) -> list[list[str]]:
    """The chosen objects grouped with what they rest on (transitively), each group in name order."""
    by_root = {r: n for n, r in roots.items()}
    parent = {n: n for n in roots}

    def find(n):
        while parent[n] != n:
            n = parent[n]
        return n

    for n, r in roots.items():
        below = support(model, data, r)[0]
        if below in by_root:
            a, b = find(n), find(by_root[below])
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for n in sorted(roots):
        groups.setdefault(find(n), []).append(n)
    # A stack moves if any of its objects was chosen; objects left out stay (unless stacked with one chosen).
    return [g for g in groups.values() if any(n in chosen for n in g)]
