"""Failure triage: the classifier on crafted traces (one per tag, and its thresholds), the env's trace
point on a real scene, and real episodes: the zero policy never reaches, the scripted expert with heavy
action noise fails to grasp; the compare CLI on those real run directories."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runners.triage import LIFT_M, REACH_M, STUCK_STEPS, TAGS, Trace, classify

REPO = Path(__file__).resolve().parents[1]
Z0 = 0.90  # the object's initial height


def pt(step, reach=0.0, z=Z0, contact=False, gap=0.078, goal=0.15, eef=None, placement=True):
    """A trace point like envs/trace.py's (the eef moves 2 cm a point unless given)."""
    return {"step": step, "object": "bowl_1", "placement": placement, "eef": eef or [0.02 * step / 5, 0.0, 1.0],
            "gripper": gap, "obj": [0.0, 0.0, z], "bottom": z, "reach": reach, "contact": contact, "goal": goal}


def approach():
    return [pt(0, reach=0.3), pt(5, reach=0.15), pt(10, reach=0.0), pt(15, reach=0.0, gap=0.01, contact=True)]


def carried():
    return approach() + [pt(20, z=Z0 + 0.05, gap=0.008, contact=True), pt(25, z=Z0 + 0.08, gap=0.008, contact=True)]


CASES = {
    "never_reached": [pt(s, reach=0.3, eef=[0, 0, 1.2]) for s in range(0, 220, 5)],
    "grasp_failed": approach() + [pt(20, gap=0.004), pt(25, reach=0.01), pt(30, reach=0.005)],
    "dropped": carried() + [pt(30, z=Z0, gap=0.004, reach=0.06), pt(35, z=Z0, gap=0.004, reach=0.06)],
    "misplaced": carried() + [pt(30, z=Z0 + 0.05, gap=0.078, reach=0.01, goal=0.12), pt(35, z=Z0, gap=0.078, goal=0.12)],
    "timeout_near_goal": carried() + [pt(30, z=Z0 + 0.02, gap=0.078, goal=0.03)],
    "timeout_holding": carried() + [pt(30, z=Z0 + 0.08, gap=0.008, contact=True, goal=0.2)],
    "stuck": approach() + [pt(s, reach=0.01, eef=[0.1, 0.0, 0.95]) for s in range(20, 20 + STUCK_STEPS + 5, 5)],
    "other": [pt(0, reach=0.3, placement=False, goal=None), pt(5, reach=0.01, placement=False, goal=None)],
}


@pytest.mark.parametrize("tag", sorted(CASES))
def test_each_tag_from_a_crafted_trace(tag):
    assert classify(CASES[tag], "failure") == tag
    assert classify(CASES[tag], "success") == "success" and classify(CASES[tag], "error") == "error"


def test_every_tag_is_covered_and_thresholds_decide():
    assert set(CASES) | {"success", "error"} == set(TAGS)
    near = [pt(0, reach=0.3), pt(5, reach=REACH_M + 0.002)]
    assert classify(near, "failure") == "never_reached"
    near[-1]["reach"] = REACH_M - 0.002
    assert classify(near, "failure") == "grasp_failed"
    # raised less than LIFT_M while held: not lifted, so losing it afterwards is no drop
    barely = approach() + [pt(20, z=Z0 + LIFT_M - 0.005, gap=0.008, contact=True), pt(25, gap=0.004, reach=0.05)]
    assert classify(barely, "failure") == "grasp_failed"
    # a raised object right at a closed hand is held even when the pads' contacts flicker off
    flicker = carried() + [pt(30, z=Z0 + 0.08, gap=0.008, contact=False, reach=0.0, goal=0.2)]
    assert classify(flicker, "failure") == "timeout_holding"
    # a still stretch just short of STUCK_STEPS is no stuck
    short = approach() + [pt(s, reach=0.01, eef=[0.1, 0.0, 0.95]) for s in range(20, 20 + STUCK_STEPS - 5, 5)]
    assert classify(short, "failure") == "grasp_failed"
    assert classify([], "failure") == "error"


def test_trace_collects_points_and_writes_its_line():
    t = Trace()
    for p in CASES["dropped"]:
        t.add(p)
    t.add(None)  # an env that could not be read adds nothing
    t.add(pt(35, z=Z0, gap=0.004, reach=0.07))  # the final point at a replan step replaces, not repeats
    assert len(t.points) == len(CASES["dropped"]) and t.points[-1]["reach"] == 0.07
    line = t.finish({"suite": "libero_spatial", "task_id": 0, "init_state_id": 3, "seed": 7}, t.classify("failure"))
    assert line["failure"] == "dropped" and line["object"] == "bowl_1" and line["init_state_id"] == 3
    assert line["facts"]["lifted"] is True and line["facts"]["max_lift_m"] == pytest.approx(0.08)
    assert "object" not in line["points"][0] and json.loads(json.dumps(line)) == line
    assert [p["held"] for p in line["points"]] == [False, False, False, True, True, True, False, False]
    assert line["points"][4]["lift"] == pytest.approx(0.05)


# ----- the env's trace point ----------------------------------------------------------------------------

def test_trace_point_follows_the_goal_object_on_a_real_scene():
    from envs.libero import LiberoEnv

    env = LiberoEnv("libero_spatial", 0, cameras=False)
    try:
        env.reset(options={"init_state_id": 0})
        p = env.trace_point()
        assert p["object"] == "akita_black_bowl_1" and p["placement"] is True and p["step"] == 0
        assert p["reach"] > 0.15 and not p["contact"] and 0.076 < p["gripper"] < 0.08  # far, open hand
        assert len(p["quat"]) == 4 and abs(sum(q * q for q in p["quat"]) - 1) < 1e-3
        assert p["goal"] > 0.08  # the bowl starts next to the plate, not on it
        plate = env.privileged_state()["objects"]["plate_1"]
        env.set_object_pose("akita_black_bowl_1", [*plate["pos"][:2], plate["bbox_max"][2] + 0.01])
        on_plate = env.trace_point()
        assert on_plate["goal"] < 0.03 and on_plate["obj"][2] > p["obj"][2] + 0.01
        eef = on_plate["eef"]
        env.set_object_pose("akita_black_bowl_1", [eef[0], eef[1], eef[2] - 0.02])  # into the open hand
        assert env.trace_point()["reach"] == 0.0
    finally:
        env.close()


# ----- real episodes ------------------------------------------------------------------------------------

SCRIPTED = ["policy=scripted", "vectorization=sync", "videos=none", "env.cameras=false", "suite=libero_spatial",
            "tasks=[0]", "init_states=[0,1]", "max_steps=150"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real evaluations on the same two episodes: the scripted expert clean and with heavy action noise
    (~70 s on 2 cores), and the zero policy for 40 steps."""
    from helpers import config
    from runners.evaluate import evaluate

    root = tmp_path_factory.mktemp("triage")
    evaluate(config(*SCRIPTED, "policy.action_noise=0.0"), root / "clean")
    evaluate(config(*SCRIPTED, "policy.action_noise=0.8"), root / "noisy")
    evaluate(config("policy=zero", "vectorization=sync", "videos=none", "env.cameras=false", "tasks=[0]",
                    "init_states=[0]", "max_steps=40"), root / "zero")
    return root


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_zero_policy_never_reaches(runs):
    (rec,) = lines(runs / "zero" / "results.jsonl")
    assert rec["success"] is False and rec["failure"] == "never_reached"
    (trace,) = lines(runs / "zero" / "traces.jsonl")
    assert trace["failure"] == "never_reached" and trace["object"] == "akita_black_bowl_1"
    steps = [p["step"] for p in trace["points"]]
    assert steps == list(range(0, 40, 5)) + [40]  # every replan (replan=5), then the end
    summary = json.loads((runs / "zero" / "summary.json").read_text())
    assert summary["tasks"][0]["failures"] == {"never_reached": 1} and "## Failure tags" in (runs / "zero" / "summary.md").read_text()


def test_heavy_action_noise_makes_the_expert_fail_to_grasp_or_drop(runs):
    clean, noisy = lines(runs / "clean" / "results.jsonl"), lines(runs / "noisy" / "results.jsonl")
    assert [r["failure"] for r in clean] == ["success", "success"]
    tags = [r["failure"] for r in noisy]
    assert all(not r["success"] for r in noisy) and all(t in ("grasp_failed", "dropped") for t in tags), tags
    traces = lines(runs / "noisy" / "traces.jsonl")
    assert [t["failure"] for t in traces] == tags
    assert all(t["facts"]["min_reach_m"] <= REACH_M for t in traces)  # it did get to the bowl


def test_compare_cli_on_two_real_run_directories(runs):
    cmd = [sys.executable, "-m", "runners.compare", str(runs / "clean"), str(runs / "noisy")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "settings that differ: policy.action_noise: 0.0 -> 0.8" in out
    assert "paired episodes: 2 (unpaired: 0 only in A, 0 only in B" in out
    assert "A only 2, B only 0" in out and "p = 0.5" in out and "Newcombe 1998 method 10" in out
    assert out.count("succeeded only in A") == 2
    js = json.loads(subprocess.run(cmd + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=120).stdout)
    assert js["difference"] == -1.0 and js["a_success_rate"] == 1.0 and js["ci95"][1] < 0
    bad = subprocess.run([sys.executable, "-m", "runners.compare", str(runs), str(runs / "noisy")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "holds no results.jsonl" in bad.stderr
