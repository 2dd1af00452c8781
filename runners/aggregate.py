"""Collect a sweep's jobs into sweep.csv, sweep.md, sweep.json and sweep.png.

One row per job (an evaluation directory with a summary.json): its config (policy, suite, steps,
backend, replan, chunking), success rate with its Wilson 95% CI, episodes, errors and policy-call
latency p50/p95. The plot shows success (with CI bars) and latency against denoising steps, one line
per (policy, suite, backend, replan, chunking). sweep.md and sweep.json add the paired comparisons
of every two jobs that differ in one setting (runners/compare.py); sweep.json also holds each job's
failure tags (runners/triage.py).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from runners.compare import markdown_table as paired_markdown
from runners.compare import sweep_comparisons
from runners.rundir import find_runs, policy_label, read_summary, upgrade_summary, write_json

COLUMNS = ["job", "policy", "suite", "steps", "backend", "replan", "chunking", "success_rate", "ci95_low",
           "ci95_high", "episodes", "errors", "latency_p50_ms", "latency_p95_ms"]
SERIES = ("policy", "suite", "backend", "replan", "chunking")


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    rows = []
    root = Path(sweep_dir)
    for run in find_runs(root):
        s = read_summary(run)
        if s is None or run == root:
            continue
        s = upgrade_summary(s)
        cfg, total = s.get("config", {}), s["total"]
        rows.append({
            "job": str(run.relative_to(root)),
            "policy": policy_label(s),
            "suite": cfg.get("suite"),
            "steps": cfg.get("steps"),
            "backend": cfg.get("backend"),
            "replan": cfg.get("replan"),
            "chunking": cfg.get("chunking"),
            "success_rate": total["success_rate"],
            "ci95_low": total["ci95"][0],
            "ci95_high": total["ci95"][1],
            "episodes": total["episodes"],
            "errors": total["errors"],
            "latency_p50_ms": total["latency_p50_ms"],
            "latency_p95_ms": total["latency_p95_ms"],
            "failures": total.get("failures", {}),
        })
    rows.sort(key=lambda r: tuple(str(r[k]) for k in SERIES) + (float(r["steps"] or 0),))
    return rows


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def write_markdown(rows: list[dict[str, Any]], path: Path, comparisons: list[dict[str, Any]] | None = None) -> None:
    head = "| job | policy | suite | steps | backend | replan | chunking | success % (95% CI) | episodes | errors | p50 ms | p95 ms |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        succ = f"{_fmt(r['success_rate'], True)} [{_fmt(r['ci95_low'], True)}, {_fmt(r['ci95_high'], True)}]"
        lines.append(f"| {r['job']} | {r['policy']} | {r['suite']} | {r['steps']} | {r['backend']} | {r['replan']} | "
                     f"{r['chunking']} | {succ} | {r['episodes']} | {r['errors']} | {_fmt(r['latency_p50_ms'])} | "
                     f"{_fmt(r['latency_p95_ms'])} |")
    text = "\n".join(lines) + "\n"
    if comparisons is not None:
        text += "\n## Paired comparisons\n\n" + paired_markdown(comparisons)
    path.write_text(text, encoding="utf-8")


def write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = defaultdict(list)
    for r in rows:
        series[tuple(r[k] for k in SERIES)].append(r)
    fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, rs in series.items():
        rs = sorted(rs, key=lambda r: float(r["steps"] or 0))
        x = [float(r["steps"] or 0) for r in rs]
        label = " / ".join(str(v) for v in key)
        y = [100 * (r["success_rate"] or 0.0) for r in rs]
        err = [[yy - 100 * r["ci95_low"] for yy, r in zip(y, rs)], [100 * r["ci95_high"] - yy for yy, r in zip(y, rs)]]
        ax_s.errorbar(x, y, yerr=err, marker="o", capsize=4, label=label)
        lat = [(float(r["steps"] or 0), r["latency_p50_ms"], r["latency_p95_ms"]) for r in rs if r["latency_p50_ms"] is not None]
        if lat:
            line, = ax_l.plot([a for a, _, _ in lat], [b for _, b, _ in lat], marker="o", label=f"{label} p50")
            ax_l.plot([a for a, _, _ in lat], [c for _, _, c in lat], ls="--", color=line.get_color(), alpha=0.6)
    steps = sorted({float(r["steps"] or 0) for r in rows})
    for ax in (ax_s, ax_l):
        ax.set_xlabel("denoising steps")
        if steps and min(steps) > 0 and len(steps) > 1:
            ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(steps)
        ax.set_xticklabels([f"{s:g}" for s in steps])
        ax.grid(alpha=0.3)
    ax_s.set_ylabel("success % (95% Wilson CI)")
    ax_s.set_ylim(-2, 102)
    ax_l.set_ylabel("policy call latency, ms (p50 solid, p95 dashed)")
    ax_s.legend(fontsize=7)
    ax_s.set_title("Success vs denoising steps")
    ax_l.set_title("Latency vs denoising steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
