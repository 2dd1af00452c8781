"""Sweeps: a Hydra multirun of evaluations (no -m needed; conf/sweep.yaml sets MULTIRUN).

    python -m runners.sweep steps=1,3,10
    python -m runners.sweep policy=pi05 steps=1,3,10 backend=eager,compile suite=libero_spatial,libero_object
    python -m runners.sweep hydra/launcher=joblib hydra.launcher.n_jobs=4 ...   # N local jobs (GPU per job)
    python -m runners.sweep --aggregate DIR                                      # rebuild sweep.* files

Shorthands: steps, backend, suite, replan, episodes (per task), tasks (subset of task ids).
After the last job the sweep directory holds sweep.csv, sweep.md, sweep.png and review.html.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runners import CONF_DIR
from runners.evaluate import evaluate, output_dir
from runners.rundir import JOB_ERROR_FILE, sweep_runs

log = logging.getLogger("runners.sweep")

MAX_NAME_BYTES = 200  # of a job directory's name (file systems allow 255): longer override lists are hashed


def job_dirname(sweep_dir: str, num: int, overrides: str) -> str:
    """A sweep job's directory name (conf/sweep.yaml): job<N>_<overrides>, job<N> without any. A directory
    of an earlier sweep into this out= with the same overrides is reused whatever its number, so a sweep
    run again with its values in another order, or with one more, resumes its jobs instead of running
    them again beside the old ones (and listing both). A new job whose number an earlier job holds
    takes a number after all of theirs. A name over MAX_NAME_BYTES ends in a hash of the overrides
    (all of them stay in the job's config.yaml)."""
    suffix = f"_{overrides}" if overrides else ""
    if len(f"job{num}{suffix}".encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(overrides.encode()).hexdigest()[:10]
        suffix = f"_{overrides.encode()[:MAX_NAME_BYTES - 40].decode(errors='ignore')}...{digest}"
    root = Path(sweep_dir)
    numbers: set[int] = set()
    if root.is_dir():
        for d in root.iterdir():
            m = re.fullmatch(r"job(\d+)(_.*)?", d.name)
            if m and d.is_dir():
                if (m.group(2) or "") == suffix:
                    return d.name  # this job's directory from an earlier sweep
                numbers.add(int(m.group(1)))
    if num in numbers:
        num = max(numbers) + 1 + num
    return f"job{num}{suffix}"


OmegaConf.register_new_resolver("job_dirname", lambda d, n, o: job_dirname(str(d), int(n), str(o or "")), replace=True)


def finish_sweep(sweep_dir: str | Path, reproduce: str | None = None) -> None:
    """Tables, plot, paired comparisons and review page over the jobs whose summaries are current; a
    failed or stopped job is left out of them and named, and the exit status says so."""
    from runners.aggregate import SWEEP_OUTPUTS, write_aggregate
    from runners.review import write_review

    root = Path(sweep_dir)
    current, left_out = sweep_runs(root)
    if current:
        rows = write_aggregate(root)
    else:  # tables of an earlier sweep into this out= would show numbers no job stands for now
        rows = []
        for name in SWEEP_OUTPUTS:
            (root / name).unlink(missing_ok=True)
    if rows or left_out:
        page = write_review(root)
    if rows:
        print((root / "sweep.md").read_text(encoding="utf-8"))
        print(f"Sweep of {len(rows)} jobs: {root / 'sweep.csv'}, {root / 'sweep.png'}\nReview page: {page}")
        if reproduce:
            from runners.reproduce import markdown, report

            print(markdown(report(root, reproduce)))
    if left_out:
        lines = "\n".join(f"  {job.relative_to(root)}: {why}" + (f": {_last_line(job / JOB_ERROR_FILE)}"
                                                                if (job / JOB_ERROR_FILE).is_file() else "")
                          for job, why in sorted(left_out.items()))
        raise SystemExit(f"{len(left_out)} sweep job(s) failed or did not finish; the tables "
                         f"{'above ' if rows else ''}leave them out. Fix the cause and run the sweep again with "
                         f"the same out=: finished episodes are kept.\n{lines}")
    if not rows:
        raise SystemExit(f"no sweep jobs (directories with results.jsonl) under {root}: give a sweep's out= directory")


def _last_line(file: Path) -> str:
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty)"


class AggregateOnEnd(Callback):
    """Hydra callback: aggregate the sweep once every job has finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            finish_sweep(config.hydra.sweep.dir, config.get("reproduce"))
        except FileNotFoundError as exc:
            print(f"sweep aggregate skipped: {exc}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sweep")
def main(cfg: DictConfig) -> float | None:
    # One failing job (a missing checkpoint, an unknown suite, an out-of-memory GPU) must not cost the
    # others their tables: Hydra's sweeper re-raises a job's exception before the aggregate callback
    # runs. The job records its traceback instead, and the aggregate reports it and exits non-zero.
    out = output_dir(cfg)
    (out / JOB_ERROR_FILE).unlink(missing_ok=True)  # a rerun that succeeds is no longer a failure
    try:
        return evaluate(cfg)["total"]["success_rate"]
    except Exception:
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        log.error("job failed, traceback in %s:\n%s", out / JOB_ERROR_FILE, traceback.format_exc())
        return None


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--aggregate":
        if len(sys.argv) != 3:
            sys.exit("usage: python -m runners.sweep --aggregate SWEEP_DIR")
        if not Path(sys.argv[2]).is_dir():
            sys.exit(f"{sys.argv[2]} is not a directory: give a sweep's out= directory")
        finish_sweep(sys.argv[2])
    else:
        main()
