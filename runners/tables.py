"""The per-task success table of a summary, rendered as text (the end of a run), Markdown
(summary.md) and HTML (review.html) from one list of rows, so the three always agree; and the
per-task table of failure tags (runners/triage.py) for summary.md."""

from __future__ import annotations

import html
from typing import Any

from runners.triage import TAGS


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def ci(s: dict[str, Any]) -> str:
    lo, hi = s["ci95"]
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


# (header, text width, cell) per column; the instruction column comes last (it is the widest).
COLUMNS: list[tuple[str, int, Any]] = [
    ("suite", 16, lambda r: r["suite"]),
    ("task", 4, lambda r: r["task_id"]),
    ("success %", 9, lambda r: pct(r["success_rate"])),
    ("95% CI", 14, ci),
    ("episodes", 8, lambda r: r["episodes"]),
    ("errors", 6, lambda r: r["errors"]),
    ("mean env steps", 14, lambda r: num(r.get("mean_env_steps"))),
    ("p50 ms", 7, lambda r: num(r["latency_p50_ms"])),
    ("p95 ms", 7, lambda r: num(r["latency_p95_ms"])),
    ("instruction", 0, lambda r: r.get("task", "")),
]


def task_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task, then one per suite (task `all`, bold where the format allows)."""
    rows = [dict(t, total=False) for t in summary.get("tasks", [])]
    rows += [dict(s, suite=name, task_id="all", task="", total=True) for name, s in summary.get("suites", {}).items()]
    return rows


def text_table(summary: dict[str, Any], instruction_width: int = 60) -> str:
    head = "  ".join(h.rjust(w) if w else h for h, w, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    rows = task_rows(summary)
    for r in rows:
        if r["total"] and not lines[-1].startswith("-"):
            lines.append("-" * len(head))
        cells = [str(cell(r)).rjust(w) if w else str(cell(r))[:instruction_width] for _, w, cell in COLUMNS]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in task_rows(summary):
        cells = [str(cell(r)) for _, _, cell in COLUMNS]
        if r["total"]:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_table(summary: dict[str, Any]) -> str:
    head = "".join(f"<th{' class=text' if h == 'instruction' else ''}>{html.escape(h)}</th>" for h, _, _ in COLUMNS)
    out = [f"<table><tr>{head}</tr>"]
    for r in task_rows(summary):
        cells = "".join(f"<td{' class=text' if h == 'instruction' else ''}>{html.escape(str(cell(r)))}</td>"
                        for h, _, cell in COLUMNS)
        out.append(f"<tr{' class=total' if r['total'] else ''}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def failure_markdown(summary: dict[str, Any]) -> str:
    """Failure tags per task and suite (episodes per tag, successes included), or "" when no episode has
    a tag (results written before triage existed)."""
    rows = task_rows(summary)
    seen = {t for r in rows for t in r.get("failures", {})}
    tags = [t for t in TAGS if t in seen] + sorted(seen - set(TAGS))
    if not tags:
        return ""
    lines = ["| suite | task | " + " | ".join(tags) + " |", "|" + "---|" * (len(tags) + 2)]
    for r in rows:
        suite = f"**{r['suite']}**" if r["total"] else r["suite"]
        lines.append(f"| {suite} | {r['task_id']} | " + " | ".join(str(r.get("failures", {}).get(t, 0)) for t in tags) + " |")
    return "\n".join(lines) + "\n"
