"""The harness benchmark: how fast the main job runs on this machine, and where the time goes.

    python -m runners.bench_eval policy=pi05 policy.checkpoint=random backend=compile suite=libero_spatial \\
        num_envs=16 videos=none out=runs/bench

Takes runners.evaluate's overrides. Runs the evaluation as asked (`main/`), then, in the same process
and on the same machine, the serial loop users start from (`serial/`: openpi's example as it runs:
one environment, rendered every step, the simulator waiting for every policy call) on the first
`serial_episodes` episodes of the plan, and writes `bench_eval.json`:

    episodes_per_hour, env_steps_per_s        the main run's loop (start-up excluded), and `wall_s`
    serial_episodes_per_hour, speedup_vs_serial
    phases   seconds: policy (its own thread, overlapping the rest), input_prep and wait_env (main thread
             blocked on replies or the policy); physics, render, reset (summed over
             workers) and worker_idle (per worker, on average); cold start: policy_build, policy_prepare
             (compilation per batch bucket), pool_start
    gpu_util GPU utilisation and memory sampled every 0.5 s while the main run's loop ran (NVML)
    gpu, cpus, provenance (commit, versions), settings (the resolved config)

Steady-state rates are over the loop (every episode of the plan, from the first reset to the last
result). Episodes that run their whole `max_steps` (random weights) make the rate a bound on what a
real policy, whose successes end early, gets.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from envs.checks import check_int
from runners import CONF_DIR
from runners.evaluate import output_dir, evaluate, plan_episodes
from runners.rundir import RESULTS_FILE, write_json

RESULT_FILE = "bench_eval.json"


class GpuSampler:
    """Samples GPU utilisation and memory of every visible GPU through NVML in a background thread."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVML (no GPU, or nvidia-ml-py missing): nothing to sample
            self._nvml, self._handles = None, []

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            row = []
            for h in self._handles:
                util = self._nvml.nvmlDeviceGetUtilizationRates(h)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                row.append((util.gpu, mem.used / 2**30))
            self.samples.append(row)

    def __enter__(self):
        if self._handles:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> list[dict[str, float]] | None:
        if not self.samples:
            return None
        out = []
        for g in range(len(self.samples[0])):
            utils = sorted(s[g][0] for s in self.samples)
            out.append({"gpu": g, "util_mean_pct": round(sum(utils) / len(utils), 1),
                        "util_p50_pct": utils[len(utils) // 2], "mem_max_gib": round(max(s[g][1] for s in self.samples), 2),
                        "samples": len(utils)})
        return out


def _rates(summary: dict[str, Any]) -> dict[str, Any]:
    run = summary.get("run", {})
    loop_s = run.get("loop_s") or float("nan")
    phases = run.get("phases", {})
    episodes = summary["total"]["episodes"] + summary["total"]["errors"]
    return {
        "episodes": episodes,
        "loop_s": loop_s,
        "episodes_per_hour": round(3600 * episodes / loop_s, 1),
        "env_steps_per_s": round(phases.get("env_steps", 0) / loop_s, 1),
    }


def _phases(summary: dict[str, Any]) -> dict[str, Any]:
    run = summary.get("run", {})
    p = dict(run.get("phases", {}))
    n = run.get("num_envs") or 1
    busy = p.get("physics", 0) + p.get("render", 0) + p.get("reset", 0)
    p["worker_idle"] = round(max(0.0, run.get("loop_s", 0) - busy / n), 3)
    p["policy_build"] = run.get("policy_build_s")
    p["policy_prepare"] = run.get("policy_prepare_s")
    p["pool_start"] = run.get("pool_start_s")
    return p


def bench(cfg: DictConfig, out: Path) -> dict[str, Any]:
    from runners.provenance import provenance

    done = [d / RESULTS_FILE for d in (out / "main", out / "serial") if (d / RESULTS_FILE).is_file()]
    if done:  # an evaluation resumes a run directory: its rates would count episodes of the earlier run
        raise ValueError(f"{done[0]} already holds results, and a benchmark must time a fresh run: choose a new "
                         "out= (the default is a new time-stamped folder); nothing was changed there")
    # every setting of the serial part is checked before the main run: its timing is not to be lost to a typo
    n_serial = check_int("serial_episodes", cfg.serial_episodes, 1) if cfg.serial_baseline else 0
    limit = cfg.get("time_limit_s")
    if limit is not None:
        try:
            limit = float(limit)
        except (TypeError, ValueError):
            limit = float("nan")
        if not limit > 0:
            raise ValueError(f"time_limit_s must be a positive number of seconds or null, got {cfg.time_limit_s!r}")
    t0 = time.perf_counter()
    with GpuSampler() as gpu:
        main = evaluate(cfg, out / "main", stop_after_s=limit)
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {
        "command": "python -m runners.bench_eval " + " ".join(_overrides()),
        **_rates(main),
        "wall_s": round(wall, 1),
        "success_rate": main["total"]["success_rate"],
        "errors": main["total"]["errors"],
        "num_envs": main.get("run", {}).get("num_envs"),
        "planned_episodes": len(plan_episodes(cfg)),
        "time_limit_s": limit,
        "phases": _phases(main),
        "gpu_util": gpu.summary(),
        "cpus": os.cpu_count(),
        "provenance": provenance(),
        "settings": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out / RESULT_FILE, result)  # the main run's numbers, before the serial part (kept if it fails)
    if cfg.serial_baseline:
        serial_cfg = cfg.copy()
        n = n_serial
        with open_dict(serial_cfg):
            serial_cfg.num_envs = 1
            serial_cfg.vectorization = "sync"
            serial_cfg.render = "every_step"
            serial_cfg.videos = "none"
            plan = plan_episodes(cfg)[:n]
            serial_cfg.tasks = sorted({e.task_id for e in plan})
            serial_cfg.init_states = sorted({e.init_state_id for e in plan})
        serial = evaluate(serial_cfg, out / "serial")
        rates = _rates(serial)
        result["serial"] = {**rates, "phases": _phases(serial)}
        result["serial_episodes_per_hour"] = rates["episodes_per_hour"]
        result["speedup_vs_serial"] = round(result["episodes_per_hour"] / rates["episodes_per_hour"], 2)
    write_json(out / RESULT_FILE, result)
    return result


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench_eval")
def main(cfg: DictConfig) -> None:
    out = output_dir(cfg)
    result = bench(cfg, Path(out))
    keys = ("episodes", "episodes_per_hour", "env_steps_per_s", "serial_episodes_per_hour", "speedup_vs_serial",
            "wall_s")
    print(json.dumps({k: result.get(k) for k in keys}))
    print(f"phases: {json.dumps(result['phases'])}\ngpu: {json.dumps(result['gpu_util'])}")
    print(f"Benchmark: {Path(out) / RESULT_FILE}")


if __name__ == "__main__":
    main()
