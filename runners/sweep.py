"""Sweeps: a Hydra multirun of evaluations (no -m needed; conf/sweep.yaml sets MULTIRUN).

    python -m runners.sweep steps=1,3,10
    python -m runners.sweep policy=pi05 steps=1,3,10 backend=eager,compile suite=libero_spatial,libero_object
    python -m runners.sweep hydra/launcher=joblib hydra.launcher.n_jobs=4 ...   # N local jobs (GPU per job)
    python -m runners.sweep --aggregate DIR                                      # rebuild sweep.* files

Shorthands: steps, backend, suite, replan, episodes (per task), tasks (subset of task ids).
After the last job the sweep directory holds sweep.csv, sweep.md, sweep.png and review.html.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runners import CONF_DIR
from runners.evaluate import evaluate, output_dir
from runners.rundir import JOB_ERROR_FILE

log = logging.getLogger("runners.sweep")

# Job directories read job0_steps=1,... or job0 when nothing was overridden (conf/sweep.yaml).
OmegaConf.register_new_resolver("underscored", lambda s: f"_{s}" if s else "", replace=True)


def failed_jobs(sweep_dir: str | Path) -> list[Path]:
    """The job directories of a sweep whose job raised (they hold JOB_ERROR_FILE)."""
    return sorted(p.parent for p in Path(sweep_dir).glob(f"*/{JOB_ERROR_FILE}"))


def finish_sweep(sweep_dir: str | Path, reproduce: str | None = None) -> None:
    from runners.aggregate import write_aggregate
    from runners.review import write_review

    root = Path(sweep_dir)
    failed = failed_jobs(root)
    rows = write_aggregate(root) if any(root.glob("*/summary.json")) else []
    if rows:
        page = write_review(root)
        print((root / "sweep.md").read_text(encoding="utf-8"))
        print(f"Sweep of {len(rows)} jobs: {root / 'sweep.csv'}, {root / 'sweep.png'}\nReview page: {page}")
        if reproduce:
            from runners.reproduce import markdown, report

            print(markdown(report(root, reproduce)))
    if failed:
        lines = "\n".join(f"  {job}: {_last_line(job / JOB_ERROR_FILE)}" for job in failed)
        raise SystemExit(f"{len(failed)} sweep job(s) failed (their tracebacks are in {JOB_ERROR_FILE}); "
                         f"the tables above leave them out. Fix the cause and run the sweep again with the "
                         f"same out=: finished episodes are kept.\n{lines}")


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
