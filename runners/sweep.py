"""Sweeps: a Hydra multirun of evaluations (no -m needed; conf/sweep.yaml sets MULTIRUN).

    python -m runners.sweep steps=1,3,10
    python -m runners.sweep policy=pi05 steps=1,3,10 backend=eager,compile suite=libero_spatial,libero_object
    python -m runners.sweep hydra/launcher=joblib hydra.launcher.n_jobs=4 ...   # N local jobs (GPU per job)
    python -m runners.sweep --aggregate DIR                                      # rebuild sweep.* files

Shorthands: steps, backend, suite, replan, episodes (per task), tasks (subset of task ids).
After the last job the sweep directory holds sweep.csv, sweep.md, sweep.png and review.html.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runners import CONF_DIR
from runners.evaluate import evaluate

# Job directories read job0_steps=1,... or job0 when nothing was overridden (conf/sweep.yaml).
OmegaConf.register_new_resolver("underscored", lambda s: f"_{s}" if s else "", replace=True)


def finish_sweep(sweep_dir: str | Path, reproduce: str | None = None) -> None:
    from runners.aggregate import write_aggregate
    from runners.review import write_review

    root = Path(sweep_dir)
    rows = write_aggregate(root)
    page = write_review(root)
    print((root / "sweep.md").read_text(encoding="utf-8"))
    print(f"Sweep of {len(rows)} jobs: {root / 'sweep.csv'}, {root / 'sweep.png'}\nReview page: {page}")
    if reproduce:
        from runners.reproduce import markdown, report

        print(markdown(report(root, reproduce)))


class AggregateOnEnd(Callback):
    """Hydra callback: aggregate the sweep once every job has finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            finish_sweep(config.hydra.sweep.dir, config.get("reproduce"))
        except FileNotFoundError as exc:
            print(f"sweep aggregate skipped: {exc}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sweep")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg)["total"]["success_rate"]


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--aggregate":
        if len(sys.argv) != 3:
            sys.exit("usage: python -m runners.sweep --aggregate SWEEP_DIR")
        finish_sweep(sys.argv[2])
    else:
        main()
