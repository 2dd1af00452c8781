"""Sweeps through Hydra's multirun: the aggregate files, and the joblib and submitit launchers."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
TINY = ["policy=zero", "tasks=[0]", "episodes=1", "max_steps=4", "vectorization=sync", "env.camera_size=128",
        "env.image_size=128"]


def sweep(out, *args, timeout=900):
    cmd = [sys.executable, "-m", "runners.sweep", *TINY, f"out={out}", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def jobs(out):
    return sorted(p.parent for p in Path(out).glob("*/summary.json"))


def test_2x2_sweep_writes_per_job_results_and_the_aggregate(tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(out, "steps=1,3", "replan=2,5", "videos=failures")
    js = jobs(out)
    assert len(js) == 4
    for j in js:
        assert (j / "results.jsonl").is_file() and (j / "review.html").is_file()
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["steps"], r["replan"]) for r in rows) == [("1", "2"), ("1", "5"), ("3", "2"), ("3", "5")]
    assert all(r["success_rate"] == "0.0" and r["episodes"] == "1" for r in rows)
    md = (out / "sweep.md").read_text()
    table, paired = md.split("## Paired comparisons")
    assert table.strip().count("\n") == 5 and "| zero |" in table
    # the jobs that differ in one setting, compared on their paired episode (not the diagonals)
    assert paired.count("| steps: 1 → 3 |") == 2 and paired.count("| replan: 2 → 5 |") == 2
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["jobs"]) == 4 and len(summary["paired_comparisons"]) == 4
    assert all(j["failures"] == {"never_reached": 1} for j in summary["jobs"])
    assert all(c["paired"] == 1 and c["neither"] == 1 for c in summary["paired_comparisons"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "review.html").is_file() and "sweep.png" in (out / "review.html").read_text()
    assert "Sweep of 4 jobs" in proc.stdout
    # the aggregate can be rebuilt from the directory alone
    (out / "sweep.csv").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "runners.sweep", "--aggregate", str(out)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0 and (out / "sweep.csv").is_file()


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_two_job_sweep_through_a_launcher(tmp_path, launcher):
    out = tmp_path / launcher
    sweep(out, f"hydra/launcher={launcher}", "steps=1,3", "videos=none")
    js = jobs(out)
    assert len(js) == 2
    steps = sorted(json.loads((j / "summary.json").read_text())["config"]["steps"] for j in js)
    assert steps == [1, 3]
    assert (out / "sweep.csv").is_file()


def test_sweep_primary_config_is_a_multirun():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="sweep", return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert cfg.hydra.callbacks.aggregate._target_ == "runners.sweep.AggregateOnEnd"
        for launcher in ("joblib", "submitit_local", "submitit_slurm", "ray"):
            c = compose(config_name="sweep", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert c.hydra.launcher._target_.startswith("hydra_plugins.")
