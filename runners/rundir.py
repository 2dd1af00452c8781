"""A run directory and its files: the one place that knows how results are written and read.

An evaluation's directory holds

    results.jsonl    one JSON line per finished episode, appended, flushed and fsync'ed before the
                     runner moves on (a killed run loses at most its in-flight episodes); the newest
                     line for an episode wins; a torn last line (killed mid-write) is ignored and kept
    summary.json     per task and suite: success with Wilson 95% CIs, errors, env steps, latency; the
                     resolved config, its hash, the policy's label and identity, provenance
    summary.md       the per-task table (runners/tables.py renders it)
    traces.jsonl     one JSON line per finished episode, written (like results.jsonl) just before its result
                     line: the privileged trace runners/triage.py classified the failure from
    provenance.jsonl one line per (re)start of the run: commit, versions, host, time
    config.yaml      the resolved config of the latest start
    videos/, review.html

A sweep's directory holds one such directory per job plus sweep.csv/.md/.png/.json (runners/aggregate.py).
Everything that reads these files (aggregate, review, compare, reproduce) goes through this module.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from runners.stats import wilson_interval

RESULTS_FILE = "results.jsonl"
TRACES_FILE = "traces.jsonl"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
PROVENANCE_FILE = "provenance.jsonl"
CONFIG_FILE = "config.yaml"
JOB_ERROR_FILE = "job_error.txt"  # a sweep job that failed: its traceback (runners/sweep.py)

# Fields renamed since the first results format; files written before keep working.
_RENAMED = {"steps": "env_steps"}

# Settings that choose which episodes run, or how fast, but not what an episode's result is: they stay
# out of the config hash (so a run can be resumed or extended with other values) and are not counted as
# differences when two runs are compared (conf/sweep.yaml's exclude_keys keeps most of them out of job
# directory names too).
NOT_HASHED = ("out", "tasks", "episodes", "init_states", "seeds", "num_envs", "vectorization", "videos", "video_fps",
              "video_stride", "render", "render_device", "retry_errors", "device", "host", "port", "serial_baseline",
              "serial_episodes", "time_limit_s", "reproduce", "worker_timeout_s")
# A remote policy's own settings: where the server is (not what it runs) and how long to wait for it.
REMOTE_NOT_HASHED = ("device", "host", "port", "api_key", "timeout_s")


def result_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (a plain dict, as in summary.json) that decides episode results."""
    data = {k: v for k, v in config.items() if k not in NOT_HASHED}
    if isinstance(data.get("policy"), dict):
        data["policy"] = {k: v for k, v in data["policy"].items() if k not in REMOTE_NOT_HASHED}
    perturb = data.get("perturb")
    if isinstance(perturb, dict) and "severity" in perturb:
        # perturb.severity, when set, is every selected kind's severity (runners/evaluate.py perturb_specs):
        # compare the severities the kinds ran with, not the group's two ways of saying them.
        shared = perturb["severity"]
        data["perturb"] = {k: ({**v, "severity": shared} if shared is not None and isinstance(v, dict) else v)
                           for k, v in perturb.items() if k != "severity"}
    return data


def episode_key(rec: dict[str, Any]) -> tuple[str, int, int, int]:
    return (rec["suite"], int(rec["task_id"]), int(rec["init_state_id"]), int(rec["seed"]))


def upgrade(rec: dict[str, Any]) -> dict[str, Any]:
    """A result line in today's field names (`steps` of the first format is `env_steps`)."""
    for old, new in _RENAMED.items():
        if old in rec and new not in rec:
            rec[new] = rec.pop(old)
    return rec


_NUMBER = (int, float)
# The result line's fields that pages and tables read, and the types they must have (None allowed for
# the optional ones): a hand-edited or foreign line with, say, markup in env_steps is skipped, not shown.
_FIELD_TYPES = {"suite": str, "task_id": int, "init_state_id": int, "seed": int, "success": bool, "env_steps": int,
                "error": str, "task": str, "failure": (str, type(None)), "video": (str, type(None)),
                "latency_p50_ms": (*_NUMBER, type(None)), "latency_p95_ms": (*_NUMBER, type(None))}


def check_record(rec: Any) -> dict[str, Any]:
    """A result line's record with its fields of the right types (ValueError naming the field if not),
    in today's field names. A video path must stay inside the run directory."""
    if not isinstance(rec, dict):
        raise ValueError(f"a result line is a JSON object, got {type(rec).__name__}")
    rec = upgrade(rec)
    for name, kind in _FIELD_TYPES.items():
        if name not in rec:
            if name in ("suite", "task_id", "init_state_id", "seed"):
                raise ValueError(f"result line without {name!r}")
            continue
        value, kinds = rec[name], kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is an int too
            raise ValueError(f"{name} is {value!r}, not {' or '.join(k.__name__ for k in kinds)}")
    video = rec.get("video")
    if video and (Path(video).is_absolute() or ".." in Path(video).parts):
        raise ValueError(f"video {video!r} points outside the run directory")
    return rec


def read_records(path: str | os.PathLike) -> tuple[dict[tuple, dict[str, Any]], int]:
    """Every episode's newest line of a results.jsonl (or of the run directory holding one), and the
    number of torn lines skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    records: dict[tuple, dict[str, Any]] = {}
    torn = 0
    with open(path, "rb") as f:  # decoded line by line: one corrupt line must not hide the others
        for raw in f:
            if not raw.strip():
                continue
            try:
                rec = check_record(json.loads(raw.decode("utf-8")))
                key = episode_key(rec)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                torn += 1  # a line cut short by a kill (the episode is simply re-run), or not ours
                continue
            records[key] = rec
    return records, torn


def read_traces(run_dir: str | os.PathLike) -> dict[tuple, dict[str, Any]]:
    """Every episode's newest line of a run directory's traces.jsonl ({} when there is none; torn lines
    are skipped as in `read_records`)."""
    path = Path(run_dir) / TRACES_FILE
    traces: dict[tuple, dict[str, Any]] = {}
    if not path.is_file():
        return traces
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line.decode("utf-8"))
                traces[episode_key(rec)] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return traces


class ResultsLog:
    """Append-only episode log for one evaluation (one config) in one directory."""

    def __init__(self, out_dir: str | os.PathLike, config_hash: str):
        self.path = Path(out_dir) / RESULTS_FILE
        self.config_hash = config_hash
        self.records: dict[tuple, dict[str, Any]] = {}
        self.torn_lines = 0
        if self.path.exists():
            records, self.torn_lines = read_records(self.path)
            foreign = {str(r.get("config_hash")) for r in records.values() if r.get("config_hash") != config_hash}
            if foreign:
                raise ValueError(
                    f"{self.path} holds results of another configuration (config hash {', '.join(sorted(foreign))}, "
                    f"this run is {config_hash}). Results of different configurations are not mixed: choose a new "
                    f"output directory (out=...), or restore the configuration those results were made with (results "
                    f"written before 2026-12-01 hash settings differently: finish those runs with the version that "
                    f"started them).")
            self.records = records

    def done(self, retry_errors: bool = True) -> set[tuple]:
        return {k for k, r in self.records.items() if not (retry_errors and r.get("error"))}

    def append(self, rec: dict[str, Any]) -> None:
        rec = {**rec, "config_hash": self.config_hash}
        append_line(self.path, rec)
        self.records[episode_key(rec)] = rec

    def append_trace(self, line: dict[str, Any]) -> None:
        """One episode's trace line (episode key fields, `failure`, `points`) to traces.jsonl; written
        before the episode's result line, so a result never lacks its trace (a re-run's newer line wins)."""
        append_line(self.path.parent / TRACES_FILE, {**line, "config_hash": self.config_hash})


def append_line(path: Path, rec: dict[str, Any]) -> None:
    """Append one JSON line, flushed and fsync'ed; a torn line left by an earlier kill is closed first."""
    line = json.dumps(rec, default=_json_default)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # make sure a torn line from an earlier kill does not swallow this one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write atomically (temp file + rename) so a kill never leaves half a summary behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def not_current(run: str | os.PathLike) -> str | None:
    """Why a run directory's summary does not stand for its latest run, or None when it does: its sweep
    job failed (JOB_ERROR_FILE; an old summary.json may still be there), it has no summary.json (stopped,
    killed, or still running), or its summary says it stopped before its plan was done."""
    run = Path(run)
    if (run / JOB_ERROR_FILE).is_file():
        return f"failed (traceback in {JOB_ERROR_FILE})"
    summary = read_summary(run)
    if summary is None:
        return "no summary.json (stopped before its end, or still running)"
    if summary.get("complete") is False:
        total = summary.get("total", {})
        done = (total.get("episodes") or 0) + (total.get("errors") or 0)
        return f"stopped after {done} of {summary.get('episodes_planned', '?')} episodes"
    return None


def sweep_runs(root: str | os.PathLike) -> tuple[list[Path], dict[Path, str]]:
    """A sweep's job directories (below root) whose summaries are current, and the others with why
    (`not_current`): tables and comparisons must not show a failed or stopped job's old numbers."""
    current, left_out = [], {}
    # A job that failed before its first episode (an unknown suite, a missing checkpoint) has only its
    # traceback: it must still be named, and fail the sweep.
    for run in sorted(_dirs_holding(root, RESULTS_FILE) | _dirs_holding(root, JOB_ERROR_FILE)):
        if run == Path(root):
            continue
        why = not_current(run)
        if why is None:
            current.append(run)
        else:
            left_out[run] = why
    return current, left_out


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every evaluation directory at or under `root` (a directory holding results.jsonl). Hidden
    folders *inside* root (.hydra, .submitit) are skipped; root itself may live anywhere (../run,
    ~/.cache/...)."""
    return sorted(_dirs_holding(root, RESULTS_FILE))


def _dirs_holding(root: str | os.PathLike, name: str) -> set[Path]:
    """The directories at or under root that hold a file `name`, outside hidden folders inside root."""
    root = Path(root)
    return {p.parent for p in root.rglob(name) if not any(part.startswith(".") for part in p.relative_to(root).parts)}


# ----- summaries -----------------------------------------------------------------------------------------

def latency_stats(latencies_ms: Iterable[float]) -> dict[str, float | None]:
    lat = np.asarray(list(latencies_ms), dtype=np.float64)
    if lat.size == 0:
        return {"latency_p50_ms": None, "latency_p95_ms": None}
    return {"latency_p50_ms": float(np.percentile(lat, 50)), "latency_p95_ms": float(np.percentile(lat, 95))}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def failure_counts(recs: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many episodes carry each `failure` tag (runners/triage.py), most frequent first; episodes
    written before tags existed are not counted."""
    counts = Counter(r["failure"] for r in recs if r.get("failure"))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def group_stats(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Success with its Wilson 95% CI (errors excluded), errors, mean env steps, latency, failure tags."""
    valid = [r for r in recs if not r.get("error")]
    succ = sum(bool(r["success"]) for r in valid)
    lo, hi = wilson_interval(succ, len(valid))
    lat = [x for r in recs for x in r.get("latencies_ms", [])]
    return {
        "episodes": len(valid),
        "successes": succ,
        "success_rate": succ / len(valid) if valid else None,
        "ci95": [lo, hi],
        "errors": len(recs) - len(valid),
        "mean_env_steps": _mean([r.get("env_steps") for r in valid]),
        "policy_calls": len(lat),
        **latency_stats(lat),
        # execution quality (runners/chunking.py), means over episodes that report it
        "action_jerk": _mean([r.get("action_jerk") for r in valid]),
        "chunk_boundary_jump": _mean([r.get("chunk_boundary_jump") for r in valid]),
        "held_steps": _mean([r.get("held_steps") for r in valid]),
        "delay_steps": _mean([r.get("delay_steps") for r in valid]),
        "failures": failure_counts(recs),
    }


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per task, per suite and in total: see `group_stats`."""
    by_task: dict[tuple[str, int], list] = defaultdict(list)
    by_suite: dict[str, list] = defaultdict(list)
    for r in records:
        r = upgrade(dict(r))
        by_task[(r["suite"], int(r["task_id"]))].append(r)
        by_suite[r["suite"]].append(r)
    tasks = []
    for (suite, tid), recs in sorted(by_task.items()):
        tasks.append({"suite": suite, "task_id": tid, "task": recs[0].get("task", ""), **group_stats(recs)})
    suites = {s: group_stats(recs) for s, recs in sorted(by_suite.items())}
    everything = [r for recs in by_suite.values() for r in recs]
    return {"tasks": tasks, "suites": suites, "total": group_stats(everything)}


def upgrade_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary.json of the first format (`mean_steps`) in today's names."""
    for group in [*summary.get("tasks", []), *summary.get("suites", {}).values(), summary.get("total", {})]:
        if "mean_steps" in group and "mean_env_steps" not in group:
            group["mean_env_steps"] = group.pop("mean_steps")
    return summary


def policy_label(summary: dict[str, Any]) -> str:
    """The policy's short name for tables: the config group choice (`pi05`, `zero`, ...) when known,
    else the class name of the policy's `_target_`."""
    if summary.get("policy_name"):
        return str(summary["policy_name"])
    target = (summary.get("config", {}).get("policy") or {}).get("_target_", "?")
    return str(target).rsplit(".", 1)[-1]
