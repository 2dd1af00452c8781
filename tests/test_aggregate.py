"""The sweep aggregate puts the swept setting on the plot's axis: latency, severity, or steps."""

import csv
import json

import pytest

from runners.aggregate import collect, plot_axis, write_aggregate
from runners.rundir import summarize


def _job(root, name, config, perturb="none", severity=None, successes=(1, 0, 1), jerk=0.1):
    d = root / name
    d.mkdir(parents=True)
    recs = [{"suite": config.get("suite", "libero_spatial"), "task_id": 0, "task": "t", "init_state_id": k, "seed": 7,
             "success": bool(ok), "env_steps": 50, "error": "", "action_jerk": jerk, "held_steps": 2 * k,
             "latencies_ms": [10.0], "config_hash": "h"} for k, ok in enumerate(successes)]
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = {"suite": "libero_spatial", "steps": 10, "backend": "eager", "replan": 5, "chunking": "replan",
            "execution": "sync", "latency_ms": 0, "seed": 7, "policy": {"_target_": "policy.scripted.ScriptedPolicy"}}
    summary = {"config": {**base, **config}, "policy_name": "scripted", "perturb": perturb,
               "severity": severity or {}, **summarize(recs)}
    (d / "summary.json").write_text(json.dumps(summary))


def test_a_latency_sweep_plots_success_and_jerk_against_latency(tmp_path):
    for i, ms in enumerate((0, 100, 400)):
        _job(tmp_path, f"job{i}", {"execution": "async", "latency_ms": ms}, jerk=0.1 * (i + 1))
    _job(tmp_path, "sync", {"execution": "sync", "latency_ms": 0})
    rows = write_aggregate(tmp_path)
    assert plot_axis(rows) == "latency_ms"
    md = (tmp_path / "sweep.md").read_text()
    assert "| execution | latency ms |" in md and "| jerk |" in md and "| held steps |" in md
    row = next(r for r in rows if r["job"] == "job2")
    assert row["latency_ms"] == 400.0 and row["action_jerk"] == pytest.approx(0.3) and row["held_steps"] == 2
    with open(tmp_path / "sweep.csv", newline="") as f:
        assert {"execution", "latency_ms", "action_jerk", "held_steps"} <= set(next(csv.DictReader(f)))
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_severity_sweep_plots_against_severity_and_names_the_perturbation(tmp_path):
    for i, sev in enumerate((0.0, 0.5, 1.0)):
        _job(tmp_path, f"job{i}", {}, perturb="camera", severity={"camera": sev})
    _job(tmp_path, "none", {})
    rows = collect(tmp_path)
    assert plot_axis(rows) == "severity"
    assert sorted((r["perturb"], r["severity"]) for r in rows) == [("camera", 0.0), ("camera", 0.5), ("camera", 1.0),
                                                                   ("none", 0.0)]


def test_a_steps_sweep_keeps_steps_on_the_axis(tmp_path):
    for i, steps in enumerate((1, 3, 10)):
        _job(tmp_path, f"job{i}", {"steps": steps})
    assert plot_axis(collect(tmp_path)) == "steps"


def test_failed_or_stopped_jobs_are_left_out_of_the_tables_and_named(tmp_path, capsys):
    """A job that failed when the sweep ran again into the same out= keeps its earlier summary.json; one
    killed outright has results but no summary; one stopped has a summary marked incomplete. None of
    their numbers may reach the tables, comparisons or plot, and the sweep must say which and why
    (it said "the tables leave them out" while showing a failed job's old numbers)."""
    from runners.rundir import JOB_ERROR_FILE
    from runners.sweep import finish_sweep

    for i, replan in enumerate((2, 5, 8, 10)):
        _job(tmp_path, f"job{i}_replan={replan}", {"replan": replan})
    (tmp_path / "job1_replan=5" / JOB_ERROR_FILE).write_text("Traceback ...\nValueError: unknown task 99\n")
    (tmp_path / "job2_replan=8" / "summary.json").unlink()
    stopped = json.loads((tmp_path / "job3_replan=10" / "summary.json").read_text())
    (tmp_path / "job3_replan=10" / "summary.json").write_text(json.dumps({**stopped, "complete": False,
                                                                          "episodes_planned": 50}))
    (tmp_path / "job4_suite=nope").mkdir()  # failed before its first episode: a traceback and nothing else
    (tmp_path / "job4_suite=nope" / JOB_ERROR_FILE).write_text("ValueError: unknown suite 'nope'\n")
    with pytest.raises(SystemExit) as info:
        finish_sweep(tmp_path)
    message = str(info.value)
    assert "4 sweep job(s) failed or did not finish" in message
    assert "job4_suite=nope: failed (traceback in job_error.txt): ValueError: unknown suite 'nope'" in message
    assert "job1_replan=5: failed (traceback in job_error.txt): ValueError: unknown task 99" in message
    assert "job2_replan=8: no summary.json" in message and "job3_replan=10: stopped after 3 of 50 episodes" in message
    assert [r["job"] for r in json.loads((tmp_path / "sweep.json").read_text())["jobs"]] == ["job0_replan=2"]
    assert json.loads((tmp_path / "sweep.json").read_text())["paired_comparisons"] == []
    page = (tmp_path / "review.html").read_text()
    assert page.count("Left out of the sweep's tables") == 3
    # every job failing: no table of an earlier run survives to be taken for this one's
    (tmp_path / "job0_replan=2" / JOB_ERROR_FILE).write_text("ValueError: again\n")
    with pytest.raises(SystemExit, match="5 sweep job"):
        finish_sweep(tmp_path)
    assert not any((tmp_path / name).exists() for name in ("sweep.csv", "sweep.md", "sweep.json", "sweep.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no sweep jobs"):
        finish_sweep(empty)


def test_a_job_with_no_valid_episode_is_named_on_the_plot_not_drawn_at_zero(tmp_path, monkeypatch):
    """Every episode of a job errored (a crashing simulator): its success is unknown, and the plot drew
    it as 0% with a full-height bar, indistinguishable from a policy that always fails."""
    from matplotlib.axes import Axes

    from runners.aggregate import plot_series

    for i, steps in enumerate((1, 3, 10)):
        _job(tmp_path, f"job{i}", {"steps": steps}, successes=(1, 1, 0))
    summary = json.loads((tmp_path / "job2" / "summary.json").read_text())
    summary.update(summarize([{"suite": "libero_spatial", "task_id": 0, "success": False, "error": "MujocoException",
                               "latencies_ms": []}] * 3))
    (tmp_path / "job2" / "summary.json").write_text(json.dumps(summary))
    drawn = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, *a, **k: (drawn.append((list(x), list(y))),
                                                                       real(self, x, y, *a, **k))[1])
    rows = write_aggregate(tmp_path)
    assert drawn == [([1.0, 3.0], [pytest.approx(200 / 3), pytest.approx(200 / 3)])]
    series, no_episodes = plot_series(rows, "steps")
    assert no_episodes == ["job2"] and [x for x, _ in series["all jobs"]] == [1.0, 3.0, 10.0]
    assert "| job2 |" in (tmp_path / "sweep.md").read_text()  # the table still lists it, with its errors
