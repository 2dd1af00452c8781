"""The five LIBERO suites and openpi's per-suite episode limits.

openpi: examples/libero/main.py (max_steps is the longest training demo plus a margin).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str
    num_tasks: int
    max_steps: int  # openpi's limit, excluding the settle steps


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("libero_spatial", 10, 220),
        Suite("libero_object", 10, 280),
        Suite("libero_goal", 10, 300),
        Suite("libero_10", 10, 520),
        Suite("libero_90", 90, 400),
    )
}

INIT_STATES_PER_TASK = 50


def get_suite(name: str) -> Suite:
    """The suite called `name`, or a ValueError listing the valid names."""
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown LIBERO suite {name!r}; choose one of {', '.join(SUITES)}") from None


def check_task_id(suite: str, task_id: int) -> None:
    n = get_suite(suite).num_tasks
    if not 0 <= int(task_id) < n:
        raise ValueError(f"task_id {task_id} is out of range for {suite}, which has tasks 0..{n - 1}")
