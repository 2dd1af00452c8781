"""Checks of settings that come from outside (configs, command lines, a client's request), each
error naming the setting, what it got and what it takes. Hydra hands over whatever the command line
said (`max_steps=abc`, `max_steps=2.5`), so an integer setting is checked to be one, not cast."""

from __future__ import annotations

import numbers
from typing import Any

SEED_RANGE = 2**32  # numpy's and MuJoCo's seeds are unsigned 32-bit


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, if it is a whole number within [low, high]; else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        else:
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"{low}..{high}" if low is not None and high is not None else (f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be {span}, got {value}")
    return value


def check_ids(name: str, values: Any, low: int = 0, high: int | None = None) -> list[int]:
    """A list of ids (tasks, init states, seeds): non-empty, each a whole number in range, no repeats
    (a repeated id would run an episode twice and count it once)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list, e.g. {name}=[0,3], got {values!r}")
    ids = [check_int(f"{name} entry", v, low, high) for v in values]
    if not ids:
        raise ValueError(f"{name} is an empty list: give at least one, or null for the default")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"{name} repeats {repeated}: each episode key must be asked for once")
    return ids


def check_env_settings(camera_size: Any = 256, image_size: Any = 224, settle_steps: Any = 10,
                       max_steps: Any = None, seed: Any = 7) -> None:
    """LiberoEnv's numeric settings; the evaluation checks them before any simulator process starts."""
    check_int("env.camera_size", camera_size, 16, 2048)
    check_int("env.image_size", image_size, 16, 2048)
    check_int("settle_steps", settle_steps, 0, 10_000)
    if max_steps is not None:
        check_int("max_steps", max_steps, 1, 100_000)
    check_int("seed", seed, 0, SEED_RANGE - 1)
