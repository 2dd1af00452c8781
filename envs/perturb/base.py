"""What every perturbation wrapper shares: one severity in [0, 1], a random generator derived from the
episode (never from global state or call order), and, for perturbations of the scene, a hook into
LiberoEnv's reset.

The generator for an episode is seeded with (episode seed, suite, task id, init state id, kind), so the
same episode always gets the same perturbation, whatever ran before it and in whichever worker, and each
kind draws independently of the others. The draws never depend on the severity: severity only scales
them, so severity 0.5 and 1 perturb in the same direction by half and full magnitude.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np


def check_severity(name: str, severity: Any) -> float:
    """`severity` as a float in [0, 1], or a ValueError that names the perturbation."""
    try:
        value = float(severity)
    except (TypeError, ValueError):
        raise ValueError(f"perturbation {name!r}: severity must be a number in [0, 1], got {severity!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"perturbation {name!r}: severity must be in [0, 1], got {value}")
    return value


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())  # stable across processes, unlike hash()


def episode_rng(libero, kind: str, *extra: str) -> np.random.Generator:
    """The generator for `kind` in the episode `libero` (a LiberoEnv) has just reset into."""
    key = [int(libero.episode_seed) % 2**63, _crc(libero.suite), int(libero.task_id), int(libero.init_state_id),
           _crc(kind), *(_crc(e) for e in extra)]
    return np.random.default_rng(np.random.SeedSequence(key))


def libero_of(env: gym.Env):
    """The LiberoEnv under `env`'s wrappers, or a TypeError saying what to wrap."""
    from envs.libero import LiberoEnv

    base = env.unwrapped
    if not isinstance(base, LiberoEnv):
        raise TypeError(f"perturbations wrap a LiberoEnv (envs.libero), got {type(base).__name__}; "
                        "build the env with envs.libero.LiberoEnv or gym.make('libero/Libero-v0')")
    return base


class Perturbation(gym.Wrapper):
    """A gymnasium wrapper with one `severity` in [0, 1]; at 0 it changes nothing, bit for bit."""

    name: ClassVar[str]

    def __init__(self, env: gym.Env, severity: float = 0.0):
        super().__init__(env)
        self.libero = libero_of(env)
        self.severity = check_severity(self.name, severity)
        self.applied: dict[str, Any] = {}  # what the last reset did (for tests, the gallery and logs)

    def set_severity(self, severity: float) -> None:
        """Takes effect at the next reset."""
        self.severity = check_severity(self.name, severity)


class ScenePerturbation(Perturbation):
    """Changes the MuJoCo model or state through a LiberoEnv reset hook: after the init state is loaded,
    before the settle steps (so the settle steps and every frame see the changed scene).

    Subclasses implement `apply(libero, rng) -> dict` (what they did). Model fields they change are
    recorded with `remember` and written back before the next application if LIBERO did not rebuild the
    model in between (it does on every reset, hard_reset=True, so this is a guard, not the usual path).
    """

    def __init__(self, env: gym.Env, severity: float = 0.0):
        super().__init__(env, severity)
        self._saved: tuple[Any, list[tuple[np.ndarray, np.ndarray]]] | None = None
        self.libero.add_reset_hook(self._on_reset)

    def detach(self) -> None:
        """Stop perturbing (removes the reset hook); the wrapper then passes everything through."""
        self.libero.remove_reset_hook(self._on_reset)

    def remember(self, model, array: np.ndarray) -> None:
        """Record a model array's current values so that they can be restored later."""
        if self._saved is None or self._saved[0] is not model:
            self._saved = (model, [])
        self._saved[1].append((array, array.copy()))

    def _restore(self, model) -> bool:
        saved, self._saved = self._saved, None
        if saved is None or saved[0] is not model:
            return False  # a freshly built model already holds its defaults
        for array, original in reversed(saved[1]):
            array[...] = original
        return True

    def _on_reset(self, libero) -> bool:
        sim = libero.robosuite_env.sim
        changed = self._restore(sim.model._model)
        self.applied = {}
        if self.severity > 0:
            self.applied = self.apply(libero, episode_rng(libero, self.name))
            changed = True
        if changed:
            sim.forward()
        return changed

    def apply(self, libero, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError


# ----- small geometry helpers (MuJoCo quaternions are w, x, y, z) ---------------------------------------

def unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else np.array([1.0, 0.0, 0.0])


def axis_angle_quat(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = unit(np.asarray(axis, dtype=np.float64))
    return np.concatenate([[math.cos(angle / 2)], math.sin(angle / 2) * axis])


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def rotation_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula: the 3x3 rotation by `angle` (rad) about `axis`."""
    x, y, z = unit(np.asarray(axis, dtype=np.float64))
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def quat_angle(a: np.ndarray, b: np.ndarray) -> float:
    """The rotation angle (rad) between two unit quaternions."""
    return 2 * math.acos(min(1.0, abs(float(np.dot(unit(a), unit(b))))))
