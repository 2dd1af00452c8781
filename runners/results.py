"""Crash-safe episode results and their summary.

`results.jsonl` gets one JSON line per finished episode, appended, flushed and fsync'ed before the
runner moves on, so a killed run loses at most its in-flight episodes. Re-running into the same
directory reads the file back and skips what is done (episodes that ended in an error are retried,
and the newest line for an episode wins). A torn last line (killed mid-write) is ignored and kept.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def episode_key(rec: dict[str, Any]) -> tuple[str, int, int, int]:
    return (rec["suite"], int(rec["task_id"]), int(rec["init_state_id"]), int(rec["seed"]))


class ResultsLog:
    """Append-only episode log for one evaluation (one config) in one directory."""

    def __init__(self, out_dir: str | os.PathLike, config_hash: str):
        self.path = Path(out_dir) / RESULTS_FILE
        self.config_hash = config_hash
        self.records: dict[tuple, dict[str, Any]] = {}
        self.torn_lines = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        foreign = set()
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self.torn_lines += 1  # a line cut short by a kill; the episode is simply re-run
                    continue
                if rec.get("config_hash") != self.config_hash:
                    foreign.add(rec.get("config_hash"))
                    continue
                self.records[episode_key(rec)] = rec
        if foreign:
            raise ValueError(
                f"{self.path} holds results of another configuration (config hash {', '.join(map(str, foreign))}, "
                f"this run is {self.config_hash}). Results of different configurations are not mixed: choose a new "
                f"output directory (out=...), or restore the configuration those results were made with."
            )

    def done(self, retry_errors: bool = True) -> set[tuple]:
        return {k for k, r in self.records.items() if not (retry_errors and r.get("error"))}

    def append(self, rec: dict[str, Any]) -> None:
        rec = {**rec, "config_hash": self.config_hash}
        line = json.dumps(rec, default=_json_default)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # make sure a torn line from an earlier kill does not swallow this one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[episode_key(rec)] = rec


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def latency_stats(latencies_ms: Iterable[float]) -> dict[str, float | None]:
    lat = np.asarray(list(latencies_ms), dtype=np.float64)
    if lat.size == 0:
        return {"latency_p50_ms": None, "latency_p95_ms": None}
    return {"latency_p50_ms": float(np.percentile(lat, 50)), "latency_p95_ms": float(np.percentile(lat, 95))}


def _group_stats(recs: list[dict[str, Any]]) -> dict[str, Any]:
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
        "mean_steps": float(np.mean([r["steps"] for r in valid])) if valid else None,
        "policy_calls": len(lat),
        **latency_stats(lat),
    }


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per task and per suite: success rate with Wilson 95% CI (errors excluded), errors, steps, latency."""
    by_task: dict[tuple[str, int], list] = defaultdict(list)
    by_suite: dict[str, list] = defaultdict(list)
    for r in records:
        by_task[(r["suite"], int(r["task_id"]))].append(r)
        by_suite[r["suite"]].append(r)
    tasks = []
    for (suite, tid), recs in sorted(by_task.items()):
        tasks.append({"suite": suite, "task_id": tid, "task": recs[0].get("task", ""), **_group_stats(recs)})
    suites = {s: _group_stats(recs) for s, recs in sorted(by_suite.items())}
    everything = [r for recs in by_suite.values() for r in recs]
    return {"tasks": tasks, "suites": suites, "total": _group_stats(everything)}


def _pct(x: float | None) -> str:
    return "  -  " if x is None else f"{100 * x:5.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """The per-task table printed at the end of an evaluation."""
    head = f"{'suite':<15} {'task':>4}  {'success %':>9}  {'95% CI':>13}  {'eps':>4} {'err':>4} {'steps':>6}  {'p50 ms':>7} {'p95 ms':>7}  instruction"
    lines = [head, "-" * len(head)]

    def row(suite, tid, s, text=""):
        lo, hi = s["ci95"]
        return (f"{suite:<15} {tid:>4}  {_pct(s['success_rate']):>9}  [{100 * lo:5.1f},{100 * hi:5.1f}]  "
                f"{s['episodes']:>4} {s['errors']:>4} {_ms(s['mean_steps']):>6}  {_ms(s['latency_p50_ms']):>7} "
                f"{_ms(s['latency_p95_ms']):>7}  {text}")

    for t in summary["tasks"]:
        lines.append(row(t["suite"], t["task_id"], t, t["task"][:60]))
    lines.append("-" * len(head))
    for suite, s in summary["suites"].items():
        lines.append(row(suite, "all", s))
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """The per-task table as Markdown (written next to summary.json as summary.md)."""
    lines = ["| suite | task | instruction | success % | 95% CI | episodes | errors | mean steps |",
             "|---|---|---|---|---|---|---|---|"]

    def row(suite, tid, s, text=""):
        lo, hi = s["ci95"]
        return (f"| {suite} | {tid} | {text} | {_pct(s['success_rate']).strip()} | [{100 * lo:.1f}, {100 * hi:.1f}] | "
                f"{s['episodes']} | {s['errors']} | {_ms(s['mean_steps'])} |")

    for t in summary["tasks"]:
        lines.append(row(t["suite"], t["task_id"], t, t["task"]))
    for suite, s in summary["suites"].items():
        lines.append(row(f"**{suite}**", "all", s))
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write atomically (temp file + rename) so a kill never leaves half a summary behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
