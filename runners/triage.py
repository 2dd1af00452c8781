"""Failure triage: what went wrong in an episode, read from the simulator's own state.

The runner adds one trace point (envs/trace.py: eef, finger gap, the goal object's pose, whether
both finger pads touch it, its distance to the goal) at every replan and at the episode's end;
`classify` turns the sequence into one tag, stored as `failure` on the episode's result line (the
points go to traces.jsonl). It works for any policy: nothing here looks at actions or images.

Tags, checked in this order (the first that applies wins):

    success            the env reported success
    error              the episode ended in an error (simulator or policy)
    never_reached      the grip site never came within REACH_M (3 cm) of the goal object's bounding
                       box: the open fingers reach ~4 cm either side of it, so no grasp was even tried
    other              reached, but the goal is no On/In placement (drawers, stoves): nothing finer to
                       say (`stuck` when the arm froze, as below)
    timeout_near_goal  the object ended within NEAR_GOAL_M (5 cm) of the goal point (its underside to the
                       target's top centre or the target region's centre) without LIBERO's success
    timeout_holding    lifted it and still held it at the end, away from the goal (too slow, or lost);
                       `stuck` instead when the arm froze, as below
    misplaced          lifted it, then let go (the finger gap had widened by RELEASE_GAP_M, 1 cm, at the
                       first point it was no longer held) away from the goal
    dropped            lifted it, then lost it with the gripper still closed (slipped or knocked out)
    stuck              never lifted it, and the arm barely moved (grip site within STILL_M, 1 cm) for
                       STUCK_STEPS (60 env steps, 3 s at LIBERO's 20 Hz) or more at a stretch
    grasp_failed       reached it, never lifted it

Terms: *held* = both finger pads touch the object (robosuite's grasp test), or it is raised by more
than LIFT_M with the grip site within HELD_REACH_M of it and the fingers not wide open (contacts
flicker; a raised object next to a closed hand is held all the same). *Lifted* = held and raised
more than LIFT_M above its height at the episode's first point (2 cm: more than a tilt or a nudge
onto a plate's rim). Points are sampled at replans (every `replan` env steps), so a brief event
between two points can be missed; the thresholds leave room for that.
"""

from __future__ import annotations

from typing import Any

TAGS = ("success", "never_reached", "grasp_failed", "dropped", "misplaced", "timeout_near_goal",
        "timeout_holding", "stuck", "other", "error")
FAILURE_TAGS = tuple(t for t in TAGS if t != "success")

REACH_M = 0.03  # grip site to the object's bounding box
LIFT_M = 0.02  # object raised above its initial height
HELD_REACH_M = 0.01  # grip site to the object's box, for a raised object counted as held without contacts
OPEN_GAP_M = 0.07  # finger gap above which the hand is open (Panda: ~0.078 fully open)
RELEASE_GAP_M = 0.01  # the finger gap widened by this much at the moment the object was lost: let go
NEAR_GOAL_M = 0.05  # object underside to the goal point
STILL_M = 0.01  # grip site motion below which the arm counts as not moving
STUCK_STEPS = 60  # env steps (3 s at 20 Hz)


def _held(p: dict[str, Any], z0: float) -> bool:
    if p.get("obj") is None:
        return False
    raised = p["obj"][2] - z0 > LIFT_M
    return bool(p.get("contact")) or (raised and (p.get("reach") or 0.0) <= HELD_REACH_M
                                       and p["gripper"] < OPEN_GAP_M)


def _lifted(p: dict[str, Any], z0: float) -> bool:
    return _held(p, z0) and p["obj"][2] - z0 > LIFT_M


def longest_still(points: list[dict[str, Any]]) -> int:
    """The most env steps over which the grip site stayed within STILL_M of where the stretch began."""
    best, start = 0, 0
    for j in range(1, len(points)):
        moved = sum((a - b) ** 2 for a, b in zip(points[j]["eef"], points[start]["eef"])) ** 0.5
        if moved > STILL_M:
            start = j
        best = max(best, points[j]["step"] - points[start]["step"])
    return best


def facts(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers the tag is decided from (shown on the review page)."""
    if not points:
        return {}
    z0 = points[0]["obj"][2] if points[0].get("obj") else None
    reach = [p["reach"] for p in points if p.get("reach") is not None]
    lift = [p["obj"][2] - z0 for p in points if z0 is not None and p.get("obj")]
    return {
        "min_reach_m": min(reach) if reach else None,
        "max_lift_m": round(max(lift), 4) if lift else None,
        "lifted": z0 is not None and any(_lifted(p, z0) for p in points),
        "final_goal_m": points[-1].get("goal"),
        "longest_still_steps": longest_still(points),
    }


def classify(points: list[dict[str, Any]], outcome: str) -> str:
    """One tag from `TAGS` for an episode with `outcome` success | failure | error (see the module
    docstring for the rules and thresholds)."""
    if outcome == "success":
        return "success"
    if outcome == "error" or not points:
        return "error"
    reach = [p["reach"] for p in points if p.get("reach") is not None]
    if not reach or min(reach) > REACH_M:
        return "never_reached"
    if not points[0].get("placement"):
        return "stuck" if longest_still(points) >= STUCK_STEPS else "other"
    last = points[-1]
    if last.get("goal") is not None and last["goal"] <= NEAR_GOAL_M:
        return "timeout_near_goal"
    z0 = points[0]["obj"][2]
    lifted = [j for j, p in enumerate(points) if _lifted(p, z0)]
    if lifted and _held(last, z0):
        return "stuck" if longest_still(points) >= STUCK_STEPS else "timeout_holding"
    if lifted:
        j = lifted[-1]
        lost = next(k for k in range(j + 1, len(points)) if not _held(points[k], z0))
        released = points[lost]["gripper"] - points[j]["gripper"] >= RELEASE_GAP_M
        return "misplaced" if released else "dropped"
    if longest_still(points) >= STUCK_STEPS:
        return "stuck"
    return "grasp_failed"


class Trace:
    """One episode's trace points, as the runner collects them (`add` at every replan and at the end)."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []

    def add(self, point: dict[str, Any] | None) -> None:
        if point is None:
            return  # the env could not be read (an episode that failed to start)
        if self.points and self.points[-1]["step"] == point["step"]:
            self.points[-1] = point  # the same state seen twice (a final point at a replan step)
        else:
            self.points.append(point)

    def classify(self, outcome: str) -> str:
        return classify(self.points, outcome)

    def finish(self, rec: dict[str, Any], failure: str) -> dict[str, Any]:
        """The traces.jsonl line of a finished episode (`rec`: its result line)."""
        first = self.points[0] if self.points else {}
        keep = ("step", "eef", "gripper", "obj", "quat", "bottom", "reach", "contact", "goal")
        z0 = first["obj"][2] if first.get("obj") else None

        def derived(p: dict[str, Any]) -> dict[str, Any]:  # what the rules read, stored for whoever reads the file
            if z0 is None or p.get("obj") is None:
                return {"lift": None, "held": False}
            return {"lift": round(p["obj"][2] - z0, 4), "held": _held(p, z0)}

        return {
            **{k: rec[k] for k in ("suite", "task_id", "init_state_id", "seed")},
            "failure": failure,
            "object": first.get("object"),
            "placement": first.get("placement"),
            "facts": facts(self.points),
            "points": [{**{k: p.get(k) for k in keep}, **derived(p)} for p in self.points],
        }
