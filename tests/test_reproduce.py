"""runners.reproduce: verdicts against a published table, their power, and the protocol check."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from runners.reproduce import power, report, verdict

REPO = Path(__file__).resolve().parents[1]


def test_exact_test_matches_a_textbook_value_and_scipy():
    # 7 successes in 20 trials against p = 0.5: two-sided exact p = 2 P(X <= 7) = 0.2632 (textbook)
    v = verdict(7, 20, 0.5, alpha=0.05)
    assert v["p_value"] == pytest.approx(0.2632, abs=1e-4) and v["verdict"] == "consistent"
    assert verdict(2, 20, 0.5, 0.05)["verdict"] == "below" and verdict(18, 20, 0.5, 0.05)["verdict"] == "above"
    assert verdict(480, 500, 0.988, 0.05)["p_value"] == pytest.approx(
        stats.binomtest(480, 500, 0.988).pvalue)


def test_power_is_the_rejection_probability_under_a_two_point_drop():
    n, p0, alpha = 60, 0.9, 0.05
    rejected = [k for k in range(n + 1) if stats.binomtest(k, n, p0).pvalue < alpha]
    expected = sum(stats.binom.pmf(k, n, p0 - 0.02) for k in rejected)
    assert power(n, p0, alpha) == pytest.approx(expected)
    # more episodes, more power; openpi's 500 per suite cannot reliably see a 2-point drop at 98.8%
    assert power(100, 0.988, 0.05) < power(500, 0.988, 0.05) < 0.9


def _evaluate(out, *overrides):
    cmd = [sys.executable, "-m", "runners.evaluate", "suite=libero_spatial", "tasks=[0]", "init_states=[0,1]",
           "num_envs=2", "videos=none", f"out={out}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_report_on_real_runs_gives_the_right_verdicts_and_names_protocol_differences(tmp_path):
    root = tmp_path / "sweep"
    _evaluate(root / "expert", "policy=scripted", "replan=4")  # a difference from openpi's protocol
    _evaluate(root / "zero", "policy=zero", "max_steps=30")  # never succeeds; and a shorter episode limit
    table = {"tables": {"made_up": {"model": "a table written for this test", "source": "tests", "date": "today",
                                    "success": {"libero_spatial": 0.95}}},
             "protocol": json.loads((REPO / "runners" / "published" / "libero.json").read_text())["protocol"]}
    published = tmp_path / "published.json"
    published.write_text(json.dumps(table))
    result = report(root, "made_up", 0.05, published)
    rows = {r["run"]: r for r in result["rows"]}
    expert, zero = json.loads((root / "expert" / "summary.json").read_text()), rows["zero"]
    assert rows["expert"]["successes"] == expert["total"]["successes"] and rows["expert"]["episodes"] == 2
    assert rows["expert"]["verdict"] == ("consistent" if expert["total"]["successes"] >= 1 else "below")
    assert zero["successes"] == 0 and zero["verdict"] == "below" and zero["p_value"] < 0.01
    diffs = result["protocol_differences"]
    assert any(d.startswith("replan: this run 4, the paper 5") for d in diffs["expert"])
    assert any(d.startswith("max steps (libero_spatial): this run 30, the paper 220") for d in diffs["zero"])
    assert all(any("episodes per task" in d for d in ds) for ds in diffs.values())  # 2 init states, not 50
    assert not any("MuJoCo" in d for d in diffs["expert"])  # this project pins openpi's 3.2.3
    md = (root / "reproduce.md").read_text()
    assert "made_up" in md and "**below**" in md and "replan: this run 4" in md
    cli = subprocess.run([sys.executable, "-m", "runners.reproduce", str(root), "--table", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "pi05_libero_openpi" in cli.stderr  # names the tables there are


def test_protocol_check_names_perturbations_blind_cameras_subsets_seeds_and_latency(tmp_path):
    """A run that is not the paper's in ways the verdict cannot see: a perturbation, cameras off, one
    task, two seeds, a latency. A table file of one's own without a protocol is checked against
    openpi's, and its own episodes per task (here 4 = 2 init states x 2 seeds) is the one held to."""
    run = tmp_path / "run"
    _evaluate(run, "policy=zero", "max_steps=8", "perturb=lighting", "perturb.severity=0.5", "env.cameras=false",
              "seeds=[7,8]", "execution=async", "latency_ms=100")
    published = tmp_path / "mine.json"
    published.write_text(json.dumps({"tables": {"mine": {"episodes_per_task": 4, "success": {"libero_spatial": 0.5}}}}))
    diffs = report(run, "mine", 0.05, published)["protocol_differences"]["."]
    text = "\n".join(diffs)
    assert "perturbation: this run lighting (severity lighting 0.5), the paper none" in text
    assert "cameras off (env.cameras=false)" in text
    assert "tasks: only [0] of the suite" in text
    assert "seeds: this run [7, 8], the paper 7 alone" in text
    assert "latency: 100 ms while the simulator kept moving" in text and "execution: this run 'async'" in text
    assert "episodes per task" not in text  # 4 per task, as this table's protocol says
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    summary = json.loads((broken / "summary.json").read_text())
    del summary["suites"]["libero_spatial"]["successes"]
    (broken / "summary.json").write_text(json.dumps(summary))
    cli = subprocess.run([sys.executable, "-m", "runners.reproduce", str(broken)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and "not in the expected form" in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "no 'tables'"),  # a list at the top: it failed with AttributeError: 'list' object has no attribute 'get'
    ('{"tables": {"t": [0.9]}}', "table 't' needs 'success'"),
    ('{"tables": {"t": {"success": {"libero_spatial": true}}}}', "table 't' needs 'success'"),
    ('{"tables": {"t": {"success": {"libero_spatial": 0.9}, "episodes_per_task": 0}}}', "episodes_per_task"),
    ('{"tables": {"t": {"success": {"libero_spatial": 0.9}}}, "protocol": [1]}', "'protocol' must be an object"),
    ("{not json", "cannot read a JSON table file"),
])
def test_a_malformed_table_file_is_refused_with_what_is_wrong(tmp_path, content, message):
    from runners.reproduce import load_published

    bad = tmp_path / "mine.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_published(bad)
    assert str(bad) in str(info.value)
