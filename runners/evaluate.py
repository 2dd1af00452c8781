"""Evaluate a policy on a LIBERO suite: every task x init state, in parallel, resumable.

    python -m runners.evaluate policy=zero suite=libero_spatial tasks=[0,1] episodes=2 num_envs=2

Writes, in the run directory (`out=...`): results.jsonl (one line per episode, appended as episodes
finish), summary.json (success per task and suite with Wilson 95% CIs, latency, provenance),
videos/ and review.html. Running again with the same `out` finishes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from envs.checks import SEED_RANGE, check_env_settings, check_ids, check_int
from envs.suites import check_task_id, get_suite
from runners import CONF_DIR
from runners.build import PI05_TARGET, build_policy, explicit_overrides, is_remote, policy_identity
from runners.chunking import check_chunking
from runners.loop import EvaluationLoop, LoopSettings
from runners.policy_thread import PolicyThread
from runners.pool import VECTORIZATIONS, EnvPool, Episode, render_environ
from runners.progress import Progress
from runners.provenance import provenance
from runners.review import write_review
from runners.rundir import NOT_HASHED, REMOTE_NOT_HASHED  # noqa: F401  (moved to runners/rundir.py)
from runners.rundir import (CONFIG_FILE, PROVENANCE_FILE, SUMMARY_FILE, SUMMARY_MD, ResultsLog, append_line,
                            policy_label, result_settings, summarize, write_json)
from runners.tables import failure_markdown, markdown_table, text_table
from videos.recorder import VideoRecorder

def config_hash(cfg: DictConfig, identity: dict | None = None) -> str:
    """Hash of everything that decides an episode's result: the config (minus runners.rundir's
    NOT_HASHED and REMOTE_NOT_HASHED) and the policy's identity (runners/build.py policy_identity: a
    checkpoint's content, a server's model)."""
    data = result_settings(OmegaConf.to_container(cfg, resolve=True))
    # Settings in their normal form, so two spellings of one run share a hash (a resume is not refused):
    # the root steps and backend reach Pi0.5 as policy.num_steps and policy.backend (resolved above) and a
    # server through its identity, and other policies do not read them; latency 100 is latency 100.0;
    # perturb=lighting perturb.severity=0.5 is perturb.lighting.severity=0.5, defaults filled in.
    data.pop("steps", None)
    data.pop("backend", None)
    latency = parse_latency(cfg.get("latency_ms", 0))
    data["latency_ms"] = "measured" if latency is None else latency
    data["perturb"] = perturb_specs(cfg)
    if identity is not None:
        data["policy_identity"] = identity
        policy = data.get("policy")
        if isinstance(policy, dict) and "checkpoint_sha256" in identity:
            # the checkpoint's content is in the identity: its path is not a setting (a moved copy, another
            # node's mount point, a trailing slash), and the tokenizer's and norm stats' files count by content
            policy.pop("checkpoint", None)
            for key in ("tokenizer", "norm_stats"):
                if isinstance(policy.get(key), str) and Path(policy[key]).expanduser().is_file():
                    with open(Path(policy[key]).expanduser(), "rb") as f:
                        policy[key] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan_episodes(cfg: DictConfig) -> list[Episode]:
    """Every (task, init state, seed) the config asks for, after checking the ids against the suite (a
    LIBERO-PRO suite may lack tasks or have fewer init states: envs/suites.py). A repeated id is an
    error: its episode would run twice and count once."""
    suite = get_suite(cfg.suite)
    tasks = list(suite.task_ids) if cfg.tasks is None else check_ids("tasks", cfg.tasks)
    for t in tasks:
        check_task_id(suite.name, t)
    n = suite.init_states
    if cfg.init_states is not None:
        states = check_ids("init_states", cfg.init_states)
    else:
        states = list(range(check_int("episodes", cfg.episodes, 1, n)))
    bad = [k for k in states if not 0 <= k < n]
    if bad:
        raise ValueError(f"init_states {bad} out of range: {suite.name} tasks have init states 0..{n - 1}")
    if cfg.get("seeds") is None:
        seeds = [check_int("seed", cfg.seed, 0, SEED_RANGE - 1)]
    else:
        seeds = check_ids("seeds", cfg.seeds, 0, SEED_RANGE - 1)
    return [Episode(suite.name, t, k, sd) for sd in seeds for t in tasks for k in states]


def check_settings(cfg: DictConfig) -> None:
    """The settings no other check reads before the simulator starts: the env's sizes and step counts,
    video and process settings, the published table to reproduce."""
    env = cfg.env
    check_env_settings(**{k: env[k] for k in ("camera_size", "image_size", "settle_steps", "max_steps", "seed")
                          if k in env})
    check_int("video_fps", cfg.video_fps, 1, 240)
    check_int("video_stride", cfg.video_stride, 1)
    worker_timeout(cfg)
    if cfg.vectorization not in VECTORIZATIONS:
        raise ValueError(f"unknown vectorization {cfg.vectorization!r}; choose {' or '.join(VECTORIZATIONS)}")
    if str(cfg.policy.get("_target_", "")) == PI05_TARGET:  # before looking for its checkpoint
        from policy.backends import get_backend

        get_backend(str(cfg.policy.get("backend", "eager")))
    if cfg.get("reproduce"):
        from runners.reproduce import load_published

        tables = load_published()["tables"]
        if str(cfg.reproduce) not in tables:
            raise ValueError(f"reproduce={cfg.reproduce} is not a published table; choose one of "
                             f"{', '.join(sorted(tables))} (runners/published/libero.json)")


def perturb_specs(cfg: DictConfig) -> list[dict]:
    """The `perturb` group (conf/perturb/) as envs.perturb specs, checked; `perturb.severity`, when set,
    is every selected kind's severity."""
    from envs.perturb import normalize_specs

    group = dict(OmegaConf.to_container(cfg.get("perturb") or {}, resolve=True))
    shared = group.pop("severity", None)
    if shared is not None:
        group = {name: {**spec, "severity": shared} for name, spec in group.items()}
    if shared is not None and not group:
        raise ValueError(f"perturb.severity={shared} but no perturbation is selected: add perturb=<kind> "
                         f"(camera, lighting, image, robot_init, object_init, language)")
    return normalize_specs(group)


def output_dir(cfg: DictConfig) -> Path:
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


MAX_LATENCY_MS = 60_000.0


def parse_latency(value) -> float | None:
    """`latency_ms`: a number of milliseconds, or `measured` (None: each call's real latency)."""
    if isinstance(value, str) and value.strip().lower() == "measured":
        return None
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"latency_ms must be a number of milliseconds or 'measured', got {value!r}") from None
    if not 0 <= ms <= MAX_LATENCY_MS:  # NaN fails too; beyond a minute no chunk outlasts it anyway
        raise ValueError(f"latency_ms must be between 0 and {MAX_LATENCY_MS:g} ms, got {value!r}")
    return ms


def loop_settings(cfg: DictConfig) -> LoopSettings:
    max_steps = cfg.env.get("max_steps") or get_suite(cfg.suite).max_steps
    try:
        ensemble_m = float(cfg.ensemble_m)
    except (TypeError, ValueError):
        ensemble_m = float("nan")
    if not math.isfinite(ensemble_m):
        raise ValueError(f"ensemble_m must be a finite number (the ensemble's weight decay), got {cfg.ensemble_m!r}")
    return LoopSettings(replan=check_int("replan", cfg.replan, 1), chunking=cfg.chunking, ensemble_m=ensemble_m,
                        execution=str(cfg.execution), latency_ms=parse_latency(cfg.latency_ms),
                        max_steps=int(max_steps), view=int(cfg.env.image_size), video_stride=check_int("video_stride", cfg.video_stride, 1),
                        render=str(cfg.get("render", "on_demand")))


def _remote_settings(cfg: DictConfig, policy) -> None:
    """A remote policy runs the server's steps and backend: record those, and refuse a run that asks
    for others on the command line (its results would be labelled with settings it never ran)."""
    asked = explicit_overrides()
    for key, served in (("steps", getattr(policy, "num_steps", None)), ("backend", getattr(policy, "backend", None))):
        if key in asked and served is not None and str(cfg[key]) != str(served):
            raise ValueError(f"{key}={cfg[key]} was asked for, but the server at {policy.uri} runs {key}={served} "
                             f"(a remote policy runs the server's settings): drop the override, or start the "
                             f"server with {key}={cfg[key]}")
        with open_dict(cfg):
            cfg[key] = served  # None when the server does not say


def perturb_stamp(specs: list[dict]) -> dict[str, Any]:
    """What a result line records of the perturbations: their names and severities."""
    return {"perturb": "+".join(s["name"] for s in specs) or "none",
            "severity": {s["name"]: s["severity"] for s in specs}}


def resolve_num_envs(value) -> int:
    """`num_envs`: a number, or `auto`: 1.5 simulator processes per CPU core (a process waits while its
    slot's policy call runs, so a few more processes than cores keep the cores busy). On a 16-core H200
    box 24 processes stepped 327 env steps/s against 252 with 16 and 302 with 32
    (docs/benchmarks/h200-2026-12-01-scaling.json, README's GPU section)."""
    if str(value).strip().lower() == "auto":
        return max(1, round(1.5 * (os.cpu_count() or 2)))
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"num_envs must be a positive number or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"num_envs must be >= 1, got {n}")
    return n


def worker_timeout(cfg: DictConfig) -> float | None:
    value = cfg.get("worker_timeout_s", 300)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"worker_timeout_s must be a number of seconds > 0, or null to wait forever; got {value!r}")
    return seconds


def _terminate_gracefully(*_):
    # SIGTERM (Slurm preemption, kill) unwinds like Ctrl-C, so workers and video files are closed.
    raise SystemExit(143)


def evaluate(cfg: DictConfig, out_dir: str | Path | None = None, policy=None, make_env=None,
             stop_after_s: float | None = None) -> dict[str, Any]:
    """Run the evaluation `cfg` describes into `out_dir` (default: Hydra's run directory); returns
    what it writes to summary.json. `stop_after_s`: start no new episode after that many seconds of
    the loop (runners/bench_eval.py's time limit); the summary covers the episodes that ran.

    `policy` replaces the one `cfg.policy` would build (for policies made in code); `make_env`
    replaces the worker environment factory (see runners.pool.make_worker_env).
    """
    out = Path(out_dir) if out_dir is not None else output_dir(cfg)
    check_settings(cfg)
    episodes = plan_episodes(cfg)
    settings = loop_settings(cfg)  # a bad execution, latency or chunking setting fails here
    specs = perturb_specs(cfg)
    check_chunking(settings.replan, settings.chunking, None)
    resolve_num_envs(cfg.num_envs)
    render_environ(cfg.render_device)
    videos = str(cfg.videos)
    if not cfg.env.get("cameras", True) and videos != "none":
        print(f"note: env.cameras=false renders no frames, so no videos are written (videos={videos} ignored)",
              file=sys.stderr)
        videos = "none"
    if policy is None and is_remote(cfg):
        policy = build_policy(cfg)  # the server says what it runs; that is part of the config hash
    if policy is not None and is_remote(cfg):
        _remote_settings(cfg, policy)
    identity = policy_identity(cfg, policy)
    chash = config_hash(cfg, identity)
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsLog(out, chash)  # refuses results of another configuration before anything is written
    done = results.done(retry_errors=bool(cfg.retry_errors))
    if results.torn_lines:
        print(f"warning: {results.torn_lines} unreadable line(s) in {results.path} (cut short by a kill, or corrupt) "
              f"were skipped and left in the file; their episodes run again", file=sys.stderr)
    todo = [e for e in episodes if e.key not in done]
    OmegaConf.save(cfg, out / CONFIG_FILE, resolve=True)
    start = {"config_hash": chash, "policy_identity": identity, "episodes_planned": len(episodes),
             "episodes_to_run": len(todo), **provenance()}
    append_line(out / PROVENANCE_FILE, start)  # one line per (re)start: a resume never rewrites history
    if len(todo) < len(episodes):
        print(f"Resuming in {out}: {len(episodes) - len(todo)} of {len(episodes)} episodes already done.")

    startup: dict[str, Any] = {}

    def write_summary(complete: bool) -> dict[str, Any]:
        summary = {
            "config_hash": chash,
            "policy_name": policy_name(cfg),
            "policy_identity": identity,
            **perturb_stamp(specs),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "provenance": provenance(),
            "run": startup,  # this invocation's start-up parts, loop time and phases (runners/bench_eval.py)
            "episodes_planned": len(episodes),
            "complete": complete,  # False: stopped before the plan was done (sweep tables leave it out)
            **summarize([results.records[e.key] for e in episodes if e.key in results.records]),
        }
        write_json(out / SUMMARY_FILE, summary)
        tags = failure_markdown(summary)
        (out / SUMMARY_MD).write_text(markdown_table(summary) + (f"\n## Failure tags\n\n{tags}" if tags else ""),
                                      encoding="utf-8")
        return summary

    if todo:
        # results.jsonl is about to change: an old summary must not outlive it (a run killed outright leaves
        # none, which readers take as "not finished"; any other stop writes a partial one below)
        for stale in (SUMMARY_FILE, SUMMARY_MD):
            (out / stale).unlink(missing_ok=True)
        t0 = time.perf_counter()
        if policy is None:
            policy = build_policy(cfg)  # before any simulator: a missing checkpoint fails in seconds
        startup["policy_build_s"] = round(time.perf_counter() - t0, 2)
        check_chunking(settings.replan, settings.chunking, getattr(policy, "chunk_size", None),
                       delay_steps=settings.fixed_delay or 0)
        if settings.execution == "rtc" and not getattr(policy, "supports_rtc", False):
            raise ValueError(f"execution=rtc needs a policy that continues a previous chunk (Pi0.5); "
                             f"{policy_name(cfg)} does not: use execution=async")
        previous = signal.signal(signal.SIGTERM, _terminate_gracefully) if _main_thread() else None
        env_kwargs = dict(OmegaConf.to_container(cfg.env, resolve=True), suite=cfg.suite, task_id=todo[0].task_id)
        recorder = VideoRecorder(out / "videos", videos=videos, fps=int(cfg.video_fps), tag=chash[:8])
        progress = None
        stamp = {"git_commit": start.get("git_commit") or start.get("package_version"),
                 "checkpoint_sha256": (identity or {}).get("checkpoint_sha256"), **perturb_stamp(specs)}
        pool = None
        policy_thread = PolicyThread()  # every call into the policy, its preparation included, runs there
        finished = False
        try:
            t0 = time.perf_counter()
            num_envs = min(resolve_num_envs(cfg.num_envs), len(todo))
            print(f"Starting {num_envs} simulator worker(s) for {len(todo)} episode(s) of {cfg.suite}...", file=sys.stderr)
            environ = render_environ(cfg.render_device, getattr(policy, "device", None))
            startup["policy_device"] = str(getattr(policy, "device", "")) or None
            startup["worker_environ"] = environ
            pool = EnvPool(num_envs, env_kwargs, cfg.vectorization, wait=False, environ=environ, perturb=specs,
                           command_timeout_s=worker_timeout(cfg),
                           **({"make_env": make_env} if make_env is not None else {}))
            if hasattr(policy, "prepare"):  # compiles while the simulator workers start
                prepared = policy_thread.call(policy.prepare, pool.num_envs)
                if prepared:
                    print(f"Policy ready for batch sizes {sorted(prepared)} in {sum(prepared.values()):.1f} s "
                          "(compilation and graph capture, not counted as latency)", file=sys.stderr)
                startup["policy_prepare_s"] = {str(b): round(t, 2) for b, t in prepared.items()}
            pool.wait_ready()
            startup["pool_start_s"] = round(time.perf_counter() - t0, 2)
            progress = Progress(total=len(episodes), done=[results.records[e.key] for e in episodes if e.key in done])
            policy_thread.call(policy.reset)
            loop = EvaluationLoop(policy, pool, results, settings, recorder, on_episode=progress.update, stamp=stamp,
                                  policy_thread=policy_thread)
            t0 = time.perf_counter()
            loop.run(todo, stop_after_s=stop_after_s)
            startup["loop_s"] = round(time.perf_counter() - t0, 2)
            startup["num_envs"] = pool.num_envs
            startup["phases"] = loop.phases.as_dict()
            finished = True
        finally:
            policy_thread.close(wait=finished)  # unwinding (an error, Ctrl-C): a call in progress is not waited for
            if pool is not None:
                pool.close()
            if progress is not None:
                progress.close()
            for err in recorder.close():
                print(f"warning: a video could not be written: {err}", file=sys.stderr)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if not finished:  # stopped (an error, Ctrl-C, SIGTERM): the summary of what is recorded, marked
                try:
                    write_summary(complete=False)
                except Exception as exc:  # never hide the error that stopped the run
                    print(f"warning: no partial summary written: {exc}", file=sys.stderr)

    summary = write_summary(complete=all(e.key in results.records for e in episodes))
    print(text_table(summary))
    if summary["total"]["failures"]:
        print("\nepisodes by tag: " + ", ".join(f"{t} {n}" for t, n in summary["total"]["failures"].items()))
    page = write_review(out)
    videos = f"\nVideos: {out / 'videos'}" if (out / "videos").is_dir() else ""
    print(f"\nResults: {out / 'results.jsonl'}\nSummary: {out / SUMMARY_FILE}{videos}\nReview page: {page}")
    if cfg.get("reproduce") and not _in_multirun():  # a sweep checks all its jobs together at its end
        from runners.reproduce import markdown, report

        print(markdown(report(out, str(cfg.reproduce))))
    return summary


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"
    except ValueError:
        return False


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    summary = evaluate(cfg)
    return summary["total"]["success_rate"]


if __name__ == "__main__":
    main()
