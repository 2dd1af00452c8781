"""Perturbations of LIBERO episodes for robustness evaluation (issue #17), as gymnasium wrappers.

    from envs.perturb import wrap
    env = wrap(LiberoEnv(suite="libero_spatial"), [{"name": "camera", "severity": 0.5},
                                                  {"name": "language", "severity": 1.0}])

Each kind has one `severity` in [0, 1] mapped to physical units in its module docstring; severity 0 is
bit-identical to no wrapper. Each episode's perturbation is drawn from a generator seeded with
(seed, suite, task, init state, kind) (base.py), so it is reproducible and independent of call order.

| name        | what changes                                          | module         |
|-------------|-------------------------------------------------------|----------------|
| robot_init  | the arm's initial joint positions                     | robot_init.py  |
| object_init | the movable objects' initial positions                | object_init.py |
| camera      | the agent-view camera's position and orientation      | camera.py      |
| lighting    | the scene lights' intensity and direction             | lighting.py    |
| image       | blur, noise, JPEG on the policy-facing images         | image.py       |
| language    | the prompt (`info["task"]`)                            | language.py    |

`wrap` applies them in the order of this table, whatever the order of the specs: the robot is moved
before the objects (so that object placements are checked against the moved arm), the scene is set up
before it is rendered, and images are corrupted after rendering. Specs are a list of
`{"name": ..., "severity": ..., **options}` or a mapping `{name: {"severity": ..., **options}}` (what the
Hydra group conf/perturb/ composes to).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym

from envs.perturb.base import Perturbation, check_severity

# name -> "module:class", imported when used (the table's order is the order wrappers are applied in)
KINDS: dict[str, str] = {
    "robot_init": "envs.perturb.robot_init:RobotInitNoise",
    "object_init": "envs.perturb.object_init:ObjectInitNoise",
    "camera": "envs.perturb.camera:CameraPose",
    "lighting": "envs.perturb.lighting:Lighting",
    "image": "envs.perturb.image:ImageCorruption",
    "language": "envs.perturb.language:Language",
}


def perturbation_class(name: str) -> type[Perturbation]:
    if name not in KINDS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {', '.join(KINDS)}")
    import importlib

    module, cls = KINDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def normalize_specs(specs: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None) -> list[dict]:
    """Check specs and return them as a list of dicts in application order. Does not build anything, so
    a runner can call it before it starts any simulator."""
    import inspect

    if specs is None:
        return []
    if isinstance(specs, Mapping):
        items = []
        for key, spec in specs.items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"perturbation {key!r}: expected a mapping of severity and options, got {spec!r}")
            if spec.get("name", key) != key:
                raise ValueError(f"perturbation spec under key {key!r} names {spec['name']!r}; they must agree")
            items.append({"name": key, **spec})
    elif isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise ValueError(f"perturbation specs must be a list of {{'name', 'severity', ...}} or a mapping "
                         f"{{name: {{'severity', ...}}}}, got {specs!r}")
    else:
        items = []
        for spec in specs:
            if not isinstance(spec, Mapping) or "name" not in spec:
                raise ValueError(f"each perturbation spec needs a 'name' (one of {', '.join(KINDS)}), got {spec!r}")
            items.append(dict(spec))
    seen = set()
    for spec in items:
        name = spec["name"]
        cls = perturbation_class(name)
        if name in seen:
            raise ValueError(f"perturbation {name!r} is given twice; give each kind once")
        seen.add(name)
        spec["severity"] = check_severity(name, spec.get("severity", 0.0))
        params = inspect.signature(cls.__init__).parameters
        options = [p for p in params if p not in ("self", "env", "severity")]
        unknown = [k for k in spec if k not in ("name", "severity") and k not in options]
        if unknown:
            raise ValueError(f"perturbation {name!r}: unknown options {unknown}; its options: {', '.join(options)}")
    order = list(KINDS)
    return sorted(items, key=lambda s: order.index(s["name"]))


def wrap(env: gym.Env, specs) -> gym.Env:
    """`env` (a LiberoEnv or a wrapper of one) with every perturbation in `specs` applied, in the order of
    KINDS. An empty list (or None) returns `env` itself."""
    for spec in normalize_specs(specs):
        options = {k: v for k, v in spec.items() if k not in ("name", "severity")}
        env = perturbation_class(spec["name"])(env, severity=spec["severity"], **options)
    return env


def perturbations(env: gym.Env) -> list[Perturbation]:
    """The perturbation wrappers around `env`, outermost first."""
    out = []
    while isinstance(env, gym.Wrapper):
        if isinstance(env, Perturbation):
            out.append(env)
        env = env.env
    return out


__all__ = ["KINDS", "Perturbation", "normalize_specs", "perturbation_class", "perturbations", "wrap"]
