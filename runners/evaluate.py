"""Evaluate a policy on a LIBERO suite: every task x init state, in parallel, resumable.

    python -m runners.evaluate policy=zero suite=libero_spatial tasks=[0,1] episodes=2 num_envs=2

Writes, in the run directory (`out=...`): results.jsonl (one line per episode, appended as episodes
finish), summary.json (success per task and suite with Wilson 95% CIs, latency, provenance),
videos/ and review.html. Running again with the same `out` finishes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from envs.suites import INIT_STATES_PER_TASK, check_task_id, get_suite
from runners import CONF_DIR
from runners.build import build_policy
from runners.chunking import check_chunking
from runners.loop import EvaluationLoop, LoopSettings
from runners.pool import EnvPool, Episode
from runners.progress import Progress
from runners.provenance import provenance
from runners.review import write_review
from runners.rundir import NOT_HASHED  # noqa: F401  (moved to runners/rundir.py; importable here as before)
from runners.rundir import SUMMARY_FILE, SUMMARY_MD, ResultsLog, policy_label, result_settings, summarize, write_json
from runners.tables import failure_markdown, markdown_table, text_table
from videos.recorder import VideoRecorder


def config_hash(cfg: DictConfig) -> str:
    """Hash of the settings that decide results (runners.rundir.NOT_HASHED are left out)."""
    data = result_settings(OmegaConf.to_container(cfg, resolve=True))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def plan_episodes(cfg: DictConfig) -> list[Episode]:
    """Every (task, init state) the config asks for, after checking the ids against the suite."""
    suite = get_suite(cfg.suite)
    tasks = list(range(suite.num_tasks)) if cfg.tasks is None else [int(t) for t in cfg.tasks]
    for t in tasks:
        check_task_id(suite.name, t)
    if cfg.init_states is not None:
        states = [int(k) for k in cfg.init_states]
    else:
        if not 1 <= int(cfg.episodes) <= INIT_STATES_PER_TASK:
            raise ValueError(f"episodes must be 1..{INIT_STATES_PER_TASK} (LIBERO's init states per task), "
                             f"got {cfg.episodes}")
        states = list(range(int(cfg.episodes)))
    bad = [k for k in states if not 0 <= k < INIT_STATES_PER_TASK]
    if bad:
        raise ValueError(f"init_states {bad} out of range: LIBERO tasks have init states 0..{INIT_STATES_PER_TASK - 1}")
    return [Episode(suite.name, t, k, int(cfg.seed)) for t in tasks for k in states]


def _output_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside a Hydra app (tests, notebooks)
        return Path(cfg.out)


def policy_name(cfg: DictConfig) -> str:
    """The policy config's name (`zero`, `pi05`, ...) when run through Hydra, else its class name."""
    try:
        from hydra.core.hydra_config import HydraConfig

        name = HydraConfig.get().runtime.choices.get("policy")
        if name:
            return str(name)
    except ValueError:
        pass
    return policy_label({"config": {"policy": OmegaConf.to_container(cfg.policy, resolve=True)}})


def _terminate_gracefully(*_):
    # SIGTERM (Slurm preemption, kill) unwinds like Ctrl-C, so workers and video files are closed.
    raise SystemExit(143)


def evaluate(cfg: DictConfig, out_dir: str | Path | None = None, policy=None, make_env=None) -> dict[str, Any]:
    """Run the evaluation `cfg` describes into `out_dir` (default: Hydra's run directory).

    `policy` replaces the one `cfg.policy` would build (for policies made in code); `make_env`
    replaces the worker environment factory (see runners.pool.make_worker_env).
    """
    out = Path(out_dir) if out_dir is not None else _output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    episodes = plan_episodes(cfg)
    if not cfg.env.get("cameras", True) and cfg.videos != "none":
        print("warning: env.cameras=false renders nothing, so the videos will be black; set videos=none",
              file=sys.stderr)
    chash = config_hash(cfg)
    results = ResultsLog(out, chash)
    done = results.done(retry_errors=bool(cfg.retry_errors))
    todo = [e for e in episodes if e.key not in done]
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    if len(todo) < len(episodes):
        print(f"Resuming in {out}: {len(episodes) - len(todo)} of {len(episodes)} episodes already done.")

    if todo:
        if policy is None:
            policy = build_policy(cfg)  # before any simulator: a missing checkpoint fails in seconds
        check_chunking(int(cfg.replan), cfg.chunking, getattr(policy, "chunk_size", None))
        previous = signal.signal(signal.SIGTERM, _terminate_gracefully) if _main_thread() else None
        env_kwargs = dict(OmegaConf.to_container(cfg.env, resolve=True), suite=cfg.suite, task_id=todo[0].task_id)
        max_steps = env_kwargs["max_steps"] or get_suite(cfg.suite).max_steps
        recorder = VideoRecorder(out / "videos", videos=cfg.videos, fps=int(cfg.video_fps), tag=chash[:8])
        progress = Progress(total=len(episodes), done=[results.records[e.key] for e in episodes if e.key in done])
        pool = EnvPool(min(int(cfg.num_envs), len(todo)), env_kwargs, cfg.vectorization,
                       **({"make_env": make_env} if make_env is not None else {}))
        settings = LoopSettings(replan=int(cfg.replan), chunking=cfg.chunking, ensemble_m=float(cfg.ensemble_m),
                                max_steps=max_steps, view=int(cfg.env.image_size))
        try:
            policy.reset()
            EvaluationLoop(policy, pool, results, settings, recorder, on_episode=progress.update).run(todo)
        finally:
            pool.close()
            progress.close()
            for err in recorder.close():
                print(f"warning: a video could not be written: {err}", file=sys.stderr)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    summary = summarize([results.records[e.key] for e in episodes if e.key in results.records])
    write_json(out / SUMMARY_FILE, {
        "config_hash": chash,
        "policy_name": policy_name(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance(),
        **summary,
    })
    tags = failure_markdown(summary)
    (out / SUMMARY_MD).write_text(markdown_table(summary) + (f"\n## Failure tags\n\n{tags}" if tags else ""),
                                  encoding="utf-8")
    print(text_table(summary))
    if summary["total"]["failures"]:
        print("\nepisodes by tag: " + ", ".join(f"{t} {n}" for t, n in summary["total"]["failures"].items()))
    page = write_review(out)
    videos = f"\nVideos: {out / 'videos'}" if (out / "videos").is_dir() else ""
    print(f"\nResults: {out / 'results.jsonl'}\nSummary: {out / SUMMARY_FILE}{videos}\nReview page: {page}")
    return summary


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    summary = evaluate(cfg)
    return summary["total"]["success_rate"]


if __name__ == "__main__":
    main()
