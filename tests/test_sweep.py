"""Sweeps through Hydra's multirun: the aggregate files, and the joblib and submitit launchers."""

import csv
import json
import os
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


def test_a_failing_job_leaves_the_others_tables_and_fails_the_sweep(tmp_path):
    """One job of two raises (an unknown suite): the other's results and the sweep tables are written,
    the failed job's traceback is kept in its directory, and the sweep exits non-zero naming it."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "runners.sweep", *TINY, f"out={out}", "suite=libero_spatial,libero_nope",
           "videos=none"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert len(jobs(out)) == 1 and (out / "sweep.csv").is_file() and (out / "review.html").is_file()
    failed = [p.parent for p in out.glob("*/job_error.txt")]
    assert len(failed) == 1 and "libero_nope" in failed[0].name
    assert "libero_nope" in (failed[0] / "job_error.txt").read_text()
    assert "1 sweep job(s) failed" in proc.stderr and failed[0].name in proc.stderr


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


# submitit_slurm, for real up to sbatch: the launcher builds `submitit.AutoExecutor(cluster="slurm")`
# from the preset and submits through it. Here that executor is built for real (submitit checks every
# parameter and writes the sbatch script from them), and the jobs run on submitit's in-process debug
# executor instead of being handed to sbatch. (The ray preset is not run anywhere: ray is not installed.)
SLURM_TO_DEBUG = r'''
import json, sys
import submitit
from submitit.auto.auto import AutoExecutor

record_path, argv = sys.argv[1], sys.argv[2:]
record = {}


class SlurmCheckedDebugExecutor(AutoExecutor):
    def __init__(self, folder, cluster=None, **kwargs):
        record.update(cluster=cluster, init=kwargs, folder=str(folder))
        self.slurm = AutoExecutor(folder, cluster=cluster, **kwargs)
        super().__init__(folder, cluster="debug")

    def update_parameters(self, **kwargs):
        self.slurm.update_parameters(**kwargs)  # submitit's own checks for the slurm executor
        record["params"] = kwargs
        record["sbatch"] = self.slurm._executor._make_submission_file_text("python -m submitit.core._submit X", "u")
        super().update_parameters(**kwargs)  # slurm_* are ignored by the debug executor, the rest kept


submitit.AutoExecutor = SlurmCheckedDebugExecutor
sys.argv = ["runners.sweep", *argv]
from runners.sweep import main

try:
    main()
finally:
    with open(record_path, "w") as f:
        json.dump(record, f)
'''


def test_submitit_slurm_preset_reaches_submitit_and_runs_a_job_on_its_debug_executor(tmp_path):
    out, record_path = tmp_path / "slurm", tmp_path / "record.json"
    args = ["policy=zero", "tasks=[0]", "episodes=1", "max_steps=5", "videos=none", "vectorization=sync",
            "env.camera_size=128", "env.image_size=128", f"out={out}", "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu-debug", "hydra.launcher.account=proj42"]
    # submitit's SlurmExecutor wants `srun` on PATH to exist; this one is never called (nothing is submitted)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho 'no Slurm here' >&2\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-c", SLURM_TO_DEBUG, str(record_path), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads(record_path.read_text())
    # the preset's values, as the launcher hands them to submitit
    assert record["cluster"] == "slurm" and record["init"] == {"slurm_max_num_timeout": 0}
    assert record["folder"] == f"{out}/.submitit/%j"
    params = record["params"]
    assert {k: params[k] for k in ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
                                   "nodes", "name")} == {"timeout_min": 240, "cpus_per_task": 16, "gpus_per_node": 1,
                                                         "tasks_per_node": 1, "mem_gb": 64, "nodes": 1, "name": "sweep"}
    assert params["slurm_partition"] == "gpu-debug" and params["slurm_account"] == "proj42"
    assert params["slurm_signal_delay_s"] == 120 and params["slurm_array_parallelism"] == 256
    # ... and what sbatch would get
    sbatch = record["sbatch"]
    for line in ("#SBATCH --partition=gpu-debug", "#SBATCH --account=proj42", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --mem=64GB", "#SBATCH --time=240",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=sweep"):
        assert line in sbatch, (line, sbatch)
    # the job ran through submitit (its job environment and log folder) and wrote its evaluation
    js = jobs(out)
    assert len(js) == 1
    summary = json.loads((js[0] / "summary.json").read_text())
    assert summary["config"]["max_steps"] == 5 and summary["total"]["episodes"] == 1
    logs = list((out / ".submitit").glob("DEBUG_*/*_log.out"))
    assert logs, sorted(p.relative_to(out) for p in out.rglob("*"))
    assert (out / "sweep.csv").is_file()


def test_joblib_jobs_start_their_own_simulator_processes(tmp_path):
    """A joblib job runs in a loky worker, whose start method its own spawned simulators cannot
    recreate; the pool must start them anyway (vectorization=async, the default)."""
    out = tmp_path / "joblib_async"
    sweep(out, "hydra/launcher=joblib", "steps=1,3", "videos=none", "vectorization=async", "num_envs=1")
    js = jobs(out)
    assert len(js) == 2 and all(json.loads((j / "summary.json").read_text())["total"]["episodes"] == 1 for j in js)


def test_job_directories_are_found_again_by_their_overrides_and_long_names_are_hashed(tmp_path):
    """A sweep run again into its out= with its values in another order (or one more) used to run every
    job again in new directories and list both in its tables; a long override list crashed the sweep
    with 'File name too long'."""
    from runners.sweep import MAX_NAME_BYTES, job_dirname

    assert job_dirname(str(tmp_path / "new"), 0, "") == "job0"  # the sweep directory need not exist yet
    for num, ov in ((0, "replan=3"), (1, "replan=5")):
        (tmp_path / job_dirname(str(tmp_path), num, ov)).mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job0_replan=3", "job1_replan=5"]
    # again as replan=5,8,3: the two old jobs resumed where they are, the new one after their numbers
    assert job_dirname(str(tmp_path), 0, "replan=5") == "job1_replan=5"
    assert job_dirname(str(tmp_path), 2, "replan=3") == "job0_replan=3"
    assert job_dirname(str(tmp_path), 1, "replan=8") == "job3_replan=8"
    assert job_dirname(str(tmp_path), 4, "replan=9") == "job4_replan=9"  # a free number stays
    long = ",".join(f"perturb.kind{i}.severity=0.{i}" for i in range(40))
    name = job_dirname(str(tmp_path), 5, long)
    assert len(name.encode()) <= MAX_NAME_BYTES and name.startswith("job5_perturb.kind0.severity=0.0")
    (tmp_path / name).mkdir()  # the file system takes it
    assert job_dirname(str(tmp_path), 0, long) == name != job_dirname(str(tmp_path), 0, long + ",seed=8")
