"""Crash-safe results: Wilson intervals, the append-only log, summaries, the run directory's readers."""

import json

import pytest

from runners.rundir import ResultsLog, find_runs, policy_label, read_records, summarize
from runners.stats import wilson_interval
from runners.tables import html_table, markdown_table, text_table


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [(5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (0, 2, 0.0, 0.6576), (49, 50, 0.8950, 0.9965)],
)
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    a, b = wilson_interval(k, n)
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_wilson_interval_without_episodes_is_uninformative():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def rec(task, k, success=True, error="", steps=10):
    return {"suite": "libero_spatial", "task_id": task, "task": f"task {task}", "init_state_id": k, "seed": 7,
            "success": success, "env_steps": steps, "error": error, "latencies_ms": [1.0, 2.0, 3.0]}


def test_log_appends_one_line_per_episode_and_reads_back(tmp_path):
    log = ResultsLog(tmp_path, "abc")
    log.append(rec(0, 0))
    log.append(rec(0, 1, success=False))
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["config_hash"] == "abc"
    again = ResultsLog(tmp_path, "abc")
    assert again.done() == {("libero_spatial", 0, 0, 7), ("libero_spatial", 0, 1, 7)}


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path):
    log = ResultsLog(tmp_path, "abc")
    log.append(rec(0, 0))
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"suite": "libero_spatial", "task_id": 0, "init_st')  # killed mid-write
    log = ResultsLog(tmp_path, "abc")
    assert log.torn_lines == 1 and len(log.done()) == 1
    log.append(rec(0, 1))
    again = ResultsLog(tmp_path, "abc")
    assert len(again.done()) == 2 and again.torn_lines == 1


def test_a_corrupt_non_utf8_line_is_skipped_like_a_torn_one(tmp_path):
    """Disk corruption in the middle of results.jsonl used to stop resume, review and compare with a
    UnicodeDecodeError naming no file."""
    from runners.rundir import read_traces

    log = ResultsLog(tmp_path, "abc")
    log.append(rec(0, 0))
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    log.append(rec(0, 1))
    (tmp_path / "traces.jsonl").write_bytes(b"\xff\n" + json.dumps(rec(0, 1)).encode() + b"\n")
    again = ResultsLog(tmp_path, "abc")
    assert again.torn_lines == 1 and again.done() == {("libero_spatial", 0, 0, 7), ("libero_spatial", 0, 1, 7)}
    assert list(read_traces(tmp_path)) == [("libero_spatial", 0, 1, 7)]


def test_error_episodes_are_retried_and_the_newest_line_wins(tmp_path):
    log = ResultsLog(tmp_path, "abc")
    log.append(rec(0, 0, success=False, error="boom"))
    assert log.done(retry_errors=True) == set()
    assert log.done(retry_errors=False) == {("libero_spatial", 0, 0, 7)}
    log.append(rec(0, 0, success=True))
    assert ResultsLog(tmp_path, "abc").records[("libero_spatial", 0, 0, 7)]["success"] is True


def test_results_of_another_configuration_are_refused(tmp_path):
    ResultsLog(tmp_path, "abc").append(rec(0, 0))
    with pytest.raises(ValueError, match="another configuration"):
        ResultsLog(tmp_path, "xyz")


def test_summary_per_task_and_suite_excludes_errors():
    records = [rec(0, 0), rec(0, 1, success=False, steps=20), rec(1, 0), rec(1, 1, error="boom", success=False)]
    s = summarize(records)
    t0, t1 = s["tasks"]
    assert t0["episodes"] == 2 and t0["successes"] == 1 and t0["success_rate"] == 0.5 and t0["mean_env_steps"] == 15
    assert t1["episodes"] == 1 and t1["errors"] == 1 and t1["success_rate"] == 1.0
    suite = s["suites"]["libero_spatial"]
    assert suite["episodes"] == 3 and suite["successes"] == 2 and suite["errors"] == 1
    assert suite["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    assert suite["latency_p50_ms"] == 2.0 and suite["policy_calls"] == 12
    table = text_table(s)
    assert "libero_spatial" in table and "50.0" in table and "all" in table


def test_the_three_renderings_of_the_task_table_hold_the_same_cells():
    s = summarize([rec(0, 0), rec(0, 1, success=False, steps=30), rec(1, 0)])
    md = markdown_table(s)
    assert md.splitlines()[0].startswith("| suite | task | success % | 95% CI |")
    assert "| libero_spatial | 0 | 50.0 | [9.5, 90.5] | 2 | 0 | 20.0 |" in md
    assert "| **libero_spatial** | all | 66.7 |" in md
    html = html_table(s)
    assert html.count("<tr") == 1 + 2 + 1 and "<td>[9.5, 90.5]</td>" in html and "<td>20.0</td>" in html
    text = text_table(s).splitlines()
    assert any("50.0" in line and "[9.5, 90.5]" in line and "20.0" in line for line in text)


def test_results_written_before_the_env_steps_rename_still_read(tmp_path):
    old = {k: v for k, v in rec(0, 0, steps=42).items() if k != "env_steps"}
    old["steps"] = 42  # the first results format called executed env steps "steps"
    (tmp_path / "results.jsonl").write_text(json.dumps({**old, "config_hash": "abc"}) + "\n")
    records, torn = read_records(tmp_path)
    assert torn == 0 and records[("libero_spatial", 0, 0, 7)]["env_steps"] == 42
    assert summarize(records.values())["total"]["mean_env_steps"] == 42
    assert ResultsLog(tmp_path, "abc").records[("libero_spatial", 0, 0, 7)]["env_steps"] == 42


def test_policy_label_prefers_the_config_choice_then_the_class_name():
    assert policy_label({"policy_name": "pi05", "config": {"policy": {"_target_": "x.Y"}}}) == "pi05"
    assert policy_label({"config": {"policy": {"_target_": "policy.simple.ZeroPolicy"}}}) == "ZeroPolicy"


def test_runs_are_found_wherever_the_root_lives_but_hidden_folders_inside_are_skipped(tmp_path):
    root = tmp_path / ".cache" / "runs" / "sweep"  # a root under a hidden folder (e.g. ~/.cache) still counts
    for job in ("job0", "job1", ".hydra", ".submitit/123"):
        (root / job).mkdir(parents=True)
        (root / job / "results.jsonl").write_text("")
    assert [p.relative_to(root).as_posix() for p in find_runs(root)] == ["job0", "job1"]
    assert find_runs(root / "job0") == [root / "job0"]


def test_result_lines_of_the_wrong_types_are_skipped_and_never_reach_the_page(tmp_path):
    """A hand-edited or foreign results.jsonl: markup in env_steps, a string task id, a boolean seed, a
    video path outside the run. Those lines are skipped like torn ones; the good line is read; the
    review page carries no unescaped markup."""
    from runners.review import write_review

    good = rec(0, 0, success=False)
    bad = [{**rec(0, 1), "env_steps": "<script>alert(1)</script>"}, {**rec(0, 2), "task_id": "0"},
           {**rec(0, 3), "seed": True}, {**rec(0, 4), "video": "../../../etc/passwd"}, ["not", "a", "record"],
           {**rec(0, 5), "failure": {"x": 1}}]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in [good, *bad]) + "\n")
    records, skipped = read_records(tmp_path)
    assert list(records) == [("libero_spatial", 0, 0, 7)] and skipped == len(bad)
    page = write_review(tmp_path).read_text()
    assert "<script>alert" not in page and "etc/passwd" not in page
