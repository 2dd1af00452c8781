"""Collect a sweep's jobs into sweep.csv, sweep.md, sweep.json and sweep.png.

One row per job (an evaluation directory with a summary.json): its settings (policy, suite, steps,
backend, replan, chunking, execution, latency, perturbation and severity), success rate with its
Wilson 95% CI, episodes, errors, policy-call latency p50/p95 and execution quality (delay, jerk,
chunk-boundary jump, held steps). sweep.png shows success (with CI bars) against the axis the sweep
varies: latency when it does (with the executed actions' jerk beside it), else perturbation
severity (with episode length), else denoising steps (with policy latency); one line per
combination of the other settings that vary. sweep.md and sweep.json add the paired comparisons of
every two jobs that differ in one setting (runners/compare.py); sweep.json also holds each job's
failure tags (runners/triage.py).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from runners.compare import markdown_table as paired_markdown
from runners.compare import sweep_comparisons
from runners.rundir import policy_label, read_summary, sweep_runs, upgrade_summary, write_json

COLUMNS = ["job", "policy", "suite", "steps", "backend", "replan", "chunking", "execution", "latency_ms", "perturb",
           "severity", "success_rate", "ci95_low", "ci95_high", "episodes", "errors", "latency_p50_ms",
           "latency_p95_ms", "delay_steps", "action_jerk", "chunk_boundary_jump", "held_steps"]
# What identifies a job's configuration in tables and plot legends (the x axis is taken out of it).
SETTINGS = ("policy", "suite", "backend", "steps", "replan", "chunking", "execution", "latency_ms", "perturb",
            "severity")
# The plot's x axis: the first of these the sweep varies (a latency study, a robustness sweep, steps).
AXES = {
    "latency_ms": ("simulated policy latency, ms (measured: the calls' p50)", "action_jerk",
                   "executed actions' jerk (mean |second difference|)"),
    "severity": ("perturbation severity", "mean_env_steps", "mean env steps of an episode"),
    "steps": ("denoising steps", "latency_p50_ms", "policy call latency, ms (p50)"),
}


def _severity(summary: dict[str, Any]) -> float | str | None:
    sev = summary.get("severity") or {}
    if not sev:
        return 0.0 if summary.get("perturb", "none") == "none" else None
    values = set(sev.values())
    return float(values.pop()) if len(values) == 1 else "+".join(f"{k}={v:g}" for k, v in sorted(sev.items()))


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    rows = []
    root = Path(sweep_dir)
    for run in sweep_runs(root)[0]:  # a failed or stopped job's old summary is not its result
        s = upgrade_summary(read_summary(run))
        cfg, total = s.get("config", {}), s["total"]
        latency = cfg.get("latency_ms", 0)
        rows.append({
            "job": str(run.relative_to(root)),
            "policy": policy_label(s),
            "suite": cfg.get("suite"),
            "steps": cfg.get("steps"),
            "backend": cfg.get("backend"),
            "replan": cfg.get("replan"),
            "chunking": cfg.get("chunking"),
            "execution": cfg.get("execution", "sync"),
            "latency_ms": latency if isinstance(latency, str) else float(latency or 0),
            "perturb": s.get("perturb", "none"),
            "severity": _severity(s),
            "success_rate": total["success_rate"],
            "ci95_low": total["ci95"][0],
            "ci95_high": total["ci95"][1],
            "episodes": total["episodes"],
            "errors": total["errors"],
            "mean_env_steps": total.get("mean_env_steps"),
            "latency_p50_ms": total["latency_p50_ms"],
            "latency_p95_ms": total["latency_p95_ms"],
            **{k: total.get(k) for k in ("delay_steps", "action_jerk", "chunk_boundary_jump", "held_steps")},
            "failures": total.get("failures", {}),
        })
    rows.sort(key=lambda r: tuple(str(r[k]) for k in SETTINGS if k not in ("steps", "latency_ms", "severity"))
              + tuple(_num(r, k) for k in ("steps", "latency_ms", "severity")))
    return rows


def _num(row: dict[str, Any], key: str) -> float:
    """A row's value on an axis as a number (measured latency: the calls' p50)."""
    v = row.get(key)
    if key == "latency_ms" and v == "measured":
        return float(row.get("latency_p50_ms") or 0.0)
    try:
        return float(v or 0)
    except (TypeError, ValueError):
        return float("nan")


def plot_axis(rows: list[dict[str, Any]]) -> str:
    """The axis the sweep varies: latency if it does, else severity, else denoising steps."""
    for axis in AXES:
        if len({str(r[axis]) for r in rows}) > 1:
            return axis
    return "steps"


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def write_markdown(rows: list[dict[str, Any]], path: Path, comparisons: list[dict[str, Any]] | None = None) -> None:
    head = ("| job | policy | suite | steps | backend | replan | chunking | execution | latency ms | perturb | severity "
            "| success % (95% CI) | episodes | errors | p50 ms | p95 ms | delay steps | jerk | boundary jump | held steps |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        succ = f"{_fmt(r['success_rate'], True)} [{_fmt(r['ci95_low'], True)}, {_fmt(r['ci95_high'], True)}]"
        cells = [r["job"], r["policy"], r["suite"], r["steps"], r["backend"], r["replan"], r["chunking"], r["execution"],
                 _fmt(r["latency_ms"]), r["perturb"], _fmt(r["severity"]), succ, r["episodes"], r["errors"],
                 _fmt(r["latency_p50_ms"]), _fmt(r["latency_p95_ms"]), _fmt(r["delay_steps"]), _fmt(r["action_jerk"]),
                 _fmt(r["chunk_boundary_jump"]), _fmt(r["held_steps"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if comparisons is not None:
        text += "\n## Paired comparisons\n\n" + paired_markdown(comparisons)
    path.write_text(text, encoding="utf-8")


def plot_series(rows: list[dict[str, Any]], axis: str) -> tuple[dict[str, list[tuple[float, dict]]], list[str]]:
    """The plot's lines: for each combination of the settings that vary besides the axis, its (axis
    value, row) points in axis order; and the jobs with no valid episode (every episode errored), whose
    success is unknown, not 0%: they are named on the plot instead of drawn at the bottom."""
    keys = [k for k in SETTINGS if k != axis and len({str(r[k]) for r in rows}) > 1]
    series: dict[str, list[tuple[float, dict]]] = defaultdict(list)
    for r in rows:
        label = " / ".join(f"{k}={r[k]}" for k in keys) or "all jobs"
        series[label].append((_num(r, axis), r))
    for pts in series.values():
        pts.sort(key=lambda p: p[0])
    return dict(series), [r["job"] for r in rows if r["success_rate"] is None]


def write_plot(rows: list[dict[str, Any]], path: Path) -> str:
    """Success (Wilson 95% CI bars) against the swept axis, one line per configuration, and the axis's
    companion metric beside it. Returns the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = plot_axis(rows)
    xlabel, metric, metric_label = AXES[axis]
    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series, no_episodes = plot_series(rows, axis)
    for label, pts in series.items():
        ok = [(x, r) for x, r in pts if r["success_rate"] is not None]
        if ok:
            y = [100 * r["success_rate"] for _, r in ok]
            err = [[yy - 100 * r["ci95_low"] for yy, (_, r) in zip(y, ok)],
                   [100 * r["ci95_high"] - yy for yy, (_, r) in zip(y, ok)]]
            ax_s.errorbar([x for x, _ in ok], y, yerr=err, marker="o", capsize=4, label=label)
        m = [(x, r[metric]) for x, r in pts if r.get(metric) is not None]
        if m:
            ax_m.plot([a for a, _ in m], [b for _, b in m], marker="o", label=label)
    if no_episodes:
        ax_s.text(0.01, 0.01, "no valid episode (left out): " + ", ".join(no_episodes), transform=ax_s.transAxes,
                  fontsize=7, color="crimson", va="bottom")
    xs = sorted({_num(r, axis) for r in rows})
    for ax in (ax_s, ax_m):
        ax.set_xlabel(xlabel)
        if axis == "steps" and xs and min(xs) > 0 and len(xs) > 1:
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{s:g}" for s in xs])
        ax.grid(alpha=0.3)
    ax_s.set_ylabel("success % (95% Wilson CI)")
    ax_s.set_ylim(-2, 102)
    ax_m.set_ylabel(metric_label)
    if ax_s.get_legend_handles_labels()[0]:
        ax_s.legend(fontsize=7)
    ax_s.set_title(f"Success vs {xlabel.split(',')[0].split(' (')[0]}")
    ax_m.set_title(metric_label.split(" (")[0].split(",")[0])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return axis


SWEEP_OUTPUTS = ("sweep.csv", "sweep.md", "sweep.json", "sweep.png")  # what write_aggregate writes


def write_aggregate(sweep_dir: str | Path) -> list[dict[str, Any]]:
    root = Path(sweep_dir)
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no job summaries (*/summary.json) under {root}: is this a sweep directory?")
    comparisons = sweep_comparisons(root)
    with open(root / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_markdown(rows, root / "sweep.md", comparisons)
    write_json(root / "sweep.json", {"jobs": rows, "paired_comparisons": comparisons})
    write_plot(rows, root / "sweep.png")
    return rows
